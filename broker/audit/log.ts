import { createHash, randomUUID } from "node:crypto";
import { create, fromJson, type JsonObject, type JsonValue, toJson } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { JetStreamApiCodes, JetStreamApiError, type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager, type StoredMsg } from "@nats-io/jetstream";
import { errors as natsErrors, type NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../../common/errors.js";
import { auditStream } from "../../common/subjects.js";
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

/** Creates the audit stream if needed: deny_delete and deny_purge, so not even an admin's API call removes an event. */
export async function ensureAuditStream(jsm: JetStreamManager): Promise<void> {
  try {
    await jsm.streams.info(auditStream.name);
  } catch {
    // Direct get on: the audit reader reads the trail through it, as it may create no consumer.
    await jsm.streams.add({ name: auditStream.name, subjects: [auditStream.subject], deny_delete: true, deny_purge: true, allow_rollup_hdrs: false, allow_direct: true });
  }
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
}

/** JetStream's answers to a publish whose expected last sequence or message id no longer holds: another replica appended first. */
const lostRace: ReadonlySet<number> = new Set([JetStreamApiCodes.StreamWrongLastSequence, JetStreamApiCodes.StreamWrongLastSequenceUnknown, 10070]);

/**
 * Appends events to the hash-chained, signed audit stream. Replicas append
 * concurrently: each append states the stream's last sequence it built on
 * (JetStream's expected-last-sequence check), and retries on a conflict, so
 * the chain never forks. An append that cannot be written rejects: callers
 * fail closed (nothing is approved without its audit event).
 */
export class AuditLog {
  private readonly js: JetStreamClient;
  private readonly jsm: JetStreamManager;
  private readonly options: AuditLogOptions;
  private tail: { sequence: bigint; streamSeq: number; sha256: Uint8Array; atMs: number } | undefined;

  private constructor(js: JetStreamClient, jsm: JetStreamManager, options: AuditLogOptions) {
    this.js = js;
    this.jsm = jsm;
    this.options = options;
  }

  /** Opens the log on an existing connection, creating the stream if needed. */
  static async open(nc: NatsConnection, options: AuditLogOptions = {}): Promise<AuditLog> {
    const jsm = await jetstreamManager(nc);
    await ensureAuditStream(jsm);
    return new AuditLog(jetstream(nc), jsm, options);
  }

  private async readTail(): Promise<{ sequence: bigint; streamSeq: number; sha256: Uint8Array; atMs: number }> {
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
   * Appends several events in order, pipelined: all are published at once,
   * the first expecting the tail's stream sequence and each later one
   * expecting its predecessor's message id, so a batch costs about one round
   * trip. Appends made while a write is in flight wait and then
   * go together in the next write (group commit), so a busy replica pays one
   * round trip per write, not per caller. If another replica interleaves, the
   * accepted events form a prefix and the rest are chained again on the new
   * tail (up to {@link auditLogDefaults.conflictAttempts} times). Rejects when
   * its events could not all be written; an append whose events were all
   * written before a later one failed still resolves.
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
        const { written, failure } = await this.appendNow(batch.flatMap((append) => append.entries)).catch((error: unknown) => ({
          written: [] as AuditEvent[],
          failure: AirlockError.from(error),
        }));
        let offset = 0;
        for (const append of batch) {
          const end = offset + append.entries.length;
          if (end <= written.length) append.resolve(written.slice(offset, end));
          else append.reject(failure);
          offset = end;
        }
      }
    } finally {
      this.writing = false;
    }
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

  /** Writes `entries` in order; what was written, and why the rest was not. */
  private async appendNow(entries: readonly AuditEntry[]): Promise<{ written: AuditEvent[]; failure: AirlockError | undefined }> {
    const written: AuditEvent[] = [];
    let remaining = [...entries];
    // Events whose publish got no answer (NATS restarting): sent again as they are, so JetStream's
    // de-duplication by message id (the event id) turns one that did land into its own ack.
    let unanswered: AuditEvent[] | undefined;
    let timeouts = 0;
    for (let attempt = 1; remaining.length > 0; attempt++) {
      let failure: unknown;
      try {
        this.tail ??= await this.readTail();
        const tail = this.tail;
        if (unanswered !== undefined) {
          // Those of the unanswered events that did land end the trail now: they are written.
          const landed = unanswered.findIndex((event) => Buffer.from(event.sha256).equals(Buffer.from(tail.sha256)));
          if (landed >= 0) {
            const done = unanswered.slice(0, landed + 1);
            written.push(...done);
            this.options.onWritten?.(done.length);
            remaining = remaining.slice(done.length);
            unanswered = unanswered.slice(done.length);
            if (remaining.length === 0) break;
          }
          // Sent again only if they still follow the tail; another writer's event in between means chaining them anew.
          if (unanswered[0]?.sequence !== tail.sequence + 1n) unanswered = undefined;
        }
        const signer = this.options.signer;
        let previous = tail.sha256;
        // Never dated before the event it follows (verification requires it), even if this replica's clock is behind.
        const atMs = Math.max(Date.now(), tail.atMs);
        const events = unanswered ?? remaining.map((entry, index) => {
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
        // The first event must follow the tail we read; each later one must follow our own
        // previous event (expected last message id), so if another replica slips in between,
        // everything after the slip is refused and the accepted events stay a chain.
        const acks = await Promise.allSettled(
          events.map((event, index) =>
            this.js.publish(auditStream.subject, auditEventToJsonLine(event), {
              msgID: event.eventId,
              expect: index === 0 ? { lastSequence: tail.streamSeq } : { lastMsgID: (events[index - 1] as AuditEvent).eventId },
            }),
          ),
        );
        let accepted = 0;
        for (const ack of acks) {
          if (ack.status === "rejected") {
            failure = ack.reason;
            break;
          }
          const event = events[accepted] as AuditEvent;
          this.tail = { sequence: event.sequence, streamSeq: ack.value.seq, sha256: event.sha256, atMs };
          written.push(event);
          accepted++;
        }
        remaining = remaining.slice(accepted);
        if (accepted > 0) this.options.onWritten?.(accepted);
        if (remaining.length === 0) break;
        if (failure instanceof natsErrors.TimeoutError && ++timeouts <= auditLogDefaults.unansweredAttempts) {
          // The same events go again, after the tail is read to learn which of them did land.
          unanswered = events.slice(accepted);
          this.tail = undefined;
          attempt--;
          continue;
        }
      } catch (error) {
        failure = error;
      }
      unanswered = undefined;
      // Another replica appended first (wrong last sequence), or the tail is stale: re-read it and try again.
      this.tail = undefined;
      // Only a lost race is worth another try; a refusal (a full stream, no stream) stays a refusal.
      const conflict = failure instanceof JetStreamApiError && lostRace.has(failure.code);
      if (!conflict || attempt >= auditLogDefaults.conflictAttempts) {
        return { written, failure: new AirlockError(Code.Unavailable, "the audit event could not be written: failing closed", { cause: failure }) };
      }
      await new Promise((resolve) => setTimeout(resolve, Math.random() * 5 * attempt));
    }
    return { written, failure: undefined };
  }
}

/** One caller's {@link AuditLog.appendAll}, waiting for the writer. */
interface PendingAppend {
  readonly entries: readonly AuditEntry[];
  readonly resolve: (events: AuditEvent[]) => void;
  readonly reject: (error: unknown) => void;
}

/** Limits of {@link AuditLog}. */
export const auditLogDefaults = {
  /** Times a batch whose publishes got no answer (a NATS restart) is sent again as it is. */
  unansweredAttempts: 3,
  /** Times a write is chained again after another replica appended first. */
  conflictAttempts: 20,
  /** Most events one write publishes at once (one caller's batch may exceed it, alone). */
  maxBatchEvents: 256,
} as const;

/** The time of an event, for filters and display. */
export function auditEventTime(event: AuditEvent): Date {
  return new Date(event.at === undefined ? 0 : timestampMs(event.at));
}
