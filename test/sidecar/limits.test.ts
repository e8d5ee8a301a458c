/**
 * The data plane's limits (sidecar/h2/limits.ts): each is hit by an offender,
 * who is refused with the right HTTP/2 or gRPC error and counted in
 * airlock_sidecar_limit_hits_total, while other agents' calls keep working.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer as createHttp2Server, type IncomingHttpHeaders, type ServerHttp2Session, type ServerHttp2Stream } from "node:http2";
import { type AddressInfo, connect as netConnect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client, credentials, type Metadata } from "@grpc/grpc-js";
import { create, toBinary } from "@bufbuild/protobuf";
import { exportSPKI, generateKeyPair } from "jose";
import t from "tap";
import { provisionStreams } from "../helpers/stack.js";
import { natsConfigSection } from "../../common/nats.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { type AirlockError, Code, callBidiStream, callClientStream, callUnary } from "../../common/index.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { descriptorSetPath } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { encodeHeaderBlock } from "../../sidecar/h2/hpack.js";
import { parseSidecarConfig, type Sidecar, startSidecar } from "../../sidecar/index.js";
import { agentMetadata } from "../helpers/agent.js";
import { clientPreface, FrameSplitter, frame, frameFlag, frameType, settingsFrame } from "../helpers/h2-frames.js";

const { nats } = await useInfra(t, { nats: true });
const hNats = natsConfigSection(await nats.credentials({ kind: "sidecar", host: "h" }));
// No broker here: the streams a sidecar publishes into are made as an operator would.
await provisionStreams(nats);
const dir = await mkdtemp(join(tmpdir(), "airlock-limits-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
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
    anonymous: true
  - id: tail
    match: { service: demo.v1.OpsService, method: Tail }
    effect: allow
  - id: rotate
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    approve: { risk: low, reviewers: { all_of: [{ group: security }] }, credential: { kind: vault_token, policies: [default] }, timeout: 1m }
  - id: import
    match: { service: demo.v1.OpsService, method: ImportRows }
    effect: approve
    approve: { risk: low, reviewers: { all_of: [{ group: security }] }, credential: { kind: database, mount: database, role: import }, timeout: 1m }
`,
);

// --- an upstream with a reset budget of its own, like a server protecting itself from rapid reset:
// a session that cancels more than 20 streams is destroyed, with every call on it.
const resetBudget = 20;
const upstreamSessions = new Set<ServerHttp2Session>();
let sessionsKilled = 0;
const upstream = createHttp2Server();
upstream.on("session", (session) => {
  upstreamSessions.add(session);
  session.once("close", () => upstreamSessions.delete(session));
  let resets = 0;
  session.on("stream", (stream: ServerHttp2Stream) => {
    stream.once("close", () => {
      if (stream.rstCode !== 0 && ++resets > resetBudget && !session.destroyed) {
        sessionsKilled++;
        session.destroy();
      }
    });
  });
});
upstream.on("stream", (stream: ServerHttp2Stream, _headers: IncomingHttpHeaders) => {
  stream.on("error", () => undefined);
  stream.on("data", () => undefined);
  stream.once("end", () => {
    if (stream.destroyed) return;
    stream.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true });
    stream.once("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
    stream.end(Buffer.from([0, 0, 0, 0, 0]));
  });
});
await new Promise<void>((resolve) => upstream.listen(0, "127.0.0.1", resolve));
t.teardown(
  () =>
    new Promise<void>((resolve) => {
      upstream.close(() => resolve());
      for (const session of upstreamSessions) session.destroy();
    }),
);
const upstreamAddress = `127.0.0.1:${(upstream.address() as AddressInfo).port}`;
const agentPem = await exportSPKI(agentKeys.publicKey);

async function sidecarWith(limits: Record<string, unknown>): Promise<Sidecar> {
  const sidecar = await startSidecar(
    parseSidecarConfig(
      new ConfigReader(
        {
          listen: "127.0.0.1:0",
          upstreams: [{ name: "ops", address: upstreamAddress, descriptor_sets: [descriptorSetPath], services: ["demo.v1.OpsService"] }],
          nats: natsConfigSection(await nats.credentials({ kind: "sidecar", host: "limits-host" })),
          vault: { address: "http://127.0.0.1:1" },
          broker_keys: { k1: "broker.pem" },
          host: "limits-host",
          policy: "policy.yaml",
          agent_auth: [{ kind: "jwt", issuer: "https://idp.test", audience: "airlock", keys: { kind: "static", public_keys: [agentPem] } }],
          limits,
          metrics: { listen: "127.0.0.1:0" },
          log_level: "error",
        },
        "",
        join(dir, "sidecar.yaml"),
      ),
    ),
  );
  t.teardown(() => sidecar.close());
  return sidecar;
}

function clientOf(sidecar: Sidecar): Client {
  const client = new Client(sidecar.address, credentials.createInsecure());
  t.teardown(() => client.close());
  return client;
}

const agent = (subject: string, extra: Record<string, string> = {}): Promise<Metadata> =>
  agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock", subject }, extra);

/** Waits for a synchronous condition. */
function until(check: () => boolean, ms: number): Promise<boolean> {
  return waitUntil(() => Promise.resolve(check()), ms);
}

async function hits(sidecar: Sidecar, limit: string): Promise<number> {
  return (await sidecar.metrics.limitHits.get()).values.find((v) => v.labels.limit === limit)?.value ?? 0;
}

async function failure(promise: Promise<unknown>): Promise<AirlockError> {
  try {
    await promise;
  } catch (error) {
    return error as AirlockError;
  }
  throw new Error("expected the call to fail");
}

/** A raw TCP connection to the sidecar from a chosen loopback address, recording what it receives. */
class Raw {
  readonly frames: Array<{ type: number; streamId: number; payload: Buffer }> = [];
  closed = false;
  private readonly splitter = new FrameSplitter();
  constructor(readonly socket: Socket) {
    socket.on("data", (chunk: Buffer) => this.frames.push(...this.splitter.push(chunk)));
    socket.on("error", () => undefined);
    socket.once("close", () => (this.closed = true));
  }
  static async open(port: number, from: string, handshake = true): Promise<Raw> {
    const socket = netConnect({ host: "127.0.0.1", port, localAddress: from });
    t.teardown(() => socket.destroy());
    const raw = new Raw(socket);
    await new Promise((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    if (handshake) socket.write(Buffer.concat([clientPreface, settingsFrame([])]));
    return raw;
  }
  goaway(): number | undefined {
    const goaway = this.frames.find((f) => f.type === frameType.goaway);
    return goaway?.payload.readUInt32BE(4);
  }
  /** Sends an anonymous GetStatus on `streamId` and waits for its trailers. */
  async call(streamId: number): Promise<boolean> {
    const block = encodeHeaderBlock([
      [":method", "POST"],
      [":scheme", "http"],
      [":path", "/demo.v1.OpsService/GetStatus"],
      [":authority", "limits.test"],
      ["content-type", "application/grpc"],
      ["te", "trailers"],
    ]);
    this.socket.write(Buffer.concat([frame(frameType.headers, frameFlag.endHeaders, streamId, block), frame(frameType.data, frameFlag.endStream, streamId, Buffer.alloc(5))]));
    return until(() => this.closed || this.frames.some((f) => f.type === frameType.headers && f.streamId === streamId && f.payload.length > 0 && this.frames.filter((g) => g.type === frameType.headers && g.streamId === streamId).length === 2), 5000).then(() => !this.closed);
  }
}

const main = await sidecarWith({
  max_settings_per_second: 10,
  max_pings_per_second: 10,
  max_resets_per_second: 1000,
  max_held_bytes: 65536,
  max_held_bytes_per_connection: 100000,
  max_message_bytes: 32768,
  max_outstanding_approvals_per_agent: 2,
});
const mainClient = clientOf(main);
const connectionsSidecar = await sidecarWith({ max_connections: 4, max_connections_per_peer: 2 });
const timeoutsSidecar = await sidecarWith({ handshake_timeout: "300ms", idle_timeout: "500ms" });

await t.test("connections: per peer address and per sidecar; the offender's extra connection is closed, the others keep working", async (t) => {
  const sidecar = connectionsSidecar;
  const a1 = await Raw.open(sidecar.port, "127.0.0.2");
  const a2 = await Raw.open(sidecar.port, "127.0.0.2");
  const a3 = await Raw.open(sidecar.port, "127.0.0.2");
  t.ok(await until(() => a3.closed, 5000), "a third connection from 127.0.0.2 is closed");
  t.equal(await hits(sidecar, "connections_per_peer"), 1);
  const b1 = await Raw.open(sidecar.port, "127.0.0.3");
  await Raw.open(sidecar.port, "127.0.0.3");
  const c1 = await Raw.open(sidecar.port, "127.0.0.4");
  t.ok(await until(() => c1.closed, 5000), "a fifth connection (from anyone) is closed");
  t.equal(await hits(sidecar, "connections"), 1);
  t.ok(await a1.call(1), "an admitted connection still serves calls");
  t.notOk(a2.closed || b1.closed, "admitted connections stay open");
  b1.socket.destroy();
  const client = clientOf(sidecar);
  t.ok(await waitUntil(async () => (await callUnary(client, OpsService.method.getStatus, {}).then(() => true, () => false)), 5000), "a freed slot admits a new agent");
});

await t.test("handshake and idle timeouts: a silent socket and an idle connection are closed", async (t) => {
  const sidecar = timeoutsSidecar;
  const silent = await Raw.open(sidecar.port, "127.0.0.2", false);
  const idle = await Raw.open(sidecar.port, "127.0.0.3");
  const client = clientOf(sidecar);
  t.equal((await callUnary(client, OpsService.method.getStatus, {})).service, "", "an agent that calls is served meanwhile");
  t.ok(await until(() => silent.closed, 5000), "no preface within the handshake timeout: closed");
  t.equal(await hits(sidecar, "handshake_timeout"), 1);
  t.ok(await until(() => idle.closed, 5000), "no stream within the idle timeout: closed");
  t.equal(idle.goaway(), 0, "with GOAWAY NO_ERROR");
  t.ok((await hits(sidecar, "idle_timeout")) >= 1);
});


await t.test("SETTINGS and PING floods: GOAWAY ENHANCE_YOUR_CALM for the offender only", async (t) => {
  const settings = await Raw.open(main.port, "127.0.0.2");
  settings.socket.write(Buffer.concat(Array.from({ length: 40 }, () => settingsFrame([]))));
  const pings = await Raw.open(main.port, "127.0.0.3");
  pings.socket.write(Buffer.concat(Array.from({ length: 40 }, () => frame(frameType.ping, 0, 0, Buffer.alloc(8)))));
  t.ok(await until(() => settings.closed && pings.closed, 5000), "both offenders are disconnected");
  t.equal(settings.goaway(), 0xb, "SETTINGS flood: ENHANCE_YOUR_CALM");
  t.equal(pings.goaway(), 0xb, "PING flood: ENHANCE_YOUR_CALM");
  t.equal(await hits(main, "settings_flood"), 1);
  t.equal(await hits(main, "ping_flood"), 1);
  t.equal((await callUnary(mainClient, OpsService.method.getStatus, {})).service, "", "other agents are served");
});

await t.test("held bytes: a held client stream that buffers past max_held_bytes is refused; other held calls go on", async (t) => {
  const row = toBinary(OpsService.method.importRows.input, create(OpsService.method.importRows.input, { table: "t".repeat(20_000), row: { id: 1 } }));
  const messages = Array.from({ length: 5 }, () => ({ table: "t".repeat(20_000), row: { id: 1 } }));
  t.ok(row.length > 20_000 && row.length < 32_768, "each message is under the message limit, five are over the held-bytes limit");
  const refused = await failure(callClientStream(mainClient, OpsService.method.importRows, messages, { metadata: await agent("spiffe://corp/agent/hoarder") }));
  t.equal(refused.code, Code.ResourceExhausted, refused.rawMessage);
  t.match(refused.rawMessage, /bytes/);
  t.equal(await hits(main, "held_bytes"), 1);
  const other = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "k" }, { metadata: await agent("spiffe://corp/agent/polite", { "x-airlock-wait": "false" }) }));
  t.equal(other.code, Code.Aborted, "another agent's held call is taken (held, not waiting)");
});

await t.test("held bytes per connection: held calls of one connection together past the limit are refused; other connections go on", async (t) => {
  const rows = (n: number) => Array.from({ length: n }, () => ({ table: "t".repeat(20_000), row: { id: 1 } }));
  // A connection of its own: grpc-js otherwise shares one subchannel (one connection) between clients of an address.
  const sameConnection = new Client(main.address, credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 });
  t.teardown(() => sameConnection.close());
  // The first call waits for a decision that never comes, holding ~60 KB on this connection until cancelled.
  const waiting = new AbortController();
  const first = callClientStream(sameConnection, OpsService.method.importRows, rows(3), { metadata: await agent("spiffe://corp/agent/first"), signal: waiting.signal }).catch((e: unknown) => e);
  t.ok(await waitUntil(async () => (await main.metrics.held.get()).values[0]?.value === 1, 5000), "the first call is held");
  const second = await failure(callClientStream(sameConnection, OpsService.method.importRows, rows(3), { metadata: await agent("spiffe://corp/agent/second") }));
  t.equal(second.code, Code.ResourceExhausted, second.rawMessage);
  t.match(second.rawMessage, /held on this connection/);
  t.equal(await hits(main, "held_bytes_per_connection"), 1);
  const elsewhere = await failure(callClientStream(mainClient, OpsService.method.importRows, rows(3), { metadata: await agent("spiffe://corp/agent/third", { "x-airlock-wait": "false" }) }));
  t.equal(elsewhere.code, Code.Aborted, "the same call on another connection is held");
  waiting.abort();
  await first;
});

await t.test("outstanding approval requests per agent: no-wait calls cannot mint requests without bound", async (t) => {
  const minter = (extra: Record<string, string> = {}) => agent("spiffe://corp/agent/minter", { "x-airlock-wait": "false", ...extra });
  const first = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "1" }, { metadata: await minter() }));
  t.equal(first.code, Code.Aborted);
  t.equal((await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "2" }, { metadata: await minter() }))).code, Code.Aborted);
  const third = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "3" }, { metadata: await minter() }));
  t.equal(third.code, Code.ResourceExhausted, third.rawMessage);
  t.match(third.rawMessage, /2 approval requests outstanding/);
  t.equal(await hits(main, "outstanding_approvals"), 1);
  const requestId = /request ([0-9a-f-]{36})/.exec(first.rawMessage)?.[1] ?? "";
  const resumed = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "1" }, { metadata: await minter({ "x-airlock-request-id": requestId }) }));
  t.equal(resumed.code, Code.Aborted, "resuming one of its own requests is not a new request");
  const other = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "x" }, { metadata: await agent("spiffe://corp/agent/other", { "x-airlock-wait": "false" }) }));
  t.equal(other.code, Code.Aborted, "another agent still gets its requests held");

  // The same by call id: at the limit, a retry of one of its own no-wait calls is that request, not a new one.
  const namer = (callId: string) => agent("spiffe://corp/agent/namer", { "x-airlock-wait": "false", "x-airlock-call-id": callId });
  const c1 = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "c1" }, { metadata: await namer("c1") }));
  t.equal(c1.details.reason, "not_waiting", c1.rawMessage);
  t.equal((await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "c2" }, { metadata: await namer("c2") }))).details.reason, "not_waiting");
  for (let retry = 0; retry < 2; retry++) {
    const again = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "c1" }, { metadata: await namer("c1") }));
    t.equal(again.details.reason, "not_waiting", `a retry by call id at the limit resumes its request: ${again.rawMessage}`);
    t.equal(again.details.requestId, c1.details.requestId);
  }
  // Reusing c1 for another payload is refused, and c1's request, still pending, stays counted.
  const reused = await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "not-c1" }, { metadata: await namer("c1") }));
  t.equal(reused.details.reason, "call_id_reused", reused.rawMessage);
  t.equal((await failure(callUnary(mainClient, OpsService.method.rotateKey, { keyId: "c3" }, { metadata: await namer("c3") }))).code, Code.ResourceExhausted, "a third call id is a third request");
});

await t.test("upstream resets: one agent's cancellations cost only its own upstream connection", async (t) => {
  // Agent B's call stays open on the upstream while agent A cancels calls past the upstream's reset budget.
  const slow = callBidiStream(mainClient, OpsService.method.tail, { metadata: await agent("spiffe://corp/agent/b") });
  const slowOutcome = new Promise<number>((resolve) => {
    slow.on("data", () => undefined);
    slow.on("error", (error: { code: number }) => resolve(error.code));
    slow.on("end", () => resolve(0));
  });
  slow.write(create(OpsService.method.tail.input, { filter: "x" }));
  const aMetadata = await agent("spiffe://corp/agent/a");
  for (let i = 0; i < resetBudget * 4; i++) {
    const call = callBidiStream(mainClient, OpsService.method.tail, { metadata: aMetadata });
    call.on("error", () => undefined);
    call.on("data", () => undefined);
    call.write(create(OpsService.method.tail.input, { filter: "x" }));
    // Let the HEADERS reach the upstream before cancelling, so each cancel is a reset there.
    await new Promise((resolve) => setImmediate(resolve));
    call.cancel();
  }
  t.ok(await until(() => sessionsKilled >= 1, 10_000), "the upstream ran out of patience with agent A's connection");
  slow.end();
  const outcome = await Promise.race([slowOutcome, new Promise<string>((resolve) => setTimeout(() => resolve("no answer in 10 s"), 10_000).unref())]);
  t.equal(outcome, 0, "agent B's call, open all along, ends normally");
});

await t.test("limits are read once from config, naming a bad field; unset ones take their defaults", async (t) => {
  const parse = (limits: Record<string, unknown>) =>
    parseSidecarConfig(
      new ConfigReader(
        {
          upstreams: [{ name: "ops", address: upstreamAddress, descriptor_sets: [descriptorSetPath] }],
          nats: hNats,
          vault: { address: "http://127.0.0.1:1" },
          broker_keys: { k1: "broker.pem" },
          host: "h",
          policy: "policy.yaml",
          limits,
        },
        "",
        join(dir, "sidecar.yaml"),
      ),
    );
  const refused = (limits: Record<string, unknown>): string => {
    try {
      parse(limits);
    } catch (error) {
      return (error as AirlockError).rawMessage;
    }
    return "accepted";
  };
  t.match(refused({ idle_timeout: "soon" }), /limits\.idle_timeout/);
  t.match(refused({ max_connections: 0 }), /limits\.max_connections/);
  t.match(refused({ max_conections: 5 }), /max_conections/);
  const defaults = parse({ max_pings_per_second: 7 }).limits;
  t.equal(defaults.maxPingsPerSecond, 7);
  t.equal(defaults.maxOutstandingApprovalsPerAgent, 16);
  t.equal(defaults.idleTimeoutMs, 300_000);
});
