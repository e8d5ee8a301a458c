import { JetStreamApiCodes, JetStreamApiError, type JetStreamManager, type StreamConfig, type StreamInfo } from "@nats-io/jetstream";
import { errors as natsErrors } from "@nats-io/transport-node";
import { AirlockError, Code } from "./errors.js";

/**
 * The JetStream streams Airlock's parts talk through. Sidecars publish
 * requests, completions and security events; brokers publish decisions.
 * Subjects carry the sidecar's host as a whole token, so the server's
 * permissions and account exports can give each host its own subjects only.
 */
export const streams = {
  requests: { name: "AIRLOCK_REQUESTS", subjects: ["airlock.request.>"] },
  decisions: { name: "AIRLOCK_DECISIONS", subjects: ["airlock.decision.>"] },
  completions: { name: "AIRLOCK_COMPLETIONS", subjects: ["airlock.completion.>"] },
  security: { name: "AIRLOCK_SECURITY", subjects: ["airlock.security.>"] },
} as const;

/** The append-only audit trail's stream and its one subject (only brokers write it). */
export const auditStream = { name: "AIRLOCK_AUDIT", subject: "airlock.audit" } as const;

/**
 * The history of settled requests (each record once, one subject per request), where records go
 * when they leave the state bucket at the end of their retention (only brokers touch it).
 */
export const historyStream = { name: "AIRLOCK_HISTORY", subjects: "airlock.history.>" } as const;

/** The KV bucket holding every request's record, keyed by request id (only brokers touch it). */
export const stateBucket = "AIRLOCK_STATE";

/**
 * The KV bucket holding each record's ApprovalRequest, written once before the record and keyed
 * by request id: the records in {@link stateBucket} leave it out (only brokers touch it).
 */
export const requestBucket = "AIRLOCK_STATE_REQUESTS";

/** The KV bucket of reviewers' registered passkeys (public keys and counters; only brokers touch it). */
export const passkeyBucket = "AIRLOCK_PASSKEYS";

/** The KV bucket of issued step-up challenges, each usable once (only brokers touch it; entries expire). */
export const stepUpBucket = "AIRLOCK_STEPUP";

/**
 * The KV bucket of where each request's chat messages are (Slack channel and ts, Teams
 * conversation and activity), so any replica can update them when the request is decided
 * (only brokers touch it; each entry expires a margin after its request's deadline).
 */
export const chatBucket = "AIRLOCK_CHAT";

/** A host name usable as one NATS subject token. */
export const hostPattern = /^[A-Za-z0-9_-]{1,64}$/;

/** Subjects, by what they carry. */
export const subjects = {
  /** An ApprovalRequest from `host`. */
  request: (host: string, requestId: string) => `airlock.request.${host}.${requestId}`,
  /** The signed Decision for a request from `host`. */
  decision: (host: string, requestId: string) => `airlock.decision.${host}.${requestId}`,
  /** Every decision for `host`'s requests. */
  decisionsFor: (host: string) => `airlock.decision.${host}.>`,
  /** The Completion of an approved action on `host`. */
  completion: (host: string, requestId: string) => `airlock.completion.${host}.${requestId}`,
  /** A security event seen by `host`'s sidecar (refused decision, failed unwrap). */
  security: (host: string) => `airlock.security.${host}`,
  /** `host`'s sidecar saying which approved actions it is still running (core NATS, every few seconds). */
  heartbeat: (host: string) => `airlock.heartbeat.${host}`,
  /** A settled request's record in the history stream. */
  history: (requestId: string) => `airlock.history.${requestId}`,
  /** Every host's heartbeats, as brokers subscribe to them. */
  heartbeats: "airlock.heartbeat.*",
} as const;

/** How many copies of each stream and bucket a cluster keeps: 1 (a single server), 3 or 5 (clusters). */
export const natsReplicaChoices = [1, 3, 5] as const;

/** Defaults of {@link EnsureOptions}. */
export const ensureDefaults = {
  replicas: 1,
  /** How long a stream's info is asked again while JetStream does not answer in time, in ms. */
  answerWaitMs: 5_000,
} as const;

/** Options of {@link ensureStream} and everything built on it. */
export interface EnsureOptions {
  /** Replicas of every stream and bucket Airlock creates (`nats.replicas`). @default 1 */
  readonly replicas?: number;
  /** Told of each stream whose settings this start brought up to date (a pino logger will do). */
  readonly log?: { warn(fields: { readonly stream: string; readonly changed: Record<string, { readonly from: unknown; readonly to: unknown }> }, message: string): void };
}

/**
 * Settings Airlock owns on one of its streams: what {@link ensureStream} creates
 * the stream with and keeps it at. Settings not named here are the operator's.
 */
export type OwnedStreamSettings = Partial<StreamConfig> & { readonly name: string };

/** The owned settings of `wanted` whose value differs in `actual`, with both values. */
function settingsDiff(wanted: OwnedStreamSettings, actual: StreamConfig): Record<string, { readonly from: unknown; readonly to: unknown }> {
  const diff: Record<string, { from: unknown; to: unknown }> = {};
  for (const [key, to] of Object.entries(wanted)) {
    const from = (actual as unknown as Record<string, unknown>)[key];
    // Booleans the server leaves out of its answer when false.
    const same = typeof to === "boolean" ? (from === true) === to : JSON.stringify(from) === JSON.stringify(to);
    if (!same) diff[key] = { from, to };
  }
  return diff;
}

/**
 * A stream's info, asked again for a few seconds while JetStream does not answer in time (a
 * cluster electing its leaders, a loaded machine): the request's own timeout, no responders, or
 * a 503 "temporarily unavailable" answer. Any other answer, an error one included, is final.
 */
async function streamInfoPatiently(jsm: JetStreamManager, name: string): Promise<StreamInfo> {
  const until = Date.now() + ensureDefaults.answerWaitMs;
  for (let wait = 250; ; wait = Math.min(wait * 2, 2000)) {
    try {
      return await jsm.streams.info(name);
    } catch (error) {
      // 503: the server's "temporarily unavailable" answers (no JetStream meta or stream leader yet).
      const unanswered = error instanceof natsErrors.TimeoutError || error instanceof natsErrors.NoRespondersError || (error instanceof JetStreamApiError && error.status === 503);
      if (!unanswered || Date.now() + wait > until) throw error;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }
}

/**
 * The one owner of "this stream exists with these settings". A missing stream
 * is created (by `create` when given, e.g. a KV bucket's own constructor); an
 * existing one whose owned settings differ (replicas after a move to a
 * cluster, a setting a newer version needs) is updated and the change logged.
 * When the update is refused (the broker's credential may not update streams)
 * start fails with FAILED_PRECONDITION naming the stream and the settings, so
 * an operator applies them with the admin credential; a stream is never
 * silently kept as it is.
 */
export async function ensureStream(jsm: JetStreamManager, wanted: OwnedStreamSettings, options: EnsureOptions & { readonly create?: () => Promise<unknown> } = {}): Promise<void> {
  const settings: OwnedStreamSettings = { ...wanted, num_replicas: options.replicas ?? ensureDefaults.replicas };
  let actual: StreamConfig;
  try {
    actual = (await streamInfoPatiently(jsm, settings.name)).config;
  } catch (error) {
    if (!(error instanceof JetStreamApiError && error.code === JetStreamApiCodes.StreamNotFound)) {
      throw new AirlockError(Code.Unavailable, `cannot read the settings of stream ${settings.name}`, { cause: error, details: { stream: settings.name } });
    }
    try {
      if (options.create === undefined) await jsm.streams.add(settings);
      else await options.create();
    } catch (cause) {
      throw new AirlockError(Code.Unavailable, `cannot create stream ${settings.name}`, { cause, details: { stream: settings.name } });
    }
    return;
  }
  const diff = settingsDiff(settings, actual);
  const fields = Object.keys(diff);
  if (fields.length === 0) return;
  try {
    await jsm.streams.update(settings.name, { ...actual, ...settings });
  } catch (cause) {
    throw new AirlockError(
      Code.FailedPrecondition,
      `stream ${settings.name} differs from this configuration in ${fields.join(", ")} and could not be updated with this credential: an operator applies the change with the admin credential (docs/architecture.md, Production topology)`,
      { cause, details: { stream: settings.name, fields: fields.join(",") } },
    );
  }
  options.log?.warn({ stream: settings.name, changed: diff }, "stream settings brought up to date");
}

/** The stream behind a KV bucket. */
export function bucketStream(bucket: string): string {
  return `KV_${bucket}`;
}

/**
 * Creates the streams if they do not exist yet, and brings an existing one's
 * owned settings (replicas, direct get, duplicate window, subjects) up to date
 * through {@link ensureStream}. Direct get is on, so a sidecar can read back its
 * own host's requests and decisions by subject
 * (`$JS.API.DIRECT.GET.<stream>.<subject>`), a right the server can scope to the host.
 */
export async function ensureStreams(jsm: JetStreamManager, options: EnsureOptions = {}): Promise<void> {
  for (const stream of Object.values(streams)) {
    await ensureStream(jsm, { name: stream.name, subjects: [...stream.subjects], duplicate_window: 2 * 60 * 1_000_000_000, allow_direct: true }, options);
  }
}
