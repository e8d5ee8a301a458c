import { isNode, LineCounter, parseDocument, type Document } from "yaml";
import { hostPattern } from "../../common/subjects.js";
import { AirlockError, Code } from "../../common/errors.js";
import { type CompiledCondition, compileCondition, ConditionError } from "./condition.js";
import { parseDuration } from "../../common/duration.js";
import { type ApproveSpec, type CredentialSpec, type Effect, policyDefaults, type ReviewerSpec, type StepUpSpec } from "./types.js";

/** One rule after validation, its condition compiled. */
export interface RuleDefinition {
  readonly id: string;
  readonly service: string;
  readonly method: string;
  /** The hosts whose calls the rule applies to; absent: every host. */
  readonly hosts?: readonly string[];
  readonly when?: CompiledCondition;
  readonly effect: Effect;
  readonly reason?: string;
  /** What the rule is for and why its calls are risky, for reviewers. */
  readonly description?: string;
  readonly approve?: ApproveSpec;
  /** Whether the rule lets callers without an agent identity through. @default false */
  readonly anonymous: boolean;
  /** Whether calls the rule allows are reported to the audit trail too (batched). @default false */
  readonly audit: boolean;
}

/** A policy file after validation. */
export interface PolicyDefinition {
  readonly defaultEffect: "allow" | "deny";
  readonly rules: readonly RuleDefinition[];
}

type Path = readonly (string | number)[];

/** Longest `description` (of a rule or a credential) a policy may carry: reviewers read it on a phone. */
export const maxDescriptionLength = 500;
type Mapping = Readonly<Record<string, unknown>>;

/** `rules[2].approve.credential.kind`: the path as a person would write it. */
export function formatPath(path: Path): string {
  let text = "";
  for (const segment of path) text += typeof segment === "number" ? `[${segment}]` : text === "" ? segment : `.${segment}`;
  return text;
}

const effects: readonly Effect[] = ["allow", "deny", "approve"];
const risks: readonly ApproveSpec["risk"][] = ["low", "medium", "high", "critical"];
const credentialKinds: readonly CredentialSpec["kind"][] = ["database", "vault_token"];

// Rule ids travel into approval requests, audit events and metric labels.
const ruleIdPattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const identifier = "[A-Za-z_][A-Za-z0-9_]*";
const servicePattern = new RegExp(`^${identifier}(?:\\.${identifier})*$`);
const methodPattern = new RegExp(`^${identifier}$`);
const fieldPathPattern = /^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*$/;
// gRPC metadata keys are lowercase; `grpc-` is reserved by gRPC and `-bin` would
// make the value binary, while credentials are text.
const headerPattern = /^[a-z0-9][a-z0-9_.-]*$/;

function quoteList(values: readonly string[]): string {
  return values.join(", ");
}

function describeValue(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "a mapping";
  if (typeof value === "string") return `the string ${JSON.stringify(value)}`;
  if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") return `${typeof value} ${String(value)}`;
  return typeof value;
}

/** Reads one policy document, failing at the first invalid field with its path. */
class PolicyReader {
  readonly #source: string;
  readonly #document: Document.Parsed;
  readonly #lines: LineCounter;

  constructor(source: string, document: Document.Parsed, lines: LineCounter) {
    this.#source = source;
    this.#document = document;
    this.#lines = lines;
  }

  fail(path: Path, message: string, extra: Readonly<Record<string, unknown>> = {}): never {
    const field = formatPath(path);
    const details: Record<string, unknown> = { field, source: this.#source, ...extra };
    const line = this.#lineOf(path);
    if (line !== undefined) details.line = line;
    const where = line === undefined ? this.#source : `${this.#source}:${line}`;
    throw new AirlockError(Code.InvalidArgument, `invalid policy ${where}: ${field === "" ? "" : `${field}: `}${message}`, { details });
  }

  #lineOf(path: Path): number | undefined {
    // The deepest node that exists: for an unknown or missing key, its parent's line.
    for (let length = path.length; length >= 0; length--) {
      const node: unknown = this.#document.getIn(path.slice(0, length), true);
      if (isNode(node) && node.range !== undefined && node.range !== null) return this.#lines.linePos(node.range[0]).line;
    }
    return undefined;
  }

  mapping(value: unknown, path: Path, allowed: readonly string[], required: readonly string[] = []): Mapping {
    if (value === null || typeof value !== "object" || Array.isArray(value)) this.fail(path, `must be a mapping, got ${describeValue(value)}`);
    const mapping = value as Mapping;
    for (const key of Object.keys(mapping)) {
      if (!allowed.includes(key)) this.fail([...path, key], `unknown key ${JSON.stringify(key)} (expected one of: ${quoteList(allowed)})`);
    }
    for (const key of required) {
      if (mapping[key] === undefined) this.fail([...path, key], "is required");
    }
    return mapping;
  }

  list(value: unknown, path: Path): readonly unknown[] {
    if (!Array.isArray(value)) this.fail(path, `must be a list, got ${describeValue(value)}`);
    return value as readonly unknown[];
  }

  string(value: unknown, path: Path, pattern?: RegExp, patternHint?: string): string {
    if (typeof value !== "string") this.fail(path, `must be a string, got ${describeValue(value)}`);
    if (value.trim() === "") this.fail(path, "must not be empty");
    if (pattern !== undefined && !pattern.test(value)) this.fail(path, `${JSON.stringify(value)} is not ${patternHint ?? `a match for ${String(pattern)}`}`);
    return value;
  }

  /** Text for people: a non-empty string of at most {@link maxDescriptionLength} characters, trimmed. */
  text(value: unknown, path: Path): string {
    const text = this.string(value, path).trim();
    if (text.length > maxDescriptionLength) this.fail(path, `is longer than ${maxDescriptionLength} characters`);
    return text;
  }

  oneOf<T extends string>(value: unknown, path: Path, choices: readonly T[]): T {
    if (typeof value !== "string" || !(choices as readonly string[]).includes(value)) {
      this.fail(path, `must be one of ${quoteList(choices)}, got ${describeValue(value)}`);
    }
    return value as T;
  }

  boolean(value: unknown, path: Path, fallback: boolean): boolean {
    if (value === undefined) return fallback;
    if (typeof value !== "boolean") this.fail(path, `must be true or false, got ${describeValue(value)}`);
    return value;
  }

  integer(value: unknown, path: Path, fallback: number, min: number, max: number): number {
    if (value === undefined) return fallback;
    if (typeof value !== "number" || !Number.isInteger(value)) this.fail(path, `must be a whole number, got ${describeValue(value)}`);
    if (value < min || value > max) this.fail(path, `must be between ${min} and ${max}, got ${value}`);
    return value;
  }

  duration(value: unknown, path: Path, fallback?: number): number {
    if (value === undefined && fallback !== undefined) return fallback;
    const hint = "a duration like 90s, 5m, 1h or 1h30m (units h, m, s, ms, largest first)";
    if (typeof value !== "string") this.fail(path, `must be ${hint}, got ${describeValue(value)}`);
    const ms = parseDuration(value);
    if (ms === undefined) this.fail(path, `${JSON.stringify(value)} is not ${hint}`);
    if (ms <= 0) this.fail(path, "must be longer than zero");
    return ms;
  }
}

/**
 * Parses and validates a policy file. Throws an AirlockError with
 * `Code.InvalidArgument` and `details: { field, source, line? }` naming the first
 * invalid field; a bad condition also carries `details.ruleId`.
 */
export function readPolicy(yamlText: string, source: string): PolicyDefinition {
  const lines = new LineCounter();
  const document = parseDocument(yamlText, { lineCounter: lines, uniqueKeys: true, prettyErrors: false });
  const reader = new PolicyReader(source, document, lines);
  const [syntaxError] = document.errors;
  if (syntaxError !== undefined) {
    const line = lines.linePos(syntaxError.pos[0]).line;
    throw new AirlockError(Code.InvalidArgument, `invalid policy ${source}:${line}: not valid YAML: ${syntaxError.message}`, {
      details: { field: "", source, line },
      cause: syntaxError,
    });
  }
  // An alias bomb fails here instead of exhausting memory.
  const root: unknown = document.toJS({ maxAliasCount: 100 });
  if (root === null || root === undefined) reader.fail([], "the policy is empty (it needs at least `version: 1`)");
  const top = reader.mapping(root, [], ["version", "default", "rules"], ["version"]);
  if (top.version !== 1) reader.fail(["version"], `must be 1, got ${describeValue(top.version)}`);
  const defaultEffect = top.default === undefined ? policyDefaults.defaultEffect : reader.oneOf(top.default, ["default"], ["allow", "deny"] as const);
  const rules: RuleDefinition[] = [];
  const firstIndexOf = new Map<string, number>();
  const ruleList = top.rules === undefined || top.rules === null ? [] : reader.list(top.rules, ["rules"]);
  ruleList.forEach((value, index) => {
    const rule = readRule(reader, value, ["rules", index]);
    const earlier = firstIndexOf.get(rule.id);
    if (earlier !== undefined) reader.fail(["rules", index, "id"], `duplicate rule id ${JSON.stringify(rule.id)} (also rules[${earlier}].id)`);
    firstIndexOf.set(rule.id, index);
    rules.push(rule);
  });
  return { defaultEffect, rules };
}

function readRule(reader: PolicyReader, value: unknown, path: Path): RuleDefinition {
  const rule = reader.mapping(value, path, ["id", "match", "when", "effect", "reason", "description", "approve", "anonymous", "audit"], ["id", "match", "effect"]);
  const id = reader.string(rule.id, [...path, "id"], ruleIdPattern, "a rule id (letters, digits, '.', '_', '-', at most 128)");
  const match = reader.mapping(rule.match, [...path, "match"], ["service", "method", "hosts"], ["service", "method"]);
  const service = match.service === "*" ? "*" : reader.string(match.service, [...path, "match", "service"], servicePattern, 'a fully qualified service name or "*"');
  const method = match.method === "*" ? "*" : reader.string(match.method, [...path, "match", "method"], methodPattern, 'a method name or "*"');
  const effect = reader.oneOf(rule.effect, [...path, "effect"], effects);
  const anonymous = reader.boolean(rule.anonymous, [...path, "anonymous"], false);
  // Denied and held calls are always in the trail; `audit` adds the calls an allow rule lets through.
  const audit = reader.boolean(rule.audit, [...path, "audit"], false);
  if (audit && effect !== "allow") reader.fail([...path, "audit"], 'is only for effect "allow": denied and held calls are always audited');
  // A held call goes to reviewers with the agent's identity and the chain that keeps humans from approving their own requests.
  if (anonymous && effect === "approve") reader.fail([...path, "anonymous"], 'is not allowed when effect is "approve": a held call needs an authenticated agent');
  const definition: { -readonly [K in keyof RuleDefinition]: RuleDefinition[K] } = { id, service, method, effect, anonymous, audit };
  if (match.hosts !== undefined) {
    const hosts = reader.list(match.hosts, [...path, "match", "hosts"]).map((entry, index) => reader.string(entry, [...path, "match", "hosts", index], hostPattern, "a host name (letters, digits, '-' or '_')"));
    if (hosts.length === 0) reader.fail([...path, "match", "hosts"], "needs at least one host (leave it out for every host)");
    definition.hosts = [...new Set(hosts)];
  }
  if (rule.when !== undefined) {
    const source = reader.string(rule.when, [...path, "when"]);
    try {
      definition.when = compileCondition(source);
    } catch (error) {
      if (!(error instanceof ConditionError)) throw error;
      reader.fail([...path, "when"], `rule ${JSON.stringify(id)}: invalid condition: ${error.message}`, { ruleId: id });
    }
  }
  if (rule.reason !== undefined) definition.reason = reader.string(rule.reason, [...path, "reason"]);
  if (rule.description !== undefined) definition.description = reader.text(rule.description, [...path, "description"]);
  if (effect === "approve") {
    if (rule.approve === undefined) reader.fail([...path, "approve"], 'is required when effect is "approve"');
    definition.approve = readApprove(reader, rule.approve, [...path, "approve"], definition.description ?? "");
  } else if (rule.approve !== undefined) {
    reader.fail([...path, "approve"], `is only allowed when effect is "approve" (this rule's effect is "${effect}")`);
  }
  return definition;
}

function readApprove(reader: PolicyReader, value: unknown, path: Path, description: string): ApproveSpec {
  const approve = reader.mapping(value, path, ["risk", "reviewers", "credential", "redact", "require_reason", "timeout", "step_up"], ["risk", "reviewers", "credential"]);
  const redact = approve.redact === undefined ? [] : reader.list(approve.redact, [...path, "redact"]);
  const redactPaths = redact.map((entry, index) =>
    reader.string(entry, [...path, "redact", index], fieldPathPattern, "a dotted request field path like filter.ssn"),
  );
  return {
    risk: reader.oneOf(approve.risk, [...path, "risk"], risks),
    description,
    reviewers: readReviewers(reader, approve.reviewers, [...path, "reviewers"]),
    credential: readCredential(reader, approve.credential, [...path, "credential"]),
    redact: [...new Set(redactPaths)],
    requireReason: reader.boolean(approve.require_reason, [...path, "require_reason"], policyDefaults.requireReason),
    timeoutMs: reader.duration(approve.timeout, [...path, "timeout"], policyDefaults.timeoutMs),
    ...readStepUp(reader, approve.step_up, [...path, "step_up"]),
  };
}

/** `step_up: true | false | { acr: <value> }`; absent or false: no step-up asked by the rule. */
function readStepUp(reader: PolicyReader, value: unknown, path: Path): { stepUp?: StepUpSpec } {
  if (value === undefined || value === null || typeof value === "boolean") return reader.boolean(value, path, false) ? { stepUp: { acr: "" } } : {};
  const stepUp = reader.mapping(value, path, ["acr"], ["acr"]);
  return { stepUp: { acr: reader.string(stepUp.acr, [...path, "acr"]) } };
}

function readReviewers(reader: PolicyReader, value: unknown, path: Path): ReviewerSpec {
  const reviewers = reader.mapping(value, path, ["all_of", "escalation", "break_glass"], ["all_of"]);
  const groups = reader.list(reviewers.all_of, [...path, "all_of"]);
  if (groups.length === 0) reader.fail([...path, "all_of"], "needs at least one reviewer group");
  const seen = new Set<string>();
  const allOf = groups.map((entry, index) => {
    const entryPath = [...path, "all_of", index];
    const requirement = reader.mapping(entry, entryPath, ["group", "min_approvals"], ["group"]);
    const group = reader.string(requirement.group, [...entryPath, "group"]);
    // Two entries for one group would make "N distinct approvers" ambiguous.
    if (seen.has(group)) reader.fail([...entryPath, "group"], `group ${JSON.stringify(group)} is listed twice`);
    seen.add(group);
    return { group, minApprovals: reader.integer(requirement.min_approvals, [...entryPath, "min_approvals"], policyDefaults.minApprovals, 1, 100) };
  });
  const spec: { -readonly [K in keyof ReviewerSpec]: ReviewerSpec[K] } = {
    allOf,
    breakGlass: reader.boolean(reviewers.break_glass, [...path, "break_glass"], policyDefaults.breakGlass),
  };
  if (reviewers.escalation !== undefined) {
    const escalationPath = [...path, "escalation"];
    const escalation = reader.mapping(reviewers.escalation, escalationPath, ["group", "after"], ["group", "after"]);
    spec.escalation = { group: reader.string(escalation.group, [...escalationPath, "group"]), afterMs: reader.duration(escalation.after, [...escalationPath, "after"]) };
  }
  return spec;
}

function readCredential(reader: PolicyReader, value: unknown, path: Path): CredentialSpec {
  // Check the kind first, so that a key of the other kind is reported as not belonging to this kind.
  const kindOnly = reader.mapping(value, path, ["kind", "mount", "role", "policies", "num_uses", "ttl", "inject_header", "description"], ["kind"]);
  const kind = reader.oneOf(kindOnly.kind, [...path, "kind"], credentialKinds);
  const common = ["kind", "ttl", "inject_header", "description"];
  const description = kindOnly.description === undefined ? "" : reader.text(kindOnly.description, [...path, "description"]);
  const injectHeader =
    kindOnly.inject_header === undefined
      ? policyDefaults.injectHeader
      : reader.string(kindOnly.inject_header, [...path, "inject_header"], headerPattern, "a lowercase gRPC metadata key");
  if (injectHeader.startsWith("grpc-") || injectHeader.endsWith("-bin")) {
    reader.fail([...path, "inject_header"], `${JSON.stringify(injectHeader)} is reserved by gRPC ("grpc-" prefix) or binary ("-bin" suffix)`);
  }
  const ttlMs = reader.duration(kindOnly.ttl, [...path, "ttl"], policyDefaults.credentialTtlMs);
  if (kind === "database") {
    const credential = reader.mapping(value, path, [...common, "mount", "role"], ["mount", "role"]);
    return { kind, mount: reader.string(credential.mount, [...path, "mount"]), role: reader.string(credential.role, [...path, "role"]), ttlMs, injectHeader, description };
  }
  const credential = reader.mapping(value, path, [...common, "policies", "num_uses"], ["policies"]);
  const policies = reader.list(credential.policies, [...path, "policies"]).map((entry, index) => reader.string(entry, [...path, "policies", index]));
  if (policies.length === 0) reader.fail([...path, "policies"], "needs at least one Vault policy");
  return {
    kind,
    policies,
    numUses: reader.integer(credential.num_uses, [...path, "num_uses"], policyDefaults.vaultTokenNumUses, 1, 1000),
    ttlMs,
    injectHeader,
    description,
  };
}
