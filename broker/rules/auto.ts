import { type ApprovalRequest, Risk } from "../../proto/index.js";
import { type AutoRule, type AutoRuleConditions, clockMinutes, type RiskLevel } from "./config.js";
import { principalKey } from "./people.js";

const riskValue: Readonly<Record<RiskLevel, Risk>> = { low: Risk.LOW, medium: Risk.MEDIUM, high: Risk.HIGH, critical: Risk.CRITICAL };

const formatters = new Map<string, Intl.DateTimeFormat>();

/** The wall clock in a time zone: minutes after midnight and whether it is Saturday or Sunday. */
function wallClock(at: Date, timeZone: string): { minutes: number; weekend: boolean } {
  let format = formatters.get(timeZone);
  if (format === undefined) {
    format = new Intl.DateTimeFormat("en-US", { timeZone, hourCycle: "h23", weekday: "short", hour: "2-digit", minute: "2-digit" });
    formatters.set(timeZone, format);
  }
  let hour = 0;
  let minute = 0;
  let weekday = "";
  for (const part of format.formatToParts(at)) {
    if (part.type === "hour") hour = Number(part.value);
    else if (part.type === "minute") minute = Number(part.value);
    else if (part.type === "weekday") weekday = part.value;
  }
  return { minutes: hour * 60 + minute, weekend: weekday === "Sat" || weekday === "Sun" };
}

function conditionsHold(when: AutoRuleConditions, request: ApprovalRequest, at: Date): boolean {
  if (when.maxRisk !== undefined) {
    // An unspecified (or unknown) risk is not "at most" anything.
    if (request.risk < Risk.LOW || request.risk > Risk.CRITICAL || request.risk > riskValue[when.maxRisk]) return false;
  }
  if (when.ruleIds !== undefined && !when.ruleIds.includes(request.ruleId)) return false;
  if (when.agents !== undefined) {
    const agent = principalKey(request.identity?.agent ?? "");
    if (agent === "" || !when.agents.some((candidate) => principalKey(candidate) === agent)) return false;
  }
  if (when.hours !== undefined) {
    const from = clockMinutes(when.hours.from, false) ?? 0;
    const to = clockMinutes(when.hours.to, true) ?? 0;
    const { minutes } = wallClock(at, when.hours.timezone);
    const inside = from < to ? minutes >= from && minutes < to : minutes >= from || minutes < to;
    if (!inside) return false;
  }
  if (when.weekdaysOnly === true && wallClock(at, when.hours?.timezone ?? "UTC").weekend) return false;
  return true;
}

/**
 * The first auto rule that matches the request at `at`, skipping approve rules when
 * `approveAllowed` is false; undefined when none does.
 */
export function firstMatchingAutoRule(rules: readonly AutoRule[], request: ApprovalRequest, at: Date, approveAllowed: boolean): AutoRule | undefined {
  return rules.find((rule) => (rule.effect === "deny" || approveAllowed) && conditionsHold(rule.when, request, at));
}
