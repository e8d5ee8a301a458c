import { execFile } from "node:child_process";
import { createPrivateKey } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { DiscardPolicy, jetstreamManager } from "@nats-io/jetstream";
import t from "tap";
import { AuditKeyRing, AuditLog, auditEventsFromJsonl, auditEventToJsonLine, auditStream, readAuditEvents, verifyTrail, writeAuditKey } from "../../broker/audit/index.js";
import { useInfra } from "../../harness/index.js";
import { type AuditEvent, AuditEventType } from "../../proto/index.js";

const { nats } = await useInfra(t, { nats: true });
// Two broker replicas' connections, and an operator's (stream settings only an operator may change).
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const other = await nats.connect({ kind: "broker" });
t.teardown(() => other.close());
const operator = await nats.connect({ kind: "admin" });
t.teardown(() => operator.close());
const auditReader = await nats.credentials({ kind: "audit" });
const readerFlags = ["--nats-seed", auditReader.auth.seedFile, "--nats-ca", nats.caFile];
// Each replica signs with a key of its own; the key ring names both.
const keyDir = await mkdtemp(join(tmpdir(), "airlock-audit-keys-"));
t.teardown(() => rm(keyDir, { recursive: true, force: true }));
async function signer(keyId: string) {
  const files = await writeAuditKey(keyDir, keyId);
  return { keyId, privateKey: createPrivateKey(await readFile(files.privateKeyFile, "utf8")) };
}
const replicaA = await signer("replica-a");
const replicaB = await signer("replica-b");
const keyring = join(keyDir, "keyring.yaml");
await writeFile(keyring, "keys:\n  - key_id: replica-a\n    public_key_file: replica-a.pub.pem\n  - key_id: replica-b\n    public_key_file: replica-b.pub.pem\n");
const keys = await AuditKeyRing.load(keyring);

async function everything(): Promise<AuditEvent[]> {
  const events: AuditEvent[] = [];
  for await (const event of readAuditEvents(nc)) events.push(event);
  return events;
}

await t.test("appended events form an intact, signed hash chain", async (t) => {
  const log = await AuditLog.open(nc, { signer: replicaA });
  const first = await log.append({ type: AuditEventType.REQUEST_RECEIVED, actor: "sidecar:web-01", requestId: "r1", details: { method: "ExportTable" } });
  const second = await log.append({ type: AuditEventType.DECIDED, actor: "rita@corp", requestId: "r1", details: { verdict: "approved", reason: "ok" } });
  t.equal(first.sequence, 1n);
  t.equal(first.prevSha256.length, 0, "the first event links to nothing");
  t.same(Buffer.from(second.prevSha256), Buffer.from(first.sha256), "each event carries the previous event's hash");
  t.equal(first.keyId, "replica-a");
  t.equal(first.signature.length, 64, "an Ed25519 signature");
  const verdict = verifyTrail(await everything(), { keys });
  t.same(verdict, { intact: true, eventsChecked: 2, signed: 2, checkpoints: 0, firstBrokenSequence: 0, problem: "" });
});

await t.test("two replicas appending at once, singly and in pipelined batches, never fork the chain", async (t) => {
  const a = await AuditLog.open(nc, { signer: replicaA });
  const b = await AuditLog.open(other, { signer: replicaB });
  const batch = (i: number) => [0, 1, 2].map((k) => ({ type: AuditEventType.VOTE_RECORDED, actor: `b-${i}-${k}`, requestId: `r${i}` }));
  await Promise.all([
    ...Array.from({ length: 15 }, (_, i) => a.append({ type: AuditEventType.VOTE_RECORDED, actor: `a-${i}`, requestId: `r${i}` })),
    ...Array.from({ length: 5 }, (_, i) => b.appendAll(batch(i))),
  ]);
  const events = await everything();
  t.equal(events.length, 32);
  t.same(
    events.map((e) => Number(e.sequence)),
    Array.from({ length: 32 }, (_, i) => i + 1),
  );
  t.same(verifyTrail(events, { keys }).signed, 32, "each replica's events verify with its own key");
});

await t.test("an edited or removed event in an export is found, naming the first broken link", async (t) => {
  const lines = (await everything()).map(auditEventToJsonLine);
  t.ok(verifyTrail(auditEventsFromJsonl(lines.join("\n"))).intact, "the export verifies as the stream does");

  const edited = [...lines];
  edited[4] = edited[4]?.replace(/"actor":"[^"]*"/, '"actor":"mallory"') ?? "";
  const editedVerdict = verifyTrail(auditEventsFromJsonl(edited.join("\n")));
  t.equal(editedVerdict.intact, false);
  t.equal(editedVerdict.firstBrokenSequence, 5);
  t.equal(editedVerdict.error, "event_altered");
  t.match(editedVerdict.problem, /altered/);

  const removed = lines.filter((_, i) => i !== 9);
  const removedVerdict = verifyTrail(auditEventsFromJsonl(removed.join("\n")));
  t.equal(removedVerdict.firstBrokenSequence, 11);
  t.equal(removedVerdict.error, "event_missing");
  t.match(removedVerdict.problem, /missing/);

  t.throws(() => auditEventsFromJsonl("{not json"), /line 1 is not an audit event/);
});

await t.test("the stream refuses deletes and purges, even to an operator's credential", async (t) => {
  const jsm = await jetstreamManager(operator);
  await t.rejects(jsm.streams.deleteMessage(auditStream.name, 1), "delete refused");
  await t.rejects(jsm.streams.purge(auditStream.name), "purge refused");
  t.equal((await jsm.streams.info(auditStream.name)).state.messages, 32, "every event still there");
});

const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "cli", "airlock.ts");
async function airlock(...args: string[]): Promise<{ code: number; stdout: string }> {
  try {
    const { stdout } = await promisify(execFile)(process.execPath, ["--import", import.meta.resolve("tsx"), cli, ...args]);
    return { code: 0, stdout };
  } catch (error) {
    const failed = error as { code: number; stdout: string };
    return { code: failed.code, stdout: failed.stdout };
  }
}

await t.test("airlock audit export and verify, against the stream and an edited file", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "airlock-audit-test-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const live = await airlock("audit", "verify", "--nats", nats.url, ...readerFlags, "--keys", keyring);
  t.equal(live.code, 0);
  t.match(live.stdout, /^audit ok events=32 signed=32 checkpoints=0 verified=unanchored$/m, "without checkpoints the signatures hold, but nothing outside NATS anchors the trail");
  const unkeyed = await airlock("audit", "verify", "--nats", nats.url, ...readerFlags);
  t.not(unkeyed.code, 0, "verification without a key ring is refused, not reported as intact");
  const exported = await airlock("audit", "export", "--nats", nats.url, ...readerFlags);
  t.equal(exported.stdout.trim().split("\n").length, 32);
  await writeFile(join(dir, "audit.jsonl"), exported.stdout.replace('"actor":"rita@corp"', '"actor":"mallory@corp"'));
  const edited = await airlock("audit", "verify", "--file", join(dir, "audit.jsonl"), "--keys", keyring);
  t.equal(edited.code, 1);
  t.match(edited.stdout, /audit BROKEN error=event_altered at=2 .*: event 2 was altered/);
  const recent = await airlock("audit", "export", "--nats", nats.url, ...readerFlags, "--since", new Date(Date.now() + 60_000).toISOString());
  t.equal(recent.stdout.trim(), "", "nothing after a future time");
});

await t.test("appends made during a write go in the next one; each resolves or rejects by its own events", async (t) => {
  const jsm = await jetstreamManager(operator);
  const before = await jsm.streams.info(auditStream.name);
  // Room for four more events: the first two appends fit, the third does not.
  await jsm.streams.update(auditStream.name, { ...before.config, max_msgs: before.state.messages + 4, discard: DiscardPolicy.New });
  t.teardown(() => jsm.streams.update(auditStream.name, { ...before.config }).then(() => undefined));
  const log = await AuditLog.open(nc);
  const pair = (name: string) => [0, 1].map((k) => ({ type: AuditEventType.VOTE_RECORDED, actor: `${name}-${k}`, requestId: name }));
  // The first starts a write at once; the other two wait for it and are written together.
  const outcomes = await Promise.allSettled([log.appendAll(pair("first")), log.appendAll(pair("second")), log.appendAll(pair("third"))]);
  t.same(
    outcomes.map((o) => o.status),
    ["fulfilled", "fulfilled", "rejected"],
  );
  const second = outcomes[1]?.status === "fulfilled" ? outcomes[1].value : [];
  t.same(
    second.map((e) => e.actor),
    ["second-0", "second-1"],
    "an append written before a refusal in the same write resolves with its own events",
  );
  t.match(String(outcomes[2]?.status === "rejected" ? outcomes[2].reason : ""), /could not be written: failing closed/);
  const events = await everything();
  t.same(
    events.slice(-4).map((e) => e.actor),
    ["first-0", "first-1", "second-0", "second-1"],
    "nothing of the refused append is in the stream",
  );
  t.ok(verifyTrail(events).intact);
  // The log keeps working once the stream has room again.
  await jsm.streams.update(auditStream.name, { ...before.config });
  const after = await log.append({ type: AuditEventType.VOTE_RECORDED, actor: "after", requestId: "r" });
  t.equal(after.sequence, BigInt(events.length + 1));
});

await t.test("an audit append with NATS down fails closed", async (t) => {
  const log = await AuditLog.open(nc);
  await nats.pause();
  const error = await log.append({ type: AuditEventType.DECIDED, actor: "x" }).catch((e: unknown) => e);
  await nats.resume();
  t.match(String(error), /could not be written: failing closed/);
});
