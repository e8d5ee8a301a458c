import { clone } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { AirlockError, Code } from "../../common/errors.js";
import { type Completion, CompletionSchema, type RequestRecord, RequestRecordSchema, RequestState } from "../../proto/index.js";
import type { ApprovalEvent, EventBase, RuleResult } from "./types.js";

/**
 * The states each later state may be entered from:
 * pending → approved | denied | expired | cancelled; approved → executing | cancelled | failed;
 * executing → completed | failed. Denied, expired, cancelled, completed and failed are final.
 */
export const allowedTransitions: Readonly<Record<"executing" | "completed" | "failed" | "cancelled", readonly RequestState[]>> = {
  executing: [RequestState.APPROVED],
  completed: [RequestState.EXECUTING],
  failed: [RequestState.APPROVED, RequestState.EXECUTING],
  cancelled: [RequestState.PENDING, RequestState.APPROVED],
};

const finalStates: ReadonlySet<RequestState> = new Set([RequestState.COMPLETED, RequestState.FAILED, RequestState.EXPIRED, RequestState.DENIED, RequestState.CANCELLED]);

/** Whether a state is final: denied, expired, cancelled, completed or failed. */
export function isFinal(state: RequestState): boolean {
  return finalStates.has(state);
}

/** Whether nothing more is expected of a request: final, and no issued lease left unrevoked. */
export function isSettled(record: RequestRecord): boolean {
  return isFinal(record.state) && (record.lease === undefined || record.lease.leaseId === "" || record.lease.revokedAt !== undefined);
}

/** The lower-case name of a state, e.g. `pending`. */
export function stateName(state: RequestState): string {
  return (RequestState[state] as string | undefined)?.toLowerCase() ?? `state ${state}`;
}

type Step = { ok: true; next: RequestRecord; base: EventBase } | { ok: false; error: AirlockError };

function begin(record: RequestRecord, target: keyof typeof allowedTransitions, now: Date): Step {
  const requestId = record.request?.id ?? "";
  if (!allowedTransitions[target].includes(record.state)) {
    const error = new AirlockError(Code.FailedPrecondition, `request ${requestId}: cannot become ${target} from ${stateName(record.state)}`, {
      details: { requestId, state: stateName(record.state), target },
    });
    return { ok: false, error };
  }
  const next = clone(RequestRecordSchema, record);
  next.updatedAt = timestampFromDate(now);
  return { ok: true, next, base: { requestId, at: now } };
}

function finish(next: RequestRecord, state: RequestState, event: ApprovalEvent): RuleResult {
  next.state = state;
  return { ok: true, record: next, events: [event] };
}

/** APPROVED → EXECUTING: the credential was issued and the action started. */
export function markExecuting(record: RequestRecord, now: Date): RuleResult {
  const step = begin(record, "executing", now);
  if (!step.ok) return step;
  return finish(step.next, RequestState.EXECUTING, { ...step.base, kind: "executing" });
}

/**
 * EXECUTING → COMPLETED: the sidecar reported the action finished, whatever the
 * upstream call's status (the completion, status code included, is stored on the
 * record). A completion for another request is `invalid_argument`.
 */
export function markCompleted(record: RequestRecord, completion: Completion, now: Date): RuleResult {
  const requestId = record.request?.id ?? "";
  if (completion.requestId !== "" && requestId !== "" && completion.requestId !== requestId) {
    const error = new AirlockError(Code.InvalidArgument, `request ${requestId}: the completion is for request ${completion.requestId}`, { details: { requestId, field: "requestId" } });
    return { ok: false, error };
  }
  const step = begin(record, "completed", now);
  if (!step.ok) return step;
  step.next.completion = clone(CompletionSchema, completion);
  return finish(step.next, RequestState.COMPLETED, { ...step.base, kind: "completed", statusCode: completion.statusCode });
}

/**
 * APPROVED or EXECUTING → FAILED: the action could not run (e.g. the credential could
 * not be issued) or never reported back. A blank reason is `invalid_argument`.
 */
export function markFailed(record: RequestRecord, reason: string, now: Date): RuleResult {
  const requestId = record.request?.id ?? "";
  if (reason.trim() === "") return { ok: false, error: new AirlockError(Code.InvalidArgument, `request ${requestId}: a failure needs a reason`, { details: { requestId, field: "reason" } }) };
  const step = begin(record, "failed", now);
  if (!step.ok) return step;
  return finish(step.next, RequestState.FAILED, { ...step.base, kind: "failed", from: record.state, reason: reason.trim() });
}

/**
 * PENDING or APPROVED → CANCELLED: the held call went away (the agent cancelled, the
 * sidecar gave up). From PENDING this decides the request (`decided: "cancelled"`);
 * from APPROVED the broker must still revoke any credential.
 */
export function markCancelled(record: RequestRecord, reason: string, now: Date): RuleResult {
  const step = begin(record, "cancelled", now);
  if (!step.ok) return step;
  const result = finish(step.next, RequestState.CANCELLED, { ...step.base, kind: "cancelled", from: record.state, reason: reason.trim() });
  return record.state === RequestState.PENDING && result.ok ? { ...result, decided: "cancelled" } : result;
}
