/**
 * A record's request is stored once, apart from the record, against a real NATS: records
 * written before the split (request embedded) still read and are written back as they are; a record is never joined with a request stored for another id (a forged or
 * corrupt entry is no record); a request stored without its record (a broker stopped between
 * the two writes) is what the next delivery builds the record from, and is deleted once of age.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { create, equals, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import t from "tap";
import { CredentialIssuer } from "../../broker/credentials.js";
import { intake, parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { RequestStore } from "../../broker/store.js";
import { vetRequest } from "../../broker/trust.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { Code, createLogger, createVaultClient } from "../../common/index.js";
import { bucketStream, requestBucket, stateBucket, subjects } from "../../common/subjects.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { type ApprovalRequest, ApprovalRequestSchema, type RequestRecord, RequestRecordSchema, RequestState } from "../../proto/index.js";
import { Policy } from "../../sidecar/index.js";

const { nats } = await useInfra(t, { nats: true });
const log = createLogger({ name: "test", level: "silent" });
const policy = Policy.parse(`version: 1
default: deny
rules:
  - id: export
    match: { service: demo.v1.OpsService, method: ExportTable }
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: data-owners }] }
      credential: { kind: database, mount: database, role: export, ttl: 5m }
      timeout: 60s
`);
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"] } }, "", "broker.yaml"));

const brokerNc = await nats.connect({ kind: "broker" });
t.teardown(() => brokerNc.close());
// Nothing here is approved: Vault is never called.
const broker = await Broker.start({
  nc: brokerNc,
  issuer: new CredentialIssuer({ vault: createVaultClient({ address: "http://127.0.0.1:9" }) }),
  signingKey: generateDecisionKey("k1").signing,
  approvals,
  policy: () => policy,
  replicaId: "store-broker",
  log,
  tickIntervalMs: 100,
});
t.teardown(() => broker.close());
const store = await RequestStore.open(brokerNc);
const hostA = await nats.connect({ kind: "sidecar", host: "host-a" });
t.teardown(() => hostA.close());
// Only a broker or an operator may write the buckets; the admin plays a rogue operator or a broker of an earlier version.
const admin = await nats.connect({ kind: "admin" });
t.teardown(() => admin.close());
const records = await new Kvm(admin).open(stateBucket);
const requests = await new Kvm(admin).open(requestBucket);

/** An ExportTable request as host A's sidecar sends it. */
function sent(fields: MessageInitShape<typeof ApprovalRequestSchema> = {}): ApprovalRequest {
  return create(ApprovalRequestSchema, {
    id: randomUUID(),
    identity: { agent: "spiffe://corp/agent/etl", onBehalfOf: "alice@corp", chain: ["alice@corp", "spiffe://corp/agent/etl"], authenticatedBy: "jwt" },
    host: "host-a",
    service: "demo.v1.OpsService",
    method: "ExportTable",
    requestSha256: randomBytes(32),
    reason: "monthly report",
    ruleId: "export",
    credential: { kind: { case: "database", value: { mount: "database", role: "export" } }, ttl: durationFromMs(300_000) },
    createdAt: timestampFromMs(Date.now()),
    deadline: timestampFromMs(Date.now() + 60_000),
    ...fields,
  } as MessageInitShape<typeof ApprovalRequestSchema>);
}

/** The request as the broker records it (vetted against its policy), and its record at intake. */
function recorded(request: ApprovalRequest): { request: ApprovalRequest; record: RequestRecord } {
  const vetted = vetRequest(subjects.request("host-a", request.id), request, policy, new Date());
  if (!vetted.ok) throw new Error(vetted.refusal.message);
  const result = intake(vetted.request, approvals, new Date());
  if (!result.ok) throw result.error;
  return { request: vetted.request, record: result.record };
}

async function send(request: ApprovalRequest): Promise<void> {
  await jetstream(hostA).publish(subjects.request("host-a", request.id), toBinary(ApprovalRequestSchema, request));
}

/** Every id the broker lists from its index (it waits until the index holds every write made before). */
async function listed(): Promise<string[]> {
  return (await broker.list()).map((record) => record.request?.id ?? "");
}

await t.test("a record written before the split (request embedded) still reads, and is written back the same way", async (t) => {
  const { request, record } = recorded(sent());
  await records.create(request.id, toBinary(RequestRecordSchema, record));
  const read = await store.get(request.id);
  t.ok(read?.record.request !== undefined && equals(ApprovalRequestSchema, read.record.request, request), "get returns it with its request");
  t.ok((await listed()).includes(request.id), "the broker's index lists it");
  const denied = await broker.decide(request.id, { reviewer: "dana@corp", approve: false, reason: "not this month" });
  t.equal(denied.state, RequestState.DENIED, "a vote on it counts");
  const last = await records.get(request.id);
  const written = last === null ? undefined : fromBinary(RequestRecordSchema, last.value);
  t.equal(written?.state, RequestState.DENIED, "the vote's write is its last revision");
  t.ok(written?.request !== undefined && equals(ApprovalRequestSchema, written.request, request), "which still embeds the request");
  t.equal(await requests.get(request.id), null, "and nothing is stored apart for it");
  t.ok(equals(ApprovalRequestSchema, (await broker.get(request.id)).request ?? create(ApprovalRequestSchema), request), "it reads as before");
});

await t.test("a record is never joined with a request stored for another id", async (t) => {
  // A record whose key holds another request's bytes.
  const { request: other } = recorded(sent());
  const { request: forged, record } = recorded(sent());
  await requests.create(forged.id, toBinary(ApprovalRequestSchema, other));
  await records.create(forged.id, toBinary(RequestRecordSchema, { ...record, request: undefined }));
  // A record of the old shape whose embedded request names another id.
  const { request: named, record: legacy } = recorded(sent());
  const key = randomUUID();
  await records.create(key, toBinary(RequestRecordSchema, legacy));
  t.equal(await store.get(forged.id), undefined, "a stored request naming another id is not joined");
  t.equal(await store.get(key), undefined, "nor an embedded one naming another id");
  // A record (no request embedded) whose request is in no replica at all: the leader is asked too, and says none.
  const { request: lost, record: bare } = recorded(sent());
  await records.create(lost.id, toBinary(RequestRecordSchema, { ...bare, request: undefined }));
  t.equal(await store.get(lost.id), undefined, "a record whose request is stored nowhere is no record");
  const ids = await listed();
  for (const id of [forged.id, other.id, key, named.id]) t.notOk(ids.includes(id), `the index does not list ${id.slice(0, 8)}`);
  await t.rejects(broker.get(forged.id), { code: Code.NotFound }, "the broker has no such request");
  await t.rejects(broker.decide(forged.id, { reviewer: "dana@corp", approve: false, reason: "no" }), { code: Code.NotFound }, "and takes no vote on it");

  // A request sent with an id whose key already holds another id's request: refused for good, no record.
  const sentAgain = sent({ id: forged.id });
  await records.delete(forged.id);
  const before = await refusals("failed_permanently");
  await send(sentAgain);
  t.ok(await waitUntil(async () => (await refusals("failed_permanently")) > before, 10_000), "the message is given up and audited");
  await t.rejects(broker.get(forged.id), { code: Code.NotFound }, "no record was written");
  await t.rejects(store.hold(sentAgain), { code: Code.DataLoss }, "hold says what the bucket holds is not that request");
});

await t.test("a request stored without its record is what the next delivery builds the record from, and is deleted once of age", async (t) => {
  // A broker that stored the request and stopped before the record: the agent's message comes again, not byte for byte the same.
  const first = recorded(sent({ reason: "as first vetted" })).request;
  t.equal(await store.hold(first), first, "the first hold stores it");
  const again = sent({ ...first, reason: "as sent the second time" });
  await send(again);
  t.ok(await waitUntil(async () => (await broker.get(first.id).catch(() => undefined)) !== undefined, 10_000), "the record is written");
  const taken = await broker.get(first.id);
  t.equal(taken.request?.reason, "as first vetted", "from the request stored first, not the one sent later");
  t.equal(taken.state, RequestState.PENDING);

  // A record built from another request than the one stored under its id is refused.
  const { record: conflicting } = recorded(sent({ id: first.id, reason: "a third one" }));
  const elsewhere = await RequestStore.open(brokerNc);
  t.equal(await elsewhere.create(conflicting), undefined, "create writes no record for it");
  await t.rejects(
    elsewhere.update(conflicting, (await elsewhere.get(first.id))?.revision ?? 0),
    { code: Code.FailedPrecondition },
    "and no update changes the request of a record",
  );

  // The sweep deleting an old orphan just as another delivery builds its record from it: the record keeps its request.
  const { request: late, record: lateRecord } = recorded(sent());
  await store.hold(late);
  const builder = await RequestStore.open(brokerNc);
  t.equal(await builder.hold(late), late, "another replica finds it stored");
  const orphaned = await requests.get(late.id);
  if (orphaned === null) throw new Error("not stored");
  await (await jetstreamManager(admin)).streams.deleteMessage(bucketStream(requestBucket), orphaned.revision, false);
  t.not(await builder.create(lateRecord), undefined, "its record is written");
  const restored = await requests.get(late.id);
  t.ok(restored !== null && equals(ApprovalRequestSchema, fromBinary(ApprovalRequestSchema, restored.value), late), "and the request it found is put back");
  t.equal((await store.get(late.id))?.record.request?.id, late.id, "so the record reads, joined");

  // An orphan: stored, never recorded.
  const orphan = recorded(sent()).request;
  await store.hold(orphan);
  const sweeper = await RequestStore.open(brokerNc);
  const indexed = new Set(await listed());
  t.equal(await sweeper.dropOrphanRequests((id) => indexed.has(id), indexed.size, 600_000), 0, "within the grace it stays");
  t.not(await requests.get(orphan.id), null);
  const later = await RequestStore.open(brokerNc);
  // Past the grace: the orphan goes, and so does the forged request above, whose record is gone.
  t.equal(await later.dropOrphanRequests((id) => indexed.has(id), indexed.size, 0), 2, "past the grace the sweep deletes the requests without a record");
  t.equal(await requests.get(orphan.id), null, "gone from the requests bucket");
  t.not(await requests.get(first.id), null, "a request with a record stays");
  t.equal((await broker.get(first.id)).request?.reason, "as first vetted", "and its record still reads");
  const info = await (await jetstreamManager(admin)).streams.info(bucketStream(requestBucket), { subjects_filter: ">" });
  t.notOk(Object.keys(info.state.subjects ?? {}).some((subject) => subject.endsWith(orphan.id)), "no marker is left for it");
});

async function refusals(reason: string): Promise<number> {
  return (await broker.metrics.refusals.get()).values.find((v) => v.labels.reason === reason)?.value ?? 0;
}
