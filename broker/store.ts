import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { jetstreamManager } from "@nats-io/jetstream";
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

/**
 * Request records in JetStream KV. Every change is a compare-and-set on the
 * revision it was read at, so two replicas never both decide, issue or revoke:
 * the second write fails and that replica re-reads.
 */
export class RequestStore {
  private readonly kv: KV;

  private constructor(kv: KV) {
    this.kv = kv;
  }

  /** Opens the bucket, creating it or bringing its replicas and history up to date first ({@link ensureStateBucket}). */
  static async open(nc: NatsConnection, options: EnsureOptions = {}): Promise<RequestStore> {
    await ensureStateBucket(nc, options);
    return new RequestStore(await new Kvm(nc).open(stateBucket));
  }

  async get(requestId: string): Promise<StoredRecord | undefined> {
    // Not a key this bucket could hold (ids come from callers): there is no such request.
    if (!/^[-_=.a-zA-Z0-9]{1,256}$/.test(requestId) || requestId.startsWith(".") || requestId.endsWith(".")) return undefined;
    const entry = await this.kv.get(requestId);
    if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) return undefined;
    return { record: fromBinary(RequestRecordSchema, entry.value), revision: entry.revision };
  }

  /** Stores a new record; its revision, or undefined when the id is already there (a duplicate, or another replica took it). */
  async create(record: RequestRecord): Promise<number | undefined> {
    try {
      return await this.kv.create(record.request?.id ?? "", toBinary(RequestRecordSchema, record));
    } catch (error) {
      if (String(error).includes("wrong last sequence") || String(error).includes("exists")) return undefined;
      throw new AirlockError(Code.Unavailable, "cannot write request state to NATS", { cause: error });
    }
  }

  /** Compare-and-set; the new revision, or undefined when another writer changed the record since `revision`. */
  async update(record: RequestRecord, revision: number): Promise<number | undefined> {
    try {
      return await this.kv.update(record.request?.id ?? "", toBinary(RequestRecordSchema, record), revision);
    } catch (error) {
      if (String(error).includes("wrong last sequence")) return undefined;
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

  /** Every request id in the bucket, once each (a key updated while listing can be delivered twice). */
  async ids(): Promise<string[]> {
    const ids = new Set<string>();
    for await (const key of await this.kv.keys()) ids.add(key);
    return [...ids];
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
