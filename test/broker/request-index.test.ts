// The broker's request index and the retention of settled records, against a real NATS: the
// index answers every filter as a full read of the state bucket would, on two replicas after
// writes from both; a settled record past its retention leaves the state bucket and is still
// found and paged through from the history; and only brokers may read or write the history.
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { create, equals, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import t from "tap";
import { readAuditEvents } from "../../broker/audit/index.js";
import { CredentialIssuer } from "../../broker/credentials.js";
import { type IndexQuery, matchesQuery, summaryOf } from "../../broker/request-index.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker, type RequestPage } from "../../broker/service.js";
import { RequestStore } from "../../broker/store.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { Code, createLogger, createVaultClient } from "../../common/index.js";
import { natsRefusal } from "../../common/nats.js";
import { historyStream, requestBucket, stateBucket, subjects } from "../../common/subjects.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { ApprovalRequestSchema, type RequestRecord, RequestRecordSchema, RequestState, Risk } from "../../proto/index.js";
import { Policy } from "../../sidecar/index.js";

const { nats } = await useInfra(t, { nats: true });
const log = createLogger({ name: "test", level: "silent" });
const policy = Policy.parse(`version: 1
default: deny
rules:
  - id: rotate
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    approve:
      risk: low
      reviewers: { all_of: [{ group: data-owners }] }
      credential: { kind: vault_token, policies: [default], num_uses: 2, ttl: 1m }
      timeout: 30s
`);
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"] } }, "", join(process.cwd(), "broker.yaml")));
// No record in this test holds a lease or gets approved: Vault is never called.
const issuer = new CredentialIssuer({ vault: createVaultClient({ address: "http://127.0.0.1:9" }) });

async function startReplica(name: string, retentionMs?: number, consume = false): Promise<{ broker: Broker; store: RequestStore }> {
  const nc = await nats.connect({ kind: "broker" });
  t.teardown(() => nc.close());
  const broker = await Broker.start({
    nc,
    issuer,
    signingKey: generateDecisionKey("k1").signing,
    approvals,
    policy: () => policy,
    replicaId: name,
    log,
    consume,
    tickIntervalMs: 100,
    ...(retentionMs === undefined ? {} : { retentionMs }),
  });
  t.teardown(() => broker.close());
  return { broker, store: await RequestStore.open(nc) };
}

const now = Date.now();
const states = [RequestState.PENDING, RequestState.DENIED, RequestState.COMPLETED, RequestState.EXPIRED, RequestState.FAILED, RequestState.CANCELLED];
const agents = ["spiffe://a/agent-1", "spiffe://a/Agent-2", "spiffe://a/agent-3"];

/** A record as the broker writes one, with no lease and no decision to deliver (nothing for the ticker to act on). */
function record(i: number, state: RequestState, options: { createdMs?: number; updatedMs?: number } = {}): RequestRecord {
  const createdMs = options.createdMs ?? now - 60_000 + (i % 7) * 1000; // ties on purpose: ordered by id then
  return create(RequestRecordSchema, {
    request: {
      id: randomUUID(),
      host: `host-${i % 2}`,
      service: "demo.v1.OpsService",
      method: "RotateKey",
      risk: [Risk.LOW, Risk.MEDIUM, Risk.HIGH][i % 3] ?? Risk.LOW,
      identity: { agent: agents[i % agents.length] ?? "" },
      createdAt: timestampFromMs(createdMs),
      deadline: timestampFromMs(now + 3_600_000),
    },
    state,
    updatedAt: timestampFromMs(options.updatedMs ?? createdMs),
  });
}

/** Every page of a listing, and how many pages it took. */
async function everyPage(broker: Broker, query: IndexQuery, limit: number): Promise<{ records: RequestRecord[]; pages: number }> {
  const records: RequestRecord[] = [];
  let cursor: string | undefined;
  let pages = 0;
  do {
    const page: RequestPage = await broker.listPage(query, () => true, limit, cursor);
    records.push(...page.records);
    cursor = page.nextCursor;
    pages++;
  } while (cursor !== undefined && pages < 1000);
  return { records, pages };
}

/** What a full read of the state bucket answers: every record, filtered, newest first, ties by id. */
async function fullScan(query: IndexQuery): Promise<string[]> {
  const admin = await nats.connect({ kind: "admin" });
  try {
    const kv = await new Kvm(admin).open(stateBucket);
    const requests = await new Kvm(admin).open(requestBucket);
    const found: ReturnType<typeof summaryOf>[] = [];
    for await (const key of await kv.keys()) {
      const entry = await kv.get(key);
      if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) continue;
      // The record leaves its request out: it is stored once, under the same key, in the requests bucket.
      const stored = fromBinary(RequestRecordSchema, entry.value);
      const request = await requests.get(key);
      if (request !== null) stored.request = fromBinary(ApprovalRequestSchema, request.value);
      const summary = summaryOf(stored);
      if (matchesQuery(summary, query)) found.push(summary);
    }
    return found.sort((a, b) => b.createdMs - a.createdMs || (a.id < b.id ? 1 : -1)).map((s) => s.id);
  } finally {
    await admin.close();
  }
}

const ids = (records: readonly RequestRecord[]) => records.map((r) => r.request?.id ?? "");

const a = await startReplica("replica-a");
const b = await startReplica("replica-b");

await t.test("the index answers every filter as a full read of the bucket, on both replicas", async (t) => {
  // Writes from both replicas' connections at once: creates, then updates of some of them.
  const written = await Promise.all(
    Array.from({ length: 60 }, async (_, i) => {
      const r = record(i, RequestState.PENDING);
      const store = i % 2 === 0 ? a.store : b.store;
      const revision = await store.create(r);
      if (revision === undefined) throw new Error("create failed");
      return { r, revision, store: i % 3 === 0 ? b.store : a.store };
    }),
  );
  await Promise.all(
    written.map(async ({ r, revision, store }, i) => {
      const state = states[i % states.length] ?? RequestState.PENDING;
      if (state === RequestState.PENDING) return;
      const next = create(RequestRecordSchema, { ...r, state, updatedAt: timestampFromMs(now) });
      t.ok((await store.update(next, revision)) !== undefined, "update written");
    }),
  );
  // Two replicas writing one record from the same revision: the second loses, and the index keeps the winner.
  const [first] = written;
  if (first === undefined) throw new Error("nothing written");
  t.ok((await b.store.update(create(RequestRecordSchema, { ...first.r, escalated: true }), first.revision)) !== undefined, "the first write wins");
  t.equal(await a.store.update(create(RequestRecordSchema, { ...first.r, state: RequestState.CANCELLED }), first.revision), undefined, "a stale write loses");

  const none = { states: new Set<RequestState>(), agent: "", minRisk: Risk.UNSPECIFIED, createdFromMs: 0, createdToMs: 0 };
  const queries: Array<[string, IndexQuery]> = [
    ["everything", none],
    ["pending", { ...none, states: new Set([RequestState.PENDING]) }],
    ["denied or expired", { ...none, states: new Set([RequestState.DENIED, RequestState.EXPIRED]) }],
    ["one agent", { ...none, agent: "spiffe://a/agent-2" }],
    ["medium risk and up, denied", { ...none, minRisk: Risk.MEDIUM, states: new Set([RequestState.DENIED]) }],
    ["pending of one agent", { ...none, agent: "spiffe://a/agent-1", states: new Set([RequestState.PENDING]) }],
    ["created in a window", { ...none, createdFromMs: now - 58_000, createdToMs: now - 56_000 }],
  ];
  for (const [what, query] of queries) {
    const expected = await fullScan(query);
    t.ok(expected.length > 0, `${what}: the bucket has matches (${expected.length})`);
    for (const [name, replica] of [
      ["replica a", a.broker],
      ["replica b", b.broker],
    ] as const) {
      t.same(ids((await everyPage(replica, query, 1000)).records), expected, `${what}: ${name} lists what a full read finds, in order`);
      const paged = await everyPage(replica, query, 7);
      t.same(ids(paged.records), expected, `${what}: ${name} pages of 7 give the same, each once`);
      t.ok(paged.pages >= Math.ceil(expected.length / 7), `${what}: in ${paged.pages} pages`);
    }
  }
  await t.rejects(a.broker.listPage(none, () => true, 10, "i.12.not/an/id"), { code: Code.InvalidArgument }, "a forged cursor is refused");
});

await t.test("a settled record past its retention leaves the state bucket and is listed from the history, page by page", async (t) => {
  // Settled an hour ago, besides the records above (settled a minute ago, within a 10 min retention).
  const old = Array.from({ length: 5 }, (_, i) => record(i, RequestState.DENIED, { createdMs: now - 7_200_000 + i * 1000, updatedMs: now - 3_600_000 }));
  for (const r of old) await a.store.create(r);
  const oldIds = new Set(ids(old));
  // A third replica with a 10 min retention; the two others keep the default (1 h) and still see it go.
  const c = await startReplica("replica-c", 600_000);
  const gone = await waitUntil(async () => {
    for (const id of oldIds) if ((await c.store.get(id)) !== undefined) return false;
    return true;
  }, 60_000);
  t.ok(gone, "every record past retention left the state bucket");
  const admin = await nats.connect({ kind: "admin" });
  t.teardown(() => admin.close());
  const jsm = await jetstreamManager(admin);
  const kept = await fullScan({ states: new Set(), agent: "", minRisk: Risk.UNSPECIFIED, createdFromMs: 0, createdToMs: 0 });
  t.equal(kept.filter((id) => oldIds.has(id)).length, 0, "a full read of the bucket no longer finds them");
  t.ok(kept.length >= 60, "records within retention stayed");
  const requests = await new Kvm(admin).open(requestBucket);
  for (const r of old) {
    const id = r.request?.id ?? "";
    const stored = await jsm.direct.getMessage(historyStream.name, { last_by_subj: subjects.history(id) });
    t.ok(stored !== null, `${id.slice(0, 8)} is in the history`);
    const kept = stored === null ? undefined : fromBinary(RequestRecordSchema, stored.data).request;
    t.ok(kept !== undefined && r.request !== undefined && equals(ApprovalRequestSchema, kept, r.request), `${id.slice(0, 8)}'s history copy holds its whole request`);
    t.equal(await requests.get(id), null, `${id.slice(0, 8)}'s request left the requests bucket with its record`);
    t.equal((await b.broker.get(id)).state, RequestState.DENIED, `${id.slice(0, 8)} is still found by id, on another replica`);
  }
  // The denied list pages from the index into the history: newest first, each record once.
  const denied = { states: new Set([RequestState.DENIED]), agent: "", minRisk: Risk.UNSPECIFIED, createdFromMs: 0, createdToMs: now - 3_000_000 };
  for (const replica of [a.broker, b.broker]) {
    const paged = await everyPage(replica, denied, 2);
    t.same(ids(paged.records), ids([...old].reverse()), "the retired records, newest first, in pages of 2");
    t.equal(paged.pages, 3, "three pages");
  }
  // A retired request's id sent again by its host's sidecar is refused: it would otherwise become a new record and overwrite its history.
  const replayed = old[0]?.request;
  if (replayed === undefined) throw new Error("no request");
  const intakeReplica = await startReplica("replica-intake", undefined, true);
  const sidecarNc = await nats.connect({ kind: "sidecar", host: replayed.host });
  t.teardown(() => sidecarNc.close());
  const resent = create(ApprovalRequestSchema, { ...replayed, ruleId: "rotate", createdAt: timestampFromMs(Date.now()), deadline: timestampFromMs(Date.now() + 20_000) });
  await jetstream(sidecarNc).publish(subjects.request(replayed.host, replayed.id), toBinary(ApprovalRequestSchema, resent));
  const refusal = await waitUntil(async () => {
    for await (const event of readAuditEvents(admin)) if (event.requestId === replayed.id && event.details?.refused === "request_id_reused") return true;
    return false;
  }, 30_000);
  t.ok(refusal, "the replay is refused and audited (request_id_reused)");
  t.equal(await intakeReplica.store.get(replayed.id), undefined, "and no new record was made");
  t.equal((await b.broker.get(replayed.id)).state, RequestState.DENIED, "the history still holds the settled record");
  const first = await a.broker.listPage(denied, () => true, 2);
  t.match(first.nextCursor, /^h\.\d+$/, "the next page is in the history");
  // The history holds each record once, however many replicas retired it.
  const info = await jsm.streams.info(historyStream.name, { subjects_filter: "airlock.history.>" });
  const counts = Object.entries(info.state.subjects ?? {}).filter(([subject]) => oldIds.has(subject.slice("airlock.history.".length)));
  t.same(
    counts.map(([, n]) => n),
    [1, 1, 1, 1, 1],
    "each retired record once in the history",
  );
});

await t.test("only brokers may write or read the history", async (t) => {
  const sidecar = await nats.connect({ kind: "sidecar", host: "host-0" });
  t.teardown(() => sidecar.close());
  const forged = create(RequestRecordSchema, { ...record(0, RequestState.COMPLETED), state: RequestState.COMPLETED });
  const id = forged.request?.id ?? "";
  const js = jetstream(sidecar, { timeout: 3000 });
  const write = await js.publish(subjects.history(id), new Uint8Array([1, 2, 3])).then(
    () => undefined,
    (error: unknown) => error,
  );
  t.equal(natsRefusal(write), "permissions", `a sidecar's forged history record is refused by the server (${String(write)})`);
  const jsm = await jetstreamManager(sidecar, { checkAPI: false, timeout: 3000 });
  const read = await jsm.direct.getMessage(historyStream.name, { last_by_subj: subjects.history(id) }).then(
    () => undefined,
    (error: unknown) => error,
  );
  t.equal(natsRefusal(read), "permissions", `a sidecar cannot read the history (${String(read)})`);
  const audit = await nats.connect({ kind: "audit" });
  t.teardown(() => audit.close());
  const auditWrite = await jetstream(audit, { timeout: 3000 })
    .publish(subjects.history(id), new Uint8Array([1]))
    .then(
      () => undefined,
      (error: unknown) => error,
    );
  t.equal(natsRefusal(auditWrite), "permissions", "the audit reader cannot write it either");
  await t.rejects(a.broker.get(id), { code: Code.NotFound }, "nothing reached the history");
});
