/**
 * The audit trail on a 3-node JetStream cluster with the stream replicated ×3:
 * an older stream is brought up to date (or start fails naming it), two
 * brokers append at once without breaking the stream or forking the chain, and
 * a writer building on a stale tail is refused.
 */
import { execFile } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { JetStreamApiCodes, JetStreamApiError, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { headers } from "@nats-io/transport-node";
import t from "tap";
import { AuditLog, auditEventToJsonLine, auditStream, ensureAuditStream, eventHash, readAuditEvents } from "../../broker/audit/index.js";
import { verifyTrail } from "../../broker/audit/verify.js";
import { Code } from "../../common/errors.js";
import { bucketStream, requestBucket, stateBucket } from "../../common/subjects.js";
import { startNatsCluster } from "../../harness/index.js";
import { type AuditEvent, AuditEventSchema, AuditEventType } from "../../proto/index.js";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";

const cluster = await startNatsCluster({ nodes: 3 });
t.teardown(() => cluster.stop());
const admin = await cluster.connect({ kind: "admin" });
t.teardown(() => admin.close());
const adminJsm = await jetstreamManager(admin);
// Each broker names a different node first, as two replicas on two machines would.
const brokers = await Promise.all([0, 1].map((index) => cluster.connect({ kind: "broker" }, { servers: [cluster.urls[index] as string, ...cluster.urls] })));
t.teardown(() => Promise.all(brokers.map((nc) => nc.close())));
const reader = await cluster.connect({ kind: "audit" });
t.teardown(() => reader.close());

async function trail(): Promise<AuditEvent[]> {
  const events: AuditEvent[] = [];
  for await (const event of readAuditEvents(reader)) events.push(event);
  return events;
}

await t.test("an audit stream an older version made (one replica, no atomic batches) is brought up to date, or start fails naming it", async (t) => {
  await adminJsm.streams.add({ name: auditStream.name, subjects: [auditStream.subject], deny_delete: true, deny_purge: true, allow_direct: true });
  const broker = brokers[0];
  if (broker === undefined) throw new Error("no broker connection");
  // The broker's credential may not update streams: start fails closed, naming the stream and what differs.
  const refused = await AuditLog.open(broker, { ensure: { replicas: 3 } }).catch((error: unknown) => error);
  t.match(refused, { code: Code.FailedPrecondition, details: { stream: auditStream.name } });
  t.match(String(refused), /num_replicas/);
  t.match(String(refused), /allow_atomic/);
  // An operator applies it with the admin credential of the material: every stream and bucket, each change printed.
  const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "cli", "airlock.ts");
  const urls = cluster.urls.flatMap((url) => ["--nats", url]);
  const { stdout } = await promisify(execFile)(process.execPath, ["--import", import.meta.resolve("tsx"), cli, "nats", "ensure-streams", "--dir", cluster.securityDir, ...urls, "--replicas", "3"]);
  t.match(stdout, /^updated AIRLOCK_AUDIT: .*"num_replicas":\{"from":1,"to":3\}/m);
  t.match(stdout, /^updated AIRLOCK_AUDIT: .*"allow_atomic":\{"to":true\}/m);
  t.match(stdout, /every stream and bucket has 3 replica\(s\)/);
  t.notMatch(stdout, /SU[A-Z2-7]{20}/, "no seed printed");
  const config = (await adminJsm.streams.info(auditStream.name)).config;
  t.equal(config.num_replicas, 3);
  t.equal(config.allow_atomic, true);
  t.equal(config.deny_delete, true, "still refuses deletes");
  t.equal((await adminJsm.streams.info(bucketStream(stateBucket))).config.num_replicas, 3, "the state bucket it made has 3 replicas too");
  t.equal((await adminJsm.streams.info(bucketStream(requestBucket))).config.num_replicas, 3, "and so has the bucket of the records' requests");
  // Now the broker opens it, and a second ensure changes nothing.
  await AuditLog.open(broker, { ensure: { replicas: 3 } });
  const logged: unknown[] = [];
  await ensureAuditStream(adminJsm, { replicas: 3, log: { warn: (fields) => logged.push(fields) } });
  t.same(logged, [], "nothing more to change");
});

const perWriter = 60;

await t.test("two brokers appending at once on the R3 stream: every append resolves, the chain verifies end to end, no fork", async (t) => {
  const logs = await Promise.all(brokers.map((nc) => AuditLog.open(nc, { ensure: { replicas: 3 } })));
  const started = Date.now();
  // Four callers per broker, each appending one to three events at a time: group commits of several sizes collide.
  const outcomes = await Promise.allSettled(
    logs.flatMap((log, writer) =>
      Array.from({ length: 4 }, async (_, lane) => {
        const written: AuditEvent[] = [];
        for (let i = lane; i < perWriter; i += 4) {
          const size = 1 + (i % 3);
          written.push(...(await log.appendAll(Array.from({ length: size }, (_, k) => ({ type: AuditEventType.REQUEST_RECEIVED, actor: `writer-${writer}`, requestId: `r${writer}-${i}-${k}` })))));
        }
        return written;
      }),
    ),
  );
  const rejected = outcomes.filter((outcome) => outcome.status === "rejected");
  t.same(rejected, [], "every append resolved");
  const expected = 2 * Array.from({ length: perWriter }, (_, i) => 1 + (i % 3)).reduce((a, b) => a + b, 0);
  const events = await trail();
  t.equal(events.length, expected, `all ${expected} events are in the stream, once`);
  t.equal(new Set(events.map((event) => event.eventId)).size, events.length, "no event twice");
  t.same(
    events.map((event) => Number(event.sequence)),
    events.map((_, index) => index + 1),
    "one sequence, no gaps",
  );
  const verdict = verifyTrail(events);
  t.ok(verdict.intact, `the chain verifies end to end (${JSON.stringify(verdict.error ?? "")})`);
  t.same([...new Set(events.map((event) => event.actor))].sort(), ["writer-0", "writer-1"], "both brokers wrote");
  const info = await adminJsm.streams.info(auditStream.name);
  t.equal(info.config.num_replicas, 3);
  t.equal(info.cluster?.replicas?.length, 2, "a leader and two replicas hold it");
  t.comment(`audit two writers on R3: ${outcomes.length * (perWriter / 4)} appends, ${events.length} events in ${Date.now() - started} ms`);
});

await t.test("a writer chaining on a stale tail is refused whole by the stream, and the chain still verifies", async (t) => {
  const before = await trail();
  const tail = before.at(-1);
  if (tail === undefined) throw new Error("an empty trail");
  const info = await adminJsm.streams.info(auditStream.name);
  // A third writer read the tail one event ago, and writes a two-event batch that would fork the chain there.
  const stale = before.at(-2) as AuditEvent;
  const forged = [0, 1].map((k) =>
    create(AuditEventSchema, { sequence: stale.sequence + BigInt(k + 1), eventId: `stale-${k}`, type: AuditEventType.DECIDED, at: timestampFromMs(Date.now()), actor: "mallory", requestId: "r-forged" }),
  );
  let previous = stale.sha256;
  for (const event of forged) {
    event.prevSha256 = previous;
    event.sha256 = eventHash(event);
    previous = event.sha256;
  }
  const batchId = "stale-batch";
  const first = headers();
  first.set("Nats-Batch-Id", batchId);
  first.set("Nats-Batch-Sequence", "1");
  first.set("Nats-Expected-Last-Sequence", String(info.state.last_seq - 1));
  const broker = brokers[1];
  if (broker === undefined) throw new Error("no broker connection");
  broker.publish(auditStream.subject, auditEventToJsonLine(forged[0] as AuditEvent), { headers: first });
  const commit = headers();
  commit.set("Nats-Batch-Id", batchId);
  commit.set("Nats-Batch-Sequence", "2");
  commit.set("Nats-Batch-Commit", "1");
  const refused = await jetstream(broker)
    .publish(auditStream.subject, auditEventToJsonLine(forged[1] as AuditEvent), { headers: commit })
    .catch((error: unknown) => error);
  t.ok(refused instanceof JetStreamApiError && refused.code === JetStreamApiCodes.StreamWrongLastSequence, "refused: wrong last sequence");
  const after = await trail();
  t.equal(after.length, before.length, "neither event of the batch is stored");
  t.ok(verifyTrail(after).intact, "the chain still verifies");
  // The honest brokers keep appending after the refusal.
  const log = await AuditLog.open(broker, { ensure: { replicas: 3 } });
  const next = await log.append({ type: AuditEventType.DECIDED, actor: "writer-1", requestId: "after" });
  t.equal(next.sequence, tail.sequence + 1n);
  t.ok(verifyTrail(await trail()).intact);
});

await t.test("a forged event published without the batch's expectations is stored, and verification names the broken link", async (t) => {
  // The broker's credential can publish to the trail; the chain is what exposes a writer that ignores it.
  const before = await trail();
  const stale = before.at(-2) as AuditEvent;
  const forged = create(AuditEventSchema, { sequence: stale.sequence + 1n, eventId: "forged", type: AuditEventType.DECIDED, at: timestampFromMs(Date.now()), actor: "mallory", prevSha256: stale.sha256 });
  forged.sha256 = eventHash(forged);
  const broker = brokers[0];
  if (broker === undefined) throw new Error("no broker connection");
  await jetstream(broker).publish(auditStream.subject, auditEventToJsonLine(forged));
  const verdict = verifyTrail(await trail());
  t.notOk(verdict.intact);
  t.equal(verdict.firstBrokenSequence, Number(forged.sequence), `the forged event is the first broken link (${String(verdict.error)})`);
  t.equal(verifyTrail(before).intact, true, "the trail before it verifies");
});
