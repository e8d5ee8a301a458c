import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type CompiledCondition, type ConditionBindings, type ConditionResult, identityBinding, requestBinding } from "./condition.js";
import { type PolicyDefinition, readPolicy, type RuleDefinition } from "./schema.js";
import type { ApproveSpec, PolicyCall, PolicyVerdict, RuleSummary } from "./types.js";

interface CompiledRule {
  readonly summary: RuleSummary;
  readonly condition: CompiledCondition | undefined;
  /** `match.hosts`; undefined: every host. */
  readonly hosts: ReadonlySet<string> | undefined;
  /** The verdict when the rule fires; built once so the hot path allocates nothing. */
  readonly verdict: PolicyVerdict;
}

/** The rules that can match one service/method, in order. */
interface MethodPlan {
  readonly rules: readonly CompiledRule[];
  readonly needsRequest: boolean;
}

// Method plans are cached per service/method. The sidecar only routes methods it
// serves, but the bound keeps a flood of made-up names from growing memory.
const maxCachedPlans = 4096;

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    for (const field of Object.values(value)) deepFreeze(field);
    Object.freeze(value);
  }
  return value;
}

function matchesName(pattern: string, name: string): boolean {
  return pattern === "*" || pattern === name;
}

function describeApprove(approve: ApproveSpec): string {
  const reviewers = approve.reviewers.allOf.map((requirement) => `${requirement.minApprovals} of ${requirement.group}`).join(" and ");
  const credential = approve.credential.kind === "database" ? `database ${approve.credential.mount}/${approve.credential.role}` : `vault token (${approve.credential.policies.join(", ")})`;
  return `risk ${approve.risk}; reviewers: ${reviewers}; credential: ${credential}`;
}

function compileRule(rule: RuleDefinition): CompiledRule {
  const summary: RuleSummary = {
    id: rule.id,
    service: rule.service,
    method: rule.method,
    ...(rule.hosts === undefined ? {} : { hosts: rule.hosts }),
    effect: rule.effect,
    ...(rule.when === undefined ? {} : { when: rule.when.source }),
    ...(rule.reason === undefined ? {} : { reason: rule.reason }),
    ...(rule.description === undefined ? {} : { description: rule.description }),
    ...(rule.approve === undefined ? {} : { approve: rule.approve }),
    // An approval carries the (redacted) request to reviewers, so approve rules always need it.
    needsRequest: rule.effect === "approve" || rule.when?.referencesRequest === true,
    anonymous: rule.anonymous,
    audit: rule.audit,
  };
  const matched = `matched ${rule.service}/${rule.method}${rule.when === undefined ? "" : " and its condition"}`;
  const verdict: PolicyVerdict = {
    effect: rule.effect,
    ruleId: rule.id,
    reason: rule.reason ?? matched,
    ...(rule.approve === undefined ? {} : { approve: rule.approve }),
    ...(rule.anonymous ? { anonymous: true as const } : {}),
    ...(rule.audit ? { audit: true as const } : {}),
  };
  return { summary: deepFreeze(summary), condition: rule.when, hosts: rule.hosts === undefined ? undefined : new Set(rule.hosts), verdict: deepFreeze(verdict) };
}

/** Bindings for one evaluation, built on first use and shared by the rules it reaches. */
class CallBindings {
  readonly #call: PolicyCall;
  #bindings: ConditionBindings | undefined;
  #requestBound = false;

  constructor(call: PolicyCall) {
    this.#call = call;
  }

  evaluate(condition: CompiledCondition): ConditionResult {
    const call = this.#call;
    this.#bindings ??= {
      host: call.host,
      service: call.service,
      method: call.method,
      identity: identityBinding(call.identity),
      now: timestampFromDate(call.now ?? new Date()),
    };
    if (condition.referencesRequest && !this.#requestBound) {
      this.#bindings.request = requestBinding(call.request());
      this.#requestBound = true;
    }
    return condition.evaluate(this.#bindings);
  }
}

/**
 * What a reached rule does with its condition's result: its verdict, or
 * `undefined` to go on to the next rule.
 *
 * A condition that fails at run time (a missing field, a type mismatch, a division
 * by zero) must not let a call through:
 * - a `deny` or `approve` rule fires as `deny`, with a reason naming the rule and
 *   the CEL error (fail closed: the rule meant to restrict the call, and we cannot
 *   tell whether it applies);
 * - an `allow` rule is skipped and evaluation goes on, so a broken allow rule never
 *   allows, and later rules (or the default) still decide.
 */
function decide(rule: CompiledRule, result: ConditionResult): PolicyVerdict | undefined {
  switch (result.kind) {
    case "true":
      return rule.verdict;
    case "false":
      return undefined;
    case "error":
      if (rule.summary.effect === "allow") return undefined;
      return {
        effect: "deny",
        ruleId: rule.summary.id,
        reason: `the condition of rule ${JSON.stringify(rule.summary.id)} could not be evaluated, so the call is denied (fail closed): ${result.message}`,
      };
  }
}

function defaultVerdict(effect: "allow" | "deny", call: PolicyCall): PolicyVerdict {
  return { effect, ruleId: "default", reason: `no rule matched ${call.service}/${call.method}; the policy default is ${effect}` };
}

let compiledRulesOf: (policy: Policy) => readonly CompiledRule[];

/**
 * A loaded, validated policy: an ordered list of rules where the first rule whose
 * `match` and `when` hold decides, and a default effect for calls no rule matches.
 * Immutable; reload by parsing a new one (see `PolicyWatcher`).
 */
export class Policy {
  /** Where the policy came from (a file path), for errors and logs. */
  readonly source: string;
  /** The effect of calls no rule matches. @default "deny" */
  readonly defaultEffect: "allow" | "deny";
  /** The rules in evaluation order, for listing. */
  readonly rules: readonly RuleSummary[];
  readonly #rules: readonly CompiledRule[];
  // Keyed by service then method: no key string is built per call.
  readonly #plans = new Map<string, Map<string, MethodPlan>>();
  #planCount = 0;

  static {
    compiledRulesOf = (policy) => policy.#rules;
  }

  private constructor(source: string, definition: PolicyDefinition) {
    this.source = source;
    this.defaultEffect = definition.defaultEffect;
    this.#rules = definition.rules.map(compileRule);
    this.rules = Object.freeze(this.#rules.map((rule) => rule.summary));
  }

  /**
   * Parses and validates a policy file and compiles every `when` condition.
   * @param source - where the text came from, for error messages. @default "<inline>"
   * @throws AirlockError with `Code.InvalidArgument` and `details: { field, source, line? }`,
   * where `field` is the path of the first invalid field (e.g. `rules[2].approve.credential.kind`),
   * for invalid YAML, unknown keys, wrong types, unknown effects, an `approve` rule without an
   * `approve` block, duplicate rule ids, bad durations and conditions that do not parse or
   * type-check (those also carry `details.ruleId`).
   */
  static parse(yamlText: string, source = "<inline>"): Policy {
    return new Policy(source, readPolicy(yamlText, source));
  }

  /**
   * The verdict for one call: the first rule whose match and condition hold, else
   * the default. Calls `call.request()` at most once, and only when a rule it
   * reaches has a condition that reads `request`; an exception from `request()`
   * propagates.
   *
   * A condition that fails at run time (a missing field, a type mismatch) never lets
   * the call through: a `deny` or `approve` rule then fires as `deny`, with a reason
   * naming the rule and the CEL error (fail closed: the rule meant to restrict and we
   * cannot tell whether it applies); an `allow` rule is skipped and evaluation goes on,
   * so a broken allow rule never allows.
   */
  evaluate(call: PolicyCall): PolicyVerdict {
    const plan = this.#plan(call.service, call.method);
    let bindings: CallBindings | undefined;
    for (const rule of plan.rules) {
      if (rule.hosts !== undefined && !rule.hosts.has(call.host)) continue;
      if (rule.condition === undefined) return rule.verdict;
      bindings ??= new CallBindings(call);
      const verdict = decide(rule, bindings.evaluate(rule.condition));
      if (verdict !== undefined) return verdict;
    }
    return defaultVerdict(this.defaultEffect, call);
  }

  /**
   * Whether calls to this method need their request decoded: some rule that can be
   * reached for it reads `request` in its condition or is an `approve` rule (the
   * reviewers see the request). Rules after one that matches the method
   * unconditionally cannot be reached and do not count. When this is false,
   * {@link Policy.evaluate} never calls `request()` for the method.
   */
  needsRequest(service: string, method: string): boolean {
    return this.#plan(service, method).needsRequest;
  }

  #plan(service: string, method: string): MethodPlan {
    let plan = this.#plans.get(service)?.get(method);
    if (plan === undefined) {
      const rules: CompiledRule[] = [];
      let needsRequest = false;
      for (const rule of this.#rules) {
        if (!matchesName(rule.summary.service, service) || !matchesName(rule.summary.method, method)) continue;
        rules.push(rule);
        needsRequest ||= rule.summary.needsRequest;
        if (rule.condition === undefined && rule.hosts === undefined) break;
      }
      plan = { rules, needsRequest };
      if (this.#planCount >= maxCachedPlans) {
        this.#plans.clear();
        this.#planCount = 0;
      }
      let methods = this.#plans.get(service);
      if (methods === undefined) {
        methods = new Map();
        this.#plans.set(service, methods);
      }
      methods.set(method, plan);
      this.#planCount++;
    }
    return plan;
  }
}

/**
 * A dry run of {@link Policy.evaluate} for people: one line for the call, one per
 * rule saying why it did not match (service or method mismatch, condition false,
 * condition error) or that it fired and with which effect, then the verdict.
 * Decides exactly as `evaluate` does, including calling `call.request()` only when a
 * reached condition reads `request`.
 */
export function explainCall(policy: Policy, call: PolicyCall): string[] {
  const who =
    call.identity === undefined
      ? "an unauthenticated caller"
      : `agent ${call.identity.agent}${call.identity.onBehalfOf === "" ? "" : ` on behalf of ${call.identity.onBehalfOf}`}`;
  const lines = [`call ${call.service}/${call.method} by ${who} on host ${call.host}`];
  const bindings = new CallBindings(call);
  let verdict: PolicyVerdict | undefined;
  for (const rule of compiledRulesOf(policy)) {
    const { id, service, method, effect, when } = rule.summary;
    const name = `rule ${id}`;
    if (verdict !== undefined) {
      lines.push(`${name}: not reached (rule ${verdict.ruleId} decided first)`);
      continue;
    }
    if (!matchesName(service, call.service)) {
      lines.push(`${name}: no match: service ${call.service} is not ${service}`);
      continue;
    }
    if (!matchesName(method, call.method)) {
      lines.push(`${name}: no match: method ${call.method} is not ${method}`);
      continue;
    }
    if (rule.hosts !== undefined && !rule.hosts.has(call.host)) {
      lines.push(`${name}: no match: host ${call.host} is not one of ${[...rule.hosts].join(", ")}`);
      continue;
    }
    const result: ConditionResult = rule.condition === undefined ? { kind: "true" } : bindings.evaluate(rule.condition);
    verdict = decide(rule, result);
    if (result.kind === "false") {
      lines.push(`${name}: no match: condition is false: ${when ?? ""}`);
    } else if (result.kind === "error") {
      lines.push(
        effect === "allow"
          ? `${name}: skipped: condition error (${result.message}); a broken allow rule never allows`
          : `${name}: fires as deny: condition error (${result.message}); fail closed`,
      );
    } else {
      lines.push(`${name}: fires: ${effect}${when === undefined ? "" : ` (condition is true: ${when})`}`);
    }
  }
  if (verdict === undefined) {
    verdict = defaultVerdict(policy.defaultEffect, call);
    lines.push(`no rule matched: the default is ${policy.defaultEffect}`);
  }
  const approve = verdict.approve === undefined ? "" : ` [${describeApprove(verdict.approve)}]`;
  lines.push(`verdict: ${verdict.effect} by ${verdict.ruleId === "default" ? "the default" : `rule ${verdict.ruleId}`}: ${verdict.reason}${approve}`);
  if (call.identity === undefined && verdict.anonymous !== true) {
    lines.push(`but the caller is unauthenticated and ${verdict.ruleId === "default" ? "the default" : `rule ${verdict.ruleId}`} is not anonymous: the sidecar answers UNAUTHENTICATED`);
  }
  return lines;
}
