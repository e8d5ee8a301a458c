/**
 * The sidecar's one identity boundary (issue 14): the same authenticator decides
 * who calls on the allow fast path and on the slow path, the header the agent's
 * token came in never reaches the upstream, and an unverified client
 * certificate is refused the same way everywhere. The upstream is a real
 * HTTP/2 server that records the headers it receives.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import { natsConfigSection } from "../../common/nats.js";
import { exportSPKI, generateKeyPair, SignJWT } from "jose";
import t, { type Test } from "tap";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { type AirlockError, Code, callServerStream, callUnary } from "../../common/index.js";
import { useInfra } from "../../harness/index.js";
import { descriptorSetPath } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { parseSidecarConfig, startSidecar } from "../../sidecar/index.js";
import { makeTestPki } from "../helpers/pki.js";
import { startRecordingUpstream } from "../../harness/recording-upstream.js";

const { nats } = await useInfra(t, { nats: true });
const pki = makeTestPki();
t.teardown(() => pki.remove());
const dir = await mkdtemp(join(tmpdir(), "airlock-identity-boundary-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const upstream = await startRecordingUpstream();
t.teardown(() => upstream.close());
const agentKeys = await generateKeyPair("EdDSA");
await writeFile(join(dir, "broker.pem"), generateDecisionKey("k1").publicKeyPem);
await writeFile(
  join(dir, "policy.yaml"),
  `version: 1
default: deny
rules:
  - id: status
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
  - id: export-etl
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: 'identity.agent == "spiffe://corp/agent/etl"'
    effect: allow
  - id: grants-anyone
    match: { service: demo.v1.OpsService, method: GrantRole }
    effect: allow
    anonymous: true
`,
);
const sidecar = await startSidecar(
  parseSidecarConfig(
    new ConfigReader(
      {
        listen: "127.0.0.1:0",
        tls: { cert: pki.path("server.crt"), key: pki.path("server.key"), client_ca: pki.path("ca.crt") },
        upstreams: [{ name: "ops", address: upstream.address, descriptor_sets: [descriptorSetPath], services: ["demo.v1.OpsService"] }],
        nats: natsConfigSection(await nats.credentials({ kind: "sidecar", host: "identity-host" })),
        vault: { address: "http://127.0.0.1:1" },
        broker_keys: { k1: "broker.pem" },
        host: "identity-host",
        policy: "policy.yaml",
        agent_auth: [
          { kind: "mtls" },
          { kind: "jwt", issuer: "https://idp.test", audience: "airlock", keys: { kind: "static", public_keys: [await exportSPKI(agentKeys.publicKey)] } },
        ],
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
const tokenOnly = clientWith();

function token(subject = "spiffe://corp/agent/etl"): Promise<string> {
  return new SignJWT({ act_for: "alice@corp" })
    .setProtectedHeader({ alg: "EdDSA" })
    .setSubject(subject)
    .setIssuer("https://idp.test")
    .setAudience("airlock")
    .setExpirationTime("5m")
    .sign(agentKeys.privateKey);
}

function metadata(entries: Record<string, string>): Metadata {
  const m = new Metadata();
  for (const [key, value] of Object.entries(entries)) m.set(key, value);
  return m;
}

async function failure(promise: Promise<unknown>): Promise<AirlockError> {
  try {
    await promise;
  } catch (error) {
    return error as AirlockError;
  }
  throw new Error("expected the call to fail");
}

async function drain(stream: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of stream) void _;
}

/** The headers of the one call the upstream receives while `run` runs. */
async function forwardedHeaders(t: Test, run: () => Promise<unknown>): Promise<Readonly<Record<string, unknown>>> {
  const before = upstream.calls.length;
  await run();
  t.equal(upstream.calls.length, before + 1, "exactly one call reached the upstream");
  return upstream.calls[upstream.calls.length - 1] ?? {};
}

await t.test("allow fast path: the agent's bearer token never reaches the upstream", async (t) => {
  const agentToken = await token();
  for (let i = 0; i < 2; i++) {
    // The second call is answered from the authenticator's cache of verified tokens: still stripped.
    const seen = await forwardedHeaders(t, () => callUnary(tokenOnly, OpsService.method.getStatus, {}, { metadata: metadata({ authorization: `Bearer ${agentToken}`, "x-keep": "yes" }) }));
    t.equal(seen.authorization, undefined, `call ${i + 1}: no authorization header upstream`);
    t.notMatch(JSON.stringify(seen), agentToken, `call ${i + 1}: the token appears in no header`);
    t.equal(seen["x-keep"], "yes", "other metadata passes");
  }
  const viaHeader = await forwardedHeaders(t, () => callUnary(tokenOnly, OpsService.method.getStatus, {}, { metadata: metadata({ "x-airlock-agent-token": agentToken }) }));
  t.equal(viaHeader["x-airlock-agent-token"], undefined, "x-airlock-agent-token is not forwarded either");
});

await t.test("slow path: a token in x-airlock-agent-token next to a non-bearer authorization is the agent's identity, not INTERNAL", async (t) => {
  const basic = "Basic dXNlcjpwYXNz";
  const etl = await token();
  const seen = await forwardedHeaders(t, () => drain(callServerStream(tokenOnly, OpsService.method.exportTable, { table: "t" }, { metadata: metadata({ authorization: basic, "x-airlock-agent-token": etl }) })));
  t.equal(seen["x-airlock-agent-token"], undefined, "the consumed token header is stripped");
  t.equal(seen.authorization, basic, "an authorization that is not an agent token is the upstream's business");
  // Same authorization, another agent's token: its own identity decides (the condition names etl only).
  const other = await failure(
    drain(callServerStream(tokenOnly, OpsService.method.exportTable, { table: "t" }, { metadata: metadata({ authorization: basic, "x-airlock-agent-token": await token("spiffe://corp/agent/other") }) })),
  );
  t.equal(other.code, Code.PermissionDenied, `another agent's token gets its own identity (${other.rawMessage})`);
  const slowBearer = await forwardedHeaders(t, () => drain(callServerStream(tokenOnly, OpsService.method.exportTable, { table: "t" }, { metadata: metadata({ authorization: `Bearer ${etl}` }) })));
  t.equal(slowBearer.authorization, undefined, "a bearer agent token is stripped on the slow path too");
});

await t.test("an unverified client certificate is refused on both paths, even with a valid token", async (t) => {
  const rogue = clientWith("rogue");
  const agentToken = await token();
  const before = upstream.calls.length;
  const fast = await failure(callUnary(rogue, OpsService.method.getStatus, {}, { metadata: metadata({ authorization: `Bearer ${agentToken}` }) }));
  t.equal(fast.code, Code.Unauthenticated, `fast path: ${fast.rawMessage}`);
  t.match(fast.rawMessage, /not signed by a trusted CA/);
  const slow = await failure(drain(callServerStream(rogue, OpsService.method.exportTable, { table: "t" }, { metadata: metadata({ authorization: `Bearer ${agentToken}` }) })));
  t.equal(slow.code, Code.Unauthenticated, `slow path: ${slow.rawMessage}`);
  t.equal(upstream.calls.length, before, "nothing was forwarded");
});

await t.test("a verified client certificate is the identity on both paths; a token sent with it is still not forwarded", async (t) => {
  const agent = clientWith("agent");
  const agentToken = await token("spiffe://corp/agent/other");
  const seen = await forwardedHeaders(t, () => drain(callServerStream(agent, OpsService.method.exportTable, { table: "t" }, { metadata: metadata({ authorization: `Bearer ${agentToken}` }) })));
  t.equal(seen.authorization, undefined, "the certificate decided (etl), and the token did not travel on");
  const fast = await forwardedHeaders(t, () => callUnary(agent, OpsService.method.getStatus, {}));
  t.equal(fast.authorization, undefined);
});

await t.test("every call needs an authenticated agent unless its rule says anonymous: true", async (t) => {
  const before = upstream.calls.length;
  const fast = await failure(callUnary(tokenOnly, OpsService.method.getStatus, {}));
  t.equal(fast.code, Code.Unauthenticated, "fast path without a credential");
  t.match(fast.rawMessage, /rule status is not anonymous/);
  const slow = await failure(drain(callServerStream(tokenOnly, OpsService.method.exportTable, { table: "t" })));
  t.equal(slow.code, Code.Unauthenticated, "slow path without a credential");
  const denied = await failure(callUnary(tokenOnly, OpsService.method.rotateKey, { keyId: "k" }));
  t.equal(denied.code, Code.Unauthenticated, "the default verdict is not anonymous either");
  t.equal(upstream.calls.length, before, "none of them was forwarded");

  await forwardedHeaders(t, () => callUnary(tokenOnly, OpsService.method.grantRole, { user: "u", role: "r" }));
  const agentToken = await token();
  const seen = await forwardedHeaders(t, () => callUnary(tokenOnly, OpsService.method.grantRole, { user: "u", role: "r" }, { metadata: metadata({ authorization: `Bearer ${agentToken}` }) }));
  t.equal(seen.authorization, undefined, "an anonymous rule still strips a presented token");
  const bad = await failure(callUnary(tokenOnly, OpsService.method.grantRole, { user: "u", role: "r" }, { metadata: metadata({ "x-airlock-agent-token": "not-a-jwt" }) }));
  t.equal(bad.code, Code.Unauthenticated, "a presented token that does not verify is refused, anonymous rule or not");
});
