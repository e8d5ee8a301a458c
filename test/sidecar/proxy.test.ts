import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, fromBinary, toBinary, toJsonString } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import { type ConsumerMessages, DeliverPolicy, jetstream } from "@nats-io/jetstream";
import { connect as netConnect } from "node:net";
import { exportSPKI, generateKeyPair } from "jose";
import pg from "pg";
import t from "tap";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey, signDecision } from "../../common/decision.js";
import { type AirlockError, Code, callBidiStream, callClientStream, callServerStream, callUnary } from "../../common/index.js";
import { streams, subjects } from "../../common/subjects.js";
import { startOpsServer } from "../../demo/ops/index.js";
import { freePort, useInfra, waitUntil } from "../../harness/index.js";
import { type ApprovalRequest, ApprovalRequestSchema, CompletionSchema, DecisionBodySchema, DecisionSchema, descriptorSetPath, Verdict } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { parseSidecarConfig, startSidecar } from "../../sidecar/index.js";
import { agentMetadata as signedAgentMetadata } from "../helpers/agent.js";
import { natsSection, provisionStreams } from "../helpers/stack.js";
import { clientPreface, FrameSplitter, frame, frameFlag, frameType, settingsFrame } from "../helpers/h2-frames.js";
import { encodeHeaderBlock, HpackDecoder } from "../../sidecar/h2/hpack.js";
import { frameMessage } from "../../sidecar/wire.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const host = "test-host";

// --- the database the privileged export reads, and a role standing in for Vault's dynamic user
const role = `airlock_t_${randomBytes(5).toString("hex")}`;
const rolePassword = `pw-${randomBytes(8).toString("hex")}`;
const admin = new pg.Client({ connectionString: database.url });
await admin.connect();
await admin.query("CREATE TABLE customers (id int PRIMARY KEY, name text)");
await admin.query("INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace')");
await admin.query(`CREATE ROLE ${role} LOGIN PASSWORD '${rolePassword}'; GRANT SELECT ON customers TO ${role}`);
t.teardown(async () => {
  await admin.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`);
  await admin.end();
});

const ops = await startOpsServer({ database: { host: database.host, port: database.port, database: database.name }, vaultAddress: vault.address });
t.teardown(() => ops.close());

// --- keys: the broker's decision key, a forger's key under the same id, the agents' token key
const broker = generateDecisionKey("k1");
const forger = generateDecisionKey("k1");
const agentKeys = await generateKeyPair("EdDSA");
const agentPublicPem = await exportSPKI(agentKeys.publicKey);
const dir = await mkdtemp(join(tmpdir(), "airlock-sidecar-test-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
await writeFile(join(dir, "broker-k1.pem"), broker.publicKeyPem);
const policyYaml = `
version: 1
default: deny
rules:
  - id: status
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
    anonymous: true
  - id: tail
    match: { service: demo.v1.OpsService, method: Tail }
    effect: allow
    anonymous: true
  - id: import-held
    match: { service: demo.v1.OpsService, method: ImportRows }
    when: 'request.table == "held_rows"'
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: data-owners, min_approvals: 1 }] }
      credential: { kind: database, mount: database, role: export, ttl: 5m }
      timeout: 4s
  - id: import-open
    match: { service: demo.v1.OpsService, method: ImportRows }
    effect: allow
    anonymous: true
  - id: no-grants
    match: { service: demo.v1.OpsService, method: GrantRole }
    effect: deny
    reason: role grants go through the IAM team
  - id: export-public
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: 'request.table == "public_stats"'
    effect: allow
    anonymous: true
  - id: export
    match: { service: demo.v1.OpsService, method: ExportTable }
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: data-owners, min_approvals: 1 }] }
      credential: { kind: database, mount: database, role: export, ttl: 5m }
      require_reason: true
      timeout: 4s
  - id: rotate
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    approve:
      risk: medium
      reviewers: { all_of: [{ group: security, min_approvals: 1 }] }
      credential: { kind: vault_token, policies: [default], num_uses: 3, ttl: 1m }
      timeout: 4s
`;
await writeFile(join(dir, "policy.yaml"), policyYaml);
await provisionStreams(nats);
const sidecarNats = natsSection(await nats.credentials({ kind: "sidecar", host }));

function sidecarConfig(overrides: Record<string, unknown> = {}) {
  return parseSidecarConfig(
    new ConfigReader(
      {
        listen: "127.0.0.1:0",
        upstreams: [{ name: "ops", address: ops.address, descriptor_sets: [descriptorSetPath], services: ["demo.v1.OpsService"] }],
        nats: sidecarNats,
        vault: { address: vault.address },
        broker_keys: { k1: "broker-k1.pem" },
        host,
        policy: "policy.yaml",
        agent_auth: [{ kind: "jwt", issuer: "https://idp.test", audience: "airlock", keys: { kind: "static", public_keys: [agentPublicPem] }, clock_tolerance_sec: 0 }],
        limits: { max_message_bytes: 4096, max_buffered_messages: 50 },
        metrics: { listen: "127.0.0.1:0" },
        log_level: "error",
        ...overrides,
      },
      "",
      join(dir, "sidecar.yaml"),
    ),
  );
}

const sidecar = await startSidecar(sidecarConfig());
t.teardown(() => sidecar.close());
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

// --- a stand-in broker: reads requests, answers with signed decisions carrying real Vault wrapping tokens
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const js = jetstream(nc);
const requestConsumer = await js.consumers.get(streams.requests.name, { filter_subjects: "airlock.request.>", deliver_policy: DeliverPolicy.New });
const requestMessages: ConsumerMessages = await requestConsumer.consume();
// A loop that always pulls, so close() can finish; tests take requests from the queue.
const arrived: ApprovalRequest[] = [];
const takers: Array<(request: ApprovalRequest) => void> = [];
const requestLoop = (async () => {
  for await (const message of requestMessages) {
    const request = fromBinary(ApprovalRequestSchema, message.data);
    const taker = takers.shift();
    if (taker === undefined) arrived.push(request);
    else taker(request);
  }
})();
t.teardown(async () => {
  await requestMessages.close();
  await requestLoop;
});

function nextRequest(): Promise<ApprovalRequest> {
  const ready = arrived.shift();
  return ready === undefined ? new Promise((resolve) => takers.push(resolve)) : Promise.resolve(ready);
}

async function vaultCall(path: string, body: unknown, wrapTtl?: string): Promise<Record<string, unknown>> {
  const response = await fetch(`${vault.address}/v1/${path}`, {
    method: "POST",
    headers: { "X-Vault-Token": vault.rootToken, ...(wrapTtl === undefined ? {} : { "X-Vault-Wrap-TTL": wrapTtl }) },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`vault ${path}: ${response.status} ${await response.text()}`);
  return (await response.json()) as Record<string, unknown>;
}

async function wrappedCredential(request: ApprovalRequest): Promise<string> {
  const response =
    request.credential?.kind.case === "database"
      ? await vaultCall("sys/wrapping/wrap", { username: role, password: rolePassword }, "60s")
      : await vaultCall("auth/token/create", { policies: ["default"], ttl: "60s", num_uses: 3, meta: { request_id: request.id } }, "60s");
  return (response.wrap_info as { token: string }).token;
}

interface DecideOptions {
  readonly verdict?: Verdict;
  readonly reason?: string;
  readonly key?: typeof broker.signing;
  readonly requestId?: string;
  readonly requestSha256?: Uint8Array;
  readonly expiresAt?: number;
  readonly wrappingToken?: string;
  readonly decisionId?: string;
}

async function decide(request: ApprovalRequest, options: DecideOptions = {}): Promise<string> {
  const verdict = options.verdict ?? Verdict.APPROVED;
  const wrappingToken = verdict === Verdict.APPROVED ? (options.wrappingToken ?? (await wrappedCredential(request))) : "";
  const body = create(DecisionBodySchema, {
    decisionId: options.decisionId ?? `d-${randomBytes(6).toString("hex")}`,
    requestId: options.requestId ?? request.id,
    requestSha256: options.requestSha256 ?? request.requestSha256,
    verdict,
    votes: [{ reviewer: "rita@corp", group: "security", approve: verdict === Verdict.APPROVED, reason: options.reason ?? "ok" }],
    reason: options.reason ?? "ok",
    decidedAt: timestampFromMs(Date.now()),
    expiresAt: timestampFromMs(options.expiresAt ?? Date.now() + 60_000),
    ...(verdict === Verdict.APPROVED ? { credential: { wrappingToken, kind: request.credential?.kind.case === "database" ? "database" : "vault_token", injectHeader: request.credential?.injectHeader ?? "x-airlock-credential" } } : {}),
  });
  const decision = signDecision(body, options.key ?? broker.signing);
  await js.publish(subjects.decision(host, request.id), toBinary(DecisionSchema, decision));
  return wrappingToken;
}

function agentMetadata(extra: Record<string, string> = {}): Promise<Metadata> {
  return signedAgentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" }, extra);
}

async function failure(promise: Promise<unknown>): Promise<AirlockError> {
  try {
    await promise;
  } catch (error) {
    return error as AirlockError;
  }
  throw new Error("expected the call to fail");
}

async function collect<T>(stream: AsyncIterable<T>): Promise<T[]> {
  const items: T[] = [];
  for await (const item of stream) items.push(item);
  return items;
}

await t.test("allow: a unary call passes through with metadata both ways and trailers", async (t) => {
  const metadata = new Metadata();
  metadata.set("x-echo-trace", "abc123");
  const seen: { headers?: Metadata; trailers?: Metadata } = {};
  const status = await new Promise<{ service: string }>((resolve, reject) => {
    const call = client.makeUnaryRequest(
      `/demo.v1.OpsService/GetStatus`,
      (m: Uint8Array) => Buffer.from(m),
      (b: Buffer) => b,
      Buffer.alloc(0),
      metadata,
      {},
      (error, response) => {
        if (error !== null || response === undefined) return reject(error ?? new Error("no response"));
        resolve(fromBinary(OpsService.method.getStatus.output, response));
      },
    );
    call.on("metadata", (m) => (seen.headers = m));
    call.on("status", (s) => (seen.trailers = s.metadata));
  });
  t.equal(status.service, "demo.v1.OpsService");
  t.same(seen.headers?.get("x-echo-trace"), ["abc123"], "request metadata reached the upstream and its response headers came back");
  t.same(seen.trailers?.get("x-served-by"), ["demo.v1.OpsService"], "trailers pass through");
});

await t.test("allow: 1,500 calls in a row on the one upstream connection all succeed (no frame the upstream counts as invalid)", async (t) => {
  // node:http2 servers end a connection with GOAWAY after 1,000 invalid frames (a RST_STREAM on a
  // stream already closed, say): a proxy that sent one per call failed every call past the 1,000th.
  let failed = 0;
  const worker = async (calls: number) => {
    for (let i = 0; i < calls; i++) await callUnary(client, OpsService.method.getStatus, {}).catch(() => failed++);
  };
  await Promise.all(Array.from({ length: 8 }, () => worker(1500 / 8)));
  t.equal(failed, 0, "no call failed");
});

/**
 * Sends one client-streaming ImportRows call over a raw HTTP/2 connection, its
 * messages packed as the test says (grpc-js never packs them this way), and
 * returns the gRPC status of the trailers-only or trailing response.
 */
async function rawImportRows(messages: number, table: string, dataFrames: (bytes: Buffer) => Buffer[]): Promise<{ status: string; message: string }> {
  const authorization = (await agentMetadata()).get("authorization")[0] as string;
  const socket = netConnect({ host: "127.0.0.1", port: sidecar.port });
  try {
    await new Promise((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    const block = encodeHeaderBlock([
      [":method", "POST"],
      [":scheme", "http"],
      [":path", "/demo.v1.OpsService/ImportRows"],
      [":authority", "proxy.test"],
      ["content-type", "application/grpc"],
      ["te", "trailers"],
      ["authorization", authorization],
    ]);
    const row = toBinary(OpsService.method.importRows.input, create(OpsService.method.importRows.input, { table, row: { id: 1 } }));
    const body = Buffer.concat(Array.from({ length: messages }, () => frameMessage(row)));
    const splitter = new FrameSplitter();
    const decoder = new HpackDecoder();
    const fields: Array<readonly [string, string]> = [];
    const done = new Promise<void>((resolve, reject) => {
      socket.on("data", (chunk: Buffer) => {
        for (const received of splitter.push(chunk)) {
          if (received.type === frameType.headers && received.streamId === 1) {
            fields.push(...decoder.decode(received.payload));
            if ((received.flags & frameFlag.endStream) !== 0) resolve();
          }
          if (received.type === frameType.rstStream && received.streamId === 1 && !fields.some(([name]) => name === "grpc-status")) reject(new Error("stream reset without a status"));
        }
      });
      socket.once("close", () => reject(new Error("the sidecar closed the connection")));
    });
    socket.write(Buffer.concat([clientPreface, settingsFrame([]), frame(frameType.headers, frameFlag.endHeaders, 1, block), ...dataFrames(body)]));
    await done;
    const status = fields.find(([name]) => name === "grpc-status")?.[1] ?? "";
    return { status, message: decodeURIComponent(fields.find(([name]) => name === "grpc-message")?.[1] ?? "") };
  } finally {
    socket.destroy();
  }
}

await t.test("held client stream: more messages than the buffer holds in one DATA frame are refused, never held or sent", async (t) => {
  const before = arrived.length;
  // 60 messages and END_STREAM in a single frame: the first read (for the rule's condition) already has them all.
  const refused = await rawImportRows(60, "held_rows", (body) => [frame(frameType.data, frameFlag.endStream, 1, body)]);
  t.equal(refused.status, String(Code.ResourceExhausted), `RESOURCE_EXHAUSTED (${refused.message})`);
  t.match(refused.message, /more than 50 messages/);
  t.equal(arrived.length, before, "no approval request was published");
});

await t.test("a message cut across DATA frames after the policy read is forwarded whole (the size guard follows the buffered bytes)", async (t) => {
  // Three messages in two frames, the cut inside the second message: the policy reads message 1,
  // the rest of frame 1 (part of message 2) waits in the reader, then everything is forwarded.
  const result = await rawImportRows(3, "customers", (body) => {
    const cut = Math.floor(body.length / 2);
    return [frame(frameType.data, 0, 1, body.subarray(0, cut)), frame(frameType.data, frameFlag.endStream, 1, body.subarray(cut))];
  });
  // A guard starting at frame 2 would read message 2's payload as a length prefix and refuse the call as oversized.
  t.not(result.status, String(Code.ResourceExhausted), `not refused as oversized (${result.status}: ${result.message})`);
  // The upstream refuses ImportRows without a credential: its own answer shows the call reached it.
  t.match(result.message, /credential/, "the upstream's own answer came back");
});

await t.test("allow: bidi streaming passes through, and client-streaming status codes pass through", async (t) => {
  const tail = callBidiStream(client, OpsService.method.tail);
  const lines: string[] = [];
  const done = new Promise<void>((resolve, reject) => {
    tail.on("data", (m: { line: string }) => lines.push(m.line));
    tail.on("end", resolve);
    tail.on("error", reject);
  });
  tail.write(create(OpsService.method.tail.input, { filter: "GetStatus" }));
  tail.write(create(OpsService.method.tail.input, { filter: "nothing-matches" }));
  tail.end();
  await done;
  t.equal(lines.length, 2);
  t.match(lines[0], /GetStatus ok/);

  // The upstream refuses ImportRows without a credential; its status and details arrive unchanged.
  const refused = await failure(callClientStream(client, OpsService.method.importRows, [{ table: "customers", row: { id: 9 } }]));
  t.equal(refused.code, Code.Unauthenticated);
  t.match(refused.rawMessage, /through the Airlock sidecar/);
});

await t.test("allow on a decoded field: server streaming passes through", async (t) => {
  const error = await failure(collect(callServerStream(client, OpsService.method.exportTable, { table: "public_stats" })));
  t.equal(error.code, Code.Unauthenticated, "rule export-public let it through to the upstream, which wants a credential");
});

await t.test("deadlines and cancellation pass through, and nothing hangs", async (t) => {
  const late = callBidiStream(client, OpsService.method.tail, { deadline: new Date(Date.now() + 300) });
  const lateCode = await new Promise<number>((resolve) => {
    late.on("data", () => undefined);
    late.on("error", (error: { code: number }) => resolve(error.code));
  });
  t.equal(lateCode, Code.DeadlineExceeded);
  const cancelled = callBidiStream(client, OpsService.method.tail);
  const cancelledCode = new Promise<number>((resolve) => {
    cancelled.on("data", () => undefined);
    cancelled.on("error", (error: { code: number }) => resolve(error.code));
  });
  cancelled.write(create(OpsService.method.tail.input, { filter: "x" }));
  cancelled.cancel();
  t.equal(await cancelledCode, Code.Canceled);
  t.equal((await callUnary(client, OpsService.method.getStatus, {})).service, "demo.v1.OpsService", "the sidecar still serves");
});

await t.test("deny: PERMISSION_DENIED naming the rule and the reason", async (t) => {
  const error = await failure(callUnary(client, OpsService.method.grantRole, { user: "mallory", role: "admin" }, { metadata: await agentMetadata() }));
  t.equal(error.code, Code.PermissionDenied);
  t.match(error.rawMessage, /no-grants/);
  t.match(error.rawMessage, /IAM team/);
});

/** A unary call with raw request bytes: what a buggy or hostile agent can send. */
function rawUnary(path: string, bytes: Buffer): Promise<{ code: number; details: string }> {
  return new Promise((resolve) =>
    client.makeUnaryRequest(path, (m: Buffer) => m, (b: Buffer) => b, bytes, new Metadata(), {}, (error) =>
      resolve({ code: error?.code ?? 0, details: error?.details ?? "" }),
    ),
  );
}

await t.test("unknown method: UNIMPLEMENTED naming it", async (t) => {
  const error = await rawUnary("/demo.v1.OpsService/DropEverything", Buffer.alloc(0));
  t.equal(error.code, Code.Unimplemented);
  t.match(error.details, /DropEverything/);
});

await t.test("oversized and malformed messages are refused before the upstream", async (t) => {
  const allowed = await rawUnary("/demo.v1.OpsService/GetStatus", Buffer.alloc(5000));
  t.equal(allowed.code, Code.ResourceExhausted, "over the limit on the allow path, which never decodes");
  const held = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "k".repeat(5000) }, { metadata: await agentMetadata() }));
  t.equal(held.code, Code.ResourceExhausted, "over the limit on a held call");
  const garbage = await rawUnary("/demo.v1.OpsService/ExportTable", Buffer.from([0x0a, 0xff, 0xff]));
  t.equal(garbage.code, Code.InvalidArgument, "malformed protobuf where a rule must decode it");
});

await t.test("an agent cannot send the credential header itself", async (t) => {
  const metadata = new Metadata();
  metadata.set("x-airlock-credential", "smuggled");
  const error = await failure(callUnary(client, OpsService.method.getStatus, {}, { metadata }));
  t.equal(error.code, Code.InvalidArgument);
});

await t.test("a token that has expired is refused even though its identity was cached", async (t) => {
  const agent = { privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock", subject: "spiffe://corp/agent/short-lived" };
  // Expires in 2 s (this sidecar allows no clock skew): a cached identity must not outlive it.
  const metadata = await signedAgentMetadata({ ...agent, expiresIn: Math.floor(Date.now() / 1000) + 2 }, { "x-airlock-wait": "false" });
  const first = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "short" }, { metadata }));
  t.equal(first.code, Code.Aborted, "accepted while valid (held, not waiting)");
  await nextRequest();
  await new Promise((resolve) => setTimeout(resolve, 2500));
  const later = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "short" }, { metadata }));
  t.equal(later.code, Code.Unauthenticated, "not served from the cache after its exp");
});

await t.test("a privileged call without identity is UNAUTHENTICATED", async (t) => {
  const error = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }));
  t.equal(error.code, Code.Unauthenticated);
});

await t.test("approve: the upstream gets a live Vault token, the agent never sees it, completion is reported", async (t) => {
  const completions = await (await js.consumers.get(streams.completions.name, { filter_subjects: "airlock.completion.>", deliver_policy: DeliverPolicy.New })).consume();
  const call = callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agentMetadata({ "x-airlock-reason": "quarterly rotation" }) });
  const request = await nextRequest();
  t.equal(request.method, "RotateKey");
  t.equal(request.identity?.agent, "spiffe://corp/agent/etl");
  t.equal(request.identity?.onBehalfOf, "alice@corp");
  t.equal(request.reason, "quarterly rotation");
  t.equal(request.ruleId, "rotate");
  t.equal(request.requestSha256.length, 32);
  const wrapping = await decide(request);
  const response = await call;
  t.equal(response.version, 1, "the upstream accepted the injected token");
  t.notMatch(toJsonString(OpsService.method.rotateKey.output, response), /hvs\.|s\.[A-Za-z0-9]{20}/, "no Vault token in the response");
  t.ok(wrapping.length > 0);
  const completion = await (async () => {
    for await (const message of completions) return fromBinary(CompletionSchema, message.data);
    return undefined;
  })();
  await completions.close();
  t.equal(completion?.requestId, request.id);
  t.equal(completion?.statusCode, 0);
});

await t.test("approve: ExportTable streams rows read with the injected database credential", async (t) => {
  const rows = collect(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: await agentMetadata({ "x-airlock-reason": "monthly report" }) }));
  const request = await nextRequest();
  t.same(request.request?.kind.case, "structValue");
  await decide(request);
  t.same(
    (await rows).map((r) => r.row),
    [
      { id: 1, name: "Ada" },
      { id: 2, name: "Grace" },
    ],
  );
});

await t.test("a rule that requires a reason refuses a call without one", async (t) => {
  const error = await failure(collect(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: await agentMetadata() })));
  t.equal(error.code, Code.InvalidArgument);
  t.match(error.rawMessage, /x-airlock-reason/);
});

await t.test("deny by a reviewer: PERMISSION_DENIED with the reason and request id", async (t) => {
  const call = callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agentMetadata() });
  const request = await nextRequest();
  await decide(request, { verdict: Verdict.DENIED, reason: "not during the freeze" });
  const error = await failure(call);
  t.equal(error.code, Code.PermissionDenied);
  t.match(error.rawMessage, /not during the freeze/);
  t.match(error.rawMessage, request.id);
});

await t.test("forged, mismatched and expired decisions are refused; the real one still works", async (t) => {
  const before = await sidecar.metrics.securityEvents.get();
  const count = () => before.values.reduce((sum, v) => sum + v.value, 0);
  const call = callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agentMetadata() });
  const request = await nextRequest();
  await decide(request, { key: forger.signing });
  await decide(request, { requestSha256: new Uint8Array(32) });
  await decide(request, { expiresAt: Date.now() - 1000 });
  await new Promise((resolve) => setTimeout(resolve, 300));
  const after = await sidecar.metrics.securityEvents.get();
  const reasons = after.values.map((v) => String(v.labels.reason));
  t.ok(reasons.includes("bad_signature"), "forged signature reported");
  t.ok(reasons.includes("hash_mismatch"), "decision for another request reported");
  t.ok(reasons.includes("expired"), "expired decision reported");
  t.ok(after.values.reduce((sum, v) => sum + v.value, 0) >= count() + 3);
  await decide(request);
  t.ok((await call).version > 0, "the genuine decision still lets the call through");
});

await t.test("a credential unwrapped by someone else is refused as a security event", async (t) => {
  const call = callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agentMetadata() });
  const request = await nextRequest();
  const wrappingToken = await wrappedCredential(request);
  await fetch(`${vault.address}/v1/sys/wrapping/unwrap`, { method: "POST", headers: { "X-Vault-Token": wrappingToken } });
  await decide(request, { wrappingToken });
  const error = await failure(call);
  t.equal(error.code, Code.PermissionDenied);
  t.match(error.rawMessage, /could not be unwrapped/);
});

await t.test("no-wait and resume: ABORTED with the request id, then the identical call executes once approved", async (t) => {
  const first = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "resume-me" }, { metadata: await agentMetadata({ "x-airlock-wait": "false" }) }));
  t.equal(first.code, Code.Aborted);
  const request = await nextRequest();
  t.match(first.rawMessage, request.id);
  // Stored once decide returns (the stream acknowledged it): a resume reads it back.
  await decide(request);
  const other = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "something-else" }, { metadata: await agentMetadata({ "x-airlock-request-id": request.id }) }));
  t.equal(other.code, Code.PermissionDenied, "a different request cannot ride on the approval");
  const resumed = await callUnary(client, OpsService.method.rotateKey, { keyId: "resume-me" }, { metadata: await agentMetadata({ "x-airlock-request-id": request.id }) });
  t.equal(resumed.keyId, "resume-me");
  // No deadline of our own: the answer must come at once, not at the request's deadline.
  const replayStarted = Date.now();
  const replay = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "resume-me" }, { metadata: await agentMetadata({ "x-airlock-request-id": request.id }) }));
  t.equal(replay.code, Code.FailedPrecondition, "the same decision does not run the action twice, and a second resume is told so");
  t.match(replay.rawMessage, /already ran on this sidecar \(the upstream answered status 0: OK\); it is not run again/);
  t.ok(Date.now() - replayStarted < 2000, "answered at once (the request's timeout is 4 s)");
});

await t.test("expiry: DEADLINE_EXCEEDED with the request id when nobody decides", async (t) => {
  const error = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agentMetadata() }));
  const request = await nextRequest();
  t.equal(error.code, Code.DeadlineExceeded);
  t.match(error.rawMessage, request.id);
});

await t.test("NATS down: privileged calls fail closed with UNAVAILABLE, allowed ones still pass; recovery after restart", async (t) => {
  await nats.pause();
  const error = await failure(callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agentMetadata() }));
  t.equal(error.code, Code.Unavailable);
  t.equal((await callUnary(client, OpsService.method.getStatus, {})).service, "demo.v1.OpsService", "the allow path does not need NATS");
  await nats.resume();
  // The sidecar reconnects on its own schedule (slower on a loaded machine): waited for, not slept on.
  t.ok(await waitUntil(async () => (await fetch(`http://127.0.0.1:${sidecar.metricsPort}/readyz`)).ok, 30_000, 100), "the sidecar is back on NATS");
  const call = callUnary(client, OpsService.method.rotateKey, { keyId: "after-restart" }, { metadata: await agentMetadata() });
  const request = await nextRequest();
  await decide(request);
  t.equal((await call).keyId, "after-restart");
});

await t.test("upstream down: UNAVAILABLE", async (t) => {
  const port = await freePort();
  const upstreams = [{ name: "ops", address: `127.0.0.1:${port}`, descriptor_sets: [descriptorSetPath], services: ["demo.v1.OpsService"] }];
  // Host test-host's credential is not good for other-host: the server refuses it that host's decisions.
  const borrowed = await startSidecar(sidecarConfig({ upstreams, host: "other-host" })).catch((e: unknown) => e);
  t.match(borrowed, { code: Code.PermissionDenied, details: { field: "nats.auth.seed_file" } }, "a sidecar with another host's credential does not start");
  const config = sidecarConfig({ upstreams, host: "other-host", nats: natsSection(await nats.credentials({ kind: "sidecar", host: "other-host" })) });
  const lonely = await startSidecar(config);
  const lonelyClient = new Client(lonely.address, credentials.createInsecure());
  const error = await failure(callUnary(lonelyClient, OpsService.method.getStatus, {}));
  lonelyClient.close();
  await lonely.close();
  t.equal(error.code, Code.Unavailable);
});


await t.test("/metrics, /healthz and /readyz", async (t) => {
  const base = `http://127.0.0.1:${sidecar.metricsPort}`;
  const metrics = await (await fetch(`${base}/metrics`)).text();
  t.match(metrics, /airlock_sidecar_calls_total\{method="\/demo\.v1\.OpsService\/GetStatus",effect="allow"\} [1-9]/);
  t.match(metrics, /airlock_sidecar_calls_total\{method="\/demo\.v1\.OpsService\/GrantRole",effect="deny"\} [1-9]/);
  t.match(metrics, /airlock_sidecar_rejections_total\{reason="unknown_method"\} [1-9]/);
  // Outcomes are not errors: a reviewer's denial, a no-wait hold, an expiry and a call that already ran each have their reason.
  for (const reason of ["approval_denied", "held_not_waiting", "approval_expired", "already_ran", "policy_deny"]) {
    t.match(metrics, new RegExp(`airlock_sidecar_rejections_total\\{reason="${reason}"\\} [1-9]`), reason);
  }
  t.notMatch(metrics, /reason="internal"/, "nothing in this file is a fault inside the sidecar");
  t.match(metrics, /airlock_sidecar_approval_wait_seconds_count [1-9]/);
  t.match(metrics, /airlock_sidecar_security_events_total\{reason="bad_signature"\} [1-9]/);
  t.equal((await fetch(`${base}/healthz`)).status, 200);
  const ready = await fetch(`${base}/readyz`);
  t.equal(ready.status, 200);
  t.same(await ready.json(), { ready: true, checks: { nats: true, policy: true } });
});
