/**
 * The broker's in-memory index of the request records in the state bucket, fed by the KV
 * watch every replica keeps. Lists, the reviewers' live snapshot, bulk deny and the ticker
 * read it instead of reading every record: a record that is not settled is held whole (the
 * ticker and the pending lists need it), a settled one only by what filters and ordering
 * need (its record is read from KV when a page shows it). A cache of KV, never the source
 * of truth: every change still goes through compare-and-set on the record's revision.
 * @module
 */
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type RequestRecord, RequestState, Risk } from "../proto/index.js";
import type { StateChange, StoredRecord } from "./store.js";

/** What the index keeps of one record. */
export interface IndexEntry {
  readonly id: string;
  readonly state: RequestState;
  /** When the request was created, epoch ms (0 when unknown): the listing order. */
  readonly createdMs: number;
  /** When the record last changed, epoch ms: retention counts from here. */
  readonly updatedMs: number;
  /** The agent, lower-case. */
  readonly agent: string;
  readonly host: string;
  readonly risk: Risk;
  /** The record's KV revision. */
  readonly revision: number;
  /** The whole record while the broker may still act on it (see {@link RequestIndex}'s `keepWhole`); absent after. */
  readonly stored?: StoredRecord;
}

/** What a listing filters on (all of them at once). */
export interface IndexQuery {
  /** Empty: every state. */
  readonly states: ReadonlySet<RequestState>;
  /** Exact agent id, lower-case; empty: any. */
  readonly agent: string;
  /** Risk at least this; UNSPECIFIED: any. */
  readonly minRisk: Risk;
  /** Created at or after (epoch ms); 0: any. */
  readonly createdFromMs: number;
  /** Created at or before (epoch ms); 0: any. */
  readonly createdToMs: number;
}

/** A position in the index's order (newest first): the entry a page ended at. */
export interface IndexPosition {
  readonly createdMs: number;
  readonly id: string;
}

/** Whether `a` comes before `b` in the listing order: newest first, ties by id (descending), like the reviewers' `newestFirst`. */
function before(a: IndexPosition, b: IndexPosition): boolean {
  return a.createdMs !== b.createdMs ? a.createdMs > b.createdMs : a.id > b.id;
}

/** Whether a record in `state` may already be settled (a state that is not final never is). */
const finalStates: ReadonlySet<RequestState> = new Set([RequestState.COMPLETED, RequestState.FAILED, RequestState.EXPIRED, RequestState.DENIED, RequestState.CANCELLED]);

/** Whether a query can match a settled record (one that may have gone to the history). */
export function reachesSettled(query: Pick<IndexQuery, "states">): boolean {
  return query.states.size === 0 || [...query.states].some((state) => finalStates.has(state));
}

/** Whether an index entry (or a record's summary) passes a query. */
export function matchesQuery(entry: Pick<IndexEntry, "state" | "agent" | "risk" | "createdMs">, query: IndexQuery): boolean {
  if (query.states.size > 0 && !query.states.has(entry.state)) return false;
  if (query.agent !== "" && entry.agent !== query.agent) return false;
  if (query.minRisk !== Risk.UNSPECIFIED && entry.risk < query.minRisk) return false;
  if (query.createdFromMs > 0 && entry.createdMs < query.createdFromMs) return false;
  if (query.createdToMs > 0 && entry.createdMs > query.createdToMs) return false;
  return true;
}

/** The summary of a record an index entry holds (also used to filter history records). */
export function summaryOf(record: RequestRecord): Pick<IndexEntry, "id" | "state" | "createdMs" | "updatedMs" | "agent" | "host" | "risk"> {
  const request = record.request;
  return {
    id: request?.id ?? "",
    state: record.state,
    createdMs: request?.createdAt === undefined ? 0 : timestampMs(request.createdAt),
    updatedMs: record.updatedAt === undefined ? 0 : timestampMs(record.updatedAt),
    agent: request?.identity?.agent.toLowerCase() ?? "",
    host: request?.host ?? "",
    risk: request?.risk ?? Risk.UNSPECIFIED,
  };
}

/**
 * The index. Memory: one small entry per record in the state bucket, plus the whole record of
 * each one not settled; the state bucket itself is bounded by the retention of settled records.
 */
export class RequestIndex {
  private readonly entries = new Map<string, IndexEntry>();
  /** Every entry, newest first (the listing order). */
  private readonly order: IndexEntry[] = [];
  /** Entries whose whole record is held (every one not settled, and some settled the ticker still watches). */
  private readonly live = new Map<string, IndexEntry>();
  /** The highest KV revision (stream sequence) applied. */
  private appliedSeq = 0;
  private readonly waiters = new Set<{ seq: number; resolve: () => void }>();
  private readonly keepWhole: (record: RequestRecord) => boolean;

  /**
   * @param keepWhole - whether a record is held whole when it is written: it must be true for
   *   every record that is not settled (lists of pending requests and the ticker read those).
   */
  constructor(keepWhole: (record: RequestRecord) => boolean) {
    this.keepWhole = keepWhole;
  }

  /** How many records are indexed. */
  get size(): number {
    return this.entries.size;
  }

  /** Applies one change from the state bucket's watch. Older revisions than the one held are ignored. */
  apply(change: StateChange): void {
    if (change.kind === "removed") {
      this.remove(change.id);
      this.advance(change.seq);
      return;
    }
    const { stored } = change;
    const summary = summaryOf(stored.record);
    const held = this.entries.get(summary.id);
    this.advance(stored.revision);
    if (summary.id === "" || (held !== undefined && held.revision >= stored.revision)) return;
    const entry: IndexEntry = { ...summary, revision: stored.revision, ...(this.keepWhole(stored.record) ? { stored } : {}) };
    if (held !== undefined && held.createdMs === entry.createdMs) {
      this.order[this.positionOf(held)] = entry;
    } else {
      if (held !== undefined) this.remove(held.id);
      this.order.splice(this.insertionPoint(entry), 0, entry);
    }
    this.entries.set(entry.id, entry);
    if (entry.stored === undefined) this.live.delete(entry.id);
    else this.live.set(entry.id, entry);
  }

  /** Stops holding a record whole (the broker has nothing left to do with it); its entry stays. */
  release(id: string): void {
    const held = this.entries.get(id);
    if (held?.stored === undefined) return;
    const { stored: _dropped, ...summary } = held;
    this.order[this.positionOf(held)] = summary;
    this.entries.set(id, summary);
    this.live.delete(id);
  }

  /** Forgets a record (retired, or found gone). */
  remove(id: string): void {
    const held = this.entries.get(id);
    if (held === undefined) return;
    this.order.splice(this.positionOf(held), 1);
    this.entries.delete(id);
    this.live.delete(id);
  }

  /** The entry of a record in the state bucket, if indexed. */
  get(id: string): IndexEntry | undefined {
    return this.entries.get(id);
  }

  /** Every record held whole (all those not settled), with its revision (what the ticker and the live snapshot read). */
  active(): StoredRecord[] {
    return [...this.live.values()].flatMap((entry) => (entry.stored === undefined ? [] : [entry.stored]));
  }

  /** Settled entries last changed at or before `cutoffMs`, at most `max` (what retention retires). */
  settledBefore(cutoffMs: number, max: number): IndexEntry[] {
    const found: IndexEntry[] = [];
    for (const entry of this.entries.values()) {
      if (entry.stored === undefined && entry.updatedMs <= cutoffMs) found.push(entry);
      if (found.length >= max) break;
    }
    return found;
  }

  /** Request ids that start with `prefix` (lower-case compare). */
  idsStartingWith(prefix: string): string[] {
    const lower = prefix.toLowerCase();
    return [...this.entries.keys()].filter((id) => id.toLowerCase().startsWith(lower));
  }

  /**
   * Entries matching `query` in listing order, strictly after `after` when given. A query only
   * of states that are never settled reads the live records alone.
   */
  *select(query: IndexQuery, after?: IndexPosition): Generator<IndexEntry> {
    if (!reachesSettled(query)) {
      const matching = [...this.live.values()].filter((entry) => matchesQuery(entry, query) && (after === undefined || before(after, entry)));
      yield* matching.sort((a, b) => (before(a, b) ? -1 : 1));
      return;
    }
    for (let i = after === undefined ? 0 : this.insertionPoint(after); i < this.order.length; i++) {
      const entry = this.order[i];
      if (entry === undefined || (after !== undefined && !before(after, entry))) continue;
      if (matchesQuery(entry, query)) yield entry;
    }
  }

  /**
   * Resolves once the index has applied the state bucket's writes up to stream sequence `seq`
   * (or after `timeoutMs`, false then): a list that waits for it shows every write made
   * before it began, on any replica.
   */
  reached(seq: number, timeoutMs: number): Promise<boolean> {
    if (this.appliedSeq >= seq) return Promise.resolve(true);
    return new Promise((resolve) => {
      const waiter = {
        seq,
        resolve: () => {
          clearTimeout(timer);
          this.waiters.delete(waiter);
          resolve(true);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        resolve(false);
      }, timeoutMs);
      this.waiters.add(waiter);
    });
  }

  private advance(seq: number): void {
    if (seq <= this.appliedSeq) return;
    this.appliedSeq = seq;
    for (const waiter of [...this.waiters]) if (waiter.seq <= seq) waiter.resolve();
  }

  /** Where `position` goes in {@link order} (the first entry not before it). */
  private insertionPoint(position: IndexPosition): number {
    let low = 0;
    let high = this.order.length;
    while (low < high) {
      const mid = (low + high) >>> 1;
      const entry = this.order[mid];
      if (entry !== undefined && before(entry, position)) low = mid + 1;
      else high = mid;
    }
    return low;
  }

  private positionOf(entry: IndexEntry): number {
    return this.insertionPoint(entry);
  }
}
