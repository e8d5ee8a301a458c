/**
 * What probes and SREs see of a sidecar: grpc.health.v1.Health on the agent
 * port (answered by the sidecar, no identity needed, never forwarded) and the
 * process and runtime metrics on /metrics.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client, credentials, Metadata, type ClientReadableStream } from "@grpc/grpc-js";
import t from "tap";
import { natsConfigSection } from "../../common/nats.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { descriptorSetPath } from "../../proto/index.js";
import { parseSidecarConfig, startSidecar } from "../../sidecar/index.js";
import { healthRequestService } from "../../sidecar/health.js";
import { startRecordingUpstream } from "../../harness/recording-upstream.js";

const { nats } = await useInfra(t, { nats: true });
const dir = await mkdtemp(join(tmpdir(), "airlock-probes-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const upstream = await startRecordingUpstream();
t.teardown(() => upstream.close());
await writeFile(join(dir, "broker.pem"), generateDecisionKey("k1").publicKeyPem);
await writeFile(join(dir, "policy.yaml"), "version: 1\ndefault: deny\n");
const sidecar = await startSidecar(
  parseSidecarConfig(
    new ConfigReader(
      {
        listen: "127.0.0.1:0",
        upstreams: [{ name: "ops", address: upstream.address, descriptor_sets: [descriptorSetPath], services: ["demo.v1.OpsService"] }],
        nats: natsConfigSection(await nats.credentials({ kind: "sidecar", host: "probe-host" })),
        vault: { address: "http://127.0.0.1:1" },
        broker_keys: { k1: "broker.pem" },
        host: "probe-host",
        policy: "policy.yaml",
        metrics: { listen: "127.0.0.1:0" },
        log_level: "error",
      },
      "",
      join(dir, "sidecar.yaml"),
    ),
  ),
);
t.teardown(() => sidecar.close());
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

/** HealthCheckRequest { service } by hand: field 1, length-delimited. */
function healthRequest(service: string): Buffer {
  const name = Buffer.from(service, "utf8");
  return service === "" ? Buffer.alloc(0) : Buffer.concat([Buffer.from([0x0a, name.length]), name]);
}

function check(service: string): Promise<{ code: number; status?: number }> {
  return new Promise((resolve) =>
    client.makeUnaryRequest("/grpc.health.v1.Health/Check", (b: Buffer) => b, (b: Buffer) => b, healthRequest(service), new Metadata(), {}, (error, response) =>
      resolve(error === null ? { code: 0, ...(response === undefined ? {} : { status: response[1] ?? -1 }) } : { code: error.code }),
    ),
  );
}

await t.test("grpc.health.v1.Health/Check: SERVING for the sidecar and its services, NOT_FOUND for others, without identity", async (t) => {
  t.same(await check(""), { code: 0, status: 1 }, "the sidecar as a whole");
  t.same(await check("demo.v1.OpsService"), { code: 0, status: 1 }, "a fronted service");
  t.same(await check("other.v1.Nope"), { code: 5 }, "NOT_FOUND for a service it does not front");
  t.equal(upstream.calls.length, 0, "health calls are never forwarded");
});

await t.test("Check says NOT_SERVING while NATS is away, like /readyz, and SERVING again after", async (t) => {
  await nats.pause();
  t.ok(await waitUntil(async () => (await check("")).status === 2, 15_000), "NOT_SERVING");
  await nats.resume();
  t.ok(await waitUntil(async () => (await check("")).status === 1, 15_000), "SERVING again");
});

await t.test("Watch sends the current status and stays open until cancelled", async (t) => {
  const stream: ClientReadableStream<Buffer> = client.makeServerStreamRequest("/grpc.health.v1.Health/Watch", (b: Buffer) => b, (b: Buffer) => b, healthRequest(""), new Metadata(), {});
  const first = await new Promise<Buffer>((resolve) => stream.once("data", resolve));
  t.same([...first], [0x08, 0x01], "SERVING");
  const ended = new Promise<number>((resolve) => stream.once("error", (error: { code: number }) => resolve(error.code)).once("end", () => resolve(-1)));
  stream.cancel();
  t.equal(await ended, 1, "ended by the client's cancel (CANCELLED), not by the server");
});

await t.test("HealthCheckRequest parsing skips unknown fields and refuses truncated input", async (t) => {
  t.equal(healthRequestService(Buffer.from([0x10, 0x05, 0x0a, 0x01, 0x61])), "a");
  t.equal(healthRequestService(Buffer.from([0x0a, 0x05, 0x61])), undefined);
  t.equal(healthRequestService(Buffer.from([0x0b])), undefined, "wire type 3 (groups) is refused");
});

await t.test("/metrics has process and runtime metrics, event-loop lag included", async (t) => {
  const text = await (await fetch(`http://127.0.0.1:${sidecar.metricsPort}/metrics`)).text();
  for (const name of ["process_cpu_seconds_total", "process_resident_memory_bytes", "nodejs_heap_size_used_bytes", "nodejs_eventloop_lag_seconds", "nodejs_eventloop_lag_p99_seconds"]) {
    t.match(text, new RegExp(`^${name} `, "m"), name);
  }
});
