import { clone, create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import t from "tap";
import {
  type ApprovalConfig,
  approvalConfigDefaults,
  type ApprovalEvent,
  type Ballot,
  eligibleReviewers,
  intake,
  markCancelled,
  markCompleted,
  markExecuting,
  markFailed,
  mayApprove,
  nextTickAt,
  parseApprovalConfig,
  type RuleFailure,
  type RuleResult,
  type RuleSuccess,
  tick,
  vote,
} from "../../broker/rules.js";
import { ConfigReader } from "../../common/config.js";
import { AirlockError, Code } from "../../common/errors.js";
import { type ApprovalRequest, ApprovalRequestSchema, CompletionSchema, type RequestRecord, RequestRecordSchema, RequestState, ReviewerVoteSchema, Risk } from "../../proto/index.js";

// Monday 2024-06-03, 10:00 UTC (12:00 in Berlin, summer time).
const t0 = new Date("2024-06-03T10:00:00Z");
const minutes = (n: number): Date => new Date(t0.getTime() + n * 60_000);

const agent = "sql-agent@agents.example.com";
const human = "alice@example.com";
const planner = "planner@example.com";

const groups = {
  security: ["sam@example.com", "sue@example.com"],
  "data-owners": ["dan@example.com", "dora@example.com", "dave@example.com"],
  // The requesters are members too (spelt differently): they must still be refused.
  ops: ["olga@example.com", "oscar@example.com", " SQL-Agent@Agents.example.com", "Alice@Example.com", "PLANNER@example.com"],
  oncall: ["omar@example.com"],
  ghosts: ["casper@example.com"],
};

function config(overrides: Record<string, unknown> = {}): ApprovalConfig {
  return parseApprovalConfig(new ConfigReader({ groups, break_glass_role: [human, "lead@example.com"], ...overrides }, "approvals", "broker.yaml"));
}

interface RequestOptions {
  readonly allOf: readonly (readonly [string, number])[];
  readonly escalation?: { readonly group: string; readonly afterMinutes: number };
  readonly breakGlass?: boolean;
  readonly risk?: Risk;
  readonly deadlineMinutes?: number | null;
  readonly ruleId?: string;
  readonly id?: string;
  /** When the sidecar created it. @default t0 */
  readonly createdAt?: Date;
}

function request(options: RequestOptions): ApprovalRequest {
  return create(ApprovalRequestSchema, {
    id: options.id ?? "req-1",
    identity: { agent, onBehalfOf: human, chain: [human, planner, agent], authenticatedBy: "jwt" },
    host: "db-host-1",
    service: "demo.v1.OpsService",
    method: "ExportTable",
    risk: options.risk ?? Risk.HIGH,
    ruleId: options.ruleId ?? "export-customers",
    reviewers: {
      allOf: options.allOf.map(([group, minApprovals]) => ({ group, minApprovals })),
      escalationGroup: options.escalation?.group ?? "",
      ...(options.escalation === undefined ? {} : { escalateAfter: durationFromMs(options.escalation.afterMinutes * 60_000) }),
      breakGlassAllowed: options.breakGlass ?? false,
    },
    createdAt: timestampFromDate(options.createdAt ?? t0),
    ...(options.deadlineMinutes === null ? {} : { deadline: timestampFromDate(new Date((options.createdAt ?? t0).getTime() + (options.deadlineMinutes ?? 60) * 60_000)) }),
  });
}

function succeeded<S extends RuleSuccess>(result: S | RuleFailure): S {
  if (!result.ok) throw new Error(`expected success, got ${result.error.message}`);
  return result;
}

function refusal(result: RuleResult): AirlockError {
  if (result.ok) throw new Error(`expected a refusal, got state ${RequestState[result.record.state]}`);
  if (!(result.error instanceof AirlockError)) throw new Error("the error is not an AirlockError");
  return result.error;
}

function pending(req: ApprovalRequest, cfg: ApprovalConfig, now = t0): RequestRecord {
  const result = succeeded(intake(req, cfg, now));
  if (result.record.state !== RequestState.PENDING) throw new Error(`intake gave ${RequestState[result.record.state]}`);
  return result.record;
}

/** Casts ballots in order, each at `now`, expecting every one to be accepted. */
function castAll(record: RequestRecord, req: ApprovalRequest, cfg: ApprovalConfig, ballots: readonly Ballot[], now = minutes(1)): RuleSuccess {
  let result: RuleSuccess = { ok: true, record, events: [] };
  for (const ballot of ballots) result = succeeded(vote(result.record, req, cfg, ballot, now));
  return result;
}

const outstanding = (record: RequestRecord): Record<string, number> => Object.fromEntries(record.outstanding.map((g) => [g.group, g.minApprovals]));
const kinds = (events: readonly ApprovalEvent[]): string[] => events.map((event) => event.kind);
const approve = (reviewer: string, extra: Partial<Ballot> = {}): Ballot => ({ reviewer, approve: true, ...extra });
const deny = (reviewer: string, reason = "too broad"): Ballot => ({ reviewer, approve: false, reason });

await t.test("2 of M in one group: one approval leaves it pending, the second approves", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["data-owners", 2]] });
  const first = succeeded(intake(req, cfg, t0));
  t.equal(first.record.state, RequestState.PENDING);
  t.same(outstanding(first.record), { "data-owners": 2 });
  t.same(kinds(first.events), ["awaiting_review"]);
  t.same((first.events[0] as Extract<ApprovalEvent, { kind: "awaiting_review" }>).notify, ["dan@example.com", "dora@example.com", "dave@example.com"]);

  const before = clone(RequestRecordSchema, first.record);
  const one = succeeded(vote(first.record, req, cfg, approve("dan@example.com", { reason: "scoped export" }), minutes(1)));
  t.equal(one.record.state, RequestState.PENDING);
  t.equal(one.decided, undefined);
  t.same(outstanding(one.record), { "data-owners": 1 });
  t.same(kinds(one.events), ["voted"]);
  t.ok(first.record.votes.length === 0 && first.record.outstanding[0]?.minApprovals === 2, "the input record is not changed");
  t.same(first.record, before);

  const two = succeeded(vote(one.record, req, cfg, approve("dora@example.com"), minutes(2)));
  t.equal(two.record.state, RequestState.APPROVED);
  t.equal(two.decided, "approved");
  t.same(two.record.outstanding, []);
  t.same(
    two.record.votes.map((v) => [v.reviewer, v.group, v.approve]),
    [
      ["dan@example.com", "data-owners", true],
      ["dora@example.com", "data-owners", true],
    ],
  );
  const approved = two.events.find((event) => event.kind === "approved");
  t.match(approved, { kind: "approved", cause: "votes", by: ["dan@example.com", "dora@example.com"], requestId: "req-1" });
  t.equal(two.record.updatedAt?.seconds, BigInt(minutes(2).getTime() / 1000), "updatedAt is the vote's now");

  t.equal(refusal(vote(two.record, req, cfg, approve("dave@example.com"), minutes(3))).code, Code.FailedPrecondition, "no votes after the decision");
});

await t.test("1 from security AND 2 from data-owners", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["security", 1], ["data-owners", 2]] });
  const record = pending(req, cfg);
  const afterSecurity = castAll(record, req, cfg, [approve("sam@example.com")]);
  t.same(outstanding(afterSecurity.record), { "data-owners": 2 });

  const securityTwice = refusal(vote(afterSecurity.record, req, cfg, approve("sue@example.com"), minutes(2)));
  t.equal(securityTwice.code, Code.PermissionDenied, "security is met: another security approval counts for nothing");
  t.match(securityTwice.rawMessage, /need no more approvals/);

  const threeOfFour = castAll(afterSecurity.record, req, cfg, [approve("dan@example.com")]);
  t.equal(threeOfFour.record.state, RequestState.PENDING, "security alone plus one data owner is not enough");
  t.same(outstanding(threeOfFour.record), { "data-owners": 1 });

  const done = castAll(threeOfFour.record, req, cfg, [approve("dora@example.com")]);
  t.equal(done.record.state, RequestState.APPROVED);
  t.equal(done.decided, "approved");

  const dataOwnersOnly = castAll(record, req, cfg, [approve("dan@example.com"), approve("dora@example.com")]);
  t.equal(dataOwnersOnly.record.state, RequestState.PENDING, "data-owners alone is not enough either");
  t.same(outstanding(dataOwnersOnly.record), { security: 1 });
});

await t.test("a denial denies; a denial needs a reason", async (t) => {
  const cfg = config();
  t.equal(cfg.anyDenialDenies, true, "the default");
  const req = request({ allOf: [["security", 1], ["data-owners", 2]] });
  const record = castAll(pending(req, cfg), req, cfg, [approve("dan@example.com")]).record;

  const noReason = refusal(vote(record, req, cfg, { reviewer: "dora@example.com", approve: false, reason: "  " }, minutes(2)));
  t.equal(noReason.code, Code.InvalidArgument);
  t.equal(noReason.details.field, "reason");

  const denied = succeeded(vote(record, req, cfg, deny("dora@example.com", "exports PII"), minutes(2)));
  t.equal(denied.record.state, RequestState.DENIED);
  t.equal(denied.decided, "denied");
  t.match(denied.events.at(-1), { kind: "denied", cause: "denial", by: ["dora@example.com"], reason: "exports PII" });
  t.equal(refusal(vote(denied.record, req, cfg, approve("sam@example.com"), minutes(3))).code, Code.FailedPrecondition);
});

await t.test("any_denial_denies: false denies only when approval can no longer be reached", async (t) => {
  const cfg = config({ any_denial_denies: false });
  const req = request({ allOf: [["data-owners", 2]] });
  const oneNo = castAll(pending(req, cfg), req, cfg, [deny("dan@example.com")]);
  t.equal(oneNo.record.state, RequestState.PENDING, "dora and dave can still approve");
  t.equal(oneNo.decided, undefined);
  t.same(eligibleReviewers(oneNo.record, req, cfg, minutes(2)), ["dora@example.com", "dave@example.com"], "the denier is used up");

  const approvedAnyway = castAll(oneNo.record, req, cfg, [approve("dora@example.com"), approve("dave@example.com")]);
  t.equal(approvedAnyway.record.state, RequestState.APPROVED);

  const twoNo = succeeded(vote(oneNo.record, req, cfg, deny("dora@example.com", "not today"), minutes(2)));
  t.equal(twoNo.record.state, RequestState.DENIED, "only dave is left for two approvals");
  t.equal(twoNo.decided, "denied");
  const event = twoNo.events.at(-1);
  t.match(event, { kind: "denied", cause: "unreachable", by: ["dan@example.com", "dora@example.com"] });
  t.match(event?.kind === "denied" ? event.reason : "", /data-owners needs 2 more, 1 eligible left/);

  // While someone may still break glass, approval can still be reached.
  const glass = request({ allOf: [["data-owners", 2]], breakGlass: true });
  const stillOpen = castAll(pending(glass, cfg), glass, cfg, [deny("dan@example.com"), deny("dora@example.com")]);
  t.equal(stillOpen.record.state, RequestState.PENDING);

  // The escalation group counts too when it can vote before the deadline, but not after it.
  const withOncall = request({ allOf: [["data-owners", 2]], escalation: { group: "oncall", afterMinutes: 15 } });
  t.equal(castAll(pending(withOncall, cfg), withOncall, cfg, [deny("dan@example.com"), deny("dora@example.com")]).record.state, RequestState.PENDING, "dave and omar can still approve");
  const tooLate = request({ allOf: [["data-owners", 2]], escalation: { group: "oncall", afterMinutes: 90 } });
  t.equal(castAll(pending(tooLate, cfg), tooLate, cfg, [deny("dan@example.com"), deny("dora@example.com")]).record.state, RequestState.DENIED, "escalation after the deadline cannot help");
});

await t.test("self-approval is refused for the agent, the human and anyone in the chain", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["ops", 2]] });
  const record = pending(req, cfg);
  for (const reviewer of ["  SQL-AGENT@agents.example.com", "ALICE@example.com ", "Planner@Example.com"]) {
    const error = refusal(vote(record, req, cfg, approve(reviewer), minutes(1)));
    t.equal(error.code, Code.PermissionDenied, reviewer);
    t.match(error.rawMessage, /identity chain/);
  }
  t.equal(refusal(vote(record, req, cfg, deny(human), minutes(1))).code, Code.PermissionDenied, "a requester may not deny either");
  t.same(eligibleReviewers(record, req, cfg, minutes(1)), ["olga@example.com", "oscar@example.com"], "requesters are never eligible");
  t.equal(castAll(record, req, cfg, [approve("olga@example.com"), approve("oscar@example.com")]).record.state, RequestState.APPROVED);
});

await t.test("the same approver twice is already_exists, whatever the spelling", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["data-owners", 2]] });
  const once = castAll(pending(req, cfg), req, cfg, [approve("dan@example.com")]);
  for (const ballot of [approve("dan@example.com"), approve(" DAN@Example.com"), deny("dan@example.com")]) {
    t.equal(refusal(vote(once.record, req, cfg, ballot, minutes(2))).code, Code.AlreadyExists);
  }
  t.same(outstanding(once.record), { "data-owners": 1 });
});

await t.test("a member of both groups counts once, for the group that needs them most", async (t) => {
  const shared = { security: ["xena@example.com", "sam@example.com", "sue@example.com"], "data-owners": ["xena@example.com", "dan@example.com", "dora@example.com"] };
  const cfg = config({ groups: shared });
  const req = request({ allOf: [["security", 1], ["data-owners", 2]] });
  const record = pending(req, cfg);
  const xena = succeeded(vote(record, req, cfg, approve("xena@example.com"), minutes(1)));
  t.same(outstanding(xena.record), { security: 1, "data-owners": 1 }, "one slot filled, not two");
  t.equal(xena.record.votes[0]?.group, "data-owners", "the scarcer group: fewer other reviewers per approval still needed");
  t.equal(refusal(vote(xena.record, req, cfg, approve("xena@example.com"), minutes(2))).code, Code.AlreadyExists);

  const named = succeeded(vote(record, req, cfg, approve("xena@example.com", { group: "security" }), minutes(1)));
  t.same(outstanding(named.record), { "data-owners": 2 }, "a named group is honoured");

  // Counting xena for security would leave data-owners (2 needed) with only dan.
  const tight = config({ groups: { security: ["xena@example.com", "sam@example.com"], "data-owners": ["xena@example.com", "dan@example.com"] } });
  const tightRecord = pending(req, tight);
  const chosen = succeeded(vote(tightRecord, req, tight, approve("xena@example.com"), minutes(1)));
  t.equal(chosen.record.votes[0]?.group, "data-owners", "the choice keeps the requirement reachable");
  t.equal(castAll(chosen.record, req, tight, [approve("sam@example.com"), approve("dan@example.com")]).record.state, RequestState.APPROVED);
  const wrong = refusal(vote(tightRecord, req, tight, approve("xena@example.com", { group: "security" }), minutes(1)));
  t.equal(wrong.code, Code.FailedPrecondition);
  t.match(wrong.rawMessage, /unreachable; count for data-owners/);

  // Reachability before scarcity: "approvers" looks scarcer for xena, but sam and sue are
  // both needed by "auditors", so only counting xena for "security" keeps it reachable.
  const overlap = config({
    groups: { approvers: ["xena@example.com", "amy@example.com"], security: ["xena@example.com", "sam@example.com", "sue@example.com"], auditors: ["sam@example.com", "sue@example.com"] },
  });
  const hall = request({ allOf: [["approvers", 1], ["security", 1], ["auditors", 2]] });
  const hallRecord = pending(hall, overlap);
  const placed = succeeded(vote(hallRecord, hall, overlap, approve("xena@example.com"), minutes(1)));
  t.equal(placed.record.votes[0]?.group, "security");
  t.equal(castAll(placed.record, hall, overlap, [approve("amy@example.com"), approve("sam@example.com"), approve("sue@example.com")]).record.state, RequestState.APPROVED);

  // A record read back with a duplicated vote (a replay) still counts that person once.
  const replayed = clone(RequestRecordSchema, xena.record);
  replayed.votes.push(clone(ReviewerVoteSchema, xena.record.votes[0]!));
  const afterReplay = succeeded(vote(replayed, req, cfg, approve("sam@example.com"), minutes(2)));
  t.equal(afterReplay.record.state, RequestState.PENDING, "xena's duplicated approval does not fill data-owners");
  t.same(outstanding(afterReplay.record), { "data-owners": 1 });
});

await t.test("a non-member is refused; a group outside the requirement is invalid", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["security", 1]] });
  const record = pending(req, cfg);
  const stranger = refusal(vote(record, req, cfg, approve("mallory@example.com"), minutes(1)));
  t.equal(stranger.code, Code.PermissionDenied);
  t.match(stranger.rawMessage, /no reviewer group/);
  t.equal(refusal(vote(record, req, cfg, approve("dan@example.com"), minutes(1))).code, Code.PermissionDenied, "a member of a group the request does not need");
  const otherGroup = refusal(vote(record, req, cfg, approve("sam@example.com", { group: "data-owners" }), minutes(1)));
  t.equal(otherGroup.code, Code.InvalidArgument);
  t.equal(otherGroup.details.field, "group");
  t.equal(refusal(vote(record, req, cfg, approve("  "), minutes(1))).code, Code.InvalidArgument, "a blank reviewer");
});

await t.test("expiry: tick expires a pending request after its deadline; a vote after it is refused", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["security", 1]], deadlineMinutes: 30 });
  const record = pending(req, cfg);
  t.same(nextTickAt(record, req, cfg), new Date(minutes(30).getTime() + 1));

  const early = succeeded(tick(record, req, cfg, minutes(30)));
  t.equal(early.record, record, "at the deadline itself nothing changes (expired strictly after it)");
  t.same(early.events, []);

  const expired = succeeded(tick(record, req, cfg, minutes(31)));
  t.equal(expired.record.state, RequestState.EXPIRED);
  t.equal(expired.decided, "expired");
  t.match(expired.events, [{ kind: "expired", deadline: minutes(30) }]);
  t.equal(record.state, RequestState.PENDING, "the input record is not changed");

  const late = refusal(vote(record, req, cfg, approve("sam@example.com"), minutes(31)));
  t.equal(late.code, Code.FailedPrecondition);
  t.match(late.rawMessage, /expired/);
  t.same(eligibleReviewers(record, req, cfg, minutes(31)), []);
  t.equal(succeeded(vote(record, req, cfg, approve("sam@example.com"), minutes(29))).record.state, RequestState.APPROVED, "in time it counts");

  t.same(succeeded(tick(expired.record, req, cfg, minutes(90))).events, [], "a decided request does not change with time");

  // Without a deadline the configured default applies (1h by default).
  const open = request({ allOf: [["security", 1]], deadlineMinutes: null });
  const openRecord = pending(open, cfg);
  t.equal(succeeded(tick(openRecord, open, cfg, minutes(59))).events.length, 0);
  t.equal(succeeded(tick(openRecord, open, cfg, minutes(61))).record.state, RequestState.EXPIRED);
  const short = config({ default_expiry: "10m" });
  t.equal(succeeded(tick(pending(open, short), open, short, minutes(11))).record.state, RequestState.EXPIRED);

  const lateIntake = succeeded(intake(req, cfg, minutes(45)));
  t.equal(lateIntake.record.state, RequestState.EXPIRED, "a request taken in after its deadline expires at once");
  t.equal(lateIntake.decided, "expired");
});

await t.test("escalation: the escalation group may vote only from the escalation time, then counts for an outstanding group", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["security", 1]], escalation: { group: "oncall", afterMinutes: 15 } });
  const record = pending(req, cfg);
  t.same(nextTickAt(record, req, cfg), minutes(15));

  const tooEarly = refusal(vote(record, req, cfg, approve("omar@example.com"), minutes(10)));
  t.equal(tooEarly.code, Code.PermissionDenied);
  t.match(tooEarly.rawMessage, /escalation group oncall, which may vote from 2024-06-03T10:15:00.000Z/);
  t.same(eligibleReviewers(record, req, cfg, minutes(10)), ["sam@example.com", "sue@example.com"]);
  t.same(succeeded(tick(record, req, cfg, minutes(10))).events, []);

  const escalated = succeeded(tick(record, req, cfg, minutes(15)));
  t.equal(escalated.record.escalated, true);
  t.equal(escalated.record.state, RequestState.PENDING);
  t.match(escalated.events, [{ kind: "escalated", group: "oncall", notify: ["omar@example.com"] }]);
  t.same(succeeded(tick(escalated.record, req, cfg, minutes(16))).events, [], "escalates once");
  t.same(eligibleReviewers(escalated.record, req, cfg, minutes(16)), ["sam@example.com", "sue@example.com", "omar@example.com"]);

  const done = succeeded(vote(escalated.record, req, cfg, approve("omar@example.com"), minutes(16)));
  t.equal(done.record.state, RequestState.APPROVED, "the escalation approval completes the request");
  t.equal(done.record.votes[0]?.group, "security", "it counts for the outstanding group");

  // A vote after the escalation time records the escalation itself when no tick did yet.
  const implied = succeeded(vote(record, req, cfg, approve("omar@example.com"), minutes(20)));
  t.same(kinds(implied.events), ["escalated", "voted", "approved"]);
  t.equal(implied.record.escalated, true);

  // One slot each: with two approvals needed, the escalation approval alone is not enough.
  const two = request({ allOf: [["security", 2]], escalation: { group: "oncall", afterMinutes: 15 } });
  const partial = succeeded(vote(pending(two, cfg), two, cfg, approve("omar@example.com"), minutes(20)));
  t.equal(partial.record.state, RequestState.PENDING);
  t.same(outstanding(partial.record), { security: 1 });
});

await t.test("auto rules: approve low risk in business hours only, and an auto-deny rule", async (t) => {
  const cfg = config({
    auto_rules: [
      { id: "no-drops", effect: "deny", when: { rule_ids: ["drop-table"] }, reason: "tables are never dropped by agents" },
      {
        id: "low-risk-office-hours",
        effect: "approve",
        when: { max_risk: "low", hours: { from: "09:00", to: "17:00", timezone: "Europe/Berlin" }, weekdays_only: true },
        reason: "low-risk action during office hours",
      },
    ],
  });
  const low = request({ allOf: [["security", 1]], risk: Risk.LOW });

  const inHours = succeeded(intake(low, cfg, t0)); // 12:00 in Berlin, Monday
  t.equal(inHours.record.state, RequestState.APPROVED);
  t.equal(inHours.decided, "approved");
  t.equal(inHours.autoRule, "low-risk-office-hours");
  t.match(inHours.events, [{ kind: "approved", cause: "auto_rule", autoRule: "low-risk-office-hours", reason: "low-risk action during office hours" }]);

  const lowAt = (iso: string): [ApprovalRequest, Date] => [request({ allOf: [["security", 1]], risk: Risk.LOW, createdAt: new Date(iso) }), new Date(iso)];
  for (const [label, [req, now]] of [
    // 17:30 in Berlin: inside 09:00–17:00 in UTC, outside in the rule's time zone.
    ["after hours in the rule's time zone", lowAt("2024-06-03T15:30:00Z")],
    ["before hours", lowAt("2024-06-03T06:00:00Z")],
    ["on a Saturday", lowAt("2024-06-08T10:00:00Z")],
    ["medium risk", [request({ allOf: [["security", 1]], risk: Risk.MEDIUM }), t0]],
    ["unspecified risk", [request({ allOf: [["security", 1]], risk: Risk.UNSPECIFIED }), t0]],
  ] as const) {
    const result = succeeded(intake(req, cfg, now));
    t.equal(result.record.state, RequestState.PENDING, label);
    t.equal(result.autoRule, undefined, label);
  }
  const [lastMinute, lastMinuteNow] = lowAt("2024-06-03T14:59:00Z");
  t.equal(succeeded(intake(lastMinute, cfg, lastMinuteNow)).record.state, RequestState.APPROVED, "16:59 in Berlin is inside");

  const drop = succeeded(intake(request({ allOf: [["security", 1]], risk: Risk.LOW, ruleId: "drop-table" }), cfg, t0));
  t.equal(drop.record.state, RequestState.DENIED, "the first matching rule wins");
  t.equal(drop.decided, "denied");
  t.equal(drop.autoRule, "no-drops");
  t.match(drop.events, [{ kind: "denied", cause: "auto_rule", autoRule: "no-drops" }]);
});

await t.test("auto rules: agent lists (case-insensitive) and windows over midnight", async (t) => {
  const cfg = config({
    auto_rules: [
      { id: "quarantined-agent", effect: "deny", when: { agents: ["SQL-Agent@Agents.Example.com"] }, reason: "agent under investigation" },
      { id: "night-batch", effect: "approve", when: { hours: { from: "22:00", to: "06:00" } }, reason: "night batch window" },
    ],
  });
  const quarantined = succeeded(intake(request({ allOf: [["security", 1]] }), cfg, t0));
  t.equal(quarantined.autoRule, "quarantined-agent");
  t.equal(quarantined.record.state, RequestState.DENIED);

  const nightly = config({ auto_rules: [{ id: "night-batch", effect: "approve", when: { hours: { from: "22:00", to: "06:00" } }, reason: "night batch window" }] });
  for (const [iso, expected] of [
    ["2024-06-03T23:00:00Z", RequestState.APPROVED],
    ["2024-06-04T05:59:00Z", RequestState.APPROVED],
    ["2024-06-04T06:00:00Z", RequestState.PENDING],
    ["2024-06-03T12:00:00Z", RequestState.PENDING],
  ] as const) {
    const now = new Date(iso);
    t.equal(succeeded(intake(request({ allOf: [["security", 1]], createdAt: now }), nightly, now)).record.state, expected, iso);
  }
  const otherAgent = config({ auto_rules: [{ id: "quarantined-agent", effect: "deny", when: { agents: ["other-agent"] }, reason: "x" }] });
  t.equal(succeeded(intake(request({ allOf: [["security", 1]] }), otherAgent, t0)).record.state, RequestState.PENDING, "another agent's rule does not match");
});

await t.test("auto-approve never applies when only break-glass could approve; unreachable requests are denied at intake", async (t) => {
  const cfg = config({ auto_rules: [{ id: "low-risk", effect: "approve", when: { max_risk: "low" }, reason: "low risk" }] });
  // ops has 5 members, 3 of them requesters: 3 independent approvals are impossible.
  const onlyGlass = request({ allOf: [["ops", 3]], risk: Risk.LOW, breakGlass: true });
  const held = succeeded(intake(onlyGlass, cfg, t0));
  t.equal(held.record.state, RequestState.PENDING, "not auto-approved; break-glass remains possible");
  t.equal(held.autoRule, undefined);
  t.equal(succeeded(intake(request({ allOf: [["ops", 2]], risk: Risk.LOW }), cfg, t0)).record.state, RequestState.APPROVED, "the same rule applies when reviewers exist");

  const nobody = succeeded(intake(request({ allOf: [["security", 1], ["no-such-group", 1]] }), cfg, t0));
  t.equal(nobody.record.state, RequestState.DENIED);
  t.equal(nobody.decided, "denied");
  t.match(nobody.events, [{ kind: "denied", cause: "unreachable", reason: /no-such-group needs 1 more, 0 eligible left/ }]);

  const huge = succeeded(intake(request({ allOf: [["security", 4_000_000_000]] }), cfg, t0));
  t.equal(huge.record.state, RequestState.DENIED, "an absurd min_approvals is unreachable, decided at once");
});

await t.test("break-glass: only the role, only with a reason, only when the rule allows it; flagged and loud", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["security", 1], ["data-owners", 2]], breakGlass: true });
  const record = pending(req, cfg);

  const plainSelf = refusal(vote(record, req, cfg, approve(human), minutes(1)));
  t.equal(plainSelf.code, Code.PermissionDenied, "without break-glass the human is a requester like any other");
  t.match(plainSelf.rawMessage, /break-glass approval with a reason is allowed/);

  const noReason = refusal(vote(record, req, cfg, approve(human, { breakGlass: true, reason: " " }), minutes(1)));
  t.equal(noReason.code, Code.InvalidArgument);
  t.equal(noReason.details.field, "reason");

  const notInRole = refusal(vote(record, req, cfg, approve("sam@example.com", { breakGlass: true, reason: "outage" }), minutes(1)));
  t.equal(notInRole.code, Code.InvalidArgument);
  t.match(notInRole.rawMessage, /not in the break-glass role/);

  const ruleForbids = request({ allOf: [["security", 1], ["data-owners", 2]], breakGlass: false });
  const forbidden = refusal(vote(pending(ruleForbids, cfg), ruleForbids, cfg, approve(human, { breakGlass: true, reason: "outage" }), minutes(1)));
  t.equal(forbidden.code, Code.InvalidArgument);
  t.match(forbidden.rawMessage, /rule export-customers does not allow break-glass/);

  const asDenial = refusal(vote(record, req, cfg, { reviewer: human, approve: false, reason: "oops", breakGlass: true }, minutes(1)));
  t.equal(asDenial.code, Code.InvalidArgument);

  const broken = succeeded(vote(record, req, cfg, approve(" Alice@example.com", { breakGlass: true, reason: "prod outage, INC-42" }), minutes(1)));
  t.equal(broken.record.state, RequestState.APPROVED, "approved at once, alone");
  t.equal(broken.decided, "approved");
  t.match(broken.record.votes, [{ reviewer: "Alice@example.com", breakGlass: true, approve: true, reason: "prod outage, INC-42" }]);
  t.same(kinds(broken.events), ["voted", "break_glass", "approved"]);
  t.same(broken.events.find((event) => event.kind === "break_glass"), {
    requestId: "req-1",
    at: minutes(1),
    kind: "break_glass",
    flagged: true,
    reviewer: "Alice@example.com",
    reason: "prod outage, INC-42",
    notify: ["sam@example.com", "sue@example.com", "dan@example.com", "dora@example.com", "dave@example.com"],
  });
  t.match(broken.events.at(-1), { kind: "approved", cause: "break_glass", by: ["Alice@example.com"] });

  const byLead = succeeded(vote(record, req, cfg, approve("lead@example.com", { breakGlass: true, reason: "outage" }), minutes(1)));
  t.equal(byLead.record.state, RequestState.APPROVED, "a role member who is not a requester may break glass too");
});

await t.test("state transitions after the decision: valid and invalid", async (t) => {
  const cfg = config();
  const req = request({ allOf: [["security", 1]] });
  const record = pending(req, cfg);
  const approved = castAll(record, req, cfg, [approve("sam@example.com")]).record;

  const executing = succeeded(markExecuting(approved, minutes(2)));
  t.equal(executing.record.state, RequestState.EXECUTING);
  t.match(executing.events, [{ kind: "executing", requestId: "req-1" }]);
  t.equal(approved.state, RequestState.APPROVED, "the input record is not changed");

  const completion = create(CompletionSchema, { completionId: "c-1", requestId: "req-1", statusCode: 0 });
  const completed = succeeded(markCompleted(executing.record, completion, minutes(3)));
  t.equal(completed.record.state, RequestState.COMPLETED);
  t.equal(completed.record.completion?.completionId, "c-1");
  const foreign = refusal(markCompleted(executing.record, create(CompletionSchema, { requestId: "req-2" }), minutes(3)));
  t.equal(foreign.code, Code.InvalidArgument);

  const failed = succeeded(markFailed(executing.record, "no completion before the credential's TTL", minutes(10)));
  t.equal(failed.record.state, RequestState.FAILED);
  t.equal(succeeded(markFailed(approved, "vault refused to issue", minutes(2))).record.state, RequestState.FAILED, "issuance can fail before it runs");
  t.equal(refusal(markFailed(executing.record, " ", minutes(10))).code, Code.InvalidArgument);

  const cancelledPending = succeeded(markCancelled(record, "agent hung up", minutes(1)));
  t.equal(cancelledPending.record.state, RequestState.CANCELLED);
  t.equal(cancelledPending.decided, "cancelled", "cancelling a pending request decides it");
  const cancelledApproved = succeeded(markCancelled(approved, "agent hung up", minutes(2)));
  t.equal(cancelledApproved.record.state, RequestState.CANCELLED);
  t.equal(cancelledApproved.decided, undefined, "an approved request was already decided");

  const denied = succeeded(vote(record, req, cfg, deny("sam@example.com"), minutes(1))).record;
  const expired = succeeded(tick(record, req, cfg, minutes(61))).record;
  for (const [label, result] of [
    ["pending → executing", markExecuting(record, t0)],
    ["denied → executing", markExecuting(denied, t0)],
    ["expired → executing", markExecuting(expired, t0)],
    ["executing → executing", markExecuting(executing.record, t0)],
    ["approved → completed", markCompleted(approved, completion, t0)],
    ["completed → executing", markExecuting(completed.record, t0)],
    ["completed → failed", markFailed(completed.record, "late", t0)],
    ["denied → failed", markFailed(denied, "x", t0)],
    ["executing → cancelled", markCancelled(executing.record, "", t0)],
    ["denied → cancelled", markCancelled(denied, "", t0)],
  ] as const) {
    const error = refusal(result);
    t.equal(error.code, Code.FailedPrecondition, label);
  }
});

await t.test("config: defaults, and parse errors name the field", async (t) => {
  const minimal = parseApprovalConfig(new ConfigReader({ groups: { security: ["sam@example.com"] } }, "approvals", "broker.yaml"));
  t.equal(minimal.anyDenialDenies, true);
  t.equal(minimal.defaultExpiryMs, 3_600_000);
  t.same(minimal.breakGlassRole, []);
  t.same(minimal.autoRules, []);
  t.same(approvalConfigDefaults, { breakGlassRole: [], anyDenialDenies: true, defaultExpiryMs: 3_600_000, autoRules: [] });
  const full = config({
    default_expiry: "1h30m",
    auto_rules: [{ id: "r", effect: "deny", when: { agents: ["Bot@x"], weekdays_only: true, hours: { from: "22:00", to: "06:00" } }, reason: "night" }],
  });
  t.equal(full.defaultExpiryMs, 5_400_000);
  t.same(full.autoRules[0]?.when, { agents: ["Bot@x"], weekdaysOnly: true, hours: { from: "22:00", to: "06:00", timezone: "UTC" } });

  const rule = (when: Record<string, unknown>, extra: Record<string, unknown> = {}): Record<string, unknown> => ({ auto_rules: [{ id: "r1", effect: "approve", when, reason: "ok", ...extra }] });
  const cases: [string, Record<string, unknown>, string][] = [
    ["groups missing", { groups: undefined }, "approvals.groups"],
    ["groups empty", { groups: {} }, "approvals.groups"],
    ["a group without members", { groups: { security: [] } }, "approvals.groups.security"],
    ["a member listed twice", { groups: { security: ["sam@x", " SAM@x"] } }, "approvals.groups.security[1]"],
    ["break_glass_role not a list", { break_glass_role: "alice" }, "approvals.break_glass_role"],
    ["any_denial_denies not a boolean", { any_denial_denies: "yes" }, "approvals.any_denial_denies"],
    ["default_expiry not a duration", { default_expiry: "1 hour" }, "approvals.default_expiry"],
    ["default_expiry zero", { default_expiry: "0s" }, "approvals.default_expiry"],
    ["an unknown setting", { any_denial_denys: false }, "approvals.any_denial_denys"],
    ["an unknown effect", rule({ max_risk: "low" }, { effect: "allow" }), "approvals.auto_rules[0].effect"],
    ["an unknown risk", rule({ max_risk: "extreme" }), "approvals.auto_rules[0].when.max_risk"],
    ["a bad start time", rule({ hours: { from: "9am", to: "17:00" } }), "approvals.auto_rules[0].when.hours.from"],
    ["a bad end time", rule({ hours: { from: "09:00", to: "25:00" } }), "approvals.auto_rules[0].when.hours.to"],
    ["an empty window", rule({ hours: { from: "09:00", to: "09:00" } }), "approvals.auto_rules[0].when.hours.to"],
    ["a whole-day window", rule({ hours: { from: "00:00", to: "24:00" } }), "approvals.auto_rules[0].when.hours.to"],
    ["an agent listed twice", rule({ agents: ["bot", "BOT"] }), "approvals.auto_rules[0].when.agents[1]"],
    ["an unknown time zone", rule({ hours: { from: "09:00", to: "17:00", timezone: "Mars/Olympus_Mons" } }), "approvals.auto_rules[0].when.hours.timezone"],
    ["no condition", rule({}), "approvals.auto_rules[0].when"],
    ["only weekdays_only: false", rule({ weekdays_only: false }), "approvals.auto_rules[0].when"],
    ["an unknown condition", rule({ risk: "low" }), "approvals.auto_rules[0].when.risk"],
    ["an empty rule_ids", rule({ rule_ids: [] }), "approvals.auto_rules[0].when.rule_ids"],
    ["no when", rule({}, { when: undefined }), "approvals.auto_rules[0].when"],
    ["no reason", rule({ max_risk: "low" }, { reason: undefined }), "approvals.auto_rules[0].reason"],
    [
      "a repeated rule id",
      {
        auto_rules: [
          { id: "r1", effect: "deny", when: { max_risk: "low" }, reason: "a" },
          { id: "r1", effect: "deny", when: { max_risk: "high" }, reason: "b" },
        ],
      },
      "approvals.auto_rules[1].id",
    ],
  ];
  for (const [label, overrides, field] of cases) {
    const value = Object.fromEntries(Object.entries({ groups, ...overrides }).filter(([, v]) => v !== undefined));
    const thrown = t.throws(() => parseApprovalConfig(new ConfigReader(value, "approvals", "broker.yaml")), label) as unknown;
    t.ok(thrown instanceof AirlockError && thrown.code === Code.InvalidArgument, `${label}: invalid_argument`);
    t.equal((thrown as AirlockError).details.field, field, label);
    t.match((thrown as AirlockError).message, field, `${label}: the message names the field`);
  }
});

await t.test("malformed requests are refused at intake, naming the field", async (t) => {
  const cfg = config();
  const good = request({ allOf: [["security", 1]] });
  const cases: [string, (req: ApprovalRequest) => void, string][] = [
    ["no agent", (req) => void (req.identity = undefined), "identity.agent"],
    ["no groups", (req) => void (req.reviewers = undefined), "reviewers.all_of"],
    ["zero approvals", (req) => void (req.reviewers!.allOf[0]!.minApprovals = 0), "reviewers.all_of[0].min_approvals"],
    ["a group twice", (req) => void req.reviewers!.allOf.push(req.reviewers!.allOf[0]!), "reviewers.all_of[1].group"],
    ["no created_at", (req) => void (req.createdAt = undefined), "created_at"],
    ["a deadline before creation", (req) => void (req.deadline = timestampFromDate(minutes(-1))), "deadline"],
  ];
  for (const [label, spoil, field] of cases) {
    const req = clone(ApprovalRequestSchema, good);
    spoil(req);
    const error = refusal(intake(req, cfg, t0));
    t.equal(error.code, Code.InvalidArgument, label);
    t.equal(error.details.field, field, label);
  }
  const other = request({ allOf: [["security", 1]], id: "req-2" });
  t.equal(refusal(vote(pending(good, cfg), other, cfg, approve("sam@example.com"), minutes(1))).code, Code.InvalidArgument, "a record and a request that do not belong together");
});

await t.test("mayApprove (the listings' needs-me) agrees with vote for every reviewer, state and time", async (t) => {
  const cfg = config();
  const reviewers: { id: string; groups: string[] }[] = [
    ...Object.values(groups)
      .flat()
      .map((id) => ({ id, groups: [] })),
    { id: "lead@example.com", groups: [] },
    { id: "stranger@example.com", groups: [] },
    { id: "stranger@example.com", groups: ["data-owners"] },
    { id: "  ", groups: ["security"] },
  ];
  const requests = [
    request({ allOf: [["data-owners", 2]] }),
    request({ allOf: [["security", 1], ["data-owners", 2]] }),
    request({ allOf: [["security", 1]], escalation: { group: "oncall", afterMinutes: 15 } }),
    request({ allOf: [["ops", 2], ["security", 1]], breakGlass: true }),
  ];
  let compared = 0;
  let approvable = 0;
  for (const req of requests) {
    // The request as taken in, after each accepted approval in turn, and once decided.
    const records = [pending(req, cfg)];
    for (const reviewer of reviewers) {
      const last = records[records.length - 1];
      if (last === undefined || last.state !== RequestState.PENDING) break;
      const next = vote(last, req, cfg, approve(reviewer.id), minutes(1));
      if (next.ok) records.push(next.record);
    }
    const denied = vote(records[0] ?? pending(req, cfg), req, cfg, deny("sam@example.com"), minutes(1));
    if (denied.ok) records.push(denied.record);
    for (const record of records) {
      for (const at of [minutes(1), minutes(16), minutes(61)]) {
        for (const reviewer of reviewers) {
          const expected = vote(record, req, cfg, { reviewer: reviewer.id, approve: true, groups: reviewer.groups }, at).ok;
          const got = mayApprove(record, req, cfg, reviewer, at);
          if (got !== expected) t.fail(`${req.reviewers?.allOf.map((g) => g.group).join("+")}, ${RequestState[record.state]} with ${record.votes.length} votes, ${reviewer.id} at ${at.toISOString()}: mayApprove ${got}, vote ${expected}`);
          compared++;
          if (expected) approvable++;
        }
      }
    }
  }
  t.ok(compared > 500 && approvable > 50 && approvable < compared / 2, `compared ${compared} cases, ${approvable} approvable`);
});
