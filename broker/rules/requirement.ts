import { create } from "@bufbuild/protobuf";
import { durationMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { AirlockError, Code } from "../../common/errors.js";
import { type ApprovalRequest, type GroupRequirement, GroupRequirementSchema, type RequestRecord, type ReviewerVote } from "../../proto/index.js";
import type { ApprovalConfig } from "./config.js";
import { indexMembers, type MemberIndex, principalKey, requesterKeys } from "./people.js";
import type { GroupNeed } from "./types.js";

/** Everything the rules need to know about one request under one configuration, validated. */
export interface RequestContext {
  /** The request as given. */
  readonly request: ApprovalRequest;
  /** `request.id`. */
  readonly requestId: string;
  /** The broker configuration the rules run under. */
  readonly config: ApprovalConfig;
  /** The requirement, in the request's order. */
  readonly allOf: readonly { readonly group: string; readonly minApprovals: number }[];
  /** Members of each requirement group (unknown groups have none). */
  readonly members: ReadonlyMap<string, MemberIndex>;
  /** The escalation group, its members and when it may vote; undefined when the request has none. */
  readonly escalation: { readonly group: string; readonly members: MemberIndex; readonly atMs: number } | undefined;
  /** The agent, the human and the identity chain. */
  readonly requesters: ReadonlySet<string>;
  /** Whether the request's rule allows break-glass. */
  readonly breakGlassAllowed: boolean;
  /** The configured break-glass role, indexed. */
  readonly breakGlassRole: MemberIndex;
  /** `created_at` in epoch milliseconds. */
  readonly createdMs: number;
  /** The request's deadline, or `created_at` + `defaultExpiryMs`. Expired strictly after this instant. */
  readonly deadlineMs: number;
}

function invalid(requestId: string, field: string, message: string): AirlockError {
  return new AirlockError(Code.InvalidArgument, `request ${requestId === "" ? "(no id)" : requestId}: ${message}`, { details: { requestId, field } });
}

/** Validates a request and indexes what the rules need; an `invalid_argument` error names the bad field. */
export function requestContext(request: ApprovalRequest, config: ApprovalConfig, record?: RequestRecord): RequestContext | AirlockError {
  const requestId = request.id;
  if (requestId.trim() === "") return invalid(requestId, "id", "has no id");
  if (record?.request !== undefined && record.request.id !== requestId) {
    return invalid(requestId, "id", `the record is for request ${record.request.id}, not this one`);
  }
  if (request.identity === undefined || request.identity.agent.trim() === "") return invalid(requestId, "identity.agent", "has no agent identity, so self-approval cannot be ruled out");
  const reviewers = request.reviewers;
  if (reviewers === undefined || reviewers.allOf.length === 0) return invalid(requestId, "reviewers.all_of", "names no reviewer groups");
  const allOf: { group: string; minApprovals: number }[] = [];
  const members = new Map<string, MemberIndex>();
  for (const [index, requirement] of reviewers.allOf.entries()) {
    const field = `reviewers.all_of[${index}]`;
    if (requirement.group.trim() === "") return invalid(requestId, `${field}.group`, "has a requirement without a group");
    if (members.has(requirement.group)) return invalid(requestId, `${field}.group`, `lists group ${requirement.group} twice`);
    if (requirement.minApprovals < 1) return invalid(requestId, `${field}.min_approvals`, `needs at least one approval from ${requirement.group}`);
    allOf.push({ group: requirement.group, minApprovals: requirement.minApprovals });
    members.set(requirement.group, indexMembers(config.groups.get(requirement.group)));
  }
  if (request.createdAt === undefined) return invalid(requestId, "created_at", "has no created_at");
  const createdMs = timestampMs(request.createdAt);
  const deadlineMs = request.deadline === undefined ? createdMs + config.defaultExpiryMs : timestampMs(request.deadline);
  if (deadlineMs <= createdMs) return invalid(requestId, "deadline", "has a deadline that is not after created_at");
  let escalation: RequestContext["escalation"];
  if (reviewers.escalationGroup.trim() !== "" && reviewers.escalateAfter !== undefined) {
    const afterMs = durationMs(reviewers.escalateAfter);
    if (afterMs < 0) return invalid(requestId, "reviewers.escalate_after", "has a negative escalate_after");
    escalation = { group: reviewers.escalationGroup, members: indexMembers(config.groups.get(reviewers.escalationGroup)), atMs: createdMs + afterMs };
  }
  return {
    request,
    requestId,
    config,
    allOf,
    members,
    escalation,
    requesters: requesterKeys(request),
    breakGlassAllowed: reviewers.breakGlassAllowed,
    breakGlassRole: indexMembers(config.breakGlassRole),
    createdMs,
    deadlineMs,
  };
}

/** Where the votes stand. */
export interface Tally {
  /** Approvals each requirement group still needs (0 when met), in requirement order. */
  readonly remaining: ReadonlyMap<string, number>;
  /** Keys of everyone who voted, either way. */
  readonly voted: ReadonlySet<string>;
}

/**
 * Counts the votes: an approval counts for the group recorded on it (set when it was
 * cast); break-glass votes count for no group. Derived from the votes alone, so a
 * record's `outstanding` can always be recomputed.
 */
export function tallyVotes(context: RequestContext, votes: readonly ReviewerVote[]): Tally {
  const approvers = new Map<string, Set<string>>();
  const voted = new Set<string>();
  for (const vote of votes) {
    const key = principalKey(vote.reviewer);
    voted.add(key);
    if (!vote.approve || vote.breakGlass) continue;
    let set = approvers.get(vote.group);
    if (set === undefined) approvers.set(vote.group, (set = new Set()));
    set.add(key);
  }
  const remaining = new Map<string, number>();
  for (const { group, minApprovals } of context.allOf) remaining.set(group, Math.max(0, minApprovals - (approvers.get(group)?.size ?? 0)));
  return { remaining, voted };
}

/** The groups that still need approvals, as `RequestRecord.outstanding`. */
export function outstandingOf(tally: Tally): GroupRequirement[] {
  return [...tally.remaining].filter(([, n]) => n > 0).map(([group, n]) => create(GroupRequirementSchema, { group, minApprovals: n }));
}

/** The groups that still need approvals, as event data. */
export function needsOf(tally: Tally): GroupNeed[] {
  return [...tally.remaining].filter(([, n]) => n > 0).map(([group, remaining]) => ({ group, remaining }));
}

/** Whether every group's requirement is met. */
export function isMet(tally: Tally): boolean {
  return [...tally.remaining.values()].every((n) => n === 0);
}

/** Whether the escalation group may vote at `nowMs`. */
export function escalationInEffect(context: RequestContext, record: RequestRecord, nowMs: number): boolean {
  return context.escalation !== undefined && (record.escalated || nowMs >= context.escalation.atMs);
}

/** Whether the escalation group can vote before the request expires (already, or later). */
function escalationPossible(context: RequestContext, record: RequestRecord): boolean {
  return context.escalation !== undefined && (record.escalated || context.escalation.atMs <= context.deadlineMs);
}

/**
 * Who could still fill which outstanding groups: reviewer key → groups. Excludes the
 * requesters, everyone who voted, and `exclude`.
 */
function fillers(context: RequestContext, tally: Tally, withEscalation: boolean, exclude?: string): Map<string, Set<string>> {
  const result = new Map<string, Set<string>>();
  const open = [...tally.remaining].filter(([, n]) => n > 0).map(([group]) => group);
  const add = (key: string, groups: readonly string[]): void => {
    if (context.requesters.has(key) || tally.voted.has(key) || key === exclude) return;
    let set = result.get(key);
    if (set === undefined) result.set(key, (set = new Set()));
    for (const group of groups) set.add(group);
  };
  for (const group of open) for (const key of context.members.get(group)?.keys() ?? []) add(key, [group]);
  if (withEscalation && context.escalation !== undefined) for (const key of context.escalation.members.keys()) add(key, open);
  return result;
}

/**
 * Whether distinct reviewers can fill every remaining slot: a bipartite matching of
 * reviewers to slots (Kuhn's augmenting paths; sizes are small).
 */
function canFill(remaining: ReadonlyMap<string, number>, candidates: readonly ReadonlySet<string>[]): boolean {
  // Checked before building the slots: min_approvals is a uint32 from the wire.
  if ([...remaining.values()].reduce((sum, n) => sum + n, 0) > candidates.length) return false;
  const slots: string[] = [];
  for (const [group, n] of remaining) for (let i = 0; i < n; i += 1) slots.push(group);
  const slotOf: number[] = candidates.map(() => -1);
  const augment = (slot: number, visited: boolean[]): boolean => {
    const group = slots[slot] ?? "";
    for (const [candidate, groups] of candidates.entries()) {
      if (visited[candidate] === true || !groups.has(group)) continue;
      visited[candidate] = true;
      const held = slotOf[candidate] ?? -1;
      if (held === -1 || augment(held, visited)) {
        slotOf[candidate] = slot;
        return true;
      }
    }
    return false;
  };
  return slots.every((_, slot) => augment(slot, candidates.map(() => false)));
}

/**
 * Whether the remaining requirement can still be met by ordinary votes: by distinct
 * reviewers who have not voted, are not requesters, and belong to a group that still
 * needs approvals (or to the escalation group, if it can vote before the deadline).
 */
export function reachableByVotes(context: RequestContext, record: RequestRecord, tally: Tally): boolean {
  return canFill(tally.remaining, [...fillers(context, tally, escalationPossible(context, record)).values()]);
}

/** Whether someone may still break glass on this request: the rule allows it and a role member has not voted. */
export function breakGlassAvailable(context: RequestContext, tally: Tally): boolean {
  return context.breakGlassAllowed && [...context.breakGlassRole.keys()].some((key) => !tally.voted.has(key));
}

/** One group an approval could count for, and how good a choice it is. */
export interface GroupOption {
  /** The requirement group. */
  readonly group: string;
  /** Whether the rest of the requirement can still be met if the approval counts here. */
  readonly reachableAfter: boolean;
  /** Other eligible reviewers for the group minus the approvals it would still need: lower is scarcer. */
  readonly slack: number;
}

/**
 * Ranks the groups an approval by `reviewerKey` could count for: first those after
 * which the requirement stays reachable, then the scarcest group (fewest other
 * eligible reviewers per approval still needed), then requirement order.
 */
export function rankGroups(context: RequestContext, record: RequestRecord, tally: Tally, reviewerKey: string, groups: readonly string[]): GroupOption[] {
  const withEscalation = escalationPossible(context, record);
  const others = fillers(context, tally, withEscalation, reviewerKey);
  const options = groups.map((group): GroupOption => {
    const remaining = new Map(tally.remaining);
    const need = (remaining.get(group) ?? 0) - 1;
    remaining.set(group, Math.max(0, need));
    const eligible = [...others.values()].filter((set) => set.has(group)).length;
    return { group, reachableAfter: canFill(remaining, [...others.values()]), slack: eligible - need };
  });
  const order = (group: string): number => context.allOf.findIndex((requirement) => requirement.group === group);
  return options.sort((a, b) => Number(b.reachableAfter) - Number(a.reachableAfter) || a.slack - b.slack || order(a.group) - order(b.group));
}

/** Display names of every member of every requirement group, de-duplicated, in requirement then configuration order. */
export function allRequirementMembers(context: RequestContext): string[] {
  const names = new Map<string, string>();
  for (const { group } of context.allOf) for (const [key, name] of context.members.get(group) ?? []) if (!names.has(key)) names.set(key, name);
  return [...names.values()];
}

/**
 * Says why the requirement cannot be met, group by group: how many approvals each
 * open group needs and how many eligible reviewers it has left.
 */
export function describeShortfall(context: RequestContext, record: RequestRecord, tally: Tally): string {
  const candidates = [...fillers(context, tally, escalationPossible(context, record)).values()];
  return [...tally.remaining]
    .filter(([, n]) => n > 0)
    .map(([group, n]) => `${group} needs ${n} more, ${candidates.filter((set) => set.has(group)).length} eligible left`)
    .join("; ");
}

/**
 * Display names of reviewers whose approval would count now: members of groups that
 * still need approvals, and the escalation group once it may vote; never a requester,
 * never someone who voted.
 */
export function countingReviewers(context: RequestContext, record: RequestRecord, tally: Tally, nowMs: number): string[] {
  const names = new Map<string, string>();
  const add = (index: MemberIndex | undefined): void => {
    for (const [key, name] of index ?? []) if (!context.requesters.has(key) && !tally.voted.has(key) && !names.has(key)) names.set(key, name);
  };
  for (const [group, n] of tally.remaining) if (n > 0) add(context.members.get(group));
  if (!isMet(tally) && escalationInEffect(context, record, nowMs)) add(context.escalation?.members);
  return [...names.values()];
}
