import type { ConfigReader } from "../../common/config.js";
import { principalKey } from "./people.js";
import { parseDuration } from "../../common/duration.js";

/** A risk level an auto rule can cap, lowest first. Matches the proto `Risk` enum's order. */
export type RiskLevel = "low" | "medium" | "high" | "critical";

/** Every {@link RiskLevel}, lowest first. */
export const riskLevels: readonly RiskLevel[] = ["low", "medium", "high", "critical"];

/**
 * A daily time window, `from` inclusive and `to` exclusive, read on the wall clock of
 * `timezone`. A window whose `to` is earlier than its `from` runs over midnight
 * (`22:00`–`06:00`).
 */
export interface TimeWindow {
  /** Start of the window, `HH:MM` (24-hour clock), inclusive. */
  readonly from: string;
  /** End of the window, `HH:MM` (24-hour clock, `24:00` allowed), exclusive. */
  readonly to: string;
  /** IANA time zone name, e.g. `Europe/Berlin`. @default UTC */
  readonly timezone: string;
}

/** The conditions of an {@link AutoRule}; all the given ones must hold (AND). At least one is given. */
export interface AutoRuleConditions {
  /**
   * The highest risk the rule applies to. A request whose risk is unspecified never
   * matches a `maxRisk` condition.
   */
  readonly maxRisk?: RiskLevel;
  /** The daily window the request must arrive in (judged at intake, on the broker's `now`). */
  readonly hours?: TimeWindow;
  /**
   * Only Monday to Friday, judged in `hours.timezone` when `hours` is set, else in UTC.
   * `false` is the same as leaving it out.
   */
  readonly weekdaysOnly?: boolean;
  /** Only requests held by one of these policy rules (`ApprovalRequest.rule_id`, exact). */
  readonly ruleIds?: readonly string[];
  /** Only requests from one of these agents (`identity.agent`, trimmed and case-insensitive). */
  readonly agents?: readonly string[];
}

/**
 * A rule that decides a request at intake without reviewers. Rules are evaluated in
 * order and the first that matches wins.
 */
export interface AutoRule {
  /** Unique name of the rule; recorded in the result and events as `autoRule`. */
  readonly id: string;
  /** What a match does to the request. */
  readonly effect: "approve" | "deny";
  /** When the rule matches. */
  readonly when: AutoRuleConditions;
  /** Why; becomes the decision's reason. */
  readonly reason: string;
}

/** The broker's approval configuration: who reviews, who may break glass, and the auto rules. */
export interface ApprovalConfig {
  /** Reviewer groups: group name → member reviewer ids (e.g. emails). Compared trimmed and case-insensitively. */
  readonly groups: ReadonlyMap<string, readonly string[]>;
  /**
   * Reviewers who may break glass: approve alone, their own request included, with a
   * mandatory reason, when the request's rule allows it.
   * @default []
   */
  readonly breakGlassRole: readonly string[];
  /**
   * Whether a single denial denies the request. When false, a denial is a "no" that
   * uses up the reviewer, and the request is denied only once approval can no longer
   * be reached.
   * @default true
   */
  readonly anyDenialDenies: boolean;
  /**
   * How long a request without a deadline stays pending, counted from its `created_at`.
   * @default 3_600_000 (1h)
   */
  readonly defaultExpiryMs: number;
  /**
   * Ordered auto-approve / auto-deny rules, evaluated at intake; first match wins.
   * @default []
   */
  readonly autoRules: readonly AutoRule[];
}

/** Defaults of {@link ApprovalConfig}. */
export const approvalConfigDefaults = {
  /** @default [] */
  breakGlassRole: [] as readonly string[],
  /** @default true */
  anyDenialDenies: true,
  /** @default 3_600_000 (1h) */
  defaultExpiryMs: 3_600_000,
  /** @default [] */
  autoRules: [] as readonly AutoRule[],
} as const;

/** Minutes after midnight of `HH:MM`, or undefined. `24:00` only when `allowEndOfDay`. */
export function clockMinutes(text: string, allowEndOfDay: boolean): number | undefined {
  const match = /^(\d{2}):(\d{2})$/.exec(text);
  if (match === null) return undefined;
  const hours = Number(match[1]);
  const minutes = Number(match[2]);
  if (minutes > 59) return undefined;
  if (hours === 24 && minutes === 0 && allowEndOfDay) return 24 * 60;
  if (hours > 23) return undefined;
  return hours * 60 + minutes;
}

function isTimeZone(name: string): boolean {
  try {
    new Intl.DateTimeFormat("en-US", { timeZone: name });
    return true;
  } catch {
    return false;
  }
}

function fieldOf(reader: ConfigReader, key: string): string {
  return reader.path === "" ? key : `${reader.path}.${key}`;
}

/** A list of non-empty strings, or undefined when absent (a null value counts as absent and is marked read). */
function optionalStrings(reader: ConfigReader, key: string): string[] | undefined {
  return reader.has(key) ? reader.strings(key) : (reader.optionalString(key), undefined);
}

/** Trims every id and fails naming `field[i]` on a blank or repeated (case-insensitively) id. */
function distinctIds(reader: ConfigReader, key: string, ids: readonly string[], what: string): string[] {
  const seen = new Set<string>();
  return ids.map((id, index) => {
    const trimmed = id.trim();
    if (trimmed === "") throw reader.fail(`${fieldOf(reader, key)}[${index}]`, "must not be blank");
    const normalized = principalKey(trimmed);
    if (seen.has(normalized)) throw reader.fail(`${fieldOf(reader, key)}[${index}]`, `repeats the ${what} ${JSON.stringify(trimmed)}`);
    seen.add(normalized);
    return trimmed;
  });
}

function readWindow(when: ConfigReader): TimeWindow | undefined {
  const hours = when.optionalObject("hours");
  if (hours === undefined) return undefined;
  const from = hours.string("from");
  if (clockMinutes(from, false) === undefined) throw hours.fail(fieldOf(hours, "from"), "must be a time of day HH:MM from 00:00 to 23:59");
  const to = hours.string("to");
  if (clockMinutes(to, true) === undefined) throw hours.fail(fieldOf(hours, "to"), "must be a time of day HH:MM from 00:00 to 24:00");
  if (clockMinutes(from, false) === clockMinutes(to, true) || (from === "00:00" && to === "24:00")) {
    // 00:00–24:00 is every minute of the day: a window that limits nothing is a mistake.
    throw hours.fail(fieldOf(hours, "to"), "must differ from `from` (the window must not be empty or the whole day)");
  }
  const timezone = hours.optionalString("timezone") ?? "UTC";
  if (!isTimeZone(timezone)) throw hours.fail(fieldOf(hours, "timezone"), `${JSON.stringify(timezone)} is not a known IANA time zone`);
  hours.done();
  return { from, to, timezone };
}

function readConditions(entry: ConfigReader): AutoRuleConditions {
  if (!entry.has("when")) throw entry.fail(fieldOf(entry, "when"), "is required (an auto rule needs at least one condition)");
  const when = entry.object("when");
  const maxRiskText = when.optionalString("max_risk");
  if (maxRiskText !== undefined && !(riskLevels as readonly string[]).includes(maxRiskText)) {
    throw when.fail(fieldOf(when, "max_risk"), `must be one of ${riskLevels.join(", ")}`);
  }
  const hours = readWindow(when);
  const weekdaysOnly = when.has("weekdays_only") ? when.boolean("weekdays_only", false) : (when.optionalString("weekdays_only"), undefined);
  const ruleIds = optionalStrings(when, "rule_ids");
  if (ruleIds !== undefined && ruleIds.length === 0) throw when.fail(fieldOf(when, "rule_ids"), "must list at least one rule id");
  const agentList = optionalStrings(when, "agents");
  if (agentList !== undefined && agentList.length === 0) throw when.fail(fieldOf(when, "agents"), "must list at least one agent");
  const agents = agentList === undefined ? undefined : distinctIds(when, "agents", agentList, "agent");
  when.done();
  const conditions: AutoRuleConditions = {
    ...(maxRiskText === undefined ? {} : { maxRisk: maxRiskText as RiskLevel }),
    ...(hours === undefined ? {} : { hours }),
    ...(weekdaysOnly === undefined ? {} : { weekdaysOnly }),
    ...(ruleIds === undefined ? {} : { ruleIds }),
    ...(agents === undefined ? {} : { agents }),
  };
  if (conditions.maxRisk === undefined && hours === undefined && weekdaysOnly !== true && ruleIds === undefined && agents === undefined) {
    throw when.fail(when.path, "needs at least one condition (max_risk, hours, weekdays_only, rule_ids or agents)");
  }
  return conditions;
}

function readAutoRule(entry: ConfigReader): AutoRule {
  const rule: AutoRule = {
    id: entry.string("id"),
    effect: entry.oneOf("effect", ["approve", "deny"] as const),
    when: readConditions(entry),
    reason: entry.string("reason"),
  };
  entry.done();
  return rule;
}

/**
 * Validates the broker's approval configuration, one mapping level that this function
 * owns entirely (unknown keys are refused). Every error is an `invalid_argument`
 * AirlockError naming the exact field (`approvals.auto_rules[1].when.hours.from`).
 *
 * ```yaml
 * groups:
 *   security: [sam@example.com, sue@example.com]
 *   data-owners: [dan@example.com, dora@example.com, dave@example.com]
 * break_glass_role: [oncall-lead@example.com]   # default []
 * any_denial_denies: true                        # default true
 * default_expiry: 1h                             # default 1h; units h, m, s, ms
 * auto_rules:                                    # default []; first match wins
 *   - id: low-risk-office-hours
 *     effect: approve
 *     when: { max_risk: low, hours: { from: "09:00", to: "17:00", timezone: Europe/Berlin }, weekdays_only: true }
 *     reason: low-risk action during office hours
 * ```
 */
export function parseApprovalConfig(reader: ConfigReader): ApprovalConfig {
  if (!reader.has("groups")) throw reader.fail(fieldOf(reader, "groups"), "is required");
  const groupsReader = reader.object("groups");
  const groups = new Map<string, readonly string[]>();
  for (const name of groupsReader.keys()) {
    if (name.trim() === "") throw groupsReader.fail(fieldOf(groupsReader, name), "group names must not be blank");
    const members = groupsReader.strings(name);
    if (members.length === 0) throw groupsReader.fail(fieldOf(groupsReader, name), "must list at least one member");
    groups.set(name, distinctIds(groupsReader, name, members, "member"));
  }
  groupsReader.done();
  if (groups.size === 0) throw reader.fail(fieldOf(reader, "groups"), "must define at least one group");

  const breakGlassRole = distinctIds(reader, "break_glass_role", reader.strings("break_glass_role", approvalConfigDefaults.breakGlassRole), "reviewer");
  const anyDenialDenies = reader.boolean("any_denial_denies", approvalConfigDefaults.anyDenialDenies);

  let defaultExpiryMs: number = approvalConfigDefaults.defaultExpiryMs;
  const expiryText = reader.optionalString("default_expiry");
  if (expiryText !== undefined) {
    const parsed = parseDuration(expiryText);
    if (parsed === undefined) throw reader.fail(fieldOf(reader, "default_expiry"), `${JSON.stringify(expiryText)} is not a duration like 90s, 5m, 1h or 1h30m (units h, m, s, ms, largest first)`);
    if (parsed <= 0) throw reader.fail(fieldOf(reader, "default_expiry"), "must be longer than zero");
    defaultExpiryMs = parsed;
  }

  const ruleReaders = reader.list("auto_rules", false);
  const firstIndexOf = new Map<string, number>();
  const autoRules = ruleReaders.map((entry, index) => {
    const rule = readAutoRule(entry);
    const earlier = firstIndexOf.get(rule.id);
    if (earlier !== undefined) throw entry.fail(fieldOf(entry, "id"), `repeats the auto rule id ${JSON.stringify(rule.id)} (also ${fieldOf(reader, "auto_rules")}[${earlier}].id)`);
    firstIndexOf.set(rule.id, index);
    return rule;
  });
  reader.done();
  return { groups, breakGlassRole, anyDenialDenies, defaultExpiryMs, autoRules };
}
