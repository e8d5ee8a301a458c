import { clone, create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { AirlockError, Code } from "../../common/errors.js";
import {
  type ApprovalRequest,
  ApprovalRequestSchema,
  GroupRequirementSchema,
  type RequestRecord,
  RequestRecordSchema,
  RequestState,
  ReviewerVoteSchema,
} from "../../proto/index.js";
import { firstMatchingAutoRule } from "./auto.js";
import type { ApprovalConfig } from "./config.js";
import { type MemberIndex, principalKey } from "./people.js";
import {
  allRequirementMembers,
  breakGlassAvailable,
  countingReviewers,
  describeShortfall,
  escalationInEffect,
  isMet,
  needsOf,
  outstandingOf,
  rankGroups,
  reachableByVotes,
  type RequestContext,
  requestContext,
  type Tally,
  tallyVotes,
} from "./requirement.js";
import { stateName } from "./transitions.js";
import type { ApprovalEvent, Ballot, EventBase, IntakeResult, Outcome, RuleFailure, RuleResult, RuleSuccess, StepUpReceipt } from "./types.js";

function refuse(code: Code, context: RequestContext, message: string, details: Record<string, unknown> = {}): RuleFailure {
  return { ok: false, error: new AirlockError(code, `request ${context.requestId}: ${message}`, { details: { requestId: context.requestId, ...details } }) };
}

function success(record: RequestRecord, events: readonly ApprovalEvent[], decided?: Outcome): RuleSuccess {
  return decided === undefined ? { ok: true, record, events } : { ok: true, record, events, decided };
}

/** A copy of the record to change, stamped with `now`. */
function revise(record: RequestRecord, now: Date): RequestRecord {
  const next = clone(RequestRecordSchema, record);
  next.updatedAt = timestampFromDate(now);
  return next;
}

/** The ballot's step-up receipt, for its `voted` event (and so the vote's audit event). */
function stepUpFact(ballot: Ballot): { stepUp?: StepUpReceipt } {
  return ballot.stepUp === undefined ? {} : { stepUp: ballot.stepUp };
}

function eventBase(context: RequestContext, now: Date): EventBase {
  return { requestId: context.requestId, at: now };
}

/** Members of the escalation group who may vote (not requesters, not voted yet). */
function escalationNotify(context: RequestContext, tally: Tally): string[] {
  return [...(context.escalation?.members ?? [])].filter(([key]) => !context.requesters.has(key) && !tally.voted.has(key)).map(([, name]) => name);
}

/** Marks the record escalated when the escalation time has come; returns the event, if any. */
function escalateIfDue(context: RequestContext, record: RequestRecord, tally: Tally, now: Date): ApprovalEvent | undefined {
  if (record.escalated || context.escalation === undefined || now.getTime() < context.escalation.atMs) return undefined;
  record.escalated = true;
  return { ...eventBase(context, now), kind: "escalated", group: context.escalation.group, notify: escalationNotify(context, tally) };
}

function expiredEvent(context: RequestContext, now: Date): ApprovalEvent {
  return { ...eventBase(context, now), kind: "expired", deadline: new Date(context.deadlineMs) };
}

/**
 * Takes a new request in and gives its first record.
 *
 * - A request already past its deadline is EXPIRED at once.
 * - Otherwise the auto rules are tried in order; the first that matches approves or
 *   denies it (`autoRule` in the result and the event). An **approve** rule never
 *   applies to a request that ordinary reviewers could not approve (some group has
 *   too few eligible reviewers outside the identity chain, so only break-glass could
 *   approve it): auto-approval stands in for independent reviewers who exist, never
 *   for an emergency override. Such a rule is skipped and later rules are tried.
 * - A request no one can approve at all (no reachable requirement, and no break-glass
 *   possible) is DENIED at once with cause `unreachable`, rather than holding the
 *   agent's call until it expires.
 * - Else it is PENDING with `outstanding` = the requirement, an `awaiting_review`
 *   event listing who to notify, and `escalated` set (with an `escalated` event) if
 *   the escalation time has already come.
 *
 * A malformed request (no id, no agent, no groups, a group listed twice, a zero
 * `min_approvals`, no `created_at`, a deadline not after `created_at`) is refused with
 * `invalid_argument` naming the field. Auto rules' time conditions are judged at `now`.
 */
export function intake(request: ApprovalRequest, config: ApprovalConfig, now: Date): IntakeResult {
  const context = requestContext(request, config);
  if (context instanceof AirlockError) return { ok: false, error: context };
  const record = create(RequestRecordSchema, {
    request: clone(ApprovalRequestSchema, request),
    state: RequestState.PENDING,
    outstanding: context.allOf.map((requirement) => create(GroupRequirementSchema, requirement)),
    updatedAt: timestampFromDate(now),
  });
  const base = eventBase(context, now);
  if (now.getTime() > context.deadlineMs) {
    record.state = RequestState.EXPIRED;
    return success(record, [expiredEvent(context, now)], "expired");
  }
  const tally = tallyVotes(context, []);
  const reachable = reachableByVotes(context, record, tally);
  const rule = firstMatchingAutoRule(config.autoRules, request, now, reachable);
  if (rule !== undefined) {
    const approved = rule.effect === "approve";
    record.state = approved ? RequestState.APPROVED : RequestState.DENIED;
    const event: ApprovalEvent = approved
      ? { ...base, kind: "approved", cause: "auto_rule", by: [], reason: rule.reason, autoRule: rule.id }
      : { ...base, kind: "denied", cause: "auto_rule", by: [], reason: rule.reason, autoRule: rule.id };
    return { ...success(record, [event], approved ? "approved" : "denied"), autoRule: rule.id };
  }
  if (!reachable && !breakGlassAvailable(context, tally)) {
    record.state = RequestState.DENIED;
    const reason = `no one can approve this request: ${describeShortfall(context, record, tally)}`;
    return success(record, [{ ...base, kind: "denied", cause: "unreachable", by: [], reason }], "denied");
  }
  const escalated = escalateIfDue(context, record, tally, now);
  const awaiting: ApprovalEvent = { ...base, kind: "awaiting_review", outstanding: needsOf(tally), notify: countingReviewers(context, record, tally, now.getTime()) };
  return success(record, escalated === undefined ? [awaiting] : [awaiting, escalated]);
}

/** The checks every vote passes before its kind matters. */
function checkPending(context: RequestContext, record: RequestRecord, now: Date): RuleFailure | undefined {
  if (record.state !== RequestState.PENDING) return refuse(Code.FailedPrecondition, context, `is ${stateName(record.state)}, not pending`, { state: stateName(record.state) });
  if (now.getTime() > context.deadlineMs) {
    return refuse(Code.FailedPrecondition, context, `expired at ${new Date(context.deadlineMs).toISOString()}`, { deadline: new Date(context.deadlineMs).toISOString() });
  }
  return undefined;
}

function breakGlassVote(context: RequestContext, record: RequestRecord, ballot: Ballot, reviewer: string, reason: string, now: Date, prior: readonly ApprovalEvent[]): RuleResult {
  const rule = context.request.ruleId === "" ? "the request's rule" : `rule ${context.request.ruleId}`;
  if (!ballot.approve) return refuse(Code.InvalidArgument, context, "break-glass is an approval; deny without it", { field: "breakGlass" });
  if (!context.breakGlassAllowed) return refuse(Code.InvalidArgument, context, `${rule} does not allow break-glass`, { field: "breakGlass", reviewer });
  if (!context.breakGlassRole.has(principalKey(reviewer))) return refuse(Code.InvalidArgument, context, `${reviewer} is not in the break-glass role`, { field: "breakGlass", reviewer });
  if (reason === "") return refuse(Code.InvalidArgument, context, "break-glass needs a reason", { field: "reason", reviewer });
  const next = revise(record, now);
  next.votes.push(create(ReviewerVoteSchema, { reviewer, group: "", approve: true, reason, at: timestampFromDate(now), breakGlass: true, stepUp: ballot.stepUp?.method ?? "" }));
  next.state = RequestState.APPROVED;
  const base = eventBase(context, now);
  return success(
    next,
    [
      ...prior,
      { ...base, kind: "voted", reviewer, approve: true, group: "", reason, breakGlass: true, ...stepUpFact(ballot) },
      { ...base, kind: "break_glass", flagged: true, reviewer, reason, notify: allRequirementMembers(context) },
      { ...base, kind: "approved", cause: "break_glass", by: [reviewer], reason },
    ],
    "approved",
  );
}

/** Where a reviewer stands on a request: the requirement groups they are in, and whether the escalation group lets them count. */
interface Standing {
  readonly memberOf: readonly string[];
  /** In the escalation group, whether or not its time has come. */
  readonly inEscalation: boolean;
  /** In the escalation group and its time has come: they may count for any open group. */
  readonly viaEscalation: boolean;
}

function standingOf(context: RequestContext, record: RequestRecord, key: string, assertedGroups: readonly string[] | undefined, now: Date): Standing {
  const asserted = new Set(assertedGroups ?? []);
  const inGroup = (group: string, members: MemberIndex | undefined): boolean => members?.has(key) === true || asserted.has(group);
  const memberOf = context.allOf.map(({ group }) => group).filter((group) => inGroup(group, context.members.get(group)));
  const inEscalation = context.escalation !== undefined && inGroup(context.escalation.group, context.escalation.members);
  return { memberOf, inEscalation, viaEscalation: escalationInEffect(context, record, now.getTime()) && inEscalation };
}

function isOpen(tally: Tally, group: string): boolean {
  return (tally.remaining.get(group) ?? 0) > 0;
}

/**
 * Whether {@link vote} would accept an approval from `reviewer` now (no break-glass, no
 * named group): the "needs me" answer of listings, asked of every row a reviewer sees. It
 * runs the same checks as the vote, through the same helpers, without copying the record
 * or building the vote's result.
 */
export function mayApprove(record: RequestRecord, request: ApprovalRequest, config: ApprovalConfig, reviewer: { readonly id: string; readonly groups: readonly string[] }, now: Date): boolean {
  if (record.state !== RequestState.PENDING) return false;
  const context = requestContext(request, config, record);
  if (context instanceof AirlockError || checkPending(context, record, now) !== undefined) return false;
  const key = principalKey(reviewer.id.trim());
  if (key === "" || context.requesters.has(key) || record.votes.some((existing) => principalKey(existing.reviewer) === key)) return false;
  const { memberOf, viaEscalation } = standingOf(context, record, key, reviewer.groups, now);
  const tally = tallyVotes(context, record.votes);
  return context.allOf.some(({ group }) => isOpen(tally, group) && (viaEscalation || memberOf.includes(group)));
}

/**
 * Applies one reviewer's vote to a PENDING request.
 *
 * Refusals, checked in this order (nothing changes on a refusal):
 * - `failed_precondition`: the request is not PENDING, or `now` is past its deadline;
 * - `invalid_argument`: a blank reviewer; a denial without a reason;
 * - `already_exists`: the reviewer already voted (either way): each person counts once;
 * - break-glass (`ballot.breakGlass`) is `invalid_argument` when it is a denial, when
 *   the request's rule does not allow it, when the reviewer is not in the break-glass
 *   role, or without a reason; otherwise it approves at once (see below);
 * - `permission_denied`: the reviewer is a requester (the agent, the human it acts
 *   for, anyone in the identity chain; trimmed, case-insensitive) and did not break
 *   glass; the reviewer is in no group of the requirement (an escalation-group member
 *   before the escalation time is told when it comes); an approval from someone whose
 *   groups need no more approvals;
 * - with `ballot.group`: `invalid_argument` when it is not a group of the requirement,
 *   `permission_denied` when the reviewer cannot count for it or (approving) it needs
 *   no more approvals, `failed_precondition` when counting there would leave the rest
 *   of the requirement unreachable while another of the reviewer's groups would not.
 *
 * Counting (N distinct approvers per group, AND across groups): an approval counts
 * for exactly one group, recorded on the vote. Without `ballot.group` it goes to the
 * group, among the reviewer's groups that still need approvals, after which the rest
 * stays reachable; among those, the scarcest (fewest other eligible reviewers per
 * approval still needed); then requirement order. Once escalated, members of the
 * escalation group can count for ANY group that still needs approvals, one slot like
 * everyone else (an escalation approval does not approve the whole request alone).
 * The request is APPROVED when every group is met.
 *
 * Denials: with `anyDenialDenies` the first denial DENIES. Without it, a denial uses
 * up that reviewer and the request is DENIED (cause `unreachable`) only when the
 * remaining eligible reviewers (the escalation group included if it can vote before
 * the deadline) can no longer meet the requirement and no break-glass is possible.
 * Any member of a requirement group (and, once escalated, of the escalation group)
 * may deny, even when their own group is already met.
 *
 * Break-glass: a break-glass-role member (a requester or not) approves alone; the
 * vote is marked `breakGlass` and counts for no group (`outstanding` keeps showing
 * what ordinary reviewers did not cover); the events include a flagged `break_glass`
 * event listing every member of every requirement group to notify.
 *
 * If the escalation time has come but no {@link tick} recorded it yet, the vote
 * records it first (and its result starts with the `escalated` event).
 */
export function vote(record: RequestRecord, request: ApprovalRequest, config: ApprovalConfig, ballot: Ballot, now: Date): RuleResult {
  const context = requestContext(request, config, record);
  if (context instanceof AirlockError) return { ok: false, error: context };
  const notPending = checkPending(context, record, now);
  if (notPending !== undefined) return notPending;
  const reviewer = ballot.reviewer.trim();
  const key = principalKey(reviewer);
  const reason = (ballot.reason ?? "").trim();
  if (reviewer === "") return refuse(Code.InvalidArgument, context, "a vote needs a reviewer", { field: "reviewer" });
  if (!ballot.approve && reason === "") return refuse(Code.InvalidArgument, context, "a denial needs a reason", { field: "reason", reviewer });
  if (record.votes.some((existing) => principalKey(existing.reviewer) === key)) {
    return refuse(Code.AlreadyExists, context, `${reviewer} already voted; each reviewer counts once`, { reviewer });
  }

  const working = clone(RequestRecordSchema, record);
  const tally = tallyVotes(context, working.votes);
  const escalated = escalateIfDue(context, working, tally, now);
  const prior: ApprovalEvent[] = escalated === undefined ? [] : [escalated];
  if (ballot.breakGlass === true) return breakGlassVote(context, working, ballot, reviewer, reason, now, prior);

  if (context.requesters.has(key)) {
    const hint = context.breakGlassAllowed && context.breakGlassRole.has(key) ? " (a break-glass approval with a reason is allowed)" : "";
    return refuse(Code.PermissionDenied, context, `${reviewer} is in the request's identity chain and may not vote on it${hint}`, { reviewer });
  }
  const { memberOf, inEscalation, viaEscalation } = standingOf(context, working, key, ballot.groups, now);
  if (memberOf.length === 0 && !viaEscalation) {
    if (context.escalation !== undefined && inEscalation) {
      const at = new Date(context.escalation.atMs).toISOString();
      return refuse(Code.PermissionDenied, context, `${reviewer} is in the escalation group ${context.escalation.group}, which may vote from ${at}`, { reviewer, escalatesAt: at });
    }
    return refuse(Code.PermissionDenied, context, `${reviewer} is in no reviewer group of this request`, { reviewer });
  }
  const canCountFor = (group: string): boolean => viaEscalation || memberOf.includes(group);
  const open = (group: string): boolean => isOpen(tally, group);

  let group: string;
  if (ballot.group !== undefined) {
    const named = ballot.group;
    if (!context.members.has(named)) {
      return refuse(Code.InvalidArgument, context, `${named} is not a group of this request's requirement (${context.allOf.map((r) => r.group).join(", ")})`, { field: "group", reviewer });
    }
    if (!canCountFor(named)) return refuse(Code.PermissionDenied, context, `${reviewer} cannot vote for group ${named}`, { reviewer, group: named });
    if (ballot.approve) {
      if (!open(named)) return refuse(Code.PermissionDenied, context, `group ${named} needs no more approvals`, { reviewer, group: named });
      const ranked = rankGroups(context, working, tally, key, context.allOf.map((r) => r.group).filter((g) => canCountFor(g) && open(g)));
      const best = ranked[0];
      if (ranked.find((option) => option.group === named)?.reachableAfter === false && best?.reachableAfter === true) {
        return refuse(Code.FailedPrecondition, context, `counting for ${named} would leave the requirement unreachable; count for ${best.group}`, { reviewer, group: named });
      }
    }
    group = named;
  } else if (ballot.approve) {
    const ranked = rankGroups(context, working, tally, key, context.allOf.map((r) => r.group).filter((g) => canCountFor(g) && open(g)));
    const best = ranked[0];
    if (best === undefined) return refuse(Code.PermissionDenied, context, `the groups ${reviewer} can approve for need no more approvals`, { reviewer });
    group = best.group;
  } else {
    group = memberOf[0] ?? context.escalation?.group ?? "";
  }

  const next = revise(working, now);
  next.votes.push(create(ReviewerVoteSchema, { reviewer, group, approve: ballot.approve, reason, at: timestampFromDate(now), breakGlass: false, stepUp: ballot.stepUp?.method ?? "" }));
  const after = tallyVotes(context, next.votes);
  next.outstanding = outstandingOf(after);
  const base = eventBase(context, now);
  const events: ApprovalEvent[] = [...prior, { ...base, kind: "voted", reviewer, approve: ballot.approve, group, reason, breakGlass: false, ...stepUpFact(ballot) }];

  if (ballot.approve) {
    if (!isMet(after)) return success(next, events);
    next.state = RequestState.APPROVED;
    const by = next.votes.filter((v) => v.approve && !v.breakGlass).map((v) => v.reviewer);
    events.push({ ...base, kind: "approved", cause: "votes", by, reason });
    return success(next, events, "approved");
  }
  if (config.anyDenialDenies) {
    next.state = RequestState.DENIED;
    events.push({ ...base, kind: "denied", cause: "denial", by: [reviewer], reason });
    return success(next, events, "denied");
  }
  if (reachableByVotes(context, next, after) || breakGlassAvailable(context, after)) return success(next, events);
  next.state = RequestState.DENIED;
  const by = next.votes.filter((v) => !v.approve).map((v) => v.reviewer);
  events.push({ ...base, kind: "denied", cause: "unreachable", by, reason: `approval can no longer be reached (${describeShortfall(context, next, after)}); ${reviewer}: ${reason}` });
  return success(next, events, "denied");
}

/**
 * Lets time pass over a request. A PENDING request past its deadline (its own, or
 * `created_at` + `defaultExpiryMs`) becomes EXPIRED with an `expired` event. A PENDING
 * request whose escalation time (`created_at` + `escalate_after`) has come, with an
 * escalation group set and not yet escalated, gets `escalated = true` and an
 * `escalated` event listing the escalation group's members to notify. A request
 * without `escalate_after` never escalates. Anything else: no events, and the input
 * record is returned as is.
 */
export function tick(record: RequestRecord, request: ApprovalRequest, config: ApprovalConfig, now: Date): RuleResult {
  const context = requestContext(request, config, record);
  if (context instanceof AirlockError) return { ok: false, error: context };
  if (record.state !== RequestState.PENDING) return success(record, []);
  if (now.getTime() > context.deadlineMs) {
    const next = revise(record, now);
    next.state = RequestState.EXPIRED;
    return success(next, [expiredEvent(context, now)], "expired");
  }
  const next = revise(record, now);
  const escalated = escalateIfDue(context, next, tallyVotes(context, record.votes), now);
  return escalated === undefined ? success(record, []) : success(next, [escalated]);
}

/**
 * Who may still cast a vote that counts, for notifications and the "needs me" inbox:
 * members of groups that still need approvals and, once the escalation time has come,
 * of the escalation group; never anyone in the identity chain, never someone who
 * already voted. Break-glass-role members are not listed (break-glass is not review).
 * Empty unless the request is PENDING and not past its deadline at `now`, and for a
 * malformed request. Names are spelt as in the configuration, de-duplicated.
 */
export function eligibleReviewers(record: RequestRecord, request: ApprovalRequest, config: ApprovalConfig, now: Date): string[] {
  const context = requestContext(request, config, record);
  if (context instanceof AirlockError || checkPending(context, record, now) !== undefined) return [];
  return countingReviewers(context, record, tallyVotes(context, record.votes), now.getTime());
}

/**
 * The earliest instant at which {@link tick} would change the record (escalation, or
 * expiry one millisecond after the deadline), for the broker's timers; undefined when
 * nothing is due (not PENDING, or a malformed request).
 */
export function nextTickAt(record: RequestRecord, request: ApprovalRequest, config: ApprovalConfig): Date | undefined {
  const context = requestContext(request, config, record);
  if (context instanceof AirlockError || record.state !== RequestState.PENDING) return undefined;
  const expiry = context.deadlineMs + 1;
  const escalation = context.escalation;
  return new Date(escalation !== undefined && !record.escalated && escalation.atMs < expiry ? escalation.atMs : expiry);
}
