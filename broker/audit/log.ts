import { createHash, randomUUID } from "node:crypto";
import { create, fromJson, type JsonObject, type JsonValue, toJson } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { JetStreamApiCodes, JetStreamApiError, type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager, type StoredMsg } from "@nats-io/jetstream";
import { headers, type NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../../common/errors.js";
import { auditStream, type EnsureOptions, ensureStream } from "../../common/subjects.js";
import { type AuditEvent, AuditEventSchema, type AuditEventType } from "../../proto/index.js";
import { type AuditSigner, signHash } from "./signing.js";

/** The audit stream: append-only, with deletes and purges refused by the server itself. */
export { auditStream };

/** What a caller says about an event; the log adds sequence, id, time and the chain links. */
export interface AuditEntry {
  readonly type: AuditEventType;
  readonly actor: string;
  readonly requestId?: string;
  /** Facts about the event. Never a secret. */
  readonly details?: JsonObject;
  /** Break-glass approvals and security events, for alerting. */
  readonly flagged?: boolean;
}

/** JSON with keys sorted at every level: the canonical form hashes are taken over. */
export function sortKeys(value: JsonValue): JsonValue {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((key) => [key, sortKeys(value[key] ?? null)]),
    );
  }
  return value;
}

/**
 * The hash of an event: SHA-256 over the previous event's hash and the
 * event's protobuf JSON with keys sorted (its own `sha256` and `signature` left
 * out; the key id is in). JSON with
 * sorted keys, not protobuf bytes, so an exported JSONL file verifies exactly
 * like the stream does, whatever order a map's keys were written in.
 */
export function eventHash(event: AuditEvent): Uint8Array {
  const json = toJson(AuditEventSchema, { ...event, sha256: new Uint8Array(0), signature: new Uint8Array(0) }) as JsonObject;
  return createHash("sha256")
    .update(Buffer.from(event.prevSha256))
    .update("\n")
    .update(JSON.stringify(sortKeys(json)))
    .digest();
}

/** One event as a JSONL line (protobuf JSON). */
export function auditEventToJsonLine(event: AuditEvent): string {
  return JSON.stringify(toJson(AuditEventSchema, event));
}

/** Parses JSONL lines back into events; a bad line is INVALID_ARGUMENT naming the line number. */
export function auditEventsFromJsonl(text: string): AuditEvent[] {
  const events: AuditEvent[] = [];
  for (const [index, line] of text.split("\n").entries()) {
    if (line.trim() === "") continue;
    try {
      events.push(fromJson(AuditEventSchema, JSON.parse(line) as JsonValue));
    } catch (error) {
      throw new AirlockError(Code.InvalidArgument, `line ${index + 1} is not an audit event`, { cause: error, details: { line: index + 1 } });
    }
  }
  return events;
}

/**
 * Creates the audit stream, or brings an existing one up to date ({@link ensureStream}):
 * deny_delete and deny_purge, so not even an admin's API call removes an event (the server
 * refuses to turn them off again); direct get, through which the audit reader reads the trail,
 * as it may create no consumer; and atomic batch publish, which {@link AuditLog} appends with.
 */
export async function ensureAuditStream(jsm: JetStreamManager, options: EnsureOptions = {}): Promise<void> {
  await ensureStream(jsm, { name: auditStream.name, subjects: [auditStream.subject], deny_delete: true, deny_purge: true, allow_rollup_hdrs: false, allow_direct: true, allow_atomic: true }, options);
}

/** Events one batched read of {@link readAuditEvents} asks for. */
const auditReadBatch = 256;

/**
 * Reads the audit stream in order: from the start, from a time (`since`), or
 * only the newest `last` events (without reading the ones before them), or
 * from audit sequence `from` on (the SIEM forwarder resuming: the trail holds
 * only events, each appended at the next stream sequence with deletes
 * refused, so an event's `sequence` is its stream sequence). It reads by
 * batched direct get, which the read-only audit role may do (it may
 * create no consumer), and stops at the stream's end as of the call.
 */
export async function* readAuditEvents(
  nc: NatsConnection,
  options: {
    since?: Date;
    last?: number;
    from?: number;
    /** Told of a message that is not an audit event, which is then skipped; without it, reading throws there. */
    onUndecodable?: (streamSequence: number, error: unknown) => void;
  } = {},
): AsyncGenerator<AuditEvent> {
  const jsm = await jetstreamManager(nc, { checkAPI: false });
  // The trail has one subject: its last message is the end to read to.
  const end = await jsm.direct.getMessage(auditStream.name, { last_by_subj: auditStream.subject });
  if (end === null) return;
  const last = end.seq;
  // A batch from a sequence starts at the first message at or after it.
  let next = options.from !== undefined ? Math.max(1, options.from) : options.last === undefined ? 1 : Math.max(1, last - Math.max(1, options.last) + 1);
  let query: { seq: number } | { start_time: string } = options.since === undefined ? { seq: next } : { start_time: options.since.toISOString() };
  while (next <= last) {
    const batch: StoredMsg[] = [];
    try {
      for await (const message of await jsm.direct.getBatch(auditStream.name, { ...query, batch: auditReadBatch })) batch.push(message);
    } catch (error) {
      // JetStream's status 404: nothing at or after the start (a start time past the last event).
      if (error instanceof Error && "code" in error && error.code === 404) return;
      throw error;
    }
    if (batch.length === 0) return;
    for (const message of batch) {
      if (message.seq > last) return;
      next = message.seq + 1;
      let event: AuditEvent;
      try {
        event = fromJson(AuditEventSchema, message.json<JsonValue>());
      } catch (error) {
        if (options.onUndecodable === undefined) throw new AirlockError(Code.DataLoss, `audit stream message ${message.seq} is not an audit event`, { cause: error, details: { streamSequence: message.seq } });
        options.onUndecodable(message.seq, error);
        continue;
      }
      yield event;
    }
    query = { seq: next };
  }
}

/** Options of {@link AuditLog.open}. */
export interface AuditLogOptions {
  /** Signs every event this replica writes. Without one, events are only hash-chained (tests of the chain alone). */
  readonly signer?: AuditSigner;
  /** Told how many events were just written (the checkpointer counts them). */
  readonly onWritten?: (count: number) => void;
  /** How the audit stream is created or brought up to date (replicas). */
  readonly ensure?: EnsureOptions;
}

/**
 * JetStream's answers to an atomic batch that was refused whole and may be
 * chained again on a fresh tail: another replica appended first (wrong last
 * sequence), or the batch reached the stream leader incomplete (a leader change
 * or reconnect mid-batch). Refusals are told apart by these API error codes
 * (nats-server's errors.json), never by their text.
 */
const retryable: ReadonlySet<number> = new Set([
  JetStreamApiCodes.StreamWrongLastSequence,
  JetStreamApiCodes.StreamWrongLastSequenceUnknown,
  /** JSAtomicPublishIncompleteBatchErr */
  10176,
]);

/** Headers of JetStream's atomic batch publish (nats-server 2.12 and later). */
const batchHeaders = { id: "Nats-Batch-Id", sequence: "Nats-Batch-Sequence", commit: "Nats-Batch-Commit", msgId: "Nats-Msg-Id", expectedLastSequence: "Nats-Expected-Last-Sequence" } as const;

/**
 * Appends events to the hash-chained, signed audit stream. Replicas append
 * concurrently: each write is one JetStream atomic batch whose first message
 * states the stream's last sequence it built on (expected-last-sequence), so
 * the stream leader accepts the whole batch or none of it, and a replica that
 * lost the race re-reads the tail and chains again: the chain never forks, on
 * one server or a replicated stream. An append that cannot be written rejects:
 * callers fail closed (nothing is approved without its audit event).
 */
export class AuditLog {
  private readonly js: JetStreamClient;
  private readonly jsm: JetStreamManager;
  private readonly options: AuditLogOptions;
  private readonly nc: NatsConnection;
  private tail: AuditTail | undefined;

  private constructor(nc: NatsConnection, jsm: JetStreamManager, options: AuditLogOptions) {
    this.nc = nc;
    this.js = jetstream(nc);
    this.jsm = jsm;
    this.options = options;
  }

  /** Opens the log on an existing connection, creating the stream if needed. */
  static async open(nc: NatsConnection, options: AuditLogOptions = {}): Promise<AuditLog> {
    const jsm = await jetstreamManager(nc);
    await ensureAuditStream(jsm, options.ensure);
    return new AuditLog(nc, jsm, options);
  }

  private async readTail(): Promise<AuditTail> {
    const info = await this.jsm.streams.info(auditStream.name);
    if (info.state.messages === 0) return { sequence: 0n, streamSeq: 0, sha256: new Uint8Array(0), atMs: 0 };
    const last = await this.jsm.streams.getMessage(auditStream.name, { seq: info.state.last_seq });
    if (last === null) throw new AirlockError(Code.DataLoss, "the audit stream's last event cannot be read");
    const event = fromJson(AuditEventSchema, last.json<JsonValue>());
    return { sequence: event.sequence, streamSeq: last.seq, sha256: event.sha256, atMs: event.at === undefined ? 0 : timestampMs(event.at) };
  }

  /** Appends waiting for the writer: the next write takes all of them as one pipelined batch. */
  private waiting: PendingAppend[] = [];
  private writing = false;

  /** Appends one event; resolves with it as written (sequence and hashes filled in). */
  append(entry: AuditEntry): Promise<AuditEvent> {
    return this.appendAll([entry]).then((events) => events[0] as AuditEvent);
  }

  /**
   * Appends several events in order, as one atomic batch: all are published at
   * once and committed by the last, so a write costs about one round trip and
   * is stored whole or not at all. Appends made while a write is in flight wait
   * and then go together in the next write (group commit), so a busy replica
   * pays one round trip per write, not per caller. If another replica appended
   * first, the batch is refused whole and chained again on the new tail (up to
   * {@link auditLogDefaults.conflictAttempts} times). Rejects when its events
   * could not be written.
   */
  appendAll(entries: readonly AuditEntry[]): Promise<AuditEvent[]> {
    if (entries.length === 0) return Promise.resolve([]);
    return new Promise((resolve, reject) => {
      this.waiting.push({ entries, resolve, reject });
      if (!this.writing) void this.writeWaiting();
    });
  }

  /** Writes waiting appends until none are left. */
  private async writeWaiting(): Promise<void> {
    this.writing = true;
    try {
      while (this.waiting.length > 0) {
        const batch = this.takeBatch();
        const outcome = await this.write(batch.flatMap((append) => append.entries));
        if (outcome.failure === undefined) {
          let offset = 0;
          for (const append of batch) {
            append.resolve(outcome.written.slice(offset, offset + append.entries.length));
            offset += append.entries.length;
          }
        } else if (outcome.refused && batch.length > 1) {
          // The server refused the group's batch whole (a full stream, say): each caller's own
          // events are tried alone, so an append resolves or rejects by its own events only.
          for (const append of batch) {
            const alone = await this.write(append.entries);
            if (alone.failure === undefined) append.resolve(alone.written);
            else append.reject(alone.failure);
          }
        } else {
          for (const append of batch) append.reject(outcome.failure);
        }
      }
    } finally {
      this.writing = false;
    }
  }

  /** {@link appendNow}, never rejecting. */
  private write(entries: readonly AuditEntry[]): Promise<WriteOutcome> {
    return this.appendNow(entries).catch((error: unknown) => ({ written: [], failure: AirlockError.from(error), refused: false }));
  }

  /** The oldest waiting appends, up to {@link auditLogDefaults.maxBatchEvents} events (at least one append). */
  private takeBatch(): PendingAppend[] {
    let events = 0;
    let count = 0;
    for (const append of this.waiting) {
      if (count > 0 && events + append.entries.length > auditLogDefaults.maxBatchEvents) break;
      events += append.entries.length;
      count++;
    }
    return this.waiting.splice(0, count);
  }

  /** The events for `entries`, chained on `tail` and signed. */
  private chain(entries: readonly AuditEntry[], tail: AuditTail): { events: AuditEvent[]; atMs: number } {
    const signer = this.options.signer;
    let previous = tail.sha256;
    // Never dated before the event it follows (verification requires it), even if this replica's clock is behind.
    const atMs = Math.max(Date.now(), tail.atMs);
    const events = entries.map((entry, index) => {
      const event = create(AuditEventSchema, {
        sequence: tail.sequence + BigInt(index + 1),
        eventId: randomUUID(),
        type: entry.type,
        at: timestampFromMs(atMs),
        actor: entry.actor,
        requestId: entry.requestId ?? "",
        ...(entry.details === undefined ? {} : { details: entry.details }),
        flagged: entry.flagged ?? false,
        prevSha256: previous,
        keyId: signer?.keyId ?? "",
      });
      event.sha256 = eventHash(event);
      if (signer !== undefined) event.signature = signHash("event", event.sha256, signer);
      previous = event.sha256;
      return event;
    });
    return { events, atMs };
  }

  /**
   * Publishes `events` as one atomic batch after stream sequence `after`:
   * every message but the last is sent without waiting; the last commits the
   * batch and carries the server's one answer. Resolves with the stream
   * sequence of the last event.
   */
  private async publishBatch(events: readonly AuditEvent[], after: number): Promise<number> {
    const batchId = randomUUID();
    const last = events.length - 1;
    for (const [index, event] of events.entries()) {
      const h = headers();
      h.set(batchHeaders.id, batchId);
      h.set(batchHeaders.sequence, String(index + 1));
      if (index === 0) h.set(batchHeaders.expectedLastSequence, String(after));
      if (index < last) {
        h.set(batchHeaders.msgId, event.eventId);
        this.nc.publish(auditStream.subject, auditEventToJsonLine(event), { headers: h });
        continue;
      }
      h.set(batchHeaders.commit, "1");
      // The commit goes through the JetStream client, which turns a refusal into a JetStreamApiError with its code.
      const ack = await this.js.publish(auditStream.subject, auditEventToJsonLine(event), { msgID: event.eventId, headers: h, timeout: auditLogDefaults.commitTimeoutMs });
      const count = (ack as { count?: number }).count;
      if (events.length > 1 && count !== events.length) throw new AirlockError(Code.DataLoss, `the audit stream committed ${String(count)} of a batch of ${events.length} events`);
      return ack.seq;
    }
    throw new Error("an empty batch");
  }

  /**
   * Whether a batch whose commit got no answer (a timeout, a dropped
   * connection) was stored anyway: batches are atomic, so it was exactly when
   * the message right after the tail it built on is its first event.
   */
  private async committedAnyway(events: readonly AuditEvent[], after: number): Promise<boolean> {
    // null: no message there (yet); any other failure propagates, and the append fails closed.
    const first = await this.jsm.streams.getMessage(auditStream.name, { seq: after + 1 });
    if (first === null) return false;
    return fromJson(AuditEventSchema, first.json<JsonValue>()).eventId === events[0]?.eventId;
  }

  /**
   * {@link AuditLog.committedAnyway}, asked again while NATS does not answer (a restart takes
   * seconds): undefined when it never answered, and the append fails closed.
   */
  private async committedAfterAll(events: readonly AuditEvent[], after: number): Promise<boolean | undefined> {
    for (let check = 1; check <= auditLogDefaults.unansweredChecks; check++) {
      try {
        return await this.committedAnyway(events, after);
      } catch {
        // No answer yet: each check waits out the request's own timeout, so no sleep is needed here.
      }
    }
    return undefined;
  }

  /** Writes `entries` in order, all or none; what was written, and why not. */
  private async appendNow(entries: readonly AuditEntry[]): Promise<WriteOutcome> {
    for (let attempt = 1; ; attempt++) {
      let failure: unknown;
      let tail: AuditTail | undefined;
      let events: AuditEvent[] = [];
      try {
        tail = this.tail ?? (await this.readTail());
        const chained = this.chain(entries, tail);
        events = chained.events;
        const lastSeq = await this.publishBatch(events, tail.streamSeq);
        const newest = events[events.length - 1] as AuditEvent;
        this.tail = { sequence: newest.sequence, streamSeq: lastSeq, sha256: newest.sha256, atMs: chained.atMs };
        this.options.onWritten?.(events.length);
        return { written: events, failure: undefined, refused: false };
      } catch (error) {
        failure = error;
      }
      // The tail is stale whatever happened: re-read it before the next write.
      this.tail = undefined;
      const refusal = failure instanceof JetStreamApiError ? failure.code : undefined;
      if (refusal === undefined && tail !== undefined && events.length > 0) {
        // No answer is not a refusal: the batch may be in the stream. Written once, never twice.
        const stored = await this.committedAfterAll(events, tail.streamSeq);
        if (stored === true) {
          this.options.onWritten?.(events.length);
          return { written: events, failure: undefined, refused: false };
        }
        if (stored === undefined) return { written: [], failure: new AirlockError(Code.Unavailable, "the audit event could not be written: failing closed", { cause: failure }), refused: false };
      }
      // Only a lost race or a torn batch is worth another try; a refusal (a full stream, no stream) stays a refusal.
      const again = refusal === undefined ? events.length > 0 : retryable.has(refusal);
      if (!again || attempt >= auditLogDefaults.conflictAttempts) {
        return { written: [], failure: new AirlockError(Code.Unavailable, "the audit event could not be written: failing closed", { cause: failure }), refused: refusal !== undefined && !again };
      }
      await new Promise((resolve) => setTimeout(resolve, Math.random() * 5 * attempt));
    }
  }
}

/** What one write did: every event written, or none and why (`refused`: the server said no, for a reason other than a lost race). */
interface WriteOutcome {
  readonly written: AuditEvent[];
  readonly failure: AirlockError | undefined;
  readonly refused: boolean;
}

/** The last event this replica knows of: where the next write chains on. */
interface AuditTail {
  readonly sequence: bigint;
  readonly streamSeq: number;
  readonly sha256: Uint8Array;
  readonly atMs: number;
}

/** One caller's {@link AuditLog.appendAll}, waiting for the writer. */
interface PendingAppend {
  readonly entries: readonly AuditEntry[];
  readonly resolve: (events: AuditEvent[]) => void;
  readonly reject: (error: unknown) => void;
}

/** Limits of {@link AuditLog}. */
export const auditLogDefaults = {
  /** Times a write is chained again after another replica appended first. */
  conflictAttempts: 20,
  /** Times a commit that got no answer is looked for in the stream before the append fails closed (a NATS restart). */
  unansweredChecks: 3,
  /** How long a batch's commit waits for the stream's answer, in ms (a leader election on a cluster takes seconds). */
  commitTimeoutMs: 5_000,
  /** Most events one write publishes at once (one caller's batch may exceed it, alone, up to the server's atomic batch limit of 1000). */
  maxBatchEvents: 256,
} as const;

/** The time of an event, for filters and display. */
export function auditEventTime(event: AuditEvent): Date {
  return new Date(event.at === undefined ? 0 : timestampMs(event.at));
}
