/**
 * An upstream that receives injected credentials is reached over TLS
 * (optionally with a client certificate), over loopback or a unix socket, or
 * with an explicit `insecure: true`; any other address is a config error.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createSecureServer, createServer, type Http2Server, type Http2SecureServer, type ServerHttp2Stream, type IncomingHttpHeaders } from "node:http2";
import type { TLSSocket } from "node:tls";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client, credentials } from "@grpc/grpc-js";
import t from "tap";
import { natsConfigSection } from "../../common/nats.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { type AirlockError, Code, callUnary } from "../../common/index.js";
import { useInfra } from "../../harness/index.js";
import { descriptorSetPath } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { parseSidecarConfig, startSidecar } from "../../sidecar/index.js";
import { makeTestPki } from "../helpers/pki.js";

const { nats } = await useInfra(t, { nats: true });
const pki = makeTestPki();
t.teardown(() => pki.remove());
const dir = await mkdtemp(join(tmpdir(), "airlock-upstream-tls-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
await writeFile(join(dir, "broker.pem"), generateDecisionKey("k1").publicKeyPem);
await writeFile(join(dir, "policy.yaml"), "version: 1\ndefault: deny\nrules:\n  - id: status\n    match: { service: demo.v1.OpsService, method: GetStatus }\n    effect: allow\n    anonymous: true\n");

const tlsHostNats = natsConfigSection(await nats.credentials({ kind: "sidecar", host: "tls-host" }));

function config(upstream: Record<string, unknown>) {
  return parseSidecarConfig(
    new ConfigReader(
      {
        listen: "127.0.0.1:0",
        upstreams: [{ name: "ops", descriptor_sets: [descriptorSetPath], services: ["demo.v1.OpsService"], ...upstream }],
        nats: tlsHostNats,
        vault: { address: "http://127.0.0.1:1" },
        broker_keys: { k1: "broker.pem" },
        host: "tls-host",
        policy: "policy.yaml",
        metrics: { listen: "127.0.0.1:0" },
        log_level: "error",
      },
      "",
      join(dir, "sidecar.yaml"),
    ),
  );
}

function refusal(upstream: Record<string, unknown>): string {
  try {
    config(upstream);
  } catch (error) {
    return (error as AirlockError).rawMessage;
  }
  return "accepted";
}

/** Answers every call with one empty message and OK, remembering each call's headers and TLS peer. */
function answer(seen: Array<{ headers: IncomingHttpHeaders; peer: string }>) {
  return (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    const socket = stream.session?.socket as TLSSocket | undefined;
    seen.push({ headers, peer: typeof socket?.getPeerCertificate === "function" ? (socket.getPeerCertificate().subjectaltname ?? "") : "" });
    stream.on("data", () => undefined);
    stream.on("error", () => undefined);
    stream.once("end", () => {
      stream.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true });
      stream.once("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
      stream.end(Buffer.from([0, 0, 0, 0, 0]));
    });
  };
}

async function serve(server: Http2Server | Http2SecureServer, at: number | string): Promise<void> {
  await new Promise<void>((resolve) => (typeof at === "string" ? server.listen(at, resolve) : server.listen(at, "127.0.0.1", resolve)));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
}

await t.test("a non-loopback upstream needs tls or insecure: true; the config names the field", async (t) => {
  t.match(refusal({ address: "10.1.2.3:443" }), /upstreams\[0\]\.address.*not loopback.*cleartext/);
  t.match(refusal({ address: "ops:50051" }), /upstreams\[0\]\.address/);
  t.same(config({ address: "ops:50051", insecure: true }).upstreams[0]?.transport, { kind: "plaintext", why: "insecure" });
  t.same(config({ address: "127.0.0.1:50051" }).upstreams[0]?.transport, { kind: "plaintext", why: "loopback" });
  t.same(config({ address: "[::1]:50051" }).upstreams[0]?.transport, { kind: "plaintext", why: "loopback" });
  t.match(refusal({ address: "10.1.2.3:443", insecure: true, tls: {} }), /upstreams\[0\]\.insecure/);
  t.match(refusal({ address: "unix:relative.sock" }), /unix:\/absolute\/path/);
  t.match(refusal({ address: "10.1.2.3:443", tls: { cert: pki.path("agent.crt") } }), /both cert and key/);
  t.equal(config({ address: "10.1.2.3:443", tls: { ca: pki.path("ca.crt") } }).upstreams[0]?.transport.kind, "tls");
});

await t.test("TLS with a client certificate: the upstream sees https and the sidecar's certificate", async (t) => {
  const seen: Array<{ headers: IncomingHttpHeaders; peer: string }> = [];
  const server = createSecureServer({ key: pki.file("server.key"), cert: pki.file("server.crt"), ca: pki.file("ca.crt"), requestCert: true, rejectUnauthorized: true }, undefined);
  server.on("stream", answer(seen));
  server.on("sessionError", () => undefined);
  await serve(server, 0);
  const port = (server.address() as { port: number }).port;
  const sidecar = await startSidecar(config({ address: `127.0.0.1:${port}`, tls: { ca: pki.path("ca.crt"), cert: pki.path("agent.crt"), key: pki.path("agent.key") } }));
  t.teardown(() => sidecar.close());
  const client = new Client(sidecar.address, credentials.createInsecure());
  t.teardown(() => client.close());
  await callUnary(client, OpsService.method.getStatus, {});
  t.equal(seen[0]?.headers[":scheme"], "https");
  t.match(seen[0]?.peer, /spiffe:\/\/corp\/agent\/etl/, "the upstream verified the sidecar's client certificate");
});

await t.test("TLS to an upstream whose certificate the configured CA did not sign: UNAVAILABLE, nothing sent", async (t) => {
  const seen: Array<{ headers: IncomingHttpHeaders; peer: string }> = [];
  const server = createSecureServer({ key: pki.file("rogue.key"), cert: pki.file("rogue.crt") });
  server.on("stream", answer(seen));
  server.on("sessionError", () => undefined);
  server.on("tlsClientError", () => undefined);
  await serve(server, 0);
  const port = (server.address() as { port: number }).port;
  const sidecar = await startSidecar(config({ address: `127.0.0.1:${port}`, tls: { ca: pki.path("ca.crt") } }));
  t.teardown(() => sidecar.close());
  const client = new Client(sidecar.address, credentials.createInsecure());
  t.teardown(() => client.close());
  const error = (await callUnary(client, OpsService.method.getStatus, {}).catch((e: unknown) => e)) as AirlockError;
  t.equal(error.code, Code.Unavailable);
  t.equal(seen.length, 0);
});

await t.test("a unix socket upstream", async (t) => {
  const seen: Array<{ headers: IncomingHttpHeaders; peer: string }> = [];
  const server = createServer();
  server.on("stream", answer(seen));
  const path = join(dir, "ops.sock");
  await serve(server, path);
  const sidecar = await startSidecar(config({ address: `unix:${path}` }));
  t.teardown(() => sidecar.close());
  const client = new Client(sidecar.address, credentials.createInsecure());
  t.teardown(() => client.close());
  await callUnary(client, OpsService.method.getStatus, {});
  t.equal(seen[0]?.headers[":authority"], "localhost");
});
