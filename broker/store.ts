import { equals, fromBinary, toBinary } from "@bufbuild/protobuf";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { JetStreamApiCodes, JetStreamApiError, type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { type KV, type KvEntry, Kvm, KvWatchInclude } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../common/errors.js";
import { bucketStream, type EnsureOptions, ensureDefaults, ensureStream, requestBucket, stateBucket } from "../common/subjects.js";
import { type ApprovalRequest, ApprovalRequestSchema, type RequestRecord, RequestRecordSchema } from "../proto/index.js";

export { requestBucket, stateBucket };

/** A record and the KV revision it was read at: what a compare-and-set builds on. */
export interface StoredRecord {
  readonly record: RequestRecord;
  readonly revision: number;
}

/**
 * The state bucket's settings (10 revisions per record: compare-and-set history) and its
 * requests bucket's (one revision per key: a request is written once), `replicas` copies each
 * ({@link ensureStream}).
 */
export async function ensureStateBucket(nc: NatsConnection, options: EnsureOptions = {}): Promise<void> {
  const replicas = options.replicas ?? ensureDefaults.replicas;
  const jsm = await jetstreamManager(nc);
  await ensureStream(jsm, { name: bucketStream(stateBucket), max_msgs_per_subject: 10 }, { ...options, create: () => new Kvm(nc).create(stateBucket, { history: 10, replicas }) });
  await ensureStream(jsm, { name: bucketStream(requestBucket), max_msgs_per_subject: 1 }, { ...options, create: () => new Kvm(nc).create(requestBucket, { history: 1, replicas }) });
}

/** One change the state bucket's watch delivers: a record written, or a key removed (retired to history). */
export type StateChange = { readonly kind: "put"; readonly stored: StoredRecord } | { readonly kind: "removed"; readonly id: string; readonly seq: number };

/** Bounds of a {@link RequestStore}. */
export const requestStoreDefaults = {
  /**
   * Requests kept in memory, those of the records read or written last (requests never change,
   * so a compare-and-set or a watched change of a cached one reads nothing more).
   */
  cachedRequests: 10_000,
  /**
   * How long a request {@link RequestStore.hold} wrote is taken as stored by the record's create
   * without a check, in ms: the orphan sweep's grace is far longer, so it cannot delete it meanwhile.
   */
  heldFreshMs: 30_000,
  /** Request reads one watch has in flight at most while it delivers a backlog (a first pass over the bucket). */
  joinWindow: 64,
  /** How often a replica scans the requests bucket for requests without a record at most, in ms. */
  orphanScanMs: 60_000,
} as const;

/** The state bucket's stream, and the subject prefix of its keys; the requests bucket's stream. */
const kvStream = bucketStream(stateBucket);
const kvPrefix = `$KV.${stateBucket}.`;
const requestStream = bucketStream(requestBucket);

/**
 * Whether `id` can be a key of the state and requests buckets: 1 to 256 of `-_=.a-zA-Z0-9`, not
 * starting or ending with a dot. Every stored request's id is one; anything else names no
 * request. Ids come from callers and, at intake, from the agent's host: nothing else becomes a key.
 */
export function isRequestKey(id: string): boolean {
  return /^[-_=.a-zA-Z0-9]{1,256}$/.test(id) && !id.startsWith(".") && !id.endsWith(".");
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
 *
 * A record's ApprovalRequest never changes, so it is written once, in the requests bucket
 * ({@link requestBucket}), before the record; the record in the state bucket leaves it out, and
 * every read joins it back (`record.request` is there for callers as if stored together). A
 * record is joined only with a request stored under its own key that names that id; one that is
 * not (forged, corrupt, or its request gone) is no record for this store. Records written before
 * the split still embed their request: they read, and are written, as they are.
 */
export class RequestStore {
  private readonly kv: KV;
  private readonly requests: KV;
  private readonly js: JetStreamClient;
  private readonly jsm: JetStreamManager;
  /** Requests known stored under their id with a record joined to them, least recently used first. */
  private readonly cache = new Map<string, ApprovalRequest>();
  /** Ids of records read with their request embedded (written before the split): written back the same way. */
  private readonly embedded = new Set<string>();
  /** Requests {@link RequestStore.hold} stored or read, for the record's create that follows. */
  private readonly held = new Map<string, { readonly request: ApprovalRequest; readonly at: number; readonly wrote: boolean }>();
  /** When the next scan for requests without a record may run (epoch ms). */
  private orphanScanAt = 0;

  private constructor(kv: KV, requests: KV, js: JetStreamClient, jsm: JetStreamManager) {
    this.kv = kv;
    this.requests = requests;
    this.js = js;
    this.jsm = jsm;
  }

  /** Opens the buckets, creating them or bringing their replicas and history up to date first ({@link ensureStateBucket}). */
  static async open(nc: NatsConnection, options: EnsureOptions = {}): Promise<RequestStore> {
    await ensureStateBucket(nc, options);
    return RequestStore.observe(nc);
  }

  /** Opens the buckets as they are, never creating them or changing their settings (an observer's view). */
  static async observe(nc: NatsConnection): Promise<RequestStore> {
    const kvm = new Kvm(nc);
    return new RequestStore(await kvm.open(stateBucket), await kvm.open(requestBucket), jetstream(nc), await jetstreamManager(nc));
  }

  /** A record with its request joined, or undefined when there is none under this id (or none this store can join). */
  async get(requestId: string): Promise<StoredRecord | undefined> {
    // Not a key this bucket could hold (ids come from callers): there is no such request.
    if (!isRequestKey(requestId)) return undefined;
    // The request is read beside the record, not after it, unless it is in memory already.
    const cached = this.cache.get(requestId);
    const [entry, request] = await Promise.all([this.kv.get(requestId), cached === undefined ? this.readRequest(requestId) : cached]);
    if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) return undefined;
    const record = await this.joinOrAskLeader(requestId, entry.value, request);
    return record === undefined ? undefined : { record, revision: entry.revision };
  }

  /**
   * The record as the state stream's leader has it: what the last write says. {@link get} is a
   * direct get, which on a replicated bucket any replica may answer, one that has not applied a
   * write yet among them; this is for a reader that must see a write another replica made before
   * the reader's own. Undefined when there is no such record.
   */
  async latest(requestId: string): Promise<RequestRecord | undefined> {
    if (!isRequestKey(requestId)) return undefined;
    const [stored, request] = await Promise.all([this.jsm.streams.getMessage(kvStream, { last_by_subj: `${kvPrefix}${requestId}` }), this.cache.get(requestId) ?? this.readRequest(requestId)]);
    if (stored === null || stored.data.length === 0) return undefined;
    return this.joinOrAskLeader(requestId, stored.data, request);
  }

  /**
   * Stores a request once, before any record of it: the request now stored under its id, the one
   * given (written now, or stored already as it is), or another one stored first (another
   * delivery of the id won, or a broker stopped between the two writes). A record is built from
   * what this returns. INVALID_ARGUMENT when the id cannot be a key; DATA_LOSS when what is
   * stored under it is not a request of that id.
   */
  async hold(request: ApprovalRequest): Promise<ApprovalRequest> {
    const id = request.id;
    if (!isRequestKey(id)) throw new AirlockError(Code.InvalidArgument, `request id ${JSON.stringify(id)} cannot be a key of the state bucket`, { details: { field: "id" } });
    let held = request;
    let wrote = true;
    try {
      await this.requests.create(id, toBinary(ApprovalRequestSchema, request));
    } catch (error) {
      wrote = false;
      if (!isWrongLastSequence(error)) throw new AirlockError(Code.Unavailable, "cannot write a request to NATS", { cause: error });
      const entry = await this.requests.get(id);
      if (entry === null || entry.operation !== "PUT") throw new AirlockError(Code.Aborted, `the stored request ${id} was removed while read; try again`);
      const stored = decodeRequest(id, entry.value);
      if (stored === undefined) throw new AirlockError(Code.DataLoss, `what the requests bucket holds under ${id} is not that request`, { details: { requestId: id } });
      if (!equals(ApprovalRequestSchema, stored, request)) held = stored;
    }
    this.held.delete(id);
    this.held.set(id, { request: held, at: Date.now(), wrote });
    if (this.held.size > requestStoreDefaults.cachedRequests) this.held.delete(this.held.keys().next().value ?? "");
    return held;
  }

  /**
   * Stores a new record (its request first, unless {@link RequestStore.hold} just did); its
   * revision, or undefined when the id is already there (a duplicate, or another replica took
   * it) or another request is stored under it.
   */
  async create(record: RequestRecord): Promise<number | undefined> {
    const request = requestOf(record);
    const stored = await this.isStored(request);
    if (stored === false) return undefined;
    let revision: number;
    try {
      revision = await this.kv.create(request.id, encodeRecord(record));
    } catch (error) {
      if (isWrongLastSequence(error)) return undefined;
      throw new AirlockError(Code.Unavailable, "cannot write request state to NATS", { cause: error });
    }
    // A request this replica did not just write may be one the orphan sweep is deleting (it was
    // stored without a record, maybe long ago): the sweep looks for a record after its delete, and
    // this looks for the request after the record's write, so one of the two puts it back.
    if (stored === "found" && (await this.readRequest(request.id)) === undefined) await this.requests.create(request.id, toBinary(ApprovalRequestSchema, request)).catch(() => undefined);
    this.held.delete(request.id);
    this.remember(request.id, request);
    return revision;
  }

  /**
   * Compare-and-set; the new revision, or undefined when another writer changed the record since
   * `revision`. The record's request must be the one stored for it (FAILED_PRECONDITION otherwise:
   * a request never changes). A record this store read with its request embedded is written
   * with it embedded still: nothing is stored apart for it, so nothing stored can disagree.
   */
  async update(record: RequestRecord, revision: number): Promise<number | undefined> {
    const request = requestOf(record);
    const embedded = this.embedded.has(request.id);
    if (!embedded && (await this.isStored(request)) === false) {
      throw new AirlockError(Code.FailedPrecondition, `request ${request.id} is not the one stored for its record: a request never changes`, { details: { requestId: request.id } });
    }
    let written: number;
    try {
      written = await this.kv.update(request.id, embedded ? toBinary(RequestRecordSchema, record) : encodeRecord(record), revision);
    } catch (error) {
      if (isWrongLastSequence(error)) return undefined;
      throw new AirlockError(Code.Unavailable, "cannot write request state to NATS", { cause: error });
    }
    if (!embedded) this.remember(request.id, request);
    return written;
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
    const joined = this.joined(watcher);
    return (async function* (): AsyncGenerator<StoredRecord> {
      try {
        for await (const { entry, record } of joined) if (record !== undefined) yield { record, revision: entry.revision };
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
   * A record this store cannot join with its request comes as a removal: it is no record here.
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
    const joined = this.joined(watcher);
    const forget = (id: string) => this.forget(id);
    const changes = (async function* (): AsyncGenerator<StateChange> {
      try {
        for await (const { entry, record } of joined) {
          if (record !== undefined) {
            yield { kind: "put", stored: { record, revision: entry.revision } };
          } else {
            if (!isRecordEntry(entry)) forget(entry.key);
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
   * every revision of the key; its marker stays until {@link RequestStore.dropMarkers}. The
   * record's request goes after it (never before: no record is left without its request); a
   * request this call could not remove is left to {@link RequestStore.dropOrphanRequests}.
   */
  async retire(requestId: string, revision: number): Promise<number | undefined> {
    const h = natsHeaders();
    h.set("KV-Operation", "PURGE");
    h.set("Nats-Rollup", "sub");
    let marker: number;
    try {
      marker = (await this.js.publish(`${kvPrefix}${requestId}`, new Uint8Array(0), { headers: h, expect: { lastSubjectSequence: revision } })).seq;
    } catch (error) {
      if (isWrongLastSequence(error)) return undefined;
      throw new AirlockError(Code.Unavailable, "cannot retire a request record in NATS", { cause: error });
    }
    this.forget(requestId);
    const stored = await this.requests.get(requestId).catch(() => null);
    if (stored !== null) await this.jsm.streams.deleteMessage(requestStream, stored.revision, false).catch(() => undefined);
    return marker;
  }

  /**
   * Deletes requests stored without a record (a broker stopped between the request's write and
   * the record's, or intake refused what another delivery stored) once older than `graceMs`:
   * far longer than a broker takes between the two writes. Cheap when there are none: it scans
   * the requests bucket only when it holds more keys than `records` (the records the caller
   * knows of) and then not before the first request it skipped as too young comes of age. `indexed` tells
   * the ids the caller knows a record of (those are never read). A record written after its
   * request was judged an orphan gets the request back. The number of requests deleted.
   */
  async dropOrphanRequests(indexed: (id: string) => boolean, records: number, graceMs: number, now = Date.now()): Promise<number> {
    if (now < this.orphanScanAt) return 0;
    const stored = (await this.jsm.streams.info(requestStream)).state.num_subjects ?? 0;
    if (stored <= records) return 0;
    // The next scan: not before the first request skipped comes of age, nor within orphanScanMs.
    let comesOfAge = 0;
    let dropped = 0;
    for await (const key of await this.requests.keys()) {
      if (indexed(key)) continue;
      const entry = await this.requests.get(key);
      if (entry === null || entry.operation !== "PUT") continue;
      const bornMs = entry.created.getTime();
      if (now - bornMs < graceMs) {
        comesOfAge = comesOfAge === 0 ? bornMs + graceMs : Math.min(comesOfAge, bornMs + graceMs);
        continue;
      }
      if (await this.hasRecord(key)) continue;
      await this.jsm.streams.deleteMessage(requestStream, entry.revision, false).catch(() => undefined);
      this.held.delete(key);
      // A broker stalled longer than the grace between its two writes: its record keeps its request.
      if (await this.hasRecord(key)) await this.requests.create(key, entry.value).catch(() => undefined);
      else dropped++;
    }
    this.orphanScanAt = Math.max(now + requestStoreDefaults.orphanScanMs, comesOfAge);
    return dropped;
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

  /**
   * The entries of a watch of the state bucket in order, each put with its record joined
   * (undefined when it cannot be). While the watch has more waiting (a first pass over the
   * bucket), the requests not in memory are read side by side, up to
   * {@link requestStoreDefaults.joinWindow}; a change is handed on as soon as nothing more waits.
   */
  private async *joined<E extends KvEntry>(entries: AsyncIterable<E>): AsyncGenerator<Joined<E>> {
    const window: Array<Promise<Joined<E>>> = [];
    for await (const entry of entries) {
      const joining = this.joinEntry(entry);
      // Awaited in order below; handled here too, so one failing while an earlier one is awaited is no unhandled rejection.
      joining.catch(() => undefined);
      window.push(joining);
      if (window.length < requestStoreDefaults.joinWindow && (entry.delta ?? 0) > 0) continue;
      for (const next of window.splice(0)) yield await next;
    }
    for (const next of window.splice(0)) yield await next;
  }

  private async joinEntry<E extends KvEntry>(entry: E): Promise<Joined<E>> {
    if (!isRecordEntry(entry)) return { entry };
    const request = this.cache.get(entry.key) ?? (await this.readRequest(entry.key));
    const record = await this.joinOrAskLeader(entry.key, entry.value, request);
    return record === undefined ? { entry } : { entry, record };
  }

  /**
   * {@link RequestStore.join}, and when a record that needs its request found none: a direct get,
   * which any replica of a replicated bucket may answer (one that has not applied the write yet
   * among them), is not the last word, so the stream's leader is asked before the record counts
   * as unjoinable. Only then: a legacy record or a missing key costs no second read.
   */
  private async joinOrAskLeader(key: string, value: Uint8Array, request: ApprovalRequest | undefined): Promise<RequestRecord | undefined> {
    const record = this.join(key, value, request);
    if (record !== undefined || request !== undefined) return record;
    const stored = await this.jsm.streams.getMessage(requestStream, { last_by_subj: `$KV.${requestBucket}.${key}` });
    const fromLeader = stored === null || stored.data.length === 0 ? undefined : decodeRequest(key, stored.data);
    return fromLeader === undefined ? undefined : this.join(key, value, fromLeader);
  }

  /**
   * The record stored under `key`, with its request: the one it embeds (written before the
   * split) or `request` (stored under the key); undefined when it does not decode or either names
   * another id. The request is remembered for the next read.
   */
  private join(key: string, value: Uint8Array, request: ApprovalRequest | undefined): RequestRecord | undefined {
    let record: RequestRecord;
    try {
      record = fromBinary(RequestRecordSchema, value);
    } catch {
      // Only brokers write the bucket (the server enforces it); a record that does not decode is skipped, not fatal.
      return undefined;
    }
    if (record.request !== undefined) {
      if (record.request.id !== key) return undefined;
      this.embedded.add(key);
      return record;
    }
    if (request?.id !== key) return undefined;
    record.request = request;
    this.remember(key, request);
    return record;
  }

  /** The request stored under `key`, if any names that id. */
  private async readRequest(key: string): Promise<ApprovalRequest | undefined> {
    const entry = await this.requests.get(key);
    return entry === null || entry.operation !== "PUT" ? undefined : decodeRequest(key, entry.value);
  }

  /**
   * Whether `request` is the one stored under its id: false when another one is; `"wrote"` when
   * this replica wrote it moments ago ({@link requestStoreDefaults.heldFreshMs}); `"found"` when
   * it was stored before (known from a record, or found stored now).
   */
  private async isStored(request: ApprovalRequest): Promise<false | "wrote" | "found"> {
    const same = (known: ApprovalRequest) => known === request || equals(ApprovalRequestSchema, known, request);
    const cached = this.cache.get(request.id);
    if (cached !== undefined) return same(cached) && "found";
    let held = this.held.get(request.id);
    if (held === undefined || Date.now() - held.at >= requestStoreDefaults.heldFreshMs) {
      await this.hold(request);
      held = this.held.get(request.id);
    }
    if (held === undefined || !same(held.request)) return false;
    return held.wrote && Date.now() - held.at < requestStoreDefaults.heldFreshMs ? "wrote" : "found";
  }

  private async hasRecord(key: string): Promise<boolean> {
    const entry = await this.kv.get(key);
    return entry !== null && isRecordEntry(entry);
  }

  /** Drops what this store keeps of a record that left the bucket. */
  private forget(id: string): void {
    this.cache.delete(id);
    this.held.delete(id);
    this.embedded.delete(id);
  }

  /** Keeps a request in memory (it is stored, and a record is joined to it), the least recently used leaving first. */
  private remember(id: string, request: ApprovalRequest): void {
    this.cache.delete(id);
    this.cache.set(id, request);
    if (this.cache.size > requestStoreDefaults.cachedRequests) this.cache.delete(this.cache.keys().next().value ?? "");
  }
}

/** A watched entry of the state bucket, with its record joined to its request when it is a record this store can join. */
interface Joined<E extends KvEntry> {
  readonly entry: E;
  readonly record?: RequestRecord;
}

/** Whether a KV entry holds a value (a record or a request), not a deletion or purge. */
function isRecordEntry(entry: KvEntry): boolean {
  return entry.operation === "PUT" && entry.value.length > 0;
}

/** A record's request; INVALID_ARGUMENT for a record without one (no key to store it under). */
function requestOf(record: RequestRecord): ApprovalRequest {
  if (record.request === undefined) throw new AirlockError(Code.InvalidArgument, "a request record without its request", { details: { field: "request" } });
  return record.request;
}

/** A record as the state bucket holds it: without its request, which is stored once apart. */
function encodeRecord(record: RequestRecord): Uint8Array {
  return toBinary(RequestRecordSchema, { ...record, request: undefined });
}

/** A stored request, if it decodes and names the id it is stored under. */
function decodeRequest(key: string, value: Uint8Array): ApprovalRequest | undefined {
  try {
    const request = fromBinary(ApprovalRequestSchema, value);
    return request.id === key ? request : undefined;
  } catch {
    return undefined;
  }
}
