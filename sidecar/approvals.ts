import { createHash, createHmac, randomUUID } from "node:crypto";
import { create, fromBinary, fromJson, type JsonValue, toBinary } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate, timestampFromMs, ValueSchema } from "@bufbuild/protobuf/wkt";
import { type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { type DecisionKeyRing, ReplayGuard, verifyDecision } from "../common/decision.js";
import { AirlockError, Code } from "../common/errors.js";
import { natsRefusal } from "../common/nats.js";
import type { Logger } from "../common/logger.js";
import { subjects, streams } from "../common/subjects.js";
import type { VaultClient } from "../common/vault.js";
import {
  type ApprovalRequest,
  ApprovalRequestSchema,
  type Completion,
  CompletionSchema,
  type Decision,
  type DecisionBody,
  DecisionBodySchema,
  DecisionSchema,
  Verdict,
} from "../proto/index.js";
import type { ApprovedCall, HeldCall } from "./proxy.js";
import type { SidecarMetrics } from "./metrics.js";
import { approvalTerms, redact } from "./policy.js";

/** Options of {@link ApprovalFlow}. */
export interface ApprovalFlowOptions {
  readonly nc: NatsConnection;
  readonly host: string;
  readonly keyRing: DecisionKeyRing;
  /** Vault, for unwrapping the credential of an approved call. */
  readonly vault: VaultClient;
  readonly metrics: SidecarMetrics;
  readonly log: Logger;
  /**
   * The secret call ids are keyed with ({@link callRequestId}): only this host's sidecar may know
   * it, and it must survive restarts (the sidecar derives it from its NATS seed).
   */
  readonly callIdKey: Uint8Array;
  /** How long a publish to JetStream may take before the call fails closed, in ms. @default 5000 */
  readonly publishTimeoutMs?: number;
  /**
   * How often the sidecar tells the brokers which approved actions it is still running, in ms.
   * A broker that hears nothing of an action for its `heartbeat_silence` revokes its credential.
   * @default 5000
   */
  readonly heartbeatIntervalMs?: number;
}

/** Defaults of {@link ApprovalFlowOptions}. */
export const approvalFlowDefaults = { publishTimeoutMs: 5000, heartbeatIntervalMs: 5000 } as const;

/**
 * How a completion (or a hand-back) is published: tried again, 250 ms doubling to 2 s apart, for
 * up to `retryForMs` while NATS is away (a node restart, a cut). Until it is stored the action
 * stays in the heartbeat, so the brokers do not end a finished action as silent; a completion
 * still unpublished after that is left to the heartbeat silence. A sidecar that is shut down
 * keeps trying, and beating, for up to `drainOnCloseMs` before it lets the rest go.
 */
export const completionPublish = { retryForMs: 60_000, firstRetryMs: 250, maxRetryMs: 2000, drainOnCloseMs: 15_000 } as const;

interface Waiter {
  readonly requestId: string;
  readonly requestSha256: Uint8Array;
  readonly offer: (decision: Decision) => void;
}

/** A request whose agent was told its wait expired: a decision that comes later is handed back, never used. */
interface GivenUp {
  readonly requestSha256: Uint8Array;
  /** When the wait began: a decision made for it is judged as of then, not by its (passed) expiry. */
  readonly since: number;
  /** When it is forgotten (ms). */
  readonly until: number;
}

/** How the sidecar catches up on decisions after a reconnect, and how long it remembers given-up requests. */
export const decisionCatchUp = {
  /**
   * Catch-up reads after each reconnect, in ms after it: the brokers reconnect on their own
   * time, and a decision they publish before this connection's subscription is back is only
   * found by reading the stream again.
   */
  roundsMs: [0, 1_000, 2_000, 4_000, 8_000, 16_000],
  /** How long a request given up at its deadline is remembered, for a late decision to be handed back. */
  givenUpForMs: 600_000,
  /** Given-up requests remembered at once (the oldest forgotten first). */
  maxGivenUp: 10_000,
} as const;

/**
 * The sidecar's side of the approval workflow: publishes an ApprovalRequest
 * for a held call, waits for the broker's signed Decision, verifies that it
 * binds this exact request, unwraps the one-action credential, and reports the
 * action's completion. Every failure fails closed.
 */
export class ApprovalFlow {
  private readonly options: ApprovalFlowOptions;
  private readonly js: JetStreamClient;
  private readonly jsm: JetStreamManager;
  private readonly waiters = new Map<string, Waiter>();
  private readonly givenUp = new Map<string, GivenUp>();
  private readonly replay = new ReplayGuard();
  private decisions: Subscription | undefined;
  private following: Promise<void> = Promise.resolve();
  /** Approved actions running now (request id to decision id), for the heartbeat. */
  private readonly running = new Map<string, string>();
  private heartbeat: NodeJS.Timeout | undefined;

  private constructor(options: ApprovalFlowOptions, jsm: JetStreamManager) {
    this.options = options;
    this.js = jetstream(options.nc);
    this.jsm = jsm;
  }

  /**
   * Starts following this host's decisions: a subscription to `airlock.decision.<host>.>`, the
   * only decisions the server passes to this host's account, and after every reconnect a
   * catch-up that reads each waiting request's decision back from the stream (direct get by
   * subject), so one published while the connection was down is not missed. A sidecar may not
   * create consumers: a consumer's delivery subject is not checked against its creator's rights.
   * Fails with PERMISSION_DENIED naming the credential when it is not this host's.
   */
  static async start(options: ApprovalFlowOptions): Promise<ApprovalFlow> {
    // No $JS.API.INFO for a sidecar: it reaches JetStream only through its links.
    const flow = new ApprovalFlow(options, await jetstreamManager(options.nc, { checkAPI: false }));
    try {
      // A read of this host's decisions, to learn at start whether the credential is this host's.
      await flow.jsm.direct.getMessage(streams.decisions.name, { last_by_subj: subjects.decision(options.host, "start-up-check") });
    } catch (error) {
      if (natsRefusal(error) === "permissions") {
        throw new AirlockError(Code.PermissionDenied, `the NATS credential is not host ${options.host}'s: the server refused it this host's decisions`, { cause: error, details: { field: "nats.auth.seed_file" } });
      }
      // No stream yet (no broker has run) or no responder: privileged calls fail closed until one does.
      options.log.warn({ stream: streams.decisions.name, reason: AirlockError.from(error).rawMessage }, "the decisions stream does not answer yet; privileged calls fail closed until a broker runs");
    }
    const decisions = options.nc.subscribe(subjects.decisionsFor(options.host));
    flow.decisions = decisions;
    flow.following = (async () => {
      for await (const message of decisions) flow.route(message.data);
    })();
    // Before any call is held: the brokers end whatever an earlier run of this host's sidecar left executing.
    flow.hello();
    await options.nc.flush().catch(() => undefined);
    flow.heartbeat = setInterval(() => flow.beat(), options.heartbeatIntervalMs ?? approvalFlowDefaults.heartbeatIntervalMs);
    flow.heartbeat.unref();
    // Ends with the connection.
    void (async () => {
      for await (const status of options.nc.status()) if (status.type === "reconnect") flow.catchUpAfterReconnect();
    })();
    return flow;
  }

  /**
   * Reads back, a few times over the seconds after a reconnect, the decision of every request
   * this sidecar waits for (and of those it gave up on): a broker that reconnected first may
   * have published it before this connection's subscription was back, or while JetStream was
   * still recovering and refused the first read. A newer reconnect starts the rounds again.
   */
  private catchUpAfterReconnect(): void {
    const round = ++this.reconnects;
    const started = Date.now();
    void (async () => {
      for (const at of decisionCatchUp.roundsMs) {
        const wait = started + at - Date.now();
        if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait).unref());
        if (round !== this.reconnects || this.options.nc.isClosed() || this.closed) return;
        if (this.waiters.size === 0 && this.givenUp.size === 0) return;
        await this.catchUp();
      }
    })().catch((error: unknown) => this.options.log.warn({ err: error }, "catching up on decisions failed"));
  }

  private reconnects = 0;
  private closed = false;

  /** Offers every waiting (or given-up) request the decision the stream holds for it, if any. */
  private async catchUp(): Promise<void> {
    this.forgetGivenUp();
    await Promise.all([...this.waiters.keys(), ...this.givenUp.keys()].map((requestId) => this.readDecision(requestId)));
  }

  /** Routes the decision the stream holds for `requestId`, if any; a read that fails is tried in the next round. */
  private async readDecision(requestId: string): Promise<void> {
    const stored = await this.jsm.direct.getMessage(streams.decisions.name, { last_by_subj: subjects.decision(this.options.host, requestId) }).catch(() => null);
    if (stored !== null) this.route(stored.data);
  }

  private forgetGivenUp(): void {
    const now = Date.now();
    for (const [requestId, entry] of this.givenUp) if (entry.until <= now) this.givenUp.delete(requestId);
  }

  /**
   * A decision for a request whose agent was already told it expired: it is never used. An
   * approval is handed back at once, as a completion under its decision id saying it did not
   * run, so the broker revokes its credential and ends the record now instead of at the
   * heartbeat silence. Only a decision that verifies for this request is handed back.
   */
  private handBack(decision: Decision, requestId: string, entry: GivenUp): void {
    let body: DecisionBody;
    try {
      body = verifyDecision(decision, this.options.keyRing, { requestId, requestSha256: entry.requestSha256, now: new Date(entry.since) });
    } catch {
      return;
    }
    this.givenUp.delete(requestId);
    // One this sidecar accepted is running or ran: its own completion speaks for it.
    if (body.verdict !== Verdict.APPROVED || this.replay.has(body.decisionId)) return;
    this.options.log.warn({ requestId, decisionId: body.decisionId }, "an approval arrived after its agent was told the request expired: handed back unused");
    this.handBackUnused(requestId, body.decisionId, Code.DeadlineExceeded, notRunLate);
  }

  /**
   * Publishes a completion under the decision id saying the approved call did not run, so the
   * broker revokes its credential and ends the record now rather than at the heartbeat silence.
   */
  private handBackUnused(requestId: string, decisionId: string, statusCode: Code, statusMessage: string): void {
    const completion = create(CompletionSchema, {
      completionId: `${requestId}.${decisionId}.completion`,
      requestId,
      decisionId,
      statusCode,
      statusMessage,
      duration: durationFromMs(0),
      host: this.options.host,
      finishedAt: timestampFromMs(Date.now()),
    });
    this.publishCompletion(completion, "could not hand back an approval that was not run; the broker ends it at the heartbeat silence");
  }

  /**
   * Publishes a completion (de-duplicated by its id, so a retry is harmless), trying again while
   * NATS is away ({@link completionPublish}). Its action beats meanwhile and leaves the
   * heartbeat once the completion is stored, or given up on (logged as `failure`).
   */
  private publishCompletion(completion: Completion, failure: string): void {
    const { requestId, decisionId } = completion;
    this.running.set(requestId, decisionId);
    const until = Date.now() + completionPublish.retryForMs;
    const bytes = toBinary(CompletionSchema, completion);
    const sending = (async () => {
      for (let wait: number = completionPublish.firstRetryMs; ; wait = Math.min(wait * 2, completionPublish.maxRetryMs)) {
        try {
          await this.js.publish(subjects.completion(this.options.host, requestId), bytes, { msgID: completion.completionId });
          return;
        } catch (error) {
          if (this.closed || this.options.nc.isClosed() || Date.now() + wait > until) {
            this.options.log.error({ err: error, requestId }, failure);
            return;
          }
        }
        await new Promise((resolve) => setTimeout(resolve, wait).unref());
      }
    })().finally(() => {
      if (this.running.get(requestId) === decisionId) this.running.delete(requestId);
      this.publishing.delete(sending);
    });
    this.publishing.add(sending);
  }

  /**
   * Tells the brokers which approved actions are still running: one core NATS message on the
   * host's own subject (the server fixes the host), none when nothing runs. A lost beat costs
   * nothing; a sidecar that dies stops beating, and the brokers revoke its actions' credentials.
   */
  private beat(): void {
    if (this.running.size === 0 || this.options.nc.isClosed()) return;
    const actions = [...this.running].map(([requestId, decisionId]) => ({ requestId, decisionId }));
    try {
      this.options.nc.publish(subjects.heartbeat(this.options.host), JSON.stringify({ actions }));
    } catch (error) {
      this.options.log.warn({ err: error }, "could not send a heartbeat");
    }
  }

  /**
   * Tells the brokers this sidecar has just started and holds nothing: the actions an earlier
   * run on this host was executing are abandoned (it kept no credential, and no agent waits
   * for them any more), so the brokers revoke their credentials now rather than at the
   * heartbeat silence. The subject carries the host, which the server fixes: a host can only
   * abandon its own actions. A lost hello leaves them to the heartbeat silence.
   */
  private hello(): void {
    try {
      this.options.nc.publish(subjects.heartbeat(this.options.host), JSON.stringify({ hello: true, instance: this.instance, actions: [] }));
    } catch (error) {
      this.options.log.warn({ err: error }, "could not say hello to the brokers; actions an earlier run left end at the heartbeat silence");
    }
  }

  /** This run of the sidecar (in the hello, for the brokers' logs). */
  private readonly instance = randomUUID();
  /** When this run started (epoch ms): a decision made before it may have been collected by an earlier run. */
  private readonly startedAt = Date.now();
  /** Approved calls this run ran upstream, with the upstream's status, newest last (bounded): a retry is answered, never run again. */
  private readonly finished = new Map<string, { readonly status: number; readonly message: string }>();

  /**
   * Stops following decisions; calls still waiting fail with UNAVAILABLE. Completions still
   * being sent (NATS away when their action ended) are given up to
   * `completionPublish.drainOnCloseMs` to be stored, their actions beating meanwhile, so a
   * shutdown during a NATS blip does not leave finished actions to be ended as silent.
   */
  async close(): Promise<void> {
    this.decisions?.unsubscribe();
    await this.following;
    if (this.publishing.size > 0) {
      let timer: NodeJS.Timeout | undefined;
      let timedOut = false;
      const bound = new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          timedOut = true;
          resolve();
        }, completionPublish.drainOnCloseMs);
      });
      // Calls the closing proxy cut off report their completions while this waits: those are awaited too.
      while (this.publishing.size > 0 && !timedOut) await Promise.race([Promise.allSettled([...this.publishing]), bound]);
      clearTimeout(timer);
    }
    this.closed = true;
    clearInterval(this.heartbeat);
  }

  /** Completions being published (see {@link publishCompletion}), awaited by {@link close}. */
  private readonly publishing = new Set<Promise<void>>();

  private route(bytes: Uint8Array): void {
    let decision: Decision;
    let body: DecisionBody;
    try {
      decision = fromBinary(DecisionSchema, bytes);
      body = fromBinary(DecisionBodySchema, decision.body);
    } catch {
      this.securityEvent("malformed_decision", "");
      return;
    }
    // Unverified at this point: only used to find who is waiting; the waiter verifies.
    const waiter = this.waiters.get(body.requestId);
    if (waiter !== undefined) {
      waiter.offer(decision);
      return;
    }
    const givenUp = this.givenUp.get(body.requestId);
    if (givenUp !== undefined) this.handBack(decision, body.requestId, givenUp);
  }

  /** Sends a security event to the audit trail and counts it. */
  private securityEvent(reason: string, requestId: string, detail = ""): void {
    this.options.metrics.securityEvents.inc({ reason });
    this.options.log.warn({ reason, requestId, detail }, "security event");
    try {
      this.options.nc.publish(
        subjects.security(this.options.host),
        JSON.stringify({ reason, requestId, detail, host: this.options.host, at: new Date().toISOString() }),
      );
    } catch {
      // The log line and the metric above still record it.
    }
  }

  /**
   * Holds a privileged call: publishes its ApprovalRequest (or resumes the one
   * named by `x-airlock-request-id`), waits for a verified decision, and on
   * approval unwraps the credential. Rejects with an AirlockError:
   * PERMISSION_DENIED (denied: `details.reason` `denied`, the reviewer's words in
   * `reviewerReason`; or a bad decision), DEADLINE_EXCEEDED (expired;
   * `credential_expired`), ABORTED (`not_waiting` for `x-airlock-wait: false`;
   * `outcome_unknown`, `ended_by_restart`; a cancellation), ALREADY_EXISTS
   * (`call_in_progress`), FAILED_PRECONDITION (`already_ran`, `already_used`,
   * `call_id_reused`), UNAVAILABLE (NATS unreachable).
   */
  async hold(call: HeldCall): Promise<ApprovedCall> {
    const requestSha256 = requestHash(call);
    const resumeId = header(call.metadata, "x-airlock-request-id");
    const callId = header(call.metadata, "x-airlock-call-id");
    const noWait = header(call.metadata, "x-airlock-wait") === "false";
    let request: ApprovalRequest;
    let earlier: Decision | undefined;
    // Resumed: the request was made before this call (by an earlier call, maybe an earlier run of this sidecar).
    let resumed = resumeId !== undefined;
    if (callId !== undefined) {
      if (resumeId !== undefined) throw new AirlockError(Code.InvalidArgument, "give x-airlock-call-id or x-airlock-request-id, not both", { details: { field: "x-airlock-call-id", reason: "invalid_call_id" } });
      const id = callRequestId(this.options.callIdKey, { host: this.options.host, agent: call.identity.agent, onBehalfOf: call.identity.onBehalfOf, callId });
      const found = await this.resume(id, requestSha256, call, { byCallId: true });
      resumed = found !== undefined;
      ({ request, decision: earlier } = found ?? { request: this.buildRequest(call, requestSha256, id) });
    } else if (resumeId === undefined) {
      request = this.buildRequest(call, requestSha256);
    } else {
      ({ request, decision: earlier } = await this.resume(resumeId, requestSha256, call));
    }
    const requestId = request.id;
    if (this.waiters.has(requestId)) {
      // One wait per request: a second would take the first's decision from under it.
      throw callInProgress(requestId);
    }
    const deadline = request.deadline === undefined ? Date.now() : timestampDate(request.deadline).getTime();
    const waitStarted = Date.now();

    let cleanup: () => void = () => undefined;
    const decided = new Promise<DecisionBody>((resolve, reject) => {
      let accepted = false;
      const offer = (decision: Decision) => {
        // The same decision can arrive twice (live and from a catch-up): once accepted, the rest is moot.
        if (accepted) return;
        try {
          const body = verifyDecision(decision, this.options.keyRing, { requestId, requestSha256 });
          this.replay.accept(body);
          accepted = true;
          resolve(body);
        } catch (error) {
          const refused = AirlockError.from(error);
          const reason = typeof refused.details.reason === "string" ? refused.details.reason : "bad_decision";
          this.securityEvent(reason, requestId, refused.rawMessage);
          // A refused decision never ends the wait: a forger cannot deny service by sending junk first.
        }
      };
      this.waiters.set(requestId, { requestId, requestSha256, offer });
      const timer = setTimeout(() => {
        // A decision accepted just before the deadline is being acted on: nothing to give up.
        if (accepted) return;
        // Told expired: a decision that still comes is handed back, never used (see handBack).
        this.giveUp(requestId, requestSha256, waitStarted);
        reject(new AirlockError(Code.DeadlineExceeded, `approval request ${requestId} expired undecided`, { details: { requestId } }));
      }, Math.max(0, deadline - Date.now()));
      const onAbort = () => reject(new AirlockError(Code.Canceled, `the agent stopped waiting; resume with x-airlock-request-id: ${requestId}`, { details: { requestId } }));
      call.signal.addEventListener("abort", onAbort, { once: true });
      // An agent that left before the wait began is not waited for.
      if (call.signal.aborted) onAbort();
      cleanup = () => {
        clearTimeout(timer);
        call.signal.removeEventListener("abort", onAbort);
        // Only this call's own wait: another call's is never taken down with it.
        if (this.waiters.get(requestId)?.offer === offer) this.waiters.delete(requestId);
      };
      if (earlier !== undefined) offer(earlier);
    });
    // Rejections are awaited below or deliberately dropped (no-wait path).
    decided.catch(() => undefined);

    try {
      if (!resumed) await this.publishRequest(request);
      if (noWait && earlier === undefined) {
        throw new AirlockError(Code.Aborted, `held for approval as request ${requestId}; call again with ${callId === undefined ? `metadata x-airlock-request-id: ${requestId}` : "the same x-airlock-call-id"}`, {
          details: { requestId, reason: "not_waiting" },
        });
      }
      const body = await decided;
      return await this.conclude(body, request, resumed);
    } finally {
      cleanup();
    }
  }

  /** Remembers a request whose agent was told it expired, and reads its decision once more (it may be on the stream already). */
  private giveUp(requestId: string, requestSha256: Uint8Array, since: number): void {
    this.forgetGivenUp();
    if (this.givenUp.size >= decisionCatchUp.maxGivenUp) {
      const oldest = this.givenUp.keys().next();
      if (oldest.done !== true) this.givenUp.delete(oldest.value);
    }
    this.givenUp.set(requestId, { requestSha256, since, until: Date.now() + decisionCatchUp.givenUpForMs });
    // After the waiter is gone (this runs before the hold's cleanup), so the decision goes to handBack.
    setImmediate(() => void this.readDecision(requestId));
  }

  private buildRequest(call: HeldCall, requestSha256: Uint8Array, id: string = randomUUID()): ApprovalRequest {
    const approve = call.verdict.approve;
    const { redactedValues, removed } = redactAll(call.decoded, approve.redact);
    const now = Date.now();
    const value: JsonValue = call.method.method.methodKind === "client_streaming" ? redactedValues : (redactedValues[0] ?? {});
    return create(ApprovalRequestSchema, {
      id,
      identity: {
        agent: call.identity.agent,
        onBehalfOf: call.identity.onBehalfOf,
        chain: [...call.identity.chain],
        authenticatedBy: call.identity.authenticatedBy,
        agentAttestedBy: call.identity.attestation.agent,
        humanAttestedBy: call.identity.attestation.human,
      },
      host: this.options.host,
      service: call.method.service.typeName,
      method: call.method.method.name,
      request: fromJson(ValueSchema, value),
      requestSha256,
      redactedFields: removed,
      reason: header(call.metadata, "x-airlock-reason") ?? "",
      ruleId: call.verdict.ruleId,
      ...approvalTerms(approve),
      createdAt: timestampFromMs(now),
      deadline: timestampFromMs(now + approve.timeoutMs),
    });
  }

  private async publishRequest(request: ApprovalRequest): Promise<void> {
    try {
      await this.js.publish(subjects.request(this.options.host, request.id), toBinary(ApprovalRequestSchema, request), {
        msgID: request.id,
        timeout: this.options.publishTimeoutMs ?? approvalFlowDefaults.publishTimeoutMs,
      });
    } catch (error) {
      throw new AirlockError(Code.Unavailable, "cannot reach NATS to ask for approval: privileged calls fail closed", { cause: error, details: { requestId: request.id } });
    }
  }

  /**
   * The request held as `requestId` by this host, checked to be this very call of this agent,
   * and its decision if there is one. A request this host never published is NOT_FOUND, or
   * undefined when named by a call id (`byCallId`: the call id's first call). A call id whose
   * request is another call is FAILED_PRECONDITION `call_id_reused`.
   */
  private async resume(requestId: string, requestSha256: Uint8Array, call: HeldCall): Promise<{ request: ApprovalRequest; decision?: Decision }>;
  private async resume(requestId: string, requestSha256: Uint8Array, call: HeldCall, options: { byCallId: true }): Promise<{ request: ApprovalRequest; decision?: Decision } | undefined>;
  private async resume(requestId: string, requestSha256: Uint8Array, call: HeldCall, options?: { byCallId: true }): Promise<{ request: ApprovalRequest; decision?: Decision } | undefined> {
    if (!/^[0-9a-f-]{36}$/.test(requestId)) throw new AirlockError(Code.InvalidArgument, "x-airlock-request-id is not a request id");
    let stored;
    try {
      // Direct get by subject: the server lets this host read back its own requests only.
      stored = await this.jsm.direct.getMessage(streams.requests.name, { last_by_subj: subjects.request(this.options.host, requestId) });
    } catch (error) {
      throw new AirlockError(Code.Unavailable, "cannot reach NATS to resume the request: privileged calls fail closed", { cause: error });
    }
    if (stored === null) {
      if (options?.byCallId === true) return undefined;
      throw new AirlockError(Code.NotFound, `no held request ${requestId} from this host`, { details: { requestId } });
    }
    const request = fromBinary(ApprovalRequestSchema, stored.data);
    if (!Buffer.from(request.requestSha256).equals(Buffer.from(requestSha256)) || request.method !== call.method.method.name || request.service !== call.method.service.typeName) {
      if (options?.byCallId === true) {
        // A call id is this agent's own (its request id covers the agent and human): reusing it for another call is a mistake, not an attack.
        throw new AirlockError(Code.FailedPrecondition, `this call id already names another call (request ${requestId}, a different method or payload): give each call its own call id`, {
          details: { requestId, field: "x-airlock-call-id", reason: "call_id_reused" },
        });
      }
      this.securityEvent("resume_mismatch", requestId);
      throw new AirlockError(Code.PermissionDenied, `this call is not the one held as request ${requestId}: the request differs`, { details: { requestId } });
    }
    if (request.identity?.agent !== call.identity.agent) {
      this.securityEvent("resume_other_agent", requestId);
      throw new AirlockError(Code.PermissionDenied, `request ${requestId} was made by another agent`, { details: { requestId } });
    }
    let decision: Decision | undefined;
    try {
      const found = await this.jsm.direct.getMessage(streams.decisions.name, { last_by_subj: subjects.decision(this.options.host, requestId) });
      if (found !== null) decision = fromBinary(DecisionSchema, found.data);
    } catch {
      // Not decided yet: wait for it like a fresh request.
    }
    const ran = this.finished.get(requestId);
    if (ran !== undefined) {
      throw new AirlockError(Code.FailedPrecondition, `request ${requestId} already ran on this sidecar (the upstream answered status ${ran.status}${ran.message === "" ? "" : `: ${ran.message}`}); it is not run again`, {
        details: { requestId, reason: "already_ran", upstreamStatus: ran.status },
      });
    }
    if (this.waiters.has(requestId) || this.running.has(requestId)) {
      throw callInProgress(requestId);
    }
    if (decision !== undefined && this.replay.has(decidedId(decision))) {
      // This sidecar already ran the call with that decision: waiting would only hang until the deadline.
      throw new AirlockError(Code.FailedPrecondition, `request ${requestId} was already decided and its decision used; make the call again with a new call id, or without x-airlock-request-id, to ask anew`, {
        details: { requestId, reason: "already_used" },
      });
    }
    return decision === undefined ? { request } : { request, decision };
  }

  private async conclude(body: DecisionBody, request: ApprovalRequest, resumed: boolean): Promise<ApprovedCall> {
    const requestId = request.id;
    const reviewers = body.votes.map((v) => v.reviewer).join(", ");
    switch (body.verdict) {
      case Verdict.APPROVED:
        break;
      case Verdict.DENIED:
        throw new AirlockError(Code.PermissionDenied, `request ${requestId} denied${reviewers === "" ? "" : ` by ${reviewers}`}: ${body.reason}`, {
          // details.reason is a stable code everywhere; the reviewer's words go beside it.
          details: { requestId, reason: "denied", reviewerReason: body.reason },
        });
      case Verdict.EXPIRED:
        throw new AirlockError(Code.DeadlineExceeded, `approval request ${requestId} expired undecided`, { details: { requestId } });
      default:
        throw new AirlockError(Code.Aborted, `approval request ${requestId} was cancelled: ${body.reason}`, { details: { requestId } });
    }
    const delivery = body.credential;
    if (delivery === undefined) throw new AirlockError(Code.PermissionDenied, "approved without a credential", { details: { requestId } });
    const decidedAt = body.decidedAt === undefined ? 0 : timestampDate(body.decidedAt).getTime();
    let secret: string;
    try {
      const unwrapped = await this.options.vault.unwrap(delivery.wrappingToken);
      secret = secretFor(delivery.kind, unwrapped.data, unwrapped.auth?.clientToken);
    } catch (error) {
      const failure = AirlockError.from(error);
      if (failure.code === Code.Unavailable) throw new AirlockError(Code.Unavailable, "Vault is unreachable: cannot unwrap the credential", { details: { requestId } });
      const wrapExpired = delivery.wrapExpiresAt !== undefined && timestampDate(delivery.wrapExpiresAt).getTime() < Date.now();
      if (wrapExpired) {
        throw new AirlockError(Code.DeadlineExceeded, `the credential for request ${requestId} expired before it was collected; make the call again with a new call id to ask anew`, {
          details: { requestId, reason: "credential_expired" },
        });
      }
      this.securityEvent("unwrap_failed", requestId, failure.rawMessage);
      if (resumed && decidedAt < this.startedAt + callIds.clockSkewMs) {
        // This run never took the credential (its replay guard would have refused the resume),
        // and the decision predates it: an earlier run of this sidecar did, and died before the
        // outcome was known.
        throw new AirlockError(
          Code.Aborted,
          `request ${requestId} was approved and its credential taken by an earlier run of this sidecar, which stopped before the outcome was known: the action may have run upstream; check there before calling again with a new call id`,
          { details: { requestId, reason: "outcome_unknown" } },
        );
      }
      throw new AirlockError(Code.PermissionDenied, `the credential for request ${requestId} could not be unwrapped (already used?): refused`, { details: { requestId } });
    }
    if (resumed && decidedAt < this.startedAt) {
      // Approved before this run began, and not taken by an earlier run (the unwrap worked): this
      // run's hello has ended the action and revoked its credential, which the upstream would
      // refuse. Nothing runs; the secret is dropped. Within the clock skew of the start the hello
      // may have come first (or the broker's clock be behind): handed back, so the broker ends
      // the action now if the hello did not. Earlier than that, a lost hello leaves it to the
      // heartbeat silence (a hand-back of an ended action would only be refused, flagged).
      if (decidedAt >= this.startedAt - callIds.clockSkewMs) this.handBackUnused(requestId, body.decisionId, Code.Aborted, notRunRestarted);
      throw new AirlockError(
        Code.Aborted,
        `request ${requestId} was approved before this sidecar restarted, and the restart ended the action and revoked its credential: it did not run; call again with a new call id (or without x-airlock-request-id) to ask anew`,
        { details: { requestId, reason: "ended_by_restart" } },
      );
    }
    const started = Date.now();
    let completed = false;
    this.running.set(requestId, body.decisionId);
    return {
      requestId,
      injectHeader: delivery.injectHeader,
      secret,
      complete: (status, message, touched = {}) => {
        if (completed) return;
        completed = true;
        this.finished.delete(requestId);
        this.finished.set(requestId, { status, message: message.slice(0, 200) });
        if (this.finished.size > callIds.rememberedRuns) this.finished.delete(this.finished.keys().next().value ?? "");
        const completion = create(CompletionSchema, {
          // The decision id is in the de-duplication id: no one can spend it before the decision exists.
          completionId: `${requestId}.${body.decisionId}.completion`,
          requestId,
          decisionId: body.decisionId,
          statusCode: status,
          statusMessage: message,
          duration: durationFromMs(Date.now() - started),
          host: this.options.host,
          finishedAt: timestampFromMs(Date.now()),
          touched,
        });
        this.publishCompletion(completion, "could not report completion; the broker ends the action at the heartbeat silence");
      },
    };
  }
}

/** The status message of a completion that hands back an approval whose agent had stopped waiting. */
export const notRunLate = "not run: the decision reached the sidecar after the agent was told the request expired";

/** The status message of a completion that hands back an approval made before its sidecar restarted (ABORTED `ended_by_restart`). */
export const notRunRestarted = "not run: approved before the sidecar restarted, whose hello ends such actions; the agent was told ended_by_restart";

/** A stored decision's id, read without verifying (only to refuse a resume). */
function decidedId(decision: Decision): string {
  try {
    return fromBinary(DecisionBodySchema, decision.body).decisionId;
  } catch {
    return "";
  }
}

/** What an agent's `x-airlock-call-id` may be: 1 to 128 characters of `[-_.:a-zA-Z0-9]`. */
const callIdPattern = /^[-_.:a-zA-Z0-9]{1,128}$/;

/** Bounds of call-id handling. */
export const callIds = {
  /** Calls of this run remembered as ran, so a retry of one is answered and never run again. */
  rememberedRuns: 10_000,
  /** How far the broker's clock may be off this host's, either way, when judging whether a decision predates this run, in ms. */
  clockSkewMs: 2000,
} as const;

/** The key call ids are derived with, from the sidecar's NATS seed: secret to this host, the same across its restarts. */
export function callIdKeyFromSeed(seed: string): Uint8Array {
  return createHmac("sha256", seed.trim()).update("airlock.call-id.key.v1").digest();
}

/**
 * The request id of an agent's call id (`x-airlock-call-id`): a UUID (version 8) from
 * HMAC-SHA256, under a key only this host's sidecar holds, over the host, the authenticated
 * agent, the human it acts for and the call id. The same call, retried on this host by the same
 * agent for the same human, names the same request, so a retry after a dropped connection or a
 * sidecar restart resumes it instead of asking anew. Without the key nobody can compute it: a
 * hostile host cannot take another host's request ids ahead of it. INVALID_ARGUMENT
 * (`invalid_call_id`) for a call id outside {@link callIdPattern}.
 */
export function callRequestId(key: Uint8Array, call: { readonly host: string; readonly agent: string; readonly onBehalfOf: string; readonly callId: string }): string {
  if (!callIdPattern.test(call.callId)) {
    throw new AirlockError(Code.InvalidArgument, "x-airlock-call-id must be 1 to 128 characters of letters, digits, '-', '_', '.' and ':'", {
      details: { field: "x-airlock-call-id", reason: "invalid_call_id" },
    });
  }
  const bytes = createHmac("sha256", key).update(["airlock.call-id.v1", call.host, call.agent, call.onBehalfOf, call.callId].join("\0")).digest().subarray(0, 16);
  bytes[6] = ((bytes[6] ?? 0) & 0x0f) | 0x80;
  bytes[8] = ((bytes[8] ?? 0) & 0x3f) | 0x80;
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** ALREADY_EXISTS `call_in_progress`: the request is waited for or run by another call on this sidecar. */
function callInProgress(requestId: string): AirlockError {
  return new AirlockError(Code.AlreadyExists, `request ${requestId} is being waited for or run on this sidecar; retry once that call has ended`, { details: { requestId, reason: "call_in_progress" } });
}

function header(metadata: HeldCall["metadata"], name: string): string | undefined {
  const value = metadata[name];
  return Array.isArray(value) ? value[0] : value;
}

/**
 * SHA-256 over the method path and each request message in canonical form
 * (decoded and re-encoded, so two encodings of the same request hash alike).
 */
export function requestHash(call: Pick<HeldCall, "method" | "messages">): Uint8Array {
  const hash = createHash("sha256").update(call.method.path).update("\n");
  const schema = call.method.method.input;
  for (const message of call.messages) {
    const canonical = toBinary(schema, fromBinary(schema, message.payload));
    const length = Buffer.alloc(4);
    length.writeUInt32BE(canonical.length);
    hash.update(length).update(canonical);
  }
  return hash.digest();
}

function redactAll(decoded: readonly JsonValue[], paths: readonly string[]): { redactedValues: JsonValue[]; removed: string[] } {
  const removed = new Set<string>();
  const redactedValues = decoded.map((value) => {
    if (value === null || typeof value !== "object" || Array.isArray(value)) return value;
    const result = redact(value, paths);
    for (const path of result.removed) removed.add(path);
    return result.redacted;
  });
  return { redactedValues, removed: [...removed] };
}

function secretFor(kind: string, data: Readonly<Record<string, unknown>>, clientToken: string | undefined): string {
  if (kind === "database") {
    if (typeof data.username !== "string" || typeof data.password !== "string") throw new AirlockError(Code.Internal, "the unwrapped database secret has no username/password");
    return JSON.stringify({ username: data.username, password: data.password });
  }
  const token = clientToken ?? (typeof data.token === "string" ? data.token : undefined);
  if (token === undefined) throw new AirlockError(Code.Internal, "the unwrapped secret holds no Vault token");
  return token;
}

