/**
 * The history of settled requests: each settled record once, in a stream of its own
 * (`AIRLOCK_HISTORY`, one subject per request, one message per subject), written before the
 * record leaves the state bucket at the end of its retention. Lists page through it newest
 * first, with a bounded amount of reading per page.
 * @module
 */
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager, type StoredMsg } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../common/errors.js";
import { type EnsureOptions, ensureStream, historyStream, type OwnedStreamSettings, subjects } from "../common/subjects.js";
import { type RequestRecord, RequestRecordSchema } from "../proto/index.js";

/** Bounds on one page of history. */
export const historyDefaults = {
  /** Messages read per direct-get batch. */
  batch: 256,
  /**
   * Messages examined for one page at most: a page of a rare filter ends early, with a cursor
   * to go on from, so one call never reads the whole history.
   */
  maxScan: 4_096,
  /** How long a duplicate write is recognised by its message id (two replicas retiring one record), in ns. */
  duplicateWindowNs: 2 * 60 * 1_000_000_000,
} as const;

/** The history stream's settings: one message per request, deletes and purges refused. */
export const historyStreamSettings = {
  name: historyStream.name,
  subjects: [historyStream.subjects],
  max_msgs_per_subject: 1,
  duplicate_window: historyDefaults.duplicateWindowNs,
  allow_direct: true,
  deny_delete: true,
  deny_purge: true,
} as const satisfies OwnedStreamSettings;

/** One page of history: the matching records newest first, and where the next page starts (absent at the oldest). */
export interface HistoryPage {
  readonly records: RequestRecord[];
  /** Read the next page with messages before this stream sequence. */
  readonly before?: number;
}

/**
 * Settled requests' records, each stored once. Only brokers may read or write the stream
 * (the server enforces it: sidecars and the audit reader have no right on it).
 */
export class HistoryStore {
  private readonly js: JetStreamClient;
  private readonly jsm: JetStreamManager;

  private constructor(js: JetStreamClient, jsm: JetStreamManager) {
    this.js = js;
    this.jsm = jsm;
  }

  /** Opens the history stream, creating it or bringing its replicas and settings up to date first ({@link ensureStream}). */
  static async open(nc: NatsConnection, options: EnsureOptions = {}): Promise<HistoryStore> {
    const jsm = await jetstreamManager(nc);
    await ensureStream(jsm, historyStreamSettings, options);
    return new HistoryStore(jetstream(nc), jsm);
  }

  /**
   * Stores a settled record. Idempotent per record revision: replicas retiring the same record
   * write it once (the message id dedupes), and a request keeps one message (the newest).
   */
  async put(record: RequestRecord, revision: number): Promise<void> {
    const id = record.request?.id ?? "";
    try {
      await this.js.publish(subjects.history(id), toBinary(RequestRecordSchema, record), { msgID: `${id}@${revision}` });
    } catch (error) {
      throw new AirlockError(Code.Unavailable, "cannot write request history to NATS", { cause: error });
    }
  }

  /** A request's settled record, if it is in the history. */
  async get(requestId: string): Promise<RequestRecord | undefined> {
    if (!/^[-_=a-zA-Z0-9]{1,256}$/.test(requestId)) return undefined;
    const message = await this.jsm.direct.getMessage(historyStream.name, { last_by_subj: subjects.history(requestId) });
    return message === null ? undefined : decode(message);
  }

  /**
   * Records matching `accept`, newest stored first, at most `limit`, reading at most
   * {@link historyDefaults.maxScan} messages; `before` (a sequence a previous page returned)
   * continues a listing.
   */
  async page(accept: (record: RequestRecord) => boolean, limit: number, before?: number): Promise<HistoryPage> {
    const info = await this.jsm.streams.info(historyStream.name);
    const first = info.state.first_seq;
    let end = Math.min(before ?? Number.POSITIVE_INFINITY, info.state.last_seq + 1);
    const records: RequestRecord[] = [];
    let scanned = 0;
    while (end > first && info.state.messages > 0) {
      const start = Math.max(first, end - historyDefaults.batch);
      const batch: StoredMsg[] = [];
      try {
        for await (const message of await this.jsm.direct.getBatch(historyStream.name, { seq: start, batch: end - start })) batch.push(message);
      } catch (error) {
        // JetStream's status 404: nothing at or after the start.
        if (!(error instanceof Error && "code" in error && error.code === 404)) throw error;
      }
      for (const message of batch.filter((m) => m.seq < end).reverse()) {
        const record = decode(message);
        if (record !== undefined && accept(record)) {
          records.push(record);
          if (records.length >= limit) return { records, before: message.seq };
        }
      }
      scanned += end - start;
      end = start;
      if (scanned >= historyDefaults.maxScan && end > first) return { records, before: end };
    }
    return { records };
  }
}

function decode(message: StoredMsg): RequestRecord | undefined {
  try {
    return fromBinary(RequestRecordSchema, message.data);
  } catch {
    // Only brokers write the stream (the server enforces it); a message that does not decode is skipped.
    return undefined;
  }
}
