import type { JetStreamManager } from "@nats-io/jetstream";

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

/** The KV bucket of reviewers' registered passkeys (public keys and counters; only brokers touch it). */
export const passkeyBucket = "AIRLOCK_PASSKEYS";

/** The KV bucket of issued step-up challenges, each usable once (only brokers touch it; entries expire). */
export const stepUpBucket = "AIRLOCK_STEPUP";

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

/**
 * Creates the streams if they do not exist yet (idempotent; an existing stream is left as it is).
 * Direct get is on, so a sidecar can read back its own host's requests and decisions by subject
 * (`$JS.API.DIRECT.GET.<stream>.<subject>`), a right the server can scope to the host.
 */
export async function ensureStreams(jsm: JetStreamManager): Promise<void> {
  for (const stream of Object.values(streams)) {
    try {
      await jsm.streams.info(stream.name);
    } catch {
      await jsm.streams.add({ name: stream.name, subjects: [...stream.subjects], duplicate_window: 2 * 60 * 1_000_000_000, allow_direct: true });
    }
  }
}
