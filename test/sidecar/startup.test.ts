/**
 * A sidecar may start before any broker: it may not create the streams itself
 * (its credential has no such right), so it waits for a broker to create them.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import t from "tap";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { createLogger } from "../../common/logger.js";
import { useInfra } from "../../harness/index.js";
import { descriptorSetPath } from "../../proto/index.js";
import { parseSidecarConfig, type Sidecar, startSidecar } from "../../sidecar/index.js";
import { natsSection, provisionStreams } from "../helpers/stack.js";

const { nats } = await useInfra(t, { nats: true });
const dir = await mkdtemp(join(tmpdir(), "airlock-sidecar-startup-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
await writeFile(join(dir, "broker.pem"), generateDecisionKey("k1").publicKeyPem);
await writeFile(join(dir, "policy.yaml"), "version: 1\ndefault: deny\nrules: []\n");
const config = parseSidecarConfig(
  new ConfigReader(
    {
      listen: "127.0.0.1:0",
      upstreams: [{ name: "ops", address: "127.0.0.1:1", descriptor_sets: [descriptorSetPath] }],
      nats: natsSection(await nats.credentials({ kind: "sidecar", host: "early-host" })),
      vault: { address: "http://127.0.0.1:1" },
      broker_keys: { k1: "broker.pem" },
      host: "early-host",
      policy: "policy.yaml",
      metrics: { listen: "127.0.0.1:0" },
      log_level: "error",
    },
    "",
    join(dir, "sidecar.yaml"),
  ),
);

await t.test("a sidecar started before the streams exist waits for a broker to create them", async (t) => {
  const lines: string[] = [];
  const sink = new PassThrough();
  sink.on("data", (chunk: Buffer) => lines.push(chunk.toString()));
  const log = createLogger({ name: "sidecar", level: "warn", destination: sink });
  let started: Sidecar | undefined;
  const starting = startSidecar(config, { log }).then((sidecar) => (started = sidecar));
  t.teardown(async () => {
    await starting.catch(() => undefined);
    await started?.close();
  });
  await new Promise<void>((resolve) => {
    const check = setInterval(() => {
      if (lines.some((line) => line.includes("waiting for a broker to create the streams"))) {
        clearInterval(check);
        resolve();
      }
    }, 20);
  });
  t.equal(started, undefined, "not started while the decisions stream is missing");
  await provisionStreams(nats);
  const sidecar = await starting;
  t.ok(sidecar.port > 0, "it starts once the streams exist");
});
