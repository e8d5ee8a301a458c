import { randomUUID } from "node:crypto";
import { clone, create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { AckPolicy, type ConsumerMessages, DeliverPolicy, jetstream, JetStreamApiError, type JetStreamClient, type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { type DecisionSigningKey, signDecision } from "../common/decision.js";
import { AirlockError, Code } from "../common/errors.js";
import { natsRefusal } from "../common/nats.js";
import { failpoint } from "../common/failpoints.js";
import type { Logger } from "../common/logger.js";
import { ensureStreams, streams, subjects } from "../common/subjects.js";
import { boundTouched } from "../common/touched.js";
import {
  type ApprovalRequest,
  ApprovalRequestSchema,
  AuditEventType,
  CompletionSchema,
  type DecisionBody,
  DecisionBodySchema,
  DecisionSchema,
  type LeaseRecord,
  LeaseRecordSchema,
  type RequestRecord,
  RequestRecordSchema,
  RequestState,
  Verdict,
} from "../proto/index.js";
import { type AuditEntry, AuditKeyRing, AuditLog, type AuditSigner, Checkpointer, type CheckpointSink } from "./audit/index.js";
import type { CredentialIssuer, IssuedCredential } from "./credentials.js";
import { type ApprovalConfig, type ApprovalEvent, type Ballot, intake, isFinal, markCompleted, markExecuting, markFailed, type Outcome, principalKey, type RiskLevel, tick, vote } from "./rules.js";
import { stepUpNeed } from "./stepup/config.js";
import { type BrokerMetrics, createBrokerMetrics } from "./metrics.js";
import { HistoryStore } from "./history.js";
import { type IndexPosition, type IndexQuery, reachesSettled, RequestIndex, summaryOf, matchesQuery } from "./request-index.js";
import { RequestStore, type StoredRecord } from "./store.js";
import { type Refusal, type RefusalReason, subjectHost, subjectParts, vetCompletion, vetRequest } from "./trust.js";
import type { Policy } from "../sidecar/index.js";

/** Options of {@link Broker.start}. */
export interface BrokerOptions {
  readonly nc: NatsConnection;
  /** Replicas of every stream and bucket the broker creates or brings up to date at start (`nats.replicas`). @default 1 */
  readonly replicas?: number;
  readonly issuer: CredentialIssuer;
  readonly signingKey: DecisionSigningKey;
  readonly approvals: ApprovalConfig;
  /**
   * The policy in force (the same file the sidecars load): a request's risk, reviewer
   * requirement and credential template come from the rule it names here, never from the
   * message. Called per request, so a reloaded policy applies at once.
   */
  readonly policy: () => Policy;
  /** This replica's name, recorded on revocations. */
  readonly replicaId: string;
  readonly log: Logger;
  /** How often pending requests are checked for expiry and escalation, and leases reconciled, in ms. @default 500 */
  readonly tickIntervalMs?: number;
  /** How long an approval may be acted on after it is decided, in ms. @default 300000 */
  readonly decisionTtlMs?: number;
  /**
   * How long before the action's deadline an approval must be finalized for a credential to
   * be issued, in ms: the decision still has to reach the sidecar and its credential be
   * unwrapped, and one that arrives after the agent stopped waiting would leave a live
   * credential no action uses. @default 1000
   */
  readonly deadlineMarginMs?: number;
  /**
   * How long an executing action may go without its sidecar's heartbeat before this replica
   * revokes its credential and fails the record, in ms. Sidecars beat every 5 s by default:
   * keep this several beats long. @default 20000
   */
  readonly heartbeatSilenceMs?: number;
  /**
   * How long a decided request may stay without a published decision before
   * another replica takes it over (its publisher died), in ms. @default 10000
   */
  readonly orphanAfterMs?: number;
  /** Whether to consume requests and completions (tests may run a decide-only replica). @default true */
  readonly consume?: boolean;
  /** @default fresh metrics on a registry of their own */
  readonly metrics?: BrokerMetrics;
  /**
   * The key this replica signs its audit events and checkpoints with.
   * @default the decision signing key (signatures name their purpose, so the two never mix)
   */
  readonly auditSigner?: AuditSigner;
  /** The keys the trail is verified against (every replica's). @default the ring of {@link auditSigner} alone */
  readonly auditKeys?: AuditKeyRing;
  /** Where and how often this replica writes checkpoints of the trail; none when absent. */
  readonly checkpoints?: { readonly sink: CheckpointSink; readonly everyEvents: number; readonly intervalMs: number };
  /**
   * Told what happened to a request once it is written and audited (notifications
   * hang here). Called synchronously and must not block: it runs on the approval path.
   */
  readonly onEvents?: (events: readonly ApprovalEvent[], record: RequestRecord) => void;
  /**
   * Approvals of requests at this risk or above need step-up (`reviewers.step_up.min_risk`),
   * besides those whose rule asks for it and every break-glass. Absent: risk alone never does.
   */
  readonly stepUpMinRisk?: RiskLevel;
  /**
   * How long a settled record stays in the state bucket after its last change, in ms
   * (`state.retention`); it then moves to the history stream, where lists still find it. @default 3600000
   */
  readonly retentionMs?: number;
}

/** One page of a request listing: records in listing order, and the cursor of the next page (absent at the end). */
export interface RequestPage {
  readonly records: RequestRecord[];
  readonly nextCursor?: string;
}

/** Defaults of {@link BrokerOptions}. */
export const brokerDefaults = {
  tickIntervalMs: 500,
  decisionTtlMs: 300_000,
  deadlineMarginMs: 1_000,
  heartbeatSilenceMs: 20_000,
  /** Actions one heartbeat may name (more are ignored). */
  maxHeartbeatActions: 1_000,
  intakeConsumer: "airlock-broker-intake",
  completionConsumer: "airlock-broker-completions",
  securityConsumer: "airlock-broker-security",
  /** Messages of one consumer handled at once by one replica. */
  maxInFlight: 64,
  /**
   * How long a delivered message may go unacknowledged before JetStream gives it to another
   * replica, in ms: what a replica's death costs a waiting agent. Long work keeps it with
   * in-progress acknowledgements every third of it, so only a dead replica loses it.
   */
  ackWaitMs: 5_000,
  orphanAfterMs: 10_000,
  /** How long a settled record stays in the state bucket, in ms (`state.retention`, 1h). */
  retentionMs: 3_600_000,
  /** How often each replica looks for settled records past their retention, in ms. */
  retentionSweepMs: 10_000,
  /** Records one sweep retires at most (the next sweep goes on). */
  retireBatch: 1_000,
  /**
   * How old a request stored without a record must be before the sweep deletes it, in ms: far
   * longer than a replica takes between storing a request and writing its record.
   */
  orphanRequestGraceMs: 600_000,
  /** How long a list waits for this replica's index to catch up with the state bucket before answering from it as it is, in ms. */
  indexWaitMs: 2_000,
  /**
   * The longest a decision's publish (and the lease write before it) is tried again while NATS is
   * away, in ms, counted from the record's last write: never past the decision's expiry, and
   * never past 80% of `orphanAfterMs`, so a replica still trying (its wait for the last answer
   * included) does not overlap another replica's takeover of the same decision.
   */
  decisionRetryMs: 30_000,
  /** How long one publish of a decision waits for JetStream's answer at most, in ms (less when its retry window ends sooner). */
  publishTimeoutMs: 5_000,
  /**
   * How long each pull of a consumer waits, in ms. nats.js checks a consumer again after a
   * reconnect and, when JetStream is still recovering, waits 0.5 to 1.5 times this before the
   * next check: with its 30 s default, intake and completions stalled up to 45 s after a NATS
   * restart. The server's idle heartbeats come every half of it, and two missed ones make the
   * client pull again, so a pull left on a cluster node that died is replaced within about this long.
   */
  pullExpiresMs: 3_000,
  /** How often an issuance Vault never answered is swept for, in ms (each sweep lists Vault's tokens or leases). */
  sweepEveryMs: 5_000,
  /** Accessors or lease ids one sweep's audit event names at most (the count is always there). */
  maxSweptNamed: 50,
  /** How long before an orphaned decision's write a dead replica's issuance is looked for in Vault, in ms (clocks of replicas and Vault differ). */
  orphanSweepMarginMs: 5_000,
  /**
   * Deliveries of one message before it is given up (terminated and audited). A message that
   * cannot be decoded or fails for good is terminated at once.
   */
  maxDeliver: 8,
  /** Redelivery delays after a transient failure, by attempt (the last one repeats), in ms. */
  redeliveryBackoffMs: [250, 1000, 2000, 5000, 10_000],
} as const;

/**
 * Bounds on what a sidecar's call reports may cost: entries per message, bytes
 * per field, and audit events per host per minute (a hostile host must not be
 * able to flood the trail; what is over is counted in one flagged event).
 */
const callReportLimits = { maxPerBatch: 500, maxField: 300, eventsPerHostPerMinute: 1_000 } as const;

/** JetStream's answer to creating a durable consumer that exists with other settings. */
const consumerExists = 10148;

/** A message that will fail the same way at every delivery: terminated and audited, never redelivered. */
class PoisonMessage extends Error {
  readonly reason: RefusalReason;
  constructor(reason: RefusalReason, message: string, options?: ErrorOptions) {
    super(message, options);
    this.reason = reason;
  }
}

/** Where a vote came from, for the audit trail. */
export interface VoteOrigin {
  /** The chat channel that carried the vote (`slack`, `teams`); absent for the reviewers' API and console. */
  readonly channel?: string;
}

const verdicts: Record<Outcome, Verdict> = { approved: Verdict.APPROVED, denied: Verdict.DENIED, expired: Verdict.EXPIRED, cancelled: Verdict.CANCELLED };

function auditTypeOf(event: ApprovalEvent): AuditEventType {
  switch (event.kind) {
    case "voted":
      return AuditEventType.VOTE_RECORDED;
    case "approved":
    case "denied":
      return AuditEventType.DECIDED;
    case "break_glass":
      return AuditEventType.BREAK_GLASS;
    case "escalated":
      return AuditEventType.ESCALATED;
    case "expired":
      return AuditEventType.EXPIRED;
    case "awaiting_review":
      return AuditEventType.REVIEWERS_NOTIFIED;
    case "completed":
      return AuditEventType.ACTION_COMPLETED;
    default:
      return AuditEventType.POLICY_EVALUATED;
  }
}

/** What a decision says, before it becomes a DecisionBody. */
interface DecisionParts {
  readonly verdict: Verdict;
  readonly reason: string;
  readonly decisionId: string;
  readonly record: RequestRecord | undefined;
  readonly issued?: IssuedCredential;
}

/**
 * One broker replica. Several run at once: they share the durable JetStream
 * consumers (each request and completion goes to one of them), keep every
 * request's state in JetStream KV with compare-and-set, and each runs the
 * ticker and the lease reconciler (idempotent, so running them on every
 * replica is safe).
 */
export class Broker {
  private readonly options: BrokerOptions;
  /** This replica's metrics. */
  readonly metrics: BrokerMetrics;
  private readonly js: JetStreamClient;
  private readonly store: RequestStore;
  private readonly audit: AuditLog;
  private readonly loops: Array<Promise<void>> = [];
  private readonly consumers: ConsumerMessages[] = [];
  private ticker: NodeJS.Timeout | undefined;
  /**
   * Every record in the state bucket, kept current by a KV watch of every replica's writes;
   * whole while the record may still need this replica's ticker (pending, holding a live
   * lease, or decided while its agent may still wait). A cache of KV, never the source of
   * truth: every change still goes through compare-and-set on the revision.
   */
  private readonly index = new RequestIndex((record) => needsTicker(record, Date.now()));
  /** Purge markers of records this replica retired, deleted at a later sweep. */
  private markers: number[] = [];
  private lastSweep = 0;
  private sweeping: Promise<void> | undefined;
  private readonly stopWatching = new AbortController();
  /** When each executing action was last said alive by its own host's sidecar (request id to ms). */
  private readonly heartbeats = new Map<string, number>();
  private heartbeatSubscription: Subscription | undefined;
  /** When this replica started: it gives every executing action a full silence before judging it. */
  private readonly startedAt = Date.now();
  /** Each host's call-report budget this minute (see callReportLimits). */
  private readonly reportBudgets = new Map<string, { since: number; used: number; overflowReported: boolean }>();
  private ticking: Promise<void> = Promise.resolve();
  private closed = false;

  private readonly jsm: JetStreamManager;
  /** The keys the audit trail is verified against. */
  readonly auditKeys: AuditKeyRing;
  private checkpointer: Checkpointer | undefined;

  private readonly history: HistoryStore;

  private constructor(options: BrokerOptions, store: RequestStore, history: HistoryStore, audit: AuditLog, jsm: JetStreamManager, metrics: BrokerMetrics) {
    this.history = history;
    this.options = options;
    this.jsm = jsm;
    this.metrics = metrics;
    this.auditKeys = options.auditKeys ?? AuditKeyRing.ofSigner(options.auditSigner ?? options.signingKey);
    this.js = jetstream(options.nc);
    this.store = store;
    this.audit = audit;
  }

  /** Starts a replica: streams, state bucket, audit log, consumers, ticker; reconciles leases at once. */
  static async start(options: BrokerOptions): Promise<Broker> {
    const jsm = await jetstreamManager(options.nc);
    // Every stream and bucket with these replicas and settings, or start fails naming the one that differs.
    const ensure = { ...(options.replicas === undefined ? {} : { replicas: options.replicas }), log: options.log };
    await ensureStreams(jsm, ensure);
    const metrics = options.metrics ?? createBrokerMetrics();
    const signer = options.auditSigner ?? options.signingKey;
    let checkpointer: Checkpointer | undefined;
    if (options.checkpoints !== undefined) {
      checkpointer = await Checkpointer.start({
        nc: options.nc,
        signer,
        ...options.checkpoints,
        log: options.log,
        onOutcome: (outcome) => metrics.auditCheckpoints.inc({ outcome }),
      });
    }
    const audit = await AuditLog.open(options.nc, { signer, ensure, ...(checkpointer === undefined ? {} : { onWritten: (count: number) => checkpointer.noteWritten(count) }) });
    const broker = new Broker(options, await RequestStore.open(options.nc, ensure), await HistoryStore.open(options.nc, ensure), audit, jsm, metrics);
    broker.checkpointer = checkpointer;
    if (options.consume ?? true) {
      for (const [durable, stream, filter] of [
        [brokerDefaults.intakeConsumer, streams.requests.name, "airlock.request.>"],
        [brokerDefaults.completionConsumer, streams.completions.name, "airlock.completion.>"],
        [brokerDefaults.securityConsumer, streams.security.name, "airlock.security.>"],
      ] as const) {
        const settings = { ack_wait: brokerDefaults.ackWaitMs * 1_000_000, max_deliver: brokerDefaults.maxDeliver };
        await jsm.consumers.add(stream, { durable_name: durable, ack_policy: AckPolicy.Explicit, filter_subject: filter, deliver_policy: DeliverPolicy.All, ...settings }).catch(async (error: unknown) => {
          // Made by an earlier version with other settings: the editable ones are brought up to date.
          if (!(error instanceof JetStreamApiError && error.code === consumerExists)) throw error;
          await jsm.consumers.update(stream, durable, settings);
        });
        const messages = await (await broker.js.consumers.get(stream, durable)).consume({ expires: brokerDefaults.pullExpiresMs });
        broker.consumers.push(messages);
        const handlers = {
          [brokerDefaults.intakeConsumer]: (data: Uint8Array, subject: string) => broker.takeRequest(data, subject),
          [brokerDefaults.completionConsumer]: (data: Uint8Array, subject: string) => broker.takeCompletion(data, subject),
          [brokerDefaults.securityConsumer]: (data: Uint8Array, subject: string) => broker.takeSecurityEvent(data, subject),
        };
        const handle = handlers[durable];
        broker.loops.push(
          (async () => {
            // Messages are handled concurrently (each one's state changes are compare-and-set, so
            // order does not matter), up to a bound: one slow Vault call must not queue the rest.
            const inFlight = new Set<Promise<void>>();
            for await (const message of messages) {
              // A slow Vault or KV keeps the message this replica's while it works on it.
              const progress = setInterval(() => message.working(), brokerDefaults.ackWaitMs / 3);
              const handled = handle(message.data, message.subject)
                .then(
                  () => message.ack(),
                  (error: unknown) => broker.failed(error, message.subject, message.info.deliveryCount, (delayMs) => (delayMs === undefined ? message.term() : message.nak(delayMs))),
                )
                .finally(() => clearInterval(progress));
              inFlight.add(handled);
              void handled.finally(() => inFlight.delete(handled));
              if (inFlight.size >= brokerDefaults.maxInFlight) await Promise.race(inFlight);
            }
            await Promise.all(inFlight);
          })(),
        );
      }
    }
    broker.heartbeatSubscription = options.nc.subscribe(subjects.heartbeats, { callback: (error, message) => (error === null ? broker.takeHeartbeat(message.data, message.subject) : undefined) });
    await broker.followRecords();
    await broker.tickOnce();
    broker.ticker = setInterval(() => {
      broker.ticking = broker.ticking.then(() => broker.tickOnce()).catch((error: unknown) => options.log.error({ err: error }, "tick failed"));
    }, options.tickIntervalMs ?? brokerDefaults.tickIntervalMs);
    return broker;
  }

  /**
   * A message whose handling failed: a poison message (undecodable, or failing for good) and
   * one out of deliveries are terminated and audited; a transient failure is redelivered
   * after a backoff. `settle` terminates (undefined) or redelivers after a delay.
   */
  private async failed(error: unknown, subject: string, deliveries: number, settle: (delayMs?: number) => void): Promise<void> {
    const failure = error instanceof PoisonMessage ? undefined : AirlockError.from(error);
    if (failure?.retryable === true && deliveries < brokerDefaults.maxDeliver) {
      this.options.log.error({ err: error, subject, deliveries }, "could not process a message; it will be redelivered");
      const backoff = brokerDefaults.redeliveryBackoffMs;
      settle(backoff[Math.min(deliveries, backoff.length) - 1] ?? backoff[0]);
      return;
    }
    settle(undefined);
    const refusal: Refusal =
      error instanceof PoisonMessage
        ? { reason: error.reason, message: error.message }
        : { reason: "failed_permanently", message: `given up after ${deliveries} ${deliveries === 1 ? "delivery" : "deliveries"}: ${failure?.rawMessage ?? String(error)}` };
    await this.refuse(refusal, subject).catch((auditError: unknown) => this.options.log.error({ err: auditError, subject }, "could not audit a terminated message"));
  }

  /**
   * Records a refused message: a flagged SECURITY_EVENT in the trail (actor: the
   * host the subject names, which the server vouches for), a metric and a log line.
   */
  private async refuse(refusal: Refusal, subject: string, requestId = ""): Promise<void> {
    const host = subjectHost(subject);
    // A message too broken to name its request is filed under the id its subject carries.
    requestId ||= subjectParts(subject, "request")?.id ?? subjectParts(subject, "completion")?.id ?? "";
    this.metrics.refusals.labels(refusal.reason).inc();
    this.options.log.warn({ reason: refusal.reason, subject, requestId }, `refused: ${refusal.message}`);
    await this.audit.append({
      type: AuditEventType.SECURITY_EVENT,
      actor: `sidecar:${host}`,
      requestId,
      details: { refused: refusal.reason, detail: refusal.message.slice(0, 500), subject: subject.slice(0, 300) },
      flagged: true,
    });
  }

  /** Stops consuming and ticking. State stays in KV for the other replicas. */
  async close(): Promise<void> {
    this.closed = true;
    this.heartbeatSubscription?.unsubscribe();
    clearInterval(this.ticker);
    await this.ticking;
    await this.sweeping;
    this.stopWatching.abort();
    // A watch re-opened meanwhile replaces the promise: wait until none is left running.
    for (let following = this.following; ; following = this.following) {
      await following;
      if (following === this.following) break;
    }
    for (const messages of this.consumers) await messages.close();
    await Promise.all(this.loops);
    // Last, so the checkpoint covers everything this replica wrote.
    await this.checkpointer?.close();
  }

  /**
   * Appends a reviewer's security-relevant act that concerns no request (a passkey
   * registered or removed) to the trail, as a SECURITY_EVENT with the reviewer as actor.
   */
  async auditReviewerAct(reviewer: string, details: Readonly<Record<string, string>>): Promise<void> {
    await this.audit.append({ type: AuditEventType.SECURITY_EVENT, actor: reviewer, details: { ...details } });
  }

  /** Takes a checkpoint of the audit trail now, if this replica writes them (the demo and tests). */
  async checkpointAudit(): Promise<void> {
    await this.checkpointer?.checkpoint();
  }

  /** A request's record (from the state bucket, else the history), or NOT_FOUND. */
  async get(requestId: string): Promise<RequestRecord> {
    const record = (await this.store.get(requestId))?.record ?? (await this.history.get(requestId));
    if (record === undefined) throw new AirlockError(Code.NotFound, `no request ${requestId}`, { details: { requestId } });
    return record;
  }

  /**
   * A live request's record as the last write left it, read from the state stream's leader
   * (see `RequestStore.latest`): a write any replica made before this call is seen. Undefined for
   * a request that is not live (unknown, or retired to history).
   */
  latest(requestId: string): Promise<RequestRecord | undefined> {
    return this.store.latest(requestId);
  }

  /**
   * Every change to any request's record as it is written (all replicas'
   * writes, from JetStream KV), until `signal` aborts. With `includeCurrent`,
   * each record's current state comes first.
   */
  watch(signal: AbortSignal, includeCurrent = false): AsyncGenerator<RequestRecord> {
    return this.store.watch(signal, includeCurrent);
  }

  /** Every record in the state bucket (not the history): for tests and tools, since it reads each settled record. */
  async list(): Promise<RequestRecord[]> {
    await this.indexCurrent();
    const records: RequestRecord[] = [];
    for (const entry of this.index.select({ states: new Set(), agent: "", minRisk: 0, createdFromMs: 0, createdToMs: 0 })) {
      const record = entry.stored?.record ?? (await this.store.get(entry.id))?.record;
      if (record !== undefined) records.push(record);
    }
    return records;
  }

  /**
   * Every record the broker may still act on (all those not settled), with its KV revision,
   * from the index: what the reviewers' live snapshot starts from. It shows every write made
   * before the call, on any replica.
   */
  async activeRecords(): Promise<StoredRecord[]> {
    await this.indexCurrent();
    return this.index.active();
  }

  /** Records in the state bucket whose id starts with `prefix` (case-insensitive), from the index. */
  async findByIdPrefix(prefix: string): Promise<RequestRecord[]> {
    await this.indexCurrent();
    const records: RequestRecord[] = [];
    for (const id of this.index.idsStartingWith(prefix)) {
      const record = this.index.get(id)?.stored?.record ?? (await this.store.get(id))?.record;
      if (record !== undefined) records.push(record);
    }
    return records;
  }

  /**
   * One page of the requests matching `query` and `accept`: first the records in the state
   * bucket, newest first, from the index; then, when the query can match settled records,
   * the history, newest retired first. `cursor` is what the previous page returned; it is
   * opaque to callers (INVALID_ARGUMENT, field `cursor`, when it is not one).
   */
  async listPage(query: IndexQuery, accept: (record: RequestRecord) => boolean, limit: number, cursor?: string): Promise<RequestPage> {
    let position = parseCursor(cursor);
    await this.indexCurrent();
    const records: RequestRecord[] = [];
    if (position.in === "index") {
      const candidates = this.index.select(query, position.after);
      for (;;) {
        // Settled records are read from KV, a page's worth at a time and in parallel.
        const chunk = [];
        for (let next = candidates.next(); !next.done; next = candidates.next()) {
          chunk.push(next.value);
          if (chunk.length >= limit - records.length) break;
        }
        if (chunk.length === 0) break;
        const read = await Promise.all(chunk.map(async (entry) => entry.stored?.record ?? (await this.store.get(entry.id))?.record));
        for (const [i, record] of read.entries()) {
          const entry = chunk[i];
          if (entry === undefined) continue;
          // Gone from the bucket since the index saw it (retired by another replica): forget it here too.
          if (record === undefined) this.index.remove(entry.id);
          if (record === undefined || !accept(record)) continue;
          records.push(record);
          if (records.length >= limit) return { records, nextCursor: `i.${entry.createdMs}.${entry.id}` };
        }
      }
      if (!reachesSettled(query)) return { records };
      position = { in: "history" };
    }
    const page = await this.history.page(
      (record) => {
        const summary = summaryOf(record);
        // A record still in the state bucket was listed from the index.
        return this.index.get(summary.id) === undefined && matchesQuery(summary, query) && accept(record);
      },
      limit - records.length,
      position.before,
    );
    records.push(...page.records);
    return page.before === undefined ? { records } : { records, nextCursor: `h.${page.before}` };
  }

  /**
   * Waits until the index holds every write made to the state bucket before this call (bounded
   * by {@link brokerDefaults.indexWaitMs}): until it applied the bucket's last message, which
   * the watch delivers last (also during its first pass over the current values).
   */
  private async indexCurrent(): Promise<void> {
    if (!(await this.index.reached(await this.store.lastSeq(), brokerDefaults.indexWaitMs))) {
      // The watch may have stalled (its consumer lived on a NATS node that died): open it again,
      // from each key's last value, so the index catches up; this answer is from it as it is.
      this.options.log.warn("the request index lags the state bucket; answering from it as it is and opening its watch again");
      this.indexWatch?.abort();
    }
  }

  /**
   * Changes to any request from the moment this resolves (the watch is
   * established), with revisions, until `signal` aborts. Read a snapshot after
   * this resolves and nothing falls between the two.
   */
  openWatch(signal: AbortSignal): Promise<AsyncIterable<StoredRecord>> {
    return this.store.openWatch(signal);
  }

  /**
   * A reviewer's vote: applied with compare-and-set, audited, and when it
   * decides the request, the decision is signed and published.
   * @param via - where the vote came from: `channel` (`slack`, `teams`) is added to the
   *   details of every audit event the vote causes. @default the reviewers' API (no channel)
   */
  async decide(requestId: string, ballot: Ballot, via: VoteOrigin = {}): Promise<RequestRecord> {
    for (let attempt = 0; attempt < 50; attempt++) {
      const stored = await this.store.get(requestId);
      if (stored === undefined) throw new AirlockError(Code.NotFound, `no request ${requestId}`, { details: { requestId } });
      const request = stored.record.request;
      if (request === undefined) throw new AirlockError(Code.DataLoss, `request ${requestId} has no request`);
      const result = vote(stored.record, request, this.options.approvals, ballot, new Date());
      if (!result.ok) throw result.error;
      // Only a vote that would count is asked for step-up; the broker's own record says whether it must.
      checkStepUp(request, ballot, this.options.stepUpMinRisk);
      // The vote is audited before it counts: no audit, no approval.
      await this.auditEvents(result.events, ballot.reviewer, via.channel);
      // The write that decides also claims the decision, so exactly one replica publishes it.
      const next = result.decided === undefined ? result.record : withDecisionId(result.record);
      const revision = await this.store.update(next, stored.revision);
      if (revision === undefined) continue;
      this.announce(result.events, next);
      if (result.decided !== undefined) await this.finalize({ record: next, revision });
      return next;
    }
    throw new AirlockError(Code.Aborted, `request ${requestId} kept changing; try again`);
  }

  private auditEntries(events: readonly ApprovalEvent[], actor: string, channel?: string): AuditEntry[] {
    return events.map((event) => {
      // The event's own time is the audit event's time; other dates become ISO strings.
      const { requestId, kind, at, ...facts } = event;
      const details = JSON.parse(JSON.stringify({ kind, ...facts, ...(channel === undefined ? {} : { channel }) })) as Record<string, never>;
      return { type: auditTypeOf(event), actor, requestId, details, flagged: kind === "break_glass" };
    });
  }

  private announce(events: readonly ApprovalEvent[], record: RequestRecord): void {
    if (events.length === 0 || this.options.onEvents === undefined) return;
    try {
      this.options.onEvents(events, record);
    } catch (error) {
      this.options.log.error({ err: error, requestId: record.request?.id }, "an event listener failed");
    }
  }

  private async auditEvents(events: readonly ApprovalEvent[], actor: string, channel?: string): Promise<void> {
    if (events.length > 0) await this.audit.appendAll(this.auditEntries(events, actor, channel));
  }

  private async takeRequest(data: Uint8Array, subject: string): Promise<void> {
    let sent: ApprovalRequest;
    try {
      sent = fromBinary(ApprovalRequestSchema, data);
    } catch (error) {
      throw new PoisonMessage("undecodable", `an ApprovalRequest that does not decode on ${subject}`, { cause: error });
    }
    const now = new Date();
    const vetted = vetRequest(subject, sent, this.options.policy(), now);
    if (!vetted.ok) {
      await this.refuse(vetted.refusal, subject, sent.id);
      // The agent learns at once, through the host the server vouches for.
      const host = subjectHost(subject);
      if (host !== "" && /^[0-9a-f-]{36}$/.test(sent.id)) {
        await this.publishDecision({ ...sent, host }, { verdict: Verdict.DENIED, reason: `refused: ${vetted.refusal.message}`, decisionId: randomUUID(), record: undefined });
      }
      return;
    }
    let request = vetted.request;
    // A retired request's id sent again is a replay: its record left the state bucket, so the
    // bucket's create-only write would not catch it.
    if ((await this.history.get(request.id)) !== undefined) {
      await this.refuse({ reason: "request_id_reused", message: `request ${request.id} was settled and retired to the history already` }, subject, request.id);
      return;
    }
    let result = intake(request, this.options.approvals, now);
    if (result.ok) {
      // The request is stored once, before its record. When another request is stored under this
      // id already (another delivery of the id got there first, or a replica stopped between the
      // two writes), that one is the request: the record is built from it, never joined to another.
      const held = await this.store.hold(request);
      if (held !== request) {
        request = held;
        result = intake(request, this.options.approvals, now);
      }
    }
    if (!result.ok) {
      this.options.log.warn({ requestId: request.id, reason: result.error.rawMessage }, "request refused at intake");
      this.metrics.requests.labels("refused").inc();
      await this.audit.append({ type: AuditEventType.POLICY_EVALUATED, actor: this.options.replicaId, requestId: request.id, details: { refused: result.error.rawMessage } });
      await this.publishDecision(request, { verdict: Verdict.DENIED, reason: result.error.rawMessage, decisionId: randomUUID(), record: undefined });
      return;
    }
    const received: AuditEntry = {
      type: AuditEventType.REQUEST_RECEIVED,
      actor: request.identity?.agent ?? "",
      requestId: request.id,
      details: {
        service: request.service,
        method: request.method,
        host: request.host,
        rule: request.ruleId,
        reason: request.reason,
        onBehalfOf: request.identity?.onBehalfOf ?? "",
        agentAttestedBy: request.identity?.agentAttestedBy ?? "",
        humanAttestedBy: request.identity?.humanAttestedBy ?? "",
      },
    };
    const record = result.decided === undefined ? result.record : withDecisionId(result.record);
    const intakeAudit = [received, ...this.auditEntries(result.events, result.autoRule === undefined ? this.options.replicaId : `auto-rule:${result.autoRule}`)];
    if (result.decided === undefined) {
      // Left for reviewers: audited before the record exists, so a crash or a failed append
      // between the two cannot leave a request nobody audited (a redelivery finds no record and
      // audits again; at worst the trail shows the request received twice).
      if ((await this.store.get(request.id)) !== undefined) return;
      await this.audit.appendAll(intakeAudit);
      await failpoint("broker.after_intake_audit");
      if ((await this.store.create(record)) === undefined) return;
      this.announce(result.events, record);
      return;
    }
    // A redelivered request finds its record there already; the first delivery audited it.
    const revision = await this.store.create(record);
    if (revision === undefined) return;
    // Decided at intake (an auto rule): its intake events go in the decision's audit batch, still
    // written before the decision is published, so one round trip fewer on the agent's wait.
    await this.finalize({ record, revision }, intakeAudit);
    this.announce(result.events, record);
  }

  /**
   * Publishes the decision of a decided request, once across replicas: the
   * replica whose compare-and-set writes the decision id does it. On approval
   * it first has Vault issue the one-action credential; if Vault fails, the
   * request fails closed with a clear reason and no credential.
   */
  private async finalize(stored: StoredRecord, earlierAudit: readonly AuditEntry[] = []): Promise<void> {
    const claimed = stored.record;
    const request = claimed.request;
    if (request === undefined) return;
    const requestId = request.id;
    const decisionId = claimed.decisionId;
    const outcome = claimed.state === RequestState.APPROVED ? "approved" : claimed.state === RequestState.DENIED ? "denied" : claimed.state === RequestState.EXPIRED ? "expired" : "cancelled";
    this.metrics.requests.labels(outcome).inc();
    if (outcome === "expired") this.metrics.expiries.inc();
    if (request.createdAt !== undefined) this.metrics.timeToDecision.observe((Date.now() - timestampDate(request.createdAt).getTime()) / 1000);
    let issued: IssuedCredential | undefined;
    if (outcome === "approved") {
      // No credential for an action whose agent has stopped waiting: it could only be used late, or by someone else.
      // The latest time a credential may be handed over: the decision must still reach the sidecar in time.
      const deadlineMs = request.deadline === undefined ? undefined : timestampDate(request.deadline).getTime() - (this.options.deadlineMarginMs ?? brokerDefaults.deadlineMarginMs);
      if (deadlineMs !== undefined && Date.now() > deadlineMs) {
        await this.failPastDeadline(stored, earlierAudit, "approved too close to or after the action's deadline: nothing was issued");
        return;
      }
      const started = performance.now();
      const issueStarted = new Date();
      await failpoint("broker.before_issue");
      try {
        // The intent is the decision id, on record since the write that decided: Vault's secret carries it.
        issued = await this.options.issuer.issue(request, decisionId);
        this.metrics.vaultLatency.labels("issue").observe((performance.now() - started) / 1000);
        await failpoint("broker.after_issue");
      } catch (error) {
        this.metrics.vaultErrors.labels("issue").inc();
        const failure = AirlockError.from(error);
        const reason = `no credential could be issued: ${failure.rawMessage}`;
        // No answer is not a no: Vault may still create the secret. The record keeps the intent, and the ticker sweeps Vault for it.
        const uncertain = failure.retryable;
        await this.store.mutate(requestId, (record) => {
          const failed = markFailed(record, reason, new Date());
          if (!failed.ok) return undefined;
          if (!uncertain) return failed.record;
          const next = clone(RequestRecordSchema, failed.record);
          next.lease = intentLease(request, decisionId, issueStarted);
          return next;
        });
        await this.audit.append({ type: AuditEventType.SECURITY_EVENT, actor: this.options.replicaId, requestId, details: { failed: reason } }).catch(() => undefined);
        await this.publishDecision(request, { verdict: Verdict.CANCELLED, reason, decisionId, record: claimed }, earlierAudit);
        return;
      }
      const lease = issued;
      if (deadlineMs !== undefined && Date.now() > deadlineMs) {
        // Vault answered after the deadline (a stall): the credential dies now, before anyone can hold it.
        const revoked = await this.options.issuer.revoke(lease).then(
          () => true,
          (error: unknown) => {
            this.options.log.error({ err: error, requestId, leaseId: lease.leaseId }, "a credential issued past its action's deadline could not be revoked");
            return false;
          },
        );
        const entry: AuditEntry = revoked
          ? { type: AuditEventType.CREDENTIAL_REVOKED, actor: this.options.replicaId, requestId, details: { why: "issued_past_deadline", kind: lease.kind } }
          : { type: AuditEventType.SECURITY_EVENT, actor: this.options.replicaId, requestId, details: { failed: "issued past the deadline and not revoked", leaseId: lease.leaseId, kind: lease.kind }, flagged: true };
        await this.failPastDeadline(stored, [...earlierAudit, this.issuedEntry(requestId, lease), entry], revoked ? "the credential came after the action's deadline and was revoked at once" : "the credential came after the action's deadline; its revocation failed and is retried", { issued: lease, revoked });
        return;
      }
      const body = this.decisionBody(request, { verdict: Verdict.APPROVED, reason: claimed.votes.at(-1)?.reason ?? outcome, decisionId, record: claimed, issued });
      // The lease record and the audit batch go to different streams: written side by side, both
      // before the decision leaves, so the agent's wait has one round trip fewer.
      // NATS may be restarting (Vault answered while it was away): the compare-and-set is tried again until the deadline.
      const writeUntil = Math.min(deadlineMs ?? Number.POSITIVE_INFINITY, Date.now() + this.decisionRetryMs());
      // When the stored record last changed (its updatedAt): a takeover counts from there, so the publish must end in time from there too.
      let executingAt = Date.now();
      const [leaseWrite, auditWrite] = await Promise.allSettled([
        whileNatsAway(
          () =>
            this.store.mutate(requestId, (record) => {
              executingAt = Date.now();
              const executing = markExecuting(record, new Date(executingAt));
              const next = executing.ok ? executing.record : clone(RequestRecordSchema, record);
              next.lease = create(LeaseRecordSchema, { leaseId: lease.leaseId, kind: lease.kind, issuedAt: timestampFromDate(new Date()), expiresAt: timestampFromDate(lease.expiresAt) });
              return next;
            }, stored),
          writeUntil,
        ),
        this.audit.appendAll(this.decisionAudit(body, [...earlierAudit, this.issuedEntry(requestId, lease)])),
      ]);
      if (leaseWrite.status === "rejected") {
        // Fail closed: a credential whose issuance is not on record is revoked at once. If even that
        // fails, nothing else knows the lease: the trail and the log name it, flagged, for an operator.
        const revoked = await this.options.issuer.revoke(lease).then(
          () => true,
          (error: unknown) => {
            this.options.log.error({ err: error, requestId, leaseId: lease.leaseId }, "a credential whose lease could not be recorded could not be revoked either");
            return false;
          },
        );
        const entry: AuditEntry = revoked
          ? { type: AuditEventType.CREDENTIAL_REVOKED, actor: this.options.replicaId, requestId, details: { why: "lease_not_recorded", kind: lease.kind } }
          : { type: AuditEventType.SECURITY_EVENT, actor: this.options.replicaId, requestId, details: { failed: "lease not recorded and not revoked", leaseId: lease.leaseId, kind: lease.kind }, flagged: true };
        await this.audit.append(entry).catch(() => undefined);
        throw leaseWrite.reason;
      }
      if (auditWrite.status === "rejected") {
        await this.revokeLease(requestId, "audit_failed").catch(() => undefined);
        throw auditWrite.reason;
      }
      try {
        await this.sendDecision(request.host, body, executingAt);
      } catch (error) {
        // A publish whose answer was lost may have been stored all the same: the stream's leader
        // says. One that is there went to the sidecar, which runs with the credential: keep it.
        if (await this.decisionPublished(request, body.decisionId).catch(() => false)) return;
        // Fail closed: a credential whose decision never left is revoked at once.
        await this.revokeLease(requestId, "publish_failed").catch(() => undefined);
        throw error;
      }
      return;
    }
    await this.publishDecision(request, { verdict: verdicts[outcome], reason: claimed.votes.at(-1)?.reason ?? outcome, decisionId, record: claimed }, earlierAudit);
  }

  /** Ends an approved request whose deadline passed before its credential could go out: failed, audited, and the agent told. */
  /**
   * Fails a request whose deadline passed before it could run. A credential Vault
   * handed over late is recorded with the failure: revoked, or, when revoking it
   * failed, live, so the lease reconciler of every replica keeps trying.
   */
  private async failPastDeadline(stored: StoredRecord, earlierAudit: readonly AuditEntry[], reason: string, late?: { issued: IssuedCredential; revoked: boolean }): Promise<void> {
    const request = stored.record.request;
    if (request === undefined) return;
    await this.store.mutate(request.id, (record) => {
      const failed = markFailed(record, reason, new Date());
      if (!failed.ok) return undefined;
      if (late === undefined) return failed.record;
      const next = clone(RequestRecordSchema, failed.record);
      const now = timestampFromDate(new Date());
      next.lease = create(LeaseRecordSchema, {
        leaseId: late.issued.leaseId,
        kind: late.issued.kind,
        issuedAt: now,
        expiresAt: timestampFromDate(late.issued.expiresAt),
        ...(late.revoked ? { revokedAt: now, revokedBy: this.options.replicaId } : {}),
      });
      return next;
    });
    await this.publishDecision(request, { verdict: Verdict.CANCELLED, reason, decisionId: stored.record.decisionId, record: stored.record }, [
      ...earlierAudit,
      { type: AuditEventType.SECURITY_EVENT, actor: this.options.replicaId, requestId: request.id, details: { failed: reason }, flagged: true },
    ]);
  }

  private issuedEntry(requestId: string, issued: IssuedCredential): AuditEntry {
    return { type: AuditEventType.CREDENTIAL_ISSUED, actor: this.options.replicaId, requestId, details: { kind: issued.kind, expiresAt: issued.expiresAt.toISOString() } };
  }

  /** Audits a decision (after `firstAudit`), then signs and publishes it. */
  private async publishDecision(request: ApprovalRequest, decision: DecisionParts, firstAudit: readonly AuditEntry[] = []): Promise<void> {
    const body = this.decisionBody(request, decision);
    await this.audit.appendAll(this.decisionAudit(body, firstAudit));
    const writtenAt = decision.record?.updatedAt === undefined ? Date.now() : timestampDate(decision.record.updatedAt).getTime();
    await this.sendDecision(request.host, body, writtenAt);
  }

  private decisionBody(request: ApprovalRequest, decision: DecisionParts): DecisionBody {
    const now = Date.now();
    const deadline = request.deadline === undefined ? now + (this.options.decisionTtlMs ?? brokerDefaults.decisionTtlMs) : timestampDate(request.deadline).getTime();
    const expiresAt = Math.max(now + 1000, Math.min(deadline, now + (this.options.decisionTtlMs ?? brokerDefaults.decisionTtlMs)));
    const body = create(DecisionBodySchema, {
      decisionId: decision.decisionId,
      requestId: request.id,
      requestSha256: request.requestSha256,
      verdict: decision.verdict,
      votes: decision.record?.votes ?? [],
      reason: decision.reason,
      decidedAt: timestampFromMs(now),
      expiresAt: timestampFromMs(expiresAt),
      ...(decision.issued === undefined ? {} : { credential: decision.issued.delivery }),
    });
    return body;
  }

  /** The audit batch a decision needs before it may leave: `firstAudit`, then DECIDED. */
  private decisionAudit(body: DecisionBody, firstAudit: readonly AuditEntry[]): AuditEntry[] {
    return [
      ...firstAudit,
      { type: AuditEventType.DECIDED, actor: this.options.replicaId, requestId: body.requestId, details: { verdict: Verdict[body.verdict] ?? "", reason: body.reason, decisionId: body.decisionId } },
    ];
  }

  /**
   * Signs and publishes a decision. A publish that fails because NATS is away (restarting,
   * a network cut) is tried again until the decision expires, at most `decisionRetryMs`: the
   * message id is the decision id, so JetStream stores one copy however many tries reach it.
   * A refusal of this replica's rights fails at once.
   */
  /** How long a decision's writes are tried again: {@link brokerDefaults.decisionRetryMs}, ending before a takeover could start. */
  private decisionRetryMs(): number {
    return Math.min(brokerDefaults.decisionRetryMs, 0.8 * (this.options.orphanAfterMs ?? brokerDefaults.orphanAfterMs));
  }

  /**
   * `writtenAt`: when the record this decision settles was last written (its `updatedAt`), the
   * instant a takeover counts `orphanAfterMs` from. Every attempt, its own wait for the answer
   * included, ends within `decisionRetryMs` of it, so a takeover never finds this decision
   * missing while a publish of it is still under way (the takeover would publish a second
   * decision, and revoke the credential the first one delivers).
   */
  private async sendDecision(host: string, body: DecisionBody, writtenAt: number): Promise<void> {
    const signed = signDecision(body, this.options.signingKey);
    await failpoint("broker.before_publish");
    const bytes = toBinary(DecisionSchema, signed);
    const until = Math.min(body.expiresAt === undefined ? 0 : timestampDate(body.expiresAt).getTime(), writtenAt + this.decisionRetryMs());
    for (let attempt = 0; ; attempt++) {
      const left = until - Date.now();
      if (left <= 0) throw new AirlockError(Code.Unavailable, `decision ${body.decisionId} was not published in time: a takeover may start`, { details: { requestId: body.requestId } });
      try {
        await this.js.publish(subjects.decision(host, body.requestId), bytes, { msgID: body.decisionId, timeout: Math.min(left, brokerDefaults.publishTimeoutMs) });
        return;
      } catch (error) {
        const delayMs = Math.min(250 * 2 ** attempt, 2_000);
        if (this.closed || natsRefusal(error) !== undefined || Date.now() + delayMs >= until) throw error;
        this.options.log.warn({ err: error, requestId: body.requestId, attempt }, "could not publish a decision; trying again");
        await new Promise((resolve) => setTimeout(resolve, delayMs));
      }
    }
  }

  /**
   * A sidecar's security event (a forged, mismatched or replayed decision, a
   * failed unwrap, a resume by another agent) goes into the audit trail, flagged.
   * The event is untrusted input: only known fields, as strings, capped in length.
   */
  /**
   * A sidecar's batch of calls it decided alone (see sidecar/reports.ts): each distinct report
   * becomes one audit event. The host is the subject's, which the NATS server enforces; the rest
   * is the sidecar's account of its own calls, bounded and truncated like any sidecar input.
   */
  private async takeCallReports(batch: Record<string, unknown>, host: string): Promise<void> {
    const types = { denied: AuditEventType.CALL_DENIED, refused: AuditEventType.CALL_REFUSED, timed_out: AuditEventType.CALL_TIMED_OUT, allowed: AuditEventType.CALLS_ALLOWED } as const;
    const calls = Array.isArray(batch.calls) ? (batch.calls as unknown[]).slice(0, callReportLimits.maxPerBatch) : [];
    const entries: AuditEntry[] = [];
    let malformed = 0;
    let foreign = 0;
    // A host reports only on its own requests: one naming another host's request is not attached to it.
    const hostOf = new Map<string, string | undefined>();
    const ownRequest = async (requestId: string): Promise<boolean> => {
      if (!hostOf.has(requestId)) hostOf.set(requestId, (await this.store.get(requestId))?.record.request?.host);
      return hostOf.get(requestId) === host;
    };
    for (const call of calls) {
      const report = call !== null && typeof call === "object" ? (call as Record<string, unknown>) : {};
      const text = (key: string) => (typeof report[key] === "string" ? report[key].slice(0, callReportLimits.maxField) : "");
      const outcome = text("outcome");
      const count = typeof report.count === "number" && Number.isSafeInteger(report.count) && report.count > 0 ? report.count : 0;
      if (!(outcome in types) || count === 0 || text("method") === "") {
        malformed++;
        continue;
      }
      let requestId = text("requestId");
      const details: Record<string, string | number> = { host, method: text("method"), rule: text("rule"), agent: text("agent"), onBehalfOf: text("onBehalfOf"), reason: text("reason"), count, firstAt: text("firstAt"), lastAt: text("lastAt") };
      if (requestId !== "" && !(await ownRequest(requestId))) {
        foreign++;
        details.claimedRequestId = requestId;
        requestId = "";
      }
      entries.push({ type: types[outcome as keyof typeof types], actor: `sidecar:${host}`, requestId, details, flagged: outcome === "refused" || details.claimedRequestId !== undefined });
    }
    const dropped = typeof batch.dropped === "number" && Number.isSafeInteger(batch.dropped) ? batch.dropped : 0;
    if (malformed > 0 || dropped > 0 || foreign > 0 || (Array.isArray(batch.calls) && batch.calls.length > callReportLimits.maxPerBatch)) {
      entries.push({ type: AuditEventType.SECURITY_EVENT, actor: `sidecar:${host}`, details: { reason: "call_reports_incomplete", host, malformed, dropped, foreign }, flagged: true });
    }
    await this.audit.appendAll(this.withinReportBudget(host, entries));
  }

  /**
   * The entries a host's reports may still add this minute; past the budget,
   * the rest is dropped and one flagged event per host and minute says so.
   */
  private withinReportBudget(host: string, entries: AuditEntry[]): AuditEntry[] {
    const now = Date.now();
    let budget = this.reportBudgets.get(host);
    if (budget === undefined || now - budget.since >= 60_000) {
      // Bounded: hosts are few, and a minute-old entry is replaced before the map is touched again for it.
      if (this.reportBudgets.size >= 10_000) this.reportBudgets.clear();
      budget = { since: now, used: 0, overflowReported: false };
      this.reportBudgets.set(host, budget);
    }
    const room = Math.max(0, callReportLimits.eventsPerHostPerMinute - budget.used);
    budget.used += Math.min(room, entries.length);
    if (entries.length <= room) return entries;
    const kept = entries.slice(0, room);
    if (!budget.overflowReported) {
      budget.overflowReported = true;
      this.options.log.warn({ host, limit: callReportLimits.eventsPerHostPerMinute }, "a sidecar's call reports are over their budget; the rest of this minute's are dropped");
      kept.push({ type: AuditEventType.SECURITY_EVENT, actor: `sidecar:${host}`, details: { reason: "call_reports_rate_limited", host, limitPerMinute: callReportLimits.eventsPerHostPerMinute }, flagged: true });
    }
    return kept;
  }

  /**
   * A sidecar's heartbeat: the executing actions it still runs. An action counts only if the
   * host the server vouches for (the subject) holds it and the decision id matches: a host
   * cannot keep another host's credential alive. Anything else in it is ignored.
   */
  private takeHeartbeat(data: Uint8Array, subject: string): void {
    const host = subject.slice("airlock.heartbeat.".length);
    let actions: unknown;
    let hello: unknown;
    try {
      ({ actions, hello } = JSON.parse(new TextDecoder().decode(data)) as { actions?: unknown; hello?: unknown });
    } catch {
      return;
    }
    if (hello === true) {
      // A sidecar says it has just started: it holds nothing, so whatever its host was running is abandoned.
      for (const stored of this.index.active()) {
        if (stored.record.state !== RequestState.EXECUTING || stored.record.request?.host !== host) continue;
        const id = stored.record.request.id;
        this.endAction(stored, "sidecar_restarted", `the sidecar of host ${host} restarted while the action ran: it is ended and its credential revoked`).catch((error: unknown) =>
          this.options.log.error({ err: error, requestId: id }, "could not end an action its restarted sidecar abandoned"),
        );
      }
      return;
    }
    if (!Array.isArray(actions)) return;
    const now = Date.now();
    for (const action of actions.slice(0, brokerDefaults.maxHeartbeatActions)) {
      const { requestId, decisionId } = (action ?? {}) as { requestId?: unknown; decisionId?: unknown };
      if (typeof requestId !== "string" || typeof decisionId !== "string") continue;
      const record = this.index.get(requestId)?.stored?.record;
      if (record?.state === RequestState.EXECUTING && record.request?.host === host && record.decisionId === decisionId) this.heartbeats.set(requestId, now);
    }
  }

  /**
   * An executing action whose sidecar has said nothing of it for the heartbeat silence: its
   * credential is revoked and the record fails (the sidecar died, or its host lost NATS). A
   * completion that comes later still finds the credential gone.
   */
  private async endSilentAction(stored: StoredRecord, nowMs: number): Promise<void> {
    const record = stored.record;
    const id = record.request?.id ?? "";
    if (record.state !== RequestState.EXECUTING) {
      this.heartbeats.delete(id);
      return;
    }
    const issuedAt = record.lease?.issuedAt === undefined ? 0 : timestampDate(record.lease.issuedAt).getTime();
    const heard = Math.max(this.heartbeats.get(id) ?? 0, issuedAt, this.startedAt);
    const silence = this.options.heartbeatSilenceMs ?? brokerDefaults.heartbeatSilenceMs;
    if (nowMs - heard < silence) return;
    const reason = `no heartbeat from host ${record.request?.host ?? ""} for ${Math.round((nowMs - heard) / 1000)} s: the action is ended and its credential revoked`;
    await this.endAction(stored, "heartbeat_lost", reason);
  }

  /**
   * Ends an executing action its sidecar no longer runs: the lease is revoked (`why` in the
   * trail), the record fails with `reason`, and the replica whose write failed it audits a
   * flagged event (`details.ended` = `why`). Idempotent across replicas.
   */
  private async endAction(stored: StoredRecord, why: string, reason: string): Promise<void> {
    const id = stored.record.request?.id ?? "";
    await this.revokeLease(id, why);
    const failed = await this.store.mutate(id, (current) => {
      const next = markFailed(current, reason, new Date());
      return next.ok ? next.record : undefined;
    });
    if (failed !== undefined) {
      await this.audit.append({ type: AuditEventType.SECURITY_EVENT, actor: this.options.replicaId, requestId: id, details: { failed: reason, ended: why, host: stored.record.request?.host ?? "" }, flagged: true });
    }
    this.heartbeats.delete(id);
  }

  private async takeSecurityEvent(data: Uint8Array, subject: string): Promise<void> {
    const host = subject.slice("airlock.security.".length).slice(0, 253);
    let parsed: Record<string, unknown> = {};
    try {
      const value: unknown = JSON.parse(new TextDecoder().decode(data));
      if (value !== null && typeof value === "object" && !Array.isArray(value)) parsed = value as Record<string, unknown>;
    } catch {
      // Not JSON: recorded as such below.
    }
    if (Object.keys(parsed).length === 0) parsed = { reason: "malformed_security_event" };
    if (parsed.kind === "calls") {
      await this.takeCallReports(parsed, host);
      return;
    }
    const field = (name: string): string => {
      const value = parsed[name];
      return typeof value === "string" ? value.slice(0, 500) : "";
    };
    const reason = field("reason") === "" ? "unspecified" : field("reason");
    const requestId = field("requestId");
    this.options.log.warn({ host, reason, requestId }, "security event from a sidecar");
    await this.audit.append({ type: AuditEventType.SECURITY_EVENT, actor: `sidecar:${host}`, requestId, details: { reason, detail: field("detail"), host, at: field("at") }, flagged: true });
  }

  private async takeCompletion(data: Uint8Array, subject: string): Promise<void> {
    let completion;
    try {
      completion = fromBinary(CompletionSchema, data);
    } catch (error) {
      throw new PoisonMessage("undecodable", `a Completion that does not decode on ${subject}`, { cause: error });
    }
    const requestId = completion.requestId;
    const arrived = performance.now();
    const stored = await this.store.get(requestId);
    const vetted = vetCompletion(subject, completion, stored?.record);
    if (vetted === "duplicate") return;
    if (vetted !== undefined) {
      await this.refuse(vetted, subject, requestId);
      return;
    }
    // Revocation first: it is what ends the credential. The record and the trail then take the
    // revocation and the completion together, side by side: one write each.
    const revoked = stored === undefined ? undefined : await this.revokeInVault(stored.record);
    this.metrics.revokeLag.observe((performance.now() - arrived) / 1000);
    const completed: AuditEntry = {
      type: AuditEventType.ACTION_COMPLETED,
      actor: `sidecar:${completion.host}`,
      requestId,
      // What the upstream said the action touched (the airlock-touched trailer), capped like any sidecar input.
      details: { statusCode: completion.statusCode, statusMessage: completion.statusMessage, touched: boundTouched(completion.touched) },
    };
    await Promise.all([
      this.store.mutate(
        requestId,
        (record) => {
          const withRevocation = revoked === undefined ? undefined : this.withLeaseRevoked(record, revoked);
          const done = markCompleted(withRevocation ?? record, completion, new Date());
          return done.ok ? done.record : withRevocation;
        },
        stored,
      ),
      this.audit.appendAll(revoked === undefined ? [completed] : [this.revokedEntry(requestId, "completion", revoked), completed]),
    ]);
  }

  /** Revokes a request's lease if it is still alive; records who revoked it. Idempotent. */
  private async revokeLease(requestId: string, why: string): Promise<void> {
    const stored = await this.store.get(requestId);
    if (stored === undefined) return;
    const revoked = await this.revokeInVault(stored.record);
    if (revoked === undefined) return;
    // Vault's revoke is idempotent; the record's is compare-and-set. Only the replica whose write
    // recorded the revocation audits it, so replicas racing on one lease leave one event.
    const recorded = await this.store.mutate(requestId, (record) => this.withLeaseRevoked(record, revoked), stored);
    if (recorded !== undefined) await this.audit.append(this.revokedEntry(requestId, why, revoked));
  }

  /** Has Vault revoke the record's lease if the record still holds it alive; the lease it revoked, if any. */
  private async revokeInVault(record: RequestRecord): Promise<LeaseRecord | undefined> {
    const lease = record.lease;
    if (lease === undefined || lease.leaseId === "" || lease.revokedAt !== undefined) return undefined;
    const started = performance.now();
    try {
      await this.options.issuer.revoke({ kind: lease.kind === "database" ? "database" : "vault_token", leaseId: lease.leaseId });
    } catch (error) {
      this.metrics.vaultErrors.labels("revoke").inc();
      throw error;
    }
    this.metrics.vaultLatency.labels("revoke").observe((performance.now() - started) / 1000);
    return lease;
  }

  /** The record with `revoked` marked revoked by this replica; undefined when it holds another lease or already says so. */
  private withLeaseRevoked(record: RequestRecord, revoked: LeaseRecord): RequestRecord | undefined {
    if (record.lease === undefined || record.lease.leaseId !== revoked.leaseId || record.lease.revokedAt !== undefined) return undefined;
    const next = clone(RequestRecordSchema, record);
    if (next.lease !== undefined) {
      next.lease.revokedAt = timestampFromDate(new Date());
      next.lease.revokedBy = this.options.replicaId;
    }
    return next;
  }

  private revokedEntry(requestId: string, why: string, lease: LeaseRecord): AuditEntry {
    return { type: AuditEventType.CREDENTIAL_REVOKED, actor: this.options.replicaId, requestId, details: { why, kind: lease.kind } };
  }

  /** The lease ids the active records name: a sweep never takes one of those for an unrecorded issuance's. */
  private recordedLeaseIds(): Set<string> {
    const known = new Set<string>();
    for (const other of this.index.active()) if (other.record.lease !== undefined && other.record.lease.leaseId !== "") known.add(other.record.lease.leaseId);
    return known;
  }

  /** When this replica last swept Vault for each unresolved issuance intent (request id to ms). */
  private readonly sweeps = new Map<string, number>();

  /**
   * An issuance Vault never answered: asks Vault (every `sweepEveryMs`) for what it made for the
   * intent, revokes it, and then marks the intent resolved on the record. The replica whose write
   * resolved it audits what was found: flagged CREDENTIAL_REVOKED (`issuance_swept`) when Vault
   * had made something, a plain SECURITY_EVENT when not.
   */
  private async sweepIntent(stored: StoredRecord, nowMs: number): Promise<void> {
    const { record } = stored;
    const request = record.request;
    const lease = record.lease;
    if (request === undefined || lease === undefined) return;
    if (nowMs - (this.sweeps.get(request.id) ?? 0) < brokerDefaults.sweepEveryMs) return;
    this.sweeps.set(request.id, nowMs);
    const known = this.recordedLeaseIds();
    const since = lease.issuedAt === undefined ? new Date(0) : timestampDate(lease.issuedAt);
    const { revoked, settled } = await this.options.issuer.sweep(request, lease.intent, since, (leaseId) => known.has(leaseId));
    const sweptEntry = (): AuditEntry => ({
      type: AuditEventType.CREDENTIAL_REVOKED,
      actor: this.options.replicaId,
      requestId: request.id,
      // Named (accessors and lease ids identify, they do not authenticate), so no credential Vault made is unknown to the trail.
      details: { why: "issuance_swept", kind: lease.kind, intent: lease.intent, found: revoked.length, revoked: revoked.slice(0, brokerDefaults.maxSweptNamed), settled },
      flagged: true,
    });
    if (!settled) {
      // Not done (Vault still slow): what this pass did revoke is in the trail now, the rest comes at the next pass.
      if (revoked.length > 0) await this.audit.append(sweptEntry());
      return;
    }
    const resolved = await this.store.mutate(
      request.id,
      (current) => {
        if (current.lease?.intent !== lease.intent || current.lease.revokedAt !== undefined) return undefined;
        const next = clone(RequestRecordSchema, current);
        if (next.lease !== undefined) {
          next.lease.revokedAt = timestampFromDate(new Date());
          next.lease.revokedBy = this.options.replicaId;
        }
        return next;
      },
      stored,
    );
    this.sweeps.delete(request.id);
    if (resolved === undefined) return;
    await this.audit.append(
      revoked.length > 0
        ? sweptEntry()
        : { type: AuditEventType.SECURITY_EVENT, actor: this.options.replicaId, requestId: request.id, details: { swept: lease.intent, kind: lease.kind, found: 0 } },
    );
  }

  /**
   * A replica that died between claiming a decision and publishing it leaves
   * the agent waiting. After `orphanAfterMs` without progress and with no
   * decision on the stream, another replica takes over: a decision that needs
   * no credential is published as it stands; an approval not yet issued is
   * issued and published; an approval whose credential was issued but never
   * delivered has that credential revoked and is reported failed, so the agent
   * can ask again (the wrapping token died with the replica).
   */
  private async recoverOrphan(stored: StoredRecord, now: Date): Promise<void> {
    const { record } = stored;
    const request = record.request;
    if (request === undefined || record.decisionId === "" || record.completion !== undefined) return;
    if (![RequestState.APPROVED, RequestState.DENIED, RequestState.EXPIRED, RequestState.CANCELLED, RequestState.EXECUTING].includes(record.state)) return;
    // Past the request's deadline the agent has stopped waiting, and the reconciler handles any lease.
    if (request.deadline !== undefined && timestampDate(request.deadline).getTime() < now.getTime()) return;
    const since = record.updatedAt === undefined ? 0 : timestampDate(record.updatedAt).getTime();
    if (now.getTime() - since < (this.options.orphanAfterMs ?? brokerDefaults.orphanAfterMs)) return;
    if (await this.decisionPublished(request)) return;
    const takeover = clone(RequestRecordSchema, record);
    takeover.updatedAt = timestampFromDate(now);
    takeover.decisionId = randomUUID();
    const revision = await this.store.update(takeover, stored.revision);
    if (revision === undefined) return; // another replica took it over first
    this.options.log.warn({ requestId: request.id, state: RequestState[record.state] }, "taking over a decision whose publisher died");
    if (record.state === RequestState.EXECUTING) {
      await this.revokeLease(request.id, "orphaned");
      const reason = "the broker replica handling this approval died before delivering the credential; ask again";
      await this.store.mutate(request.id, (current) => {
        const failed = markFailed(current, reason, new Date());
        return failed.ok ? failed.record : undefined;
      });
      await this.publishDecision(request, { verdict: Verdict.CANCELLED, reason, decisionId: takeover.decisionId, record: takeover });
      return;
    }
    if (record.state === RequestState.APPROVED && !this.approvalJustified(record, request, now)) {
      // Only brokers can write records (the server enforces it), so this is defence in depth: an
      // approval that neither votes nor an auto rule account for is never acted on.
      const reason = "the record says approved, but neither its votes nor an auto rule account for it: refused";
      await this.refuse({ reason: "unjustified_approval", message: reason }, subjects.request(request.host, request.id), request.id);
      await this.store.mutate(request.id, (current) => {
        const failed = markFailed(current, reason, new Date());
        return failed.ok ? failed.record : undefined;
      });
      await this.publishDecision(request, { verdict: Verdict.CANCELLED, reason, decisionId: takeover.decisionId, record: takeover });
      return;
    }
    if (record.state === RequestState.APPROVED && (record.lease === undefined || record.lease.leaseId === "")) {
      // The replica that died may have had Vault make the credential under its decision id (the
      // issuance intent) before it could record it: found and revoked before a new one is issued.
      const swept = await this.sweepOrphanedIssuance(record, request, takeover.decisionId);
      if (!swept) return;
    }
    await this.finalize({ record: takeover, revision });
  }

  /**
   * Sweeps Vault for what a dead replica's issuance (intent: the orphaned decision id) made, and
   * audits what it revoked. True when Vault answered every question; otherwise the request fails
   * closed with the old intent on record, so the ticker's sweep goes on looking
   * ({@link Broker.sweepIntent}), and the agent is told to ask again.
   */
  private async sweepOrphanedIssuance(record: RequestRecord, request: ApprovalRequest, takeoverId: string): Promise<boolean> {
    const intent = record.decisionId;
    const known = this.recordedLeaseIds();
    // From the decision's write, less a margin for the clocks of replicas and Vault.
    const since = new Date((record.updatedAt === undefined ? 0 : timestampDate(record.updatedAt).getTime()) - brokerDefaults.orphanSweepMarginMs);
    const kind = intentLease(request, intent, since).kind;
    const { revoked, settled } = await this.options.issuer.sweep(request, intent, since, (leaseId) => known.has(leaseId)).catch(() => ({ revoked: [] as string[], settled: false }));
    if (revoked.length > 0) {
      await this.audit.append({
        type: AuditEventType.CREDENTIAL_REVOKED,
        actor: this.options.replicaId,
        requestId: request.id,
        details: { why: "orphaned_issuance_swept", kind, intent, found: revoked.length, revoked: revoked.slice(0, brokerDefaults.maxSweptNamed), settled },
        flagged: true,
      });
    }
    if (settled) return true;
    const reason = "the broker replica handling this approval died while issuing its credential, and Vault could not be searched for it yet; ask again";
    await this.store.mutate(request.id, (current) => {
      const failed = markFailed(current, reason, new Date());
      if (!failed.ok) return undefined;
      const next = clone(RequestRecordSchema, failed.record);
      next.lease = intentLease(request, intent, since);
      return next;
    });
    await this.publishDecision(request, { verdict: Verdict.CANCELLED, reason, decisionId: takeoverId, record: undefined });
    return false;
  }

  /** Whether an approved record's approval is accounted for: its requirement met by approving votes, or an auto rule that approves it. */
  private approvalJustified(record: RequestRecord, request: ApprovalRequest, now: Date): boolean {
    if (record.outstanding.length === 0 && record.votes.some((v) => v.approve) && !record.votes.some((v) => !v.approve && this.options.approvals.anyDenialDenies)) return true;
    const auto = intake(request, this.options.approvals, now);
    return auto.ok && auto.autoRule !== undefined && auto.record.state === RequestState.APPROVED;
  }

  /** Whether a decision for `request` is on the stream; with `decisionId`, whether that one is the last there. */
  private async decisionPublished(request: ApprovalRequest, decisionId?: string): Promise<boolean> {
    // Asked of the stream's leader, not by direct get: on a replicated stream a direct get may be
    // answered by a follower that has not applied the publish yet, and "not published" there would
    // take over (and revoke) an action whose decision did reach its sidecar. "Not found" is null.
    const stored = await this.jsm.streams.getMessage(streams.decisions.name, { last_by_subj: subjects.decision(request.host, request.id) });
    if (stored === null) return false;
    if (decisionId === undefined) return true;
    try {
      return fromBinary(DecisionBodySchema, fromBinary(DecisionSchema, stored.data).body).decisionId === decisionId;
    } catch {
      return false;
    }
  }

  private following: Promise<void> = Promise.resolve();

  /**
   * Starts the KV watch behind {@link Broker.index}; resolves once the records the bucket
   * held when it started are in (the watch's initial values), or after 5 s with a warning
   * (the index then fills in as the watch goes on, and lists wait for it).
   */
  private async followRecords(): Promise<void> {
    const { caughtUp } = await this.startFollowing();
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), 5000)));
    if (await Promise.race([caughtUp.then(() => false), late])) this.options.log.warn("the request index was not caught up with the state bucket within 5 s of start; it fills in as the watch goes on");
    clearTimeout(timer);
  }

  /** The state bucket's watch now feeding the index; aborting it (not {@link Broker.stopWatching}) makes it open again. */
  private indexWatch: AbortController | undefined;

  /**
   * Opens the state bucket's watch into the index, and keeps it open: a watch that ends or
   * fails without the broker closing (a NATS node died under its consumer, or
   * {@link Broker.indexCurrent} found it stalled) is opened again from each key's last value,
   * so the index re-syncs (older revisions than those it holds are ignored). Resolves with the
   * first pass's `caughtUp` once the watch is open.
   */
  private async startFollowing(): Promise<{ readonly caughtUp: Promise<void> }> {
    const watch = new AbortController();
    this.indexWatch = watch;
    const stop = () => watch.abort();
    this.stopWatching.signal.addEventListener("abort", stop, { once: true });
    let opened: Awaited<ReturnType<RequestStore["follow"]>>;
    try {
      opened = await this.store.follow(watch.signal);
    } catch (error) {
      this.stopWatching.signal.removeEventListener("abort", stop);
      throw error;
    }
    this.following = (async () => {
      try {
        for await (const change of opened.changes) this.index.apply(change);
      } catch (error) {
        this.options.log.warn({ err: error }, "the state bucket's watch failed");
      } finally {
        this.stopWatching.signal.removeEventListener("abort", stop);
      }
      for (let attempt = 0; !this.stopWatching.signal.aborted; attempt++) {
        try {
          await this.startFollowing();
          this.options.log.info("the state bucket's watch is open again");
          return;
        } catch (error) {
          this.options.log.warn({ err: error, attempt }, "cannot open the state bucket's watch again yet");
          await new Promise((resolve) => setTimeout(resolve, Math.min(250 * 2 ** attempt, 5_000)));
        }
      }
    })();
    return { caughtUp: opened.caughtUp };
  }

  /**
   * Moves settled records past their retention from the state bucket to the history: the
   * history write first (durable before the record leaves), then a purge that is a
   * compare-and-set on the record's revision, so a record that changed meanwhile stays, and
   * of replicas sweeping at once one removes it (the history write is idempotent); the
   * record's request goes after it. Requests stored without a record go once older than
   * {@link brokerDefaults.orphanRequestGraceMs}.
   */
  private async retireSettled(now: number): Promise<void> {
    // Also the watchdog of the index's watch, for a replica nobody lists on.
    await this.indexCurrent();
    this.markers = await this.store.dropMarkers(this.markers);
    const cutoff = now - (this.options.retentionMs ?? brokerDefaults.retentionMs);
    for (const entry of this.index.settledBefore(cutoff, brokerDefaults.retireBatch)) {
      if (this.closed) return;
      const stored = await this.store.get(entry.id);
      if (stored === undefined) {
        this.index.remove(entry.id);
        continue;
      }
      if (needsTicker(stored.record, now) || stored.revision !== entry.revision) continue;
      await this.history.put(stored.record, stored.revision);
      const marker = await this.store.retire(entry.id, stored.revision);
      if (marker !== undefined) {
        this.markers.push(marker);
        this.index.remove(entry.id);
      }
    }
    if (this.closed) return;
    await this.store.dropOrphanRequests((id) => this.index.get(id) !== undefined, this.index.size, brokerDefaults.orphanRequestGraceMs, now);
  }

  /** Expiry and escalation of pending requests; revocation of leases whose action is over. */
  private async tickOnce(): Promise<void> {
    if (this.closed) return;
    const now = new Date();
    let pendingCount = 0;
    let oldestPendingMs = 0;
    let outstanding = 0;
    for (const stored of this.index.active()) {
      const { record } = stored;
      const id = record.request?.id ?? "";
      if (!needsTicker(record, now.getTime())) {
        this.index.release(id);
        continue;
      }
      const request = record.request;
      if (request === undefined) continue;
      if (record.lease !== undefined && record.lease.leaseId !== "" && record.lease.revokedAt === undefined) outstanding++;
      if (record.state === RequestState.PENDING) {
        pendingCount++;
        if (request.createdAt !== undefined) oldestPendingMs = Math.max(oldestPendingMs, now.getTime() - timestampDate(request.createdAt).getTime());
        const result = tick(record, request, this.options.approvals, now);
        const next = result.ok && result.decided !== undefined ? withDecisionId(result.record) : result.ok ? result.record : undefined;
        const revision = result.ok && next !== undefined && result.events.length > 0 ? await this.store.update(next, stored.revision) : undefined;
        if (result.ok && next !== undefined && revision !== undefined) {
          await this.auditEvents(result.events, this.options.replicaId);
          this.announce(result.events, next);
          if (result.decided !== undefined) await this.finalize({ record: next, revision });
        }
        continue;
      }
      await this.recoverOrphan(stored, now).catch((error: unknown) => this.options.log.error({ err: error, requestId: id }, "could not take over an orphaned decision"));
      await this.endSilentAction(stored, now.getTime()).catch((error: unknown) => this.options.log.error({ err: error, requestId: id }, "could not end an action whose sidecar went silent"));
      if (record.lease?.intent !== undefined && record.lease.intent !== "" && record.lease.leaseId === "" && record.lease.revokedAt === undefined) {
        await this.sweepIntent(stored, now.getTime()).catch((error: unknown) => this.options.log.warn({ err: error, requestId: id }, "could not sweep Vault for an unanswered issuance yet"));
        continue;
      }
      const lease = record.lease;
      if (lease === undefined || lease.leaseId === "" || lease.revokedAt !== undefined) continue;
      const leaseOver = lease.expiresAt !== undefined && timestampDate(lease.expiresAt).getTime() <= now.getTime();
      const actionOver = request.deadline !== undefined && timestampDate(request.deadline).getTime() + (this.options.decisionTtlMs ?? brokerDefaults.decisionTtlMs) <= now.getTime();
      if (isFinal(record.state) || leaseOver || actionOver) {
        await this.revokeLease(id, "reconciler").catch((error: unknown) => this.options.log.error({ err: error, requestId: id }, "reconciler could not revoke a lease"));
      }
    }
    this.metrics.pendingDepth.set(pendingCount);
    this.metrics.oldestPendingSeconds.set(oldestPendingMs / 1000);
    this.metrics.leasesOutstanding.set(outstanding);
    // Beside the ticks, not in their way: a long sweep must not hold up expiry and revocation.
    if (this.sweeping === undefined && now.getTime() - this.lastSweep >= brokerDefaults.retentionSweepMs) {
      this.lastSweep = now.getTime();
      this.sweeping = this.retireSettled(now.getTime())
        .catch((error: unknown) => this.options.log.error({ err: error }, "could not retire settled records to the history"))
        .finally(() => (this.sweeping = undefined));
    }
  }
}

/** Where a listing goes on: the index after a position, or the history before a stream sequence. */
type ListPosition = { readonly in: "index"; readonly after?: IndexPosition } | { readonly in: "history"; readonly before?: number };

/**
 * The lease of an issuance whose outcome is unknown: no lease id yet, the intent Vault's secret
 * carries, and when it began. The ticker sweeps Vault for it ({@link Broker.sweepIntent}).
 */
function intentLease(request: ApprovalRequest, intent: string, issuedAt: Date): LeaseRecord {
  return create(LeaseRecordSchema, { leaseId: "", intent, kind: request.credential?.kind.case === "database" ? "database" : "vault_token", issuedAt: timestampFromDate(issuedAt) });
}

/** Reads a cursor {@link Broker.listPage} returned; INVALID_ARGUMENT (field `cursor`) for anything else. */
function parseCursor(cursor: string | undefined): ListPosition {
  if (cursor === undefined || cursor === "") return { in: "index" };
  const index = /^i\.(\d{1,16})\.([-_=a-zA-Z0-9]{1,256})$/.exec(cursor);
  if (index !== null) return { in: "index", after: { createdMs: Number(index[1]), id: index[2] ?? "" } };
  const history = /^h\.(\d{1,16})$/.exec(cursor);
  if (history !== null) return { in: "history", before: Number(history[1]) };
  throw new AirlockError(Code.InvalidArgument, "cursor: is not a cursor this API returned", { details: { field: "cursor" } });
}

/**
 * Refuses a vote that needs step-up without a receipt for it (`permission_denied`,
 * `details.reason: step_up_required`, with the causes and the `acr` a fresh sign-in must
 * carry), and a receipt made for another request, verdict or reviewer.
 */
function checkStepUp(request: ApprovalRequest, ballot: Ballot, minRisk: RiskLevel | undefined): void {
  const receipt = ballot.stepUp;
  if (receipt !== undefined && (receipt.requestId !== request.id || receipt.approve !== ballot.approve || principalKey(receipt.reviewer) !== principalKey(ballot.reviewer))) {
    throw new AirlockError(Code.PermissionDenied, `request ${request.id}: the step-up was made for another vote`, { details: { reason: "step_up_mismatch", requestId: request.id } });
  }
  const need = stepUpNeed(request, ballot, minRisk);
  if (need.required && receipt === undefined) {
    throw new AirlockError(Code.PermissionDenied, `request ${request.id}: approving it needs a step-up (a passkey, or a fresh sign-in) bound to this request`, {
      details: { reason: "step_up_required", requestId: request.id, causes: [...need.causes], ...(need.acr === "" ? {} : { acr: need.acr }) },
    });
  }
}

/**
 * Runs `write` again while it fails for want of NATS (`unavailable`: a restart, a cut), 250 ms
 * doubling to 2 s apart, until `untilMs`. Only for writes that are safe to repeat (a
 * compare-and-set re-reads and applies its change again).
 */
async function whileNatsAway<T>(write: () => Promise<T>, untilMs: number): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await write();
    } catch (error) {
      const delayMs = Math.min(250 * 2 ** attempt, 2_000);
      if (AirlockError.from(error).code !== Code.Unavailable || Date.now() + delayMs >= untilMs) throw error;
      await new Promise((resolve) => setTimeout(resolve, delayMs));
    }
  }
}

/** The record with a fresh decision id: written with the transition that decides, it makes its writer the one publisher. */
function withDecisionId(record: RequestRecord): RequestRecord {
  const next = clone(RequestRecordSchema, record);
  next.decisionId = randomUUID();
  return next;
}

/**
 * Whether a record may still need a replica's ticker: pending (expiry,
 * escalation), holding a live lease (reconciler), not finished yet, or decided
 * while its agent may still be waiting (orphaned-decision takeover).
 */
function needsTicker(record: RequestRecord, nowMs: number): boolean {
  if (record.state === RequestState.PENDING) return true;
  if (record.lease !== undefined && (record.lease.leaseId !== "" || record.lease.intent !== "") && record.lease.revokedAt === undefined) return true;
  if (!isFinal(record.state) && record.completion === undefined) return true;
  const deadline = record.request?.deadline;
  return record.decisionId !== "" && deadline !== undefined && timestampDate(deadline).getTime() > nowMs;
}
