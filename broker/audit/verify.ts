/**
 * Verification of the audit trail: the hash chain, each event's signature
 * against the trusted keys, and the trail against the checkpoints written
 * outside NATS. Every failure has a stable name.
 * @module
 */
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { AuditEvent } from "../../proto/index.js";
import { type Checkpoint, checkpointHash } from "./checkpoints.js";
import { eventHash } from "./log.js";
import type { AuditKeyRing } from "./signing.js";

/**
 * Every way the trail can fail verification, as `TrailVerdict.error`. The
 * strings are stable: scripts and alerts key on them.
 */
export const trailErrors = [
  /** A sequence number is missing: an event was dropped, or history before it was cut off. */
  "event_missing",
  /** An event does not link to the hash of the one before it. */
  "chain_broken",
  /** A message in the trail is not an audit event at all (only an administrator can write one). */
  "event_undecodable",
  /** An event's content does not match its own hash: edited in place. */
  "event_altered",
  /** An event carries no signature, though keys were given. */
  "unsigned_event",
  /** An event is signed by a key the ring does not hold. */
  "unknown_key",
  /** An event is signed by a key after the ring's retirement time for it. */
  "retired_key",
  /** An event's signature does not verify. */
  "bad_signature",
  /**
   * An event has no time, or is dated earlier than the event before it by more
   * than the allowed clock skew. Times only move forward, so a retired key cannot
   * sign a new event back-dated to before its retirement.
   */
  "time_reversed",
  /** The trail's first event is not the one the checkpoints name: another history. */
  "trail_replaced",
  /** The trail ends before an event a checkpoint names. */
  "trail_truncated",
  /** An event a checkpoint names has another hash: the trail was rewritten before it. */
  "trail_edited",
  /** A writer's checkpoint chain has a missing link. */
  "checkpoint_gap",
  /** A checkpoint is unsigned, signed by an unknown or retired key, or its signature does not verify. */
  "checkpoint_bad_signature",
  /** A line in the checkpoint files is not a checkpoint. */
  "checkpoint_malformed",
  /** Checkpoints were asked for, and there are none. */
  "no_checkpoints",
] as const;

/** One of {@link trailErrors}. */
export type TrailError = (typeof trailErrors)[number];

/** The outcome of verifying the trail. */
export interface TrailVerdict {
  readonly intact: boolean;
  readonly eventsChecked: number;
  /** Events whose signature was checked and verified. */
  readonly signed: number;
  /** Checkpoints checked against the trail. */
  readonly checkpoints: number;
  /** The sequence of the first bad event (or the event a failed checkpoint names); 0 when intact. */
  readonly firstBrokenSequence: number;
  /** Why it failed; absent when intact. */
  readonly error?: TrailError;
  /** A sentence for people; empty when intact. */
  readonly problem: string;
}

/** What the trail is checked against. */
export interface TrailExpectations {
  /** Every event must be signed by one of these keys. Without a ring, signatures are not checked. */
  readonly keys?: AuditKeyRing;
  /** Checkpoints to hold the trail to (each must be signed by a key of `keys`). */
  readonly checkpoints?: readonly Checkpoint[];
  /** Lines of the checkpoint files that did not parse. */
  readonly malformedCheckpoints?: ReadonlyArray<{ readonly file: string; readonly line: number }>;
  /**
   * Checkpoint writers whose chains must be there. Without it, deleting one
   * writer's whole chain while another's remains would go unseen.
   */
  readonly expectedWriters?: readonly string[];
  /** How far an event may be dated before the one it follows (replicas' clocks differ a little). @default 2000 */
  readonly maxClockSkewMs?: number;
}

/** The default of {@link TrailExpectations.maxClockSkewMs}. */
export const defaultMaxClockSkewMs = 2_000;

const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex");

/**
 * Verifies a trail read in order, one event at a time, so a long trail need not
 * sit in memory (only each event's hash is kept, for the checkpoints).
 */
export class TrailVerifier {
  private readonly expect: TrailExpectations;
  private readonly hashes = new Map<number, string>();
  private previous: Uint8Array = new Uint8Array(0);
  private expected = 1n;
  private checked = 0;
  private lastSequence = 0;
  private signed = 0;
  private latestAtMs = Number.NEGATIVE_INFINITY;
  private failure: TrailVerdict | undefined;

  constructor(expect: TrailExpectations = {}) {
    this.expect = expect;
  }

  /** Checks the next event; after the first failure, later events are only counted. */
  add(event: AuditEvent): void {
    this.checked++;
    const sequence = Number(event.sequence);
    // What the trail says each event's hash is, failed or not: the checkpoints are held against it.
    if (!this.hashes.has(sequence)) this.hashes.set(sequence, hex(event.sha256));
    this.lastSequence = Math.max(this.lastSequence, sequence);
    if (this.failure !== undefined) return;
    const fail = (error: TrailError, problem: string) => {
      this.failure = { intact: false, eventsChecked: this.checked, signed: this.signed, checkpoints: 0, firstBrokenSequence: sequence, error, problem };
    };
    if (event.sequence !== this.expected) return fail("event_missing", `expected event ${this.expected}, found ${event.sequence}: events are missing or out of order`);
    if (!Buffer.from(event.prevSha256).equals(Buffer.from(this.previous))) return fail("chain_broken", `event ${event.sequence} does not link to the hash of event ${event.sequence - 1n}`);
    if (!Buffer.from(event.sha256).equals(Buffer.from(eventHash(event)))) return fail("event_altered", `event ${event.sequence} was altered: its hash does not match its content`);
    if (event.at === undefined) return fail("time_reversed", `event ${event.sequence} carries no time`);
    const atMs = timestampMs(event.at);
    if (!Number.isFinite(atMs) || atMs + (this.expect.maxClockSkewMs ?? defaultMaxClockSkewMs) < this.latestAtMs) {
      return fail("time_reversed", `event ${event.sequence} is dated ${new Date(atMs).toISOString()}, before the event it follows (${new Date(this.latestAtMs).toISOString()})`);
    }
    this.latestAtMs = Math.max(this.latestAtMs, atMs);
    const keys = this.expect.keys;
    if (keys !== undefined) {
      const at = new Date(atMs);
      const problem = keys.check("event", event.sha256, event.keyId, event.signature, at);
      if (problem !== undefined) {
        const says = { unsigned: ["unsigned_event", "carries no signature"], unknown_key: ["unknown_key", `is signed by key ${JSON.stringify(event.keyId)}, which is not trusted`], retired_key: ["retired_key", `is signed by key ${JSON.stringify(event.keyId)} after it was retired`], bad_signature: ["bad_signature", `has a signature that does not verify with key ${JSON.stringify(event.keyId)}`] } as const;
        return fail(says[problem][0], `event ${event.sequence} ${says[problem][1]}`);
      }
      this.signed++;
    }
    this.previous = event.sha256;
    this.expected++;
  }

  /**
   * Notes a message in the trail that is not an audit event (`readAuditEvents`'s
   * `onUndecodable`): the trail fails there, unless it already failed earlier.
   */
  undecodable(streamSequence: number): void {
    this.checked++;
    this.failure ??= { intact: false, eventsChecked: this.checked, signed: this.signed, checkpoints: 0, firstBrokenSequence: streamSequence, error: "event_undecodable", problem: `message ${streamSequence} of the audit stream is not an audit event` };
  }

  /** The verdict: the checkpoints first (the anchor outside NATS), then the chain. */
  finish(): TrailVerdict {
    const checkpoints = this.expect.checkpoints;
    const counted = (verdict: TrailVerdict, count: number): TrailVerdict => ({ ...verdict, eventsChecked: this.checked, signed: this.signed, checkpoints: count });
    if (checkpoints !== undefined) {
      const against = this.checkCheckpoints(checkpoints);
      if (against !== undefined) return counted(against, checkpoints.length);
    }
    if (this.failure !== undefined) return counted(this.failure, checkpoints?.length ?? 0);
    return { intact: true, eventsChecked: this.checked, signed: this.signed, checkpoints: checkpoints?.length ?? 0, firstBrokenSequence: 0, problem: "" };
  }

  private checkCheckpoints(checkpoints: readonly Checkpoint[]): TrailVerdict | undefined {
    const fail = (error: TrailError, sequence: number, problem: string): TrailVerdict => ({ intact: false, eventsChecked: 0, signed: 0, checkpoints: 0, firstBrokenSequence: sequence, error, problem });
    const malformed = this.expect.malformedCheckpoints?.[0];
    if (malformed !== undefined) return fail("checkpoint_malformed", 0, `line ${malformed.line} of ${malformed.file} is not a checkpoint`);
    if (checkpoints.length === 0) return fail("no_checkpoints", 0, "no checkpoints were found to verify the trail against");
    const byWriter = new Map<string, Checkpoint[]>();
    for (const checkpoint of checkpoints) byWriter.set(checkpoint.writer, [...(byWriter.get(checkpoint.writer) ?? []), checkpoint]);
    for (const writer of this.expect.expectedWriters ?? []) {
      if (!byWriter.has(writer)) return fail("checkpoint_gap", 0, `there are no checkpoints from writer ${JSON.stringify(writer)}: its chain was deleted, or it never wrote one`);
    }
    for (const [writer, chain] of byWriter) {
      chain.sort((a, b) => a.index - b.index);
      let previous: Checkpoint | undefined;
      for (const checkpoint of chain) {
        const name = `checkpoint ${checkpoint.index} of ${JSON.stringify(writer)}`;
        // Checkpoints without a key ring prove nothing: each must be signed by a trusted key.
        const keys = this.expect.keys;
        const problem = keys === undefined ? "unknown_key" : keys.check("checkpoint", checkpointHash(checkpoint), checkpoint.keyId, Buffer.from(checkpoint.signature, "base64"), new Date(checkpoint.at));
        if (problem !== undefined) return fail("checkpoint_bad_signature", checkpoint.sequence, `${name} is not validly signed (${problem})`);
        const expectedIndex = (previous?.index ?? 0) + 1;
        if (checkpoint.index !== expectedIndex) return fail("checkpoint_gap", checkpoint.sequence, `${name} follows checkpoint ${expectedIndex - 1}: checkpoints are missing`);
        if (checkpoint.prevSha256 !== (previous === undefined ? "" : hex(checkpointHash(previous)))) return fail("checkpoint_gap", checkpoint.sequence, `${name} does not link to the checkpoint before it`);
        // A checkpoint is dated no earlier than the one before it, so a retired key cannot add one back-dated.
        if (previous !== undefined && !(Date.parse(checkpoint.at) >= Date.parse(previous.at))) return fail("checkpoint_bad_signature", checkpoint.sequence, `${name} is dated before the checkpoint it follows`);
        previous = checkpoint;
      }
    }
    const genesis = this.hashes.get(1);
    for (const checkpoint of [...checkpoints].sort((a, b) => a.sequence - b.sequence)) {
      if (checkpoint.sequence === 0) continue;
      const name = `checkpoint ${checkpoint.index} of ${JSON.stringify(checkpoint.writer)}`;
      if (genesis !== undefined && genesis !== checkpoint.genesisSha256) return fail("trail_replaced", 1, `the trail's first event is not the one ${name} names: this is another history`);
      const held = this.hashes.get(checkpoint.sequence);
      if (held === undefined) {
        // Beyond the trail's end it was cut short; a hole inside it is the chain's finding (event_missing).
        if (checkpoint.sequence > this.lastSequence) return fail("trail_truncated", checkpoint.sequence, `the trail ends at event ${this.lastSequence}, but ${name} names event ${checkpoint.sequence}`);
        continue;
      }
      if (held !== checkpoint.headSha256) return fail("trail_edited", checkpoint.sequence, `event ${checkpoint.sequence} is not the one ${name} names: the trail was rewritten at or before it`);
    }
    return undefined;
  }
}

/** Verifies a whole trail held in memory (an export, a test). */
export function verifyTrail(events: Iterable<AuditEvent>, expect: TrailExpectations = {}): TrailVerdict {
  const verifier = new TrailVerifier(expect);
  for (const event of events) verifier.add(event);
  return verifier.finish();
}

/**
 * One line for a verdict: `audit ok events=… signed=… checkpoints=… verified=…`,
 * or the named error and where. `verified=yes` only when every event's signature
 * was checked and the trail was held to checkpoints outside NATS;
 * `verified=unanchored` when no checkpoints were given (a replaced or truncated
 * trail then goes unseen), `verified=unsigned` when signatures were not checked.
 */
export function trailVerdictLine(verdict: TrailVerdict): string {
  const counts = `events=${verdict.eventsChecked} signed=${verdict.signed} checkpoints=${verdict.checkpoints}`;
  if (verdict.intact) return `audit ok ${counts} verified=${verdict.signed < verdict.eventsChecked ? "unsigned" : verdict.checkpoints === 0 ? "unanchored" : "yes"}`;
  return `audit BROKEN error=${verdict.error ?? "unknown"} at=${verdict.firstBrokenSequence} ${counts}: ${verdict.problem}`;
}
