import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { JetStreamApiCodes, JetStreamApiError, type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { type KV, Kvm, KvWatchInclude } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../common/errors.js";
import { bucketStream, type EnsureOptions, ensureDefaults, ensureStream, stateBucket } from "../common/subjects.js";
import { type RequestRecord, RequestRecordSchema } from "../proto/index.js";

export { stateBucket };

/** A record and the KV revision it was read at: what a compare-and-set builds on. */
export interface StoredRecord {
  readonly record: RequestRecord;
  readonly revision: number;
}

/** The state bucket's settings: 10 revisions per record (compare-and-set history), `replicas` copies ({@link ensureStream}). */
export async function ensureStateBucket(nc: NatsConnection, options: EnsureOptions = {}): Promise<void> {
  const replicas = options.replicas ?? ensureDefaults.replicas;
  await ensureStream(await jetstreamManager(nc), { name: bucketStream(stateBucket), max_msgs_per_subject: 10 }, { ...options, create: () => new Kvm(nc).create(stateBucket, { history: 10, replicas }) });
}

/** One change the state bucket's watch delivers: a record written, or a key removed (retired to history). */
export type StateChange = { readonly kind: "put"; readonly stored: StoredRecord } | { readonly kind: "removed"; readonly id: string; readonly seq: number };

/** The state bucket's stream, and the subject prefix of its keys. */
const kvStream = bucketStream(stateBucket);
const kvPrefix = `$KV.${stateBucket}.`;

/**
 * Whether `requestId` is a key the state bucket can hold: 1 to 256 of `-_=.a-zA-Z0-9`, not
 * starting or ending with a dot. Every stored request's id is one; anything else names no request.
 */
export function isStorableRequestId(requestId: string): boolean {
  return /^[-_=.a-zA-Z0-9]{1,256}$/.test(requestId) && !requestId.startsWith(".") && !requestId.endsWith(".");
}

/**
 * Whether a JetStream write failed its compare-and-set (the key's last revision is not the one
 * expected): told by the server's error code, never by the message text.
 */
export function isWrongLastSequence(error: unknown): boolean {
  return error instanceof JetStreamApiError && (error.code === JetStreamApiCodes.StreamWrongLastSequence || error.code === JetStreamApiCodes.StreamWrongLastSequenceUnknown);
}

/**
 * Request records in JetStream KV. Every change is a compare-and-set on the
 * revision it was read at, so two replicas never both decide, issue or revoke:
 * the second write fails and that replica re-reads.
 */
export class RequestStore {
  private readonly kv: KV;
  private readonly js: JetStreamClient;
  private readonly jsm: JetStreamManager;

  private constructor(kv: KV, js: JetStreamClient, jsm: JetStreamManager) {
    this.kv = kv;
    this.js = js;
    this.jsm = jsm;
  }

  /** Opens the bucket, creating it or bringing its replicas and history up to date first ({@link ensureStateBucket}). */
  static async open(nc: NatsConnection, options: EnsureOptions = {}): Promise<RequestStore> {
    await ensureStateBucket(nc, options);
    return new RequestStore(await new Kvm(nc).open(stateBucket), jetstream(nc), await jetstreamManager(nc));
  }

  async get(requestId: string): Promise<StoredRecord | undefined> {
    // Not a key this bucket could hold (ids come from callers): there is no such request.
    if (!isStorableRequestId(requestId)) return undefined;
    const entry = await this.kv.get(requestId);
    if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) return undefined;
    return { record: fromBinary(RequestRecordSchema, entry.value), revision: entry.revision };
  }

  /** Stores a new record; its revision, or undefined when the id is already there (a duplicate, or another replica took it). */
  async create(record: RequestRecord): Promise<number | undefined> {
    try {
      return await this.kv.create(record.request?.id ?? "", toBinary(RequestRecordSchema, record));
    } catch (error) {
      if (isWrongLastSequence(error)) return undefined;
      throw new AirlockError(Code.Unavailable, "cannot write request state to NATS", { cause: error });
    }
  }

  /** Compare-and-set; the new revision, or undefined when another writer changed the record since `revision`. */
  async update(record: RequestRecord, revision: number): Promise<number | undefined> {
    try {
      return await this.kv.update(record.request?.id ?? "", toBinary(RequestRecordSchema, record), revision);
    } catch (error) {
      if (isWrongLastSequence(error)) return undefined;
      throw new AirlockError(Code.Unavailable, "cannot write request state to NATS", { cause: error });
    }
  }

  /**
   * Every record change from now on (or, with `includeCurrent`, each record's
   * current value first), until the signal aborts.
   */
  async *watch(signal: AbortSignal, includeCurrent = false): AsyncGenerator<RequestRecord> {
    for await (const stored of this.watchStored(signal, includeCurrent)) yield stored.record;
  }

  /** Like {@link RequestStore.watch}, with each record's revision (what a compare-and-set builds on). */
  async *watchStored(signal: AbortSignal, includeCurrent = false): AsyncGenerator<StoredRecord> {
    yield* await this.openWatch(signal, includeCurrent);
  }

  /**
   * Starts a watch and resolves once the server has it, so every change made
   * after this resolves is delivered (what a snapshot-then-changes reader needs).
   * The watch ends when `signal` aborts, also when it aborted before or while starting.
   */
  async openWatch(signal: AbortSignal, includeCurrent = false): Promise<AsyncIterable<StoredRecord>> {
    const empty = (async function* (): AsyncGenerator<StoredRecord> {})();
    if (signal.aborted) return empty;
    const watcher = await this.kv.watch({ include: includeCurrent ? KvWatchInclude.LastValue : KvWatchInclude.UpdatesOnly, ignoreDeletes: true });
    const stop = () => watcher.stop();
    // An abort that landed while the watch was being created has no listener to tell: check it.
    if (signal.aborted) {
      stop();
      return empty;
    }
    signal.addEventListener("abort", stop, { once: true });
    return (async function* (): AsyncGenerator<StoredRecord> {
      try {
        for await (const entry of watcher) {
          if (entry.operation === "PUT" && entry.value.length > 0) yield { record: fromBinary(RequestRecordSchema, entry.value), revision: entry.revision };
        }
      } finally {
        signal.removeEventListener("abort", stop);
        watcher.stop();
      }
    })();
  }

  /**
   * Every key's current state, then every change (puts and removals) until `signal` aborts:
   * what the broker's request index is built from. `caughtUp` resolves once the current
   * state is delivered (the server counts the keys when the watch starts; an empty bucket is
   * caught up at once), so an index that waits for it answers like a full read of the bucket.
   */
  async follow(signal: AbortSignal): Promise<{ changes: AsyncIterable<StateChange>; caughtUp: Promise<void> }> {
    let markCaughtUp: () => void = () => undefined;
    const caughtUp = new Promise<void>((resolve) => (markCaughtUp = resolve));
    // The number of keys (subjects) before the watch starts: none means nothing to wait for.
    const keys = (await this.jsm.streams.info(kvStream)).state.num_subjects ?? 0;
    if (keys === 0) markCaughtUp();
    const watcher = await this.kv.watch({ include: KvWatchInclude.LastValue });
    const stop = () => watcher.stop();
    if (signal.aborted) stop();
    else signal.addEventListener("abort", stop, { once: true });
    const changes = (async function* (): AsyncGenerator<StateChange> {
      try {
        for await (const entry of watcher) {
          if (entry.operation === "PUT" && entry.value.length > 0) {
            let record: RequestRecord;
            try {
              record = fromBinary(RequestRecordSchema, entry.value);
            } catch {
              // Only brokers write the bucket (the server enforces it); a record that does not decode is skipped, not fatal.
              continue;
            }
            yield { kind: "put", stored: { record, revision: entry.revision } };
          } else {
            yield { kind: "removed", id: entry.key, seq: entry.revision };
          }
          // The watch marks the last of the keys it counted at its start as the first update.
          if (entry.isUpdate) markCaughtUp();
        }
      } finally {
        markCaughtUp();
        signal.removeEventListener("abort", stop);
        watcher.stop();
      }
    })();
    return { changes, caughtUp };
  }

  /**
   * Removes a record from the bucket if it is still at `revision` (compare-and-set on the
   * key's last revision): the purge marker's sequence when this call removed it, undefined
   * when the record changed or is gone already (another replica retired it). The purge drops
   * every revision of the key; its marker stays until {@link RequestStore.dropMarkers}.
   */
  async retire(requestId: string, revision: number): Promise<number | undefined> {
    const h = natsHeaders();
    h.set("KV-Operation", "PURGE");
    h.set("Nats-Rollup", "sub");
    try {
      return (await this.js.publish(`${kvPrefix}${requestId}`, new Uint8Array(0), { headers: h, expect: { lastSubjectSequence: revision } })).seq;
    } catch (error) {
      if (isWrongLastSequence(error)) return undefined;
      throw new AirlockError(Code.Unavailable, "cannot retire a request record in NATS", { cause: error });
    }
  }

  /**
   * Deletes purge markers retired records left, so retired keys leave nothing for a watch to
   * read at start; the ones still at the bucket's end are kept (see {@link RequestStore.lastSeq}),
   * and returned for a later call. A marker left behind is harmless: it is no record.
   */
  async dropMarkers(markers: readonly number[]): Promise<number[]> {
    if (markers.length === 0) return [];
    const last = await this.lastSeq();
    const kept: number[] = [];
    for (const seq of markers) {
      if (seq >= last) kept.push(seq);
      else await this.jsm.streams.deleteMessage(kvStream, seq, false).catch(() => undefined);
    }
    return kept;
  }

  /**
   * The sequence of the bucket's last message. The last message is never deleted (see
   * {@link RequestStore.dropMarkers}), so a watch that delivered it has seen every write so far.
   */
  async lastSeq(): Promise<number> {
    return (await this.jsm.streams.info(kvStream)).state.last_seq;
  }

  /**
   * Reads, changes and writes one record until the write wins. `change` returns
   * the new record, or undefined to leave it as it is.
   */
  async mutate(requestId: string, change: (record: RequestRecord) => RequestRecord | undefined, known?: StoredRecord): Promise<RequestRecord | undefined> {
    // A caller that just wrote the record passes it with its revision: one round trip saved when nobody else wrote since.
    let stored = known;
    for (let attempt = 0; attempt < 50; attempt++) {
      stored ??= await this.get(requestId);
      if (stored === undefined) return undefined;
      const next = change(stored.record);
      if (next === undefined) return undefined;
      if ((await this.update(next, stored.revision)) !== undefined) return next;
      stored = undefined;
    }
    throw new AirlockError(Code.Aborted, `request ${requestId} kept changing under this replica`);
  }
}
