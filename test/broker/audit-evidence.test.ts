import { execFile } from "node:child_process";
import { createHash, createPrivateKey, type KeyObject, sign } from "node:crypto";
import { appendFile, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { clone } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import t from "tap";
import {
  AuditKeyRing,
  AuditLog,
  auditEventToJsonLine,
  auditStream,
  Checkpointer,
  DirectoryCheckpointSink,
  ensureAuditStream,
  eventHash,
  readAuditEvents,
  readCheckpointDirectory,
  signatureContexts,
  TrailVerifier,
  trailVerdictLine,
  verifyTrail,
  writeAuditKey,
} from "../../broker/audit/index.js";
import { Code } from "../../common/errors.js";
import { createLogger } from "../../common/logger.js";
import { useInfra } from "../../harness/index.js";
import { type AuditEvent, AuditEventSchema, AuditEventType } from "../../proto/index.js";

// The attacker here holds NATS's administrator credential: it may update, delete and
// recreate the audit stream. What it lacks is a broker's private key and the checkpoint sink.
const { nats } = await useInfra(t, { nats: true });
const broker = await nats.connect({ kind: "broker" });
t.teardown(() => broker.close());
const admin = await nats.connect({ kind: "admin" });
t.teardown(() => admin.close());
const adminJsm = await jetstreamManager(admin);
const adminJs = jetstream(admin);

const dir = await mkdtemp(join(tmpdir(), "airlock-audit-evidence-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const keyDir = join(dir, "keys");
const checkpointDir = join(dir, "checkpoints");
async function loadSigner(keyId: string): Promise<{ keyId: string; privateKey: KeyObject }> {
  const files = await writeAuditKey(keyDir, keyId);
  return { keyId, privateKey: createPrivateKey(await readFile(files.privateKeyFile, "utf8")) };
}
const replica = await loadSigner("broker-1");
const attacker = await loadSigner("mallory");
const keyringFile = join(keyDir, "keyring.yaml");
await writeFile(keyringFile, "keys:\n  - key_id: broker-1\n    public_key_file: broker-1.pub.pem\n");
const keys = await AuditKeyRing.load(keyringFile);

const silent = createLogger({ name: "test", level: "silent" });
const outcomes: string[] = [];
const checkpointer = await Checkpointer.start({
  nc: broker,
  sink: new DirectoryCheckpointSink(checkpointDir, 1000),
  signer: replica,
  everyEvents: 5,
  intervalMs: 3_600_000,
  log: silent,
  onOutcome: (outcome) => outcomes.push(outcome),
});
t.teardown(() => checkpointer.close());
const log = await AuditLog.open(broker, { signer: replica, onWritten: (count) => checkpointer.noteWritten(count) });

async function trail(): Promise<AuditEvent[]> {
  const events: AuditEvent[] = [];
  for await (const event of readAuditEvents(broker)) events.push(event);
  return events;
}

/** Verifies what is in the stream now, against the checkpoints on disk (or none). */
async function verify(withCheckpoints = true) {
  const found = withCheckpoints ? await readCheckpointDirectory(checkpointDir) : undefined;
  const verifier = new TrailVerifier({ keys, ...(found === undefined ? {} : { checkpoints: found.checkpoints, malformedCheckpoints: found.malformed }) });
  for (const event of await trail()) verifier.add(event);
  return verifier.finish();
}

/** The administrator's rewrite: delete the stream, make it again, publish the given events. */
async function rewrite(events: readonly AuditEvent[]): Promise<void> {
  await adminJsm.streams.delete(auditStream.name);
  await ensureAuditStream(adminJsm);
  // A message id, so a publish retried after an unseen acknowledgement cannot store an event twice.
  for (const event of events) await adminJs.publish(auditStream.subject, auditEventToJsonLine(event), { msgID: `${event.eventId}-${event.sequence}` });
  // Direct gets may answer from the deleted stream for a moment after it is made again: wait until reads show the new one.
  const want = events.map((event) => Buffer.from(event.sha256).toString("hex")).join();
  for (const until = Date.now() + 10_000; ; ) {
    const seen = (await trail()).map((event) => Buffer.from(event.sha256).toString("hex")).join();
    if (seen === want) return;
    if (Date.now() > until) throw new Error(`the rewritten stream does not read back as written`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Signs an event as `signer` would (its hash recomputed for the new key id). */
function signAs(event: AuditEvent, signer: { keyId: string; privateKey: KeyObject }): void {
  event.keyId = signer.keyId;
  event.signature = new Uint8Array(0);
  event.sha256 = eventHash(event);
  event.signature = new Uint8Array(sign(null, Buffer.concat([Buffer.from(signatureContexts.event), event.sha256]), signer.privateKey));
}

/** The events re-linked from the first, hashed, and signed with `signer` (or unsigned). */
function rechain(events: readonly AuditEvent[], signer: { keyId: string; privateKey: KeyObject } | undefined): AuditEvent[] {
  let previous: Uint8Array = new Uint8Array(0);
  return events.map((original, index) => {
    const event = clone(AuditEventSchema, original);
    event.sequence = BigInt(index + 1);
    event.prevSha256 = previous;
    if (signer === undefined) {
      event.keyId = "";
      event.signature = new Uint8Array(0);
      event.sha256 = eventHash(event);
    } else {
      signAs(event, signer);
    }
    previous = event.sha256;
    return event;
  });
}

for (let i = 0; i < 12; i++) {
  await log.append({ type: AuditEventType.DECIDED, actor: i === 3 ? "dana@corp" : `reviewer-${i}`, requestId: `r${i}`, details: { verdict: i === 3 ? "denied" : "approved" } });
}
await checkpointer.checkpoint();
const original = await trail();
/** The lowest sequence a checkpoint names above `sequence` (checkpoints name the head when they run). */
async function checkpointAbove(sequence: number): Promise<number> {
  return Math.min(...(await readCheckpointDirectory(checkpointDir)).checkpoints.map((c) => c.sequence).filter((s) => s > sequence));
}

await t.test("a signed trail with its checkpoints verifies; each checkpoint names the head then", async (t) => {
  t.equal(original.length, 12);
  const verdict = await verify();
  t.same({ intact: verdict.intact, eventsChecked: verdict.eventsChecked, signed: verdict.signed, problem: verdict.problem }, { intact: true, eventsChecked: 12, signed: 12, problem: "" });
  const found = await readCheckpointDirectory(checkpointDir);
  const sequences = found.checkpoints.map((c) => c.sequence);
  // Taken while appends go on, a checkpoint names the head when it runs: at or after its trigger.
  t.ok(sequences.length >= 3 && (sequences[0] ?? 0) >= 5 && (sequences[1] ?? 0) >= 10 && sequences.at(-1) === 12, `one after every 5 events and one on demand: ${sequences.join(",")}`);
  for (const checkpoint of found.checkpoints) t.equal(checkpoint.headSha256, Buffer.from(original[checkpoint.sequence - 1]?.sha256 ?? []).toString("hex"), `checkpoint ${checkpoint.index} names event ${checkpoint.sequence}'s hash`);
  t.same(new Set(outcomes), new Set(["written"]), `outcomes: ${outcomes.join(",")}`);
});

await t.test("a forged event chained with the plain SHA-256 is found: it carries no broker's signature", async (t) => {
  const forged = clone(AuditEventSchema, original[11] as AuditEvent);
  forged.sequence = 13n;
  forged.actor = "dana@corp";
  forged.details = { verdict: "approved" };
  forged.prevSha256 = (original[11] as AuditEvent).sha256;
  forged.keyId = "";
  forged.signature = new Uint8Array(0);
  forged.sha256 = eventHash(forged);
  await adminJs.publish(auditStream.subject, auditEventToJsonLine(forged));
  const verdict = await verify();
  t.same([verdict.error, verdict.firstBrokenSequence], ["unsigned_event", 13]);
  // Signed with a key of the attacker's own, it is no better.
  signAs(forged, attacker);
  await rewrite([...original, forged]);
  const withKey = await verify();
  t.same([withKey.error, withKey.firstBrokenSequence], ["unknown_key", 13]);
  await rewrite(original);
  t.equal((await verify()).problem, "", "restored");
});

await t.test("a stream update that drops history is found: the trail no longer starts at event 1", async (t) => {
  const info = await adminJsm.streams.info(auditStream.name);
  await adminJsm.streams.update(auditStream.name, { ...info.config, max_msgs: 5 });
  const verdict = await verify();
  t.same([verdict.error, verdict.firstBrokenSequence], ["event_missing", 8]);
  await rewrite(original);
});

await t.test("a trail replaced by another history is found by the checkpoints, signed or not", async (t) => {
  const madeUp = original.slice(0, 5).map((event) => clone(AuditEventSchema, event));
  (madeUp[3] as AuditEvent).details = { verdict: "approved" };
  (madeUp[0] as AuditEvent).eventId = "another-history";
  await rewrite(rechain(madeUp, undefined));
  t.same([(await verify(false)).error], ["unsigned_event"], "without checkpoints, the missing signatures show");
  t.same([(await verify()).error], ["trail_replaced"]);
  // Even with the broker's own key (stolen), only the checkpoints can tell.
  await rewrite(rechain(madeUp, replica));
  t.ok((await verify(false)).intact, "a stolen key makes a replaced trail verify on its own");
  const verdict = await verify();
  t.same([verdict.error, verdict.firstBrokenSequence], ["trail_replaced", 1]);
  // The broker's checkpointer refuses to bless it.
  const before = (await readCheckpointDirectory(checkpointDir)).checkpoints.length;
  await checkpointer.checkpoint();
  t.equal(outcomes.at(-1), "trail_replaced");
  t.equal((await readCheckpointDirectory(checkpointDir)).checkpoints.length, before, "no checkpoint was written of the replaced trail");
  // And the command-line check names it too.
  const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "cli", "airlock.ts");
  const reader = await nats.credentials({ kind: "audit" });
  const run = await promisify(execFile)(process.execPath, ["--import", import.meta.resolve("tsx"), cli, "audit", "verify", "--nats", nats.url, "--nats-seed", reader.auth.seedFile, "--nats-ca", nats.caFile, "--keys", keyringFile, "--checkpoints", checkpointDir]).catch(
    (error: unknown) => error as { code: number; stdout: string },
  );
  t.equal("code" in run ? run.code : 0, 1);
  t.match(run.stdout, /^audit BROKEN error=trail_replaced at=1 /m);
  await rewrite(original);
});

await t.test("a trail truncated after a checkpoint is found", async (t) => {
  await rewrite(original.slice(0, 8));
  t.ok((await verify(false)).intact, "a prefix of a signed trail verifies on its own");
  const verdict = await verify();
  t.same([verdict.error, verdict.firstBrokenSequence], ["trail_truncated", await checkpointAbove(8)]);
  await rewrite(original);
});

await t.test("a trail edited before the newest checkpoint and re-signed with a stolen key is found", async (t) => {
  const edited = original.map((event) => clone(AuditEventSchema, event));
  (edited[3] as AuditEvent).details = { verdict: "approved" };
  await rewrite(rechain(edited, replica));
  t.ok((await verify(false)).intact);
  const verdict = await verify();
  t.same([verdict.error, verdict.firstBrokenSequence], ["trail_edited", await checkpointAbove(3)]);
  await rewrite(original);
});

await t.test("a dropped event, an event edited in place, an event signed by an unknown key", async (t) => {
  await rewrite(original.filter((_, index) => index !== 6));
  const dropped = await verify();
  t.same([dropped.error, dropped.firstBrokenSequence], ["event_missing", 8], dropped.problem);
  const inPlace = original.map((event) => clone(AuditEventSchema, event));
  (inPlace[2] as AuditEvent).actor = "someone-else";
  await rewrite(inPlace);
  t.same([(await verify()).error, (await verify()).firstBrokenSequence], ["event_altered", 3]);
  const resigned = original.map((event) => clone(AuditEventSchema, event));
  signAs(resigned[9] as AuditEvent, attacker);
  await rewrite(resigned);
  t.same([(await verify(false)).error, (await verify(false)).firstBrokenSequence], ["unknown_key", 10]);
  await rewrite(original);
  t.ok((await verify()).intact);
});

await t.test("a missing checkpoint is a gap; a corrupt one is named", async (t) => {
  // The three checkpoints may span period files: gather them into one (verification reads every file).
  const writerDir = join(checkpointDir, "broker-1");
  const files = (await readdir(writerDir)).sort();
  const texts = await Promise.all(files.map((name) => readFile(join(writerDir, name), "utf8")));
  const text = texts.join("");
  for (const name of files.slice(1)) await rm(join(writerDir, name));
  const path = join(writerDir, files[0] ?? "");
  const lines = text.trim().split("\n");
  t.equal(lines.length, 3);
  await writeFile(path, `${[lines[0], lines[2]].join("\n")}\n`);
  const gap = await verify();
  t.same([gap.error], ["checkpoint_gap"]);
  await writeFile(path, `${[lines[0], "{not a checkpoint", lines[1], lines[2]].join("\n")}\n`);
  t.same([(await verify()).error], ["checkpoint_malformed"]);
  // A checkpoint rewritten to match an edited trail needs the broker's key.
  const changed = JSON.parse(lines[2] ?? "{}") as Record<string, unknown>;
  changed.head_sha256 = createHash("sha256").update("other").digest("hex");
  await writeFile(path, `${[lines[0], lines[1], JSON.stringify(changed)].join("\n")}\n`);
  t.same([(await verify()).error], ["checkpoint_bad_signature"]);
  await writeFile(path, text);
  t.ok((await verify()).intact, "the original files verify again");
});

await t.test("a retired key cannot sign an event back-dated to before its retirement, nor one without a time", async (t) => {
  const last = original[original.length - 1] as AuditEvent;
  const lastMs = timestampMs(last.at ?? timestampFromMs(0));
  // broker-1 retired a minute after the last event; the attacker stole its private key later.
  const retiredRing = AuditKeyRing.fromPem({ "broker-1": await readFile(join(keyDir, "broker-1.pub.pem"), "utf8") }, { "broker-1": new Date(lastMs + 60_000) });
  t.ok(verifyTrail(original, { keys: retiredRing }).intact, "the real trail predates the retirement");
  const forge = (at: number | undefined): AuditEvent => {
    const event = clone(AuditEventSchema, last);
    event.sequence = last.sequence + 1n;
    event.prevSha256 = last.sha256;
    event.details = { verdict: "approved", forged: "yes" };
    if (at === undefined) delete event.at;
    else event.at = timestampFromMs(at);
    signAs(event, replica);
    return event;
  };
  const now = verifyTrail([...original, forge(lastMs + 3_600_000)], { keys: retiredRing });
  t.same([now.error, now.firstBrokenSequence], ["retired_key", 13], "dated truthfully, it is past the retirement");
  const backdated = verifyTrail([...original, forge(lastMs - 3_600_000)], { keys: retiredRing });
  t.same([backdated.error, backdated.firstBrokenSequence], ["time_reversed", 13], "back-dated, it goes before the event it follows");
  const timeless = verifyTrail([...original, forge(undefined)], { keys: retiredRing });
  t.same([timeless.error, timeless.firstBrokenSequence], ["time_reversed", 13], "no time at all is refused, not read as 1970");
  const skewed = verifyTrail([...original, forge(lastMs - 500)], { keys: retiredRing });
  t.ok(skewed.intact, "half a second behind is a replica's clock skew, not a forgery");
});

await t.test("a writer's whole checkpoint chain deleted is found when the writers are named; the verdict line says what was checked", async (t) => {
  const found = await readCheckpointDirectory(checkpointDir);
  const named = verifyTrail(original, { keys, checkpoints: found.checkpoints, expectedWriters: ["broker-1"] });
  t.ok(named.intact, named.problem);
  t.match(trailVerdictLine(named), /^audit ok events=12 signed=12 checkpoints=\d+ verified=yes$/);
  // broker-2's chain was removed from the sink: the checkpoints that remain still verify, but the writer is missing.
  const missing = verifyTrail(original, { keys, checkpoints: found.checkpoints, expectedWriters: ["broker-1", "broker-2"] });
  t.same([missing.error, missing.intact], ["checkpoint_gap", false]);
  t.match(missing.problem, /no checkpoints from writer "broker-2"/);
  t.equal(trailVerdictLine(verifyTrail(original, { keys })), "audit ok events=12 signed=12 checkpoints=0 verified=unanchored", "signatures hold, nothing outside NATS anchors them");
  t.equal(trailVerdictLine(verifyTrail(original)), "audit ok events=12 signed=0 checkpoints=0 verified=unsigned", "a chain without signatures is not called verified");
});

await t.test("the checkpoint sink continues from the highest index, cuts a line torn by a crash, and refuses a second writer under one key id", async (t) => {
  const sinkDir = join(dir, "sink-recovery");
  const sink = new DirectoryCheckpointSink(sinkDir, 3_600_000);
  const stub = (index: number, at: string) => ({ writer: "w1", index, stream: "AIRLOCK_AUDIT", sequence: index, headSha256: "aa", genesisSha256: "bb", at, prevSha256: "", keyId: "w1", signature: "c2ln" });
  await sink.append(stub(1, "2026-12-04T20:10:00.000Z"));
  // The clock was set back an hour: checkpoint 2 lands in an older period's file, which sorts first.
  await sink.append(stub(2, "2026-12-04T19:10:00.000Z"));
  t.equal((await sink.last("w1"))?.index, 2, "the highest index, not the file that sorts last");
  const newestFile = join(sinkDir, "w1", "2026-12-04T200000.jsonl");
  await appendFile(newestFile, '{"writer":"w1","index":3,"str');
  t.equal((await sink.last("w1"))?.index, 2, "a torn line is not a checkpoint, and does not stop the chain");
  t.ok((await readFile(newestFile, "utf8")).endsWith("\n"), "the torn bytes were cut off");
  await sink.append(stub(3, "2026-12-04T20:20:00.000Z"));
  const read = await readCheckpointDirectory(sinkDir);
  t.same([read.checkpoints.map((c) => c.index).sort(), read.malformed], [[1, 2, 3], []], "the next checkpoint is a line of its own; nothing malformed is left");

  // Two replicas configured with one key id: the second sees a chain it did not write and writes nothing.
  const conflictDir = join(dir, "sink-conflict");
  const seen: string[][] = [[], []];
  const writers = await Promise.all(
    [0, 1].map((i) => Checkpointer.start({ nc: broker, sink: new DirectoryCheckpointSink(conflictDir, 3_600_000), signer: replica, everyEvents: 1_000, intervalMs: 3_600_000, log: silent, onOutcome: (outcome) => seen[i]?.push(outcome) })),
  );
  for (const writer of writers) t.teardown(() => writer.close());
  await writers[0]?.checkpoint();
  await writers[1]?.checkpoint();
  t.same(seen, [["written"], ["writer_conflict"]]);
  t.equal((await readCheckpointDirectory(conflictDir)).checkpoints.length, 1, "the chain did not fork");
});

await t.test("a message in the trail that is not an event is named: event_undecodable", async (t) => {
  const junkAt = (await adminJsm.streams.info(auditStream.name)).state.last_seq + 1;
  await adminJs.publish(auditStream.subject, "{not an audit event");
  const verifier = new TrailVerifier({ keys });
  for await (const event of readAuditEvents(broker, { onUndecodable: (sequence) => verifier.undecodable(sequence) })) verifier.add(event);
  const verdict = verifier.finish();
  t.same([verdict.error, verdict.firstBrokenSequence, verdict.intact], ["event_undecodable", junkAt, false], verdict.problem);
  await t.rejects(
    (async () => {
      for await (const event of readAuditEvents(broker)) void event;
    })(),
    { code: Code.DataLoss },
    "a reader that is not told what to do with it stops there, with data_loss",
  );
  await rewrite(original);
  t.ok((await verify()).intact, "the original trail verifies again");
});
