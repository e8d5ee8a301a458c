/**
 * The broker's approval rules as a pure, deterministic state function: what a new
 * request, a reviewer's vote, or the passage of time does to a request's
 * `RequestRecord`. No I/O and no clock: time comes in as `now`, and every step
 * returns a new record (the input is never changed) plus the events that happened, or
 * an `AirlockError` and no change. The broker stores records in JetStream KV and
 * applies these steps with compare-and-set.
 *
 * ```ts
 * const config = parseApprovalConfig(root.object("approvals"));
 * const first = intake(request, config, now);           // PENDING, or decided by an auto rule
 * const next = vote(record, request, config, { reviewer: "sam@example.com", approve: true }, now);
 * const later = tick(record, request, config, now);     // expiry and escalation
 * ```
 *
 * Life of a request: pending → approved | denied | expired | cancelled;
 * approved → executing (→ completed | failed), or cancelled / failed before it runs.
 * @module
 */
export { eligibleReviewers, intake, mayApprove, nextTickAt, tick, vote } from "./rules/engine.js";
export { allowedTransitions, isFinal, isSettled, markCancelled, markCompleted, markExecuting, markFailed, stateName } from "./rules/transitions.js";
export {
  type ApprovalConfig,
  approvalConfigDefaults,
  type AutoRule,
  type AutoRuleConditions,
  parseApprovalConfig,
  type RiskLevel,
  riskLevels,
  type TimeWindow,
} from "./rules/config.js";
export { principalKey } from "./rules/people.js";
export type { ApprovalEvent, Ballot, EventBase, GroupNeed, IntakeResult, IntakeSuccess, Outcome, RuleFailure, RuleResult, RuleSuccess, StepUpReceipt } from "./rules/types.js";
