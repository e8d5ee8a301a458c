import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client, credentials } from "@grpc/grpc-js";
import t from "tap";
import { natsSection, provisionStreams } from "../helpers/stack.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { type AirlockError, Code, callUnary } from "../../common/index.js";
import { startOpsServer } from "../../demo/ops/index.js";
import { useInfra } from "../../harness/index.js";
import { descriptorSetPath } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { parseSidecarConfig, startSidecar } from "../../sidecar/index.js";
import { makeTestPki } from "../helpers/pki.js";

const { nats } = await useInfra(t, { nats: true });
const pki = makeTestPki();
t.teardown(() => pki.remove());
const dir = await mkdtemp(join(tmpdir(), "airlock-mtls-sidecar-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const ops = await startOpsServer({ database: { host: "127.0.0.1", port: 1, database: "unused" }, vaultAddress: "http://127.0.0.1:1" });
t.teardown(() => ops.close());
await writeFile(join(dir, "broker.pem"), generateDecisionKey("k1").publicKeyPem);
// Only the agent the certificate names may call GetStatus: the condition reads the mTLS identity.
await writeFile(
  join(dir, "policy.yaml"),
  `version: 1
default: deny
rules:
  - id: etl-status
    match: { service: demo.v1.OpsService, method: GetStatus }
    when: 'identity.agent == "spiffe://corp/agent/etl" && identity.on_behalf_of == "alice@corp.com" && identity.authenticated_by == "mtls"'
    effect: allow
`,
);
await provisionStreams(nats);
const sidecarNats = natsSection(await nats.credentials({ kind: "sidecar", host: "mtls-host" }));
const sidecar = await startSidecar(
  parseSidecarConfig(
    new ConfigReader(
      {
        listen: "127.0.0.1:0",
        tls: { cert: pki.path("server.crt"), key: pki.path("server.key"), client_ca: pki.path("ca.crt") },
        upstreams: [{ name: "ops", address: ops.address, descriptor_sets: [descriptorSetPath] }],
        nats: sidecarNats,
        vault: { address: "http://127.0.0.1:1" },
        broker_keys: { k1: "broker.pem" },
        host: "mtls-host",
        policy: "policy.yaml",
        agent_auth: [{ kind: "mtls" }],
        metrics: { listen: "127.0.0.1:0" },
        log_level: "error",
      },
      "",
      join(dir, "sidecar.yaml"),
    ),
  ),
);
t.teardown(() => sidecar.close());

function clientWith(cert?: string): Client {
  const client = new Client(
    sidecar.address,
    cert === undefined ? credentials.createSsl(pki.file("ca.crt")) : credentials.createSsl(pki.file("ca.crt"), pki.file(`${cert}.key`), pki.file(`${cert}.crt`)),
  );
  t.teardown(() => client.close());
  return client;
}

await t.test("the agent's client certificate is its identity, through the TLS proxy", async (t) => {
  const status = await callUnary(clientWith("agent"), OpsService.method.getStatus, {});
  t.equal(status.service, "demo.v1.OpsService");
});

await t.test("no certificate is no identity: UNAUTHENTICATED, since no rule here is anonymous", async (t) => {
  const error = (await callUnary(clientWith(), OpsService.method.getStatus, {}).catch((e: unknown) => e)) as AirlockError;
  t.equal(error.code, Code.Unauthenticated);
  t.match(error.rawMessage, /needs an authenticated agent/);
});

await t.test("a certificate from another CA is refused as unauthenticated, not taken as no identity", async (t) => {
  const error = (await callUnary(clientWith("rogue"), OpsService.method.getStatus, {}).catch((e: unknown) => e)) as AirlockError;
  t.equal(error.code, Code.Unauthenticated);
  t.match(error.rawMessage, /not signed by a trusted CA/);
});
