import { mkdtemp, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { JsonObject } from "@bufbuild/protobuf";
import t from "tap";
import { AirlockError, Code } from "../../common/errors.js";
import { type CallIdentity, explainCall, Policy, type PolicyCall, policyDefaults, PolicyWatcher, redact } from "../../sidecar/policy.js";

const ops = "demo.v1.OpsService";
const alice: CallIdentity = { agent: "sql-agent", onBehalfOf: "alice", chain: ["alice", "planner", "sql-agent"], authenticatedBy: "mtls" };

const examplePolicy = `
version: 1
default: deny
rules:
  - id: status-is-free
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
  - id: export-customers
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: 'request.table == "customers" && identity.on_behalf_of != ""'
    description: "  An export copies customer records out for good.  "
    effect: approve
    approve:
      risk: high
      reviewers:
        all_of:
          - { group: security, min_approvals: 1 }
          - { group: data-owners, min_approvals: 2 }
        escalation: { group: oncall, after: 30m }
        break_glass: false
      credential:
        kind: database
        mount: database
        role: export
        ttl: 5m
        inject_header: x-airlock-credential
        description: SELECT on customers
      redact: [email, filter.ssn]
      require_reason: true
      timeout: 1h
  - id: no-role-grants
    match: { service: demo.v1.OpsService, method: GrantRole }
    effect: deny
    reason: role grants go through the IAM team
  - id: rotate-key
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    approve:
      risk: critical
      reviewers: { all_of: [{ group: security }] }
      credential: { kind: vault_token, policies: [rotate-keys], ttl: 90s }
`;

/** A call whose request() counts how often the engine decoded it. */
function countingCall(fields: Omit<PolicyCall, "request">, request: JsonObject = {}): PolicyCall & { decodes: () => number } {
  let decodes = 0;
  return {
    ...fields,
    request: () => {
      decodes++;
      return request;
    },
    decodes: () => decodes,
  };
}

function call(method: string, request: JsonObject = {}, extra: Partial<Omit<PolicyCall, "request">> = {}): PolicyCall {
  return { service: ops, method, host: "prod-db-1", identity: alice, ...extra, request: () => request };
}

function policyWith(rules: string, header = "version: 1"): Policy {
  return Policy.parse(`${header}\nrules:\n${rules}`, "test.yaml");
}

function parseError(yamlText: string): AirlockError {
  try {
    Policy.parse(yamlText, "bad.yaml");
  } catch (error) {
    if (error instanceof AirlockError) return error;
    throw error;
  }
  throw new Error("the policy parsed, but it should not have");
}

await t.test("the example policy loads with its values and defaults", async (t) => {
  const policy = Policy.parse(examplePolicy, "example.yaml");
  t.equal(policy.source, "example.yaml");
  t.equal(policy.defaultEffect, "deny");
  t.same(
    policy.rules.map((rule) => [rule.id, rule.effect, rule.needsRequest]),
    [
      ["status-is-free", "allow", false],
      ["export-customers", "approve", true],
      ["no-role-grants", "deny", false],
      ["rotate-key", "approve", true],
    ],
  );
  const exportRule = policy.rules[1];
  t.equal(exportRule?.description, "An export copies customer records out for good.", "the rule's description, trimmed");
  t.same(exportRule?.approve, {
    risk: "high",
    description: "An export copies customer records out for good.",
    reviewers: {
      allOf: [
        { group: "security", minApprovals: 1 },
        { group: "data-owners", minApprovals: 2 },
      ],
      escalation: { group: "oncall", afterMs: 30 * 60_000 },
      breakGlass: false,
    },
    credential: { kind: "database", mount: "database", role: "export", ttlMs: 5 * 60_000, injectHeader: "x-airlock-credential", description: "SELECT on customers" },
    redact: ["email", "filter.ssn"],
    requireReason: true,
    timeoutMs: 3_600_000,
  });
  t.same(policy.rules[3]?.approve, {
    risk: "critical",
    description: "",
    reviewers: { allOf: [{ group: "security", minApprovals: policyDefaults.minApprovals }], breakGlass: false },
    credential: { kind: "vault_token", policies: ["rotate-keys"], numUses: 1, ttlMs: 90_000, injectHeader: policyDefaults.injectHeader, description: "" },
    redact: [],
    requireReason: false,
    timeoutMs: policyDefaults.timeoutMs,
  });
  t.equal(policyDefaults.defaultEffect, "deny");
  t.equal(policyDefaults.timeoutMs, 3_600_000);
  t.ok(Object.isFrozen(policy.rules[1]?.approve?.reviewers.allOf), "rule summaries cannot be changed by callers");
});

await t.test("verdicts of the example policy", async (t) => {
  const policy = Policy.parse(examplePolicy);
  t.same(policy.evaluate(call("GetStatus")), { effect: "allow", ruleId: "status-is-free", reason: "matched demo.v1.OpsService/GetStatus" });
  const exported = policy.evaluate(call("ExportTable", { table: "customers" }));
  t.equal(exported.effect, "approve");
  t.equal(exported.ruleId, "export-customers");
  t.equal(exported.approve?.credential.kind, "database");
  t.same(policy.evaluate(call("GrantRole")), { effect: "deny", ruleId: "no-role-grants", reason: "role grants go through the IAM team" });
  const orders = policy.evaluate(call("ExportTable", { table: "orders" }));
  t.equal(orders.effect, "deny", "a condition that is false falls through to the default");
  t.equal(orders.ruleId, "default");
  t.match(orders.reason, /no rule matched demo\.v1\.OpsService\/ExportTable; the policy default is deny/);
  t.equal(policy.evaluate(call("ExportTable", { table: "customers" }, { identity: { ...alice, onBehalfOf: "" } })).ruleId, "default");
  t.equal(policy.evaluate({ ...call("ExportTable", { table: "customers" }), identity: undefined }).ruleId, "default", "no identity reads as empty strings");
});

await t.test("the first rule whose match and condition hold decides, in file order", async (t) => {
  const rules = (first: string, second: string): string => `${first}\n${second}`;
  const denyExports = `  - id: deny-exports\n    match: { service: demo.v1.OpsService, method: ExportTable }\n    effect: deny`;
  const allowExports = `  - id: allow-exports\n    match: { service: demo.v1.OpsService, method: ExportTable }\n    effect: allow`;
  t.equal(policyWith(rules(denyExports, allowExports)).evaluate(call("ExportTable")).ruleId, "deny-exports");
  t.equal(policyWith(rules(allowExports, denyExports)).evaluate(call("ExportTable")).ruleId, "allow-exports");
  const conditional = `  - id: small-exports\n    match: { service: demo.v1.OpsService, method: ExportTable }\n    when: request.limit <= 10\n    effect: allow`;
  const policy = policyWith(rules(conditional, denyExports));
  t.equal(policy.evaluate(call("ExportTable", { limit: 5 })).ruleId, "small-exports");
  t.equal(policy.evaluate(call("ExportTable", { limit: 500 })).ruleId, "deny-exports", "a false condition passes to the next rule");
});

await t.test('"*" matches any method or any service', async (t) => {
  const policy = policyWith(`
  - id: status
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
  - id: rest-of-ops
    match: { service: demo.v1.OpsService, method: "*" }
    effect: deny
    reason: ops is privileged
  - id: everything-else
    match: { service: "*", method: "*" }
    effect: allow
`);
  t.equal(policy.evaluate(call("GetStatus")).ruleId, "status");
  t.equal(policy.evaluate(call("RotateKey")).ruleId, "rest-of-ops");
  t.equal(policy.evaluate(call("Anything")).reason, "ops is privileged");
  t.equal(policy.evaluate(call("Check", {}, { service: "grpc.health.v1.Health" })).ruleId, "everything-else");
  t.equal(policy.evaluate(call("Check", {}, { service: "grpc.health.v1.Health" })).effect, "allow");
});

await t.test("the default effect is deny unless the policy says allow", async (t) => {
  const unmatched = call("Tail", {}, { service: "other.v1.Service" });
  const omitted = Policy.parse("version: 1\nrules: []");
  t.same(omitted.evaluate(unmatched), { effect: "deny", ruleId: "default", reason: "no rule matched other.v1.Service/Tail; the policy default is deny" });
  t.equal(Policy.parse("version: 1\ndefault: deny").evaluate(unmatched).effect, "deny");
  const allowing = Policy.parse("version: 1\ndefault: allow\nrules:\n  - id: d\n    match: { service: demo.v1.OpsService, method: GrantRole }\n    effect: deny");
  t.equal(allowing.evaluate(unmatched).effect, "allow");
  t.equal(allowing.evaluate(unmatched).ruleId, "default");
  t.equal(allowing.evaluate(call("GrantRole")).effect, "deny");
});

await t.test("conditions see request, identity, host, service, method and now", async (t) => {
  const allowWhen = (when: string): Policy =>
    policyWith(`  - id: rule\n    match: { service: "*", method: "*" }\n    when: ${JSON.stringify(when)}\n    effect: allow`);
  const fires = (when: string, target: PolicyCall): boolean => allowWhen(when).evaluate(target).effect === "allow";
  const request = { table: "customers", limit: 50, filter: { region: "eu", ssn: "123" }, rows: [{ id: "a", vip: false }, { id: "b", vip: true }] };
  const target = call("ExportTable", request, { now: new Date("2024-03-01T23:30:00Z") });

  t.ok(fires('request.table == "customers"', target));
  t.notOk(fires('request.table == "orders"', target));
  t.ok(fires('request.filter.region == "eu" && request.limit > 10', target), "nested fields and numbers");
  t.ok(fires("request.rows.exists(r, r.vip)", target), "lists of objects and macros");
  t.ok(fires("has(request.filter) && !has(request.missing)", target));
  t.ok(fires('identity.agent == "sql-agent" && identity.authenticated_by == "mtls"', target));
  t.ok(fires('"alice" in identity.chain && identity.chain.size() == 3', target));
  t.notOk(fires('identity.on_behalf_of == "bob"', target));
  t.ok(fires('host.startsWith("prod-")', target));
  t.notOk(fires('host.startsWith("prod-")', { ...target, host: "staging-1" }));
  t.ok(fires('service == "demo.v1.OpsService" && method == "ExportTable"', target));
  t.ok(fires("now.getHours() >= 22", target), "now is the call's time, in UTC");
  t.notOk(fires("now.getHours() >= 22", { ...target, now: new Date("2024-03-01T09:00:00Z") }));
  t.ok(fires('now > timestamp("2024-01-01T00:00:00Z")', target));
  t.ok(fires('request.table.upperAscii() == "CUSTOMERS"', target), "the strings extension is available");
  const before = Date.now();
  t.ok(fires(`now >= timestamp("${new Date(before - 1000).toISOString()}")`, { ...target, now: undefined }), "now defaults to the current time");
});

await t.test("the request is decoded only when a reached rule needs it", async (t) => {
  const policy = Policy.parse(`
version: 1
rules:
  - id: status
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
  - id: tail-on-prod
    match: { service: demo.v1.OpsService, method: Tail }
    when: host.startsWith("prod-")
    effect: deny
  - id: tail-by-size
    match: { service: demo.v1.OpsService, method: Tail }
    when: request.lines > 1000
    effect: deny
  - id: tail
    match: { service: demo.v1.OpsService, method: Tail }
    effect: allow
  - id: rotate
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    approve:
      risk: low
      reviewers: { all_of: [{ group: security }] }
      credential: { kind: vault_token, policies: [rotate] }
  - id: catch-all
    match: { service: "*", method: "*" }
    when: request.size() > 0
    effect: deny
`);
  t.notOk(policy.needsRequest(ops, "GetStatus"), "an unconditional rule hides the later catch-all");
  t.ok(policy.needsRequest(ops, "Tail"), "a reachable condition reads request");
  t.ok(policy.needsRequest(ops, "RotateKey"), "approve rules need the request for reviewers");
  t.ok(policy.needsRequest("other.v1.Service", "Any"), "the catch-all reads request");
  t.notOk(Policy.parse("version: 1").needsRequest(ops, "GetStatus"), "no rules, no decoding");

  const status = countingCall({ service: ops, method: "GetStatus", host: "prod-1" });
  t.equal(policy.evaluate(status).effect, "allow");
  t.equal(status.decodes(), 0, "an unconditional allow never decodes");

  const tailOnProd = countingCall({ service: ops, method: "Tail", host: "prod-1" }, { lines: 5 });
  t.equal(policy.evaluate(tailOnProd).ruleId, "tail-on-prod");
  t.equal(tailOnProd.decodes(), 0, "a rule whose condition does not read request decides without decoding");

  const tailElsewhere = countingCall({ service: ops, method: "Tail", host: "dev-1" }, { lines: 5000 });
  t.equal(policy.evaluate(tailElsewhere).ruleId, "tail-by-size");
  t.equal(tailElsewhere.decodes(), 1);

  const other = countingCall({ service: "other.v1.Service", method: "Any", host: "dev-1" }, { a: 1 });
  const explained = explainCall(policy, other);
  t.equal(policy.evaluate(other).ruleId, "catch-all");
  t.equal(other.decodes(), 2, "decoded once by explainCall and once by evaluate");
  t.match(explained.at(-1), /rule catch-all/);

  const twoReaders = Policy.parse(`
version: 1
rules:
  - id: first
    match: { service: "*", method: "*" }
    when: has(request.a)
    effect: deny
  - id: second
    match: { service: "*", method: "*" }
    when: has(request.b)
    effect: allow
`);
  const both = countingCall({ service: ops, method: "X", host: "h" }, { b: true });
  t.equal(twoReaders.evaluate(both).ruleId, "second");
  t.equal(both.decodes(), 1, "the request is decoded at most once per evaluation");
});

await t.test("a condition that fails at run time never lets the call through", async (t) => {
  const policy = Policy.parse(`
version: 1
default: allow
rules:
  - id: broken-allow
    match: { service: demo.v1.OpsService, method: GetStatus }
    when: request.verbose == true
    effect: allow
  - id: deny-big-exports
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: request.limit > 1000
    effect: deny
  - id: approve-rotation
    match: { service: demo.v1.OpsService, method: RotateKey }
    when: request.key.startsWith("prod/")
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: security }] }
      credential: { kind: vault_token, policies: [rotate] }
  - id: status-fallback
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: deny
    reason: status needs the verbose flag
`);
  const missingField = policy.evaluate(call("ExportTable", {}));
  t.equal(missingField.effect, "deny", "a deny rule with a missing field fires as deny even though the default is allow");
  t.equal(missingField.ruleId, "deny-big-exports");
  t.match(missingField.reason, /rule "deny-big-exports".*fail closed.*limit/);

  const wrongType = policy.evaluate(call("RotateKey", { key: 42 }));
  t.equal(wrongType.effect, "deny", "an approve rule whose condition fails is a deny, not an approval");
  t.equal(wrongType.ruleId, "approve-rotation");
  t.equal(wrongType.approve, undefined);
  t.match(wrongType.reason, /approve-rotation/);

  const brokenAllow = policy.evaluate(call("GetStatus", {}));
  t.equal(brokenAllow.effect, "deny", "a broken allow rule is skipped and the next rule decides");
  t.equal(brokenAllow.ruleId, "status-fallback");
  t.equal(policy.evaluate(call("GetStatus", { verbose: true })).effect, "allow", "the allow rule works when its field is present");
  t.equal(policy.evaluate(call("ExportTable", { limit: 5 })).effect, "allow");
});

await t.test("every kind of invalid policy names its field", async (t) => {
  const approveRule = (credential: string, extra = ""): string => `version: 1
rules:
  - id: ok
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
  - id: export
    match: { service: demo.v1.OpsService, method: ExportTable }
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: security }, { group: data-owners, min_approvals: 2 }] }
      credential: ${credential}
${extra}`;
  const database = "{ kind: database, mount: database, role: export }";
  const cases: [name: string, yaml: string, field: string, message: RegExp][] = [
    ["unknown top-level key", "version: 1\nrulez: []", "rulez", /unknown key "rulez"/],
    ["missing version", "rules: []", "version", /required/],
    ["wrong version", "version: 2", "version", /must be 1/],
    ["unknown default", "version: 1\ndefault: approve", "default", /allow, deny/],
    ["rules not a list", "version: 1\nrules: {}", "rules", /must be a list/],
    ["unknown rule key", "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    effect: allow\n    matcher: x", "rules[0].matcher", /unknown key "matcher"/],
    ["missing match", "version: 1\nrules:\n  - id: a\n    effect: allow", "rules[0].match", /required/],
    ["unknown match key", "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M, host: h }\n    effect: allow", "rules[0].match.host", /unknown key/],
    ["bad method name", "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: /s.S/M }\n    effect: allow", "rules[0].match.method", /method name/],
    ["unknown effect", "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    effect: permit", "rules[0].effect", /allow, deny, approve/],
    ["approve without approve block", "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    effect: approve", "rules[0].approve", /required when effect is "approve"/],
    ["approve block on a deny rule", `version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    effect: deny\n    approve: { risk: low }`, "rules[0].approve", /only allowed/],
    ["wrong type of id", "version: 1\nrules:\n  - id: [a]\n    match: { service: s.S, method: M }\n    effect: allow", "rules[0].id", /must be a string/],
    ["unknown credential kind", approveRule("{ kind: s3, mount: m, role: r }"), "rules[1].approve.credential.kind", /database, vault_token/],
    ["a vault_token key on a database credential", approveRule("{ kind: database, mount: m, role: r, policies: [p] }"), "rules[1].approve.credential.policies", /unknown key "policies"/],
    ["database credential without role", approveRule("{ kind: database, mount: m }"), "rules[1].approve.credential.role", /required/],
    ["vault token without policies", approveRule("{ kind: vault_token, policies: [] }"), "rules[1].approve.credential.policies", /at least one/],
    ["bad ttl", approveRule("{ kind: database, mount: m, role: r, ttl: 5 }"), "rules[1].approve.credential.ttl", /duration/],
    ["reserved inject header", approveRule("{ kind: database, mount: m, role: r, inject_header: grpc-credential }"), "rules[1].approve.credential.inject_header", /reserved/],
    ["bad timeout", approveRule(database, "      timeout: 1 hour"), "rules[1].approve.timeout", /"1 hour" is not a duration/],
    ["units out of order", approveRule(database, "      timeout: 30m1h"), "rules[1].approve.timeout", /duration/],
    ["zero timeout", approveRule(database, "      timeout: 0s"), "rules[1].approve.timeout", /longer than zero/],
    ["unknown risk", approveRule(database).replace("risk: high", "risk: severe"), "rules[1].approve.risk", /low, medium, high, critical/],
    ["min_approvals not a number", approveRule(database).replace("min_approvals: 2", "min_approvals: two"), "rules[1].approve.reviewers.all_of[1].min_approvals", /whole number/],
    ["min_approvals zero", approveRule(database).replace("min_approvals: 2", "min_approvals: 0"), "rules[1].approve.reviewers.all_of[1].min_approvals", /between 1/],
    ["group listed twice", approveRule(database).replace("group: data-owners", "group: security"), "rules[1].approve.reviewers.all_of[1].group", /listed twice/],
    ["break_glass not a bool", approveRule(database).replace("all_of:", "break_glass: yes, all_of:"), "rules[1].approve.reviewers.break_glass", /true or false/],
    ["bad escalation duration", approveRule(database).replace("all_of:", "escalation: { group: oncall, after: 30x }, all_of:"), "rules[1].approve.reviewers.escalation.after", /duration/],
    ["redact path not a path", approveRule(database, "      redact: [email, filter..ssn]"), "rules[1].approve.redact[1]", /dotted request field path/],
    ["require_reason not a bool", approveRule(database, '      require_reason: "true"'), "rules[1].approve.require_reason", /true or false/],
    ["unknown approve key", approveRule(database, "      reviewer: x"), "rules[1].approve.reviewer", /unknown key "reviewer"/],
    ["an empty rule description", "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    description: ' '\n    effect: allow", "rules[0].description", /must not be empty/],
    ["a rule description that is not text", "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    description: [risky]\n    effect: allow", "rules[0].description", /must be a string/],
    ["a rule description too long to read", `version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    description: ${"x".repeat(501)}\n    effect: allow`, "rules[0].description", /longer than 500/],
    ["a credential description that is not text", approveRule("{ kind: database, mount: m, role: r, description: 5 }"), "rules[1].approve.credential.description", /must be a string/],
    [
      "duplicate rule id",
      "version: 1\nrules:\n  - id: a\n    match: { service: s.S, method: M }\n    effect: allow\n  - id: b\n    match: { service: s.S, method: N }\n    effect: allow\n  - id: a\n    match: { service: s.S, method: O }\n    effect: deny",
      "rules[2].id",
      /duplicate rule id "a" \(also rules\[0\]\.id\)/,
    ],
    ["not YAML", "version: 1\nrules: [", "", /not valid YAML/],
    ["a duplicate YAML key", "version: 1\nversion: 1", "", /not valid YAML.*unique/],
    ["an empty file", "", "", /empty/],
  ];
  for (const [name, yamlText, field, message] of cases) {
    const error = parseError(yamlText);
    t.equal(error.code, Code.InvalidArgument, `${name}: invalid_argument`);
    t.equal(error.details.field, field, `${name}: names ${field === "" ? "the document" : field}`);
    t.equal(error.details.source, "bad.yaml", `${name}: names the source`);
    t.match(error.message, message, `${name}: says why`);
  }
  const kind = parseError(approveRule("{ kind: s3, mount: m, role: r }"));
  t.equal(kind.details.line, 12, "details carry the line of the bad field");
  t.match(kind.message, /^\[invalid_argument\] invalid policy bad\.yaml:12: rules\[1\]\.approve\.credential\.kind: /);
});

await t.test("a condition that does not parse or type-check is a load error naming the rule", async (t) => {
  const cases: [when: string, message: RegExp][] = [
    ['request.table ==', /syntax error/],
    ['reqest.table == "customers"', /unknown variable "reqest"/],
    ['identity.onBehalfOf != ""', /identity has no field "onBehalfOf"/],
    ['1 + "a" == 2', /no overload of "\+" accepts \(int, string\)/],
    ['host == 1', /cannot compare string == int/],
    ["host", /must yield a bool.*string/],
    ['lookup(request.table)', /unknown function "lookup"/],
    ['host.startsWith()', /cannot be called as a method with 0 argument/],
    ["now.size() > 0", /no overload of "size"/],
    ["identity.chain.exists(c, c > 1)", /no overload of ">" accepts \(string, int\)/],
  ];
  for (const [when, message] of cases) {
    const error = parseError(
      `version: 1\nrules:\n  - id: fine\n    match: { service: s.S, method: M }\n    effect: allow\n  - id: export-check\n    match: { service: s.S, method: M }\n    when: ${JSON.stringify(when)}\n    effect: deny`,
    );
    t.equal(error.code, Code.InvalidArgument, when);
    t.equal(error.details.field, "rules[1].when", `${when}: names the field`);
    t.equal(error.details.ruleId, "export-check", `${when}: names the rule in details`);
    t.match(error.message, /rule "export-check"/, `${when}: names the rule in the message`);
    t.match(error.message, message, `${when}: says why`);
  }
  const valid = ['type(request.limit) == double', "request.items.all(i, i.qty < 100)", '"x" in request', "request.tags.exists_one(t, t == \"pii\")", "strings.quote(host) != \"\""];
  for (const when of valid) {
    t.doesNotThrow(() => policyWith(`  - id: r\n    match: { service: s.S, method: M }\n    when: ${JSON.stringify(when)}\n    effect: deny`), `${when} is accepted`);
  }
});

await t.test("redact replaces nested and array fields in a copy", async (t) => {
  const request: JsonObject = {
    table: "customers",
    email: "alice@example.com",
    filter: { ssn: "123-45-6789", region: "eu", deeper: { token: "t" } },
    items: [{ secret: "a", keep: 1 }, { keep: 2 }, { secret: "c" }],
    matrix: [[{ secret: "x" }], [{ secret: "y" }]],
  };
  const original = structuredClone(request);
  const { redacted, removed } = redact(request, ["email", "filter.ssn", "filter.deeper", "items.secret", "matrix.secret", "absent", "filter.absent", "table.length"]);
  t.same(redacted, {
    table: "customers",
    email: "[redacted]",
    filter: { ssn: "[redacted]", region: "eu", deeper: "[redacted]" },
    items: [{ secret: "[redacted]", keep: 1 }, { keep: 2 }, { secret: "[redacted]" }],
    matrix: [[{ secret: "[redacted]" }], [{ secret: "[redacted]" }]],
  });
  t.same(removed, ["email", "filter.ssn", "filter.deeper", "items.secret", "matrix.secret"], "only paths that were found");
  t.same(request, original, "the input is not modified");
  t.not(redacted.filter, request.filter, "nested objects are copies");

  const sneaky = JSON.parse('{"__proto__": {"secret": "s"}, "ok": 1}') as JsonObject;
  const result = redact(sneaky, ["__proto__"]);
  t.equal(JSON.stringify(result.redacted), '{"__proto__":"[redacted]","ok":1}', 'a "__proto__" key is redacted like any other');
  t.same(redact({}, []), { redacted: {}, removed: [] });
  t.throws(() => redact({}, ["a..b"]), { code: Code.InvalidArgument });
});

await t.test("explainCall says why each rule did or did not match", async (t) => {
  const policy = Policy.parse(`
version: 1
rules:
  - id: status
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
  - id: other-service
    match: { service: demo.v2.OpsService, method: "*" }
    effect: allow
  - id: broken-allow
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: request.dry_run == true
    effect: allow
  - id: small
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: request.limit < 10
    effect: allow
  - id: customers
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: request.table == "customers"
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: security }] }
      credential: { kind: database, mount: database, role: export }
  - id: last
    match: { service: "*", method: "*" }
    effect: deny
`);
  const lines = explainCall(policy, call("ExportTable", { table: "customers", limit: 500 }));
  t.same(lines.slice(0, -1), [
    "call demo.v1.OpsService/ExportTable by agent sql-agent on behalf of alice on host prod-db-1",
    "rule status: no match: method ExportTable is not GetStatus",
    "rule other-service: no match: service demo.v1.OpsService is not demo.v2.OpsService",
    "rule broken-allow: skipped: condition error (field not found: dry_run); a broken allow rule never allows",
    "rule small: no match: condition is false: request.limit < 10",
    'rule customers: fires: approve (condition is true: request.table == "customers")',
    "rule last: not reached (rule customers decided first)",
  ]);
  t.match(lines.at(-1), /^verdict: approve by rule customers: .*risk high; reviewers: 1 of security; credential: database database\/export/);

  const failClosed = explainCall(policy, call("ExportTable", { limit: 500 }));
  t.match(failClosed, ["call demo.v1.OpsService/ExportTable by agent sql-agent on behalf of alice on host prod-db-1"]);
  t.ok(failClosed.includes("rule customers: fires as deny: condition error (field not found: table); fail closed"));
  t.match(failClosed.at(-1), /^verdict: deny by rule customers: .*fail closed/);

  const unmatched = explainCall(Policy.parse("version: 1\ndefault: allow"), { ...call("GetStatus"), identity: undefined });
  t.same(unmatched, [
    "call demo.v1.OpsService/GetStatus by an unauthenticated caller on host prod-db-1",
    "no rule matched: the default is allow",
    "verdict: allow by the default: no rule matched demo.v1.OpsService/GetStatus; the policy default is allow",
    "but the caller is unauthenticated and the default is not anonymous: the sidecar answers UNAUTHENTICATED",
  ]);
});

const openWatchers = (): number => process.getActiveResourcesInfo().filter((resource) => resource === "FSEventWrap").length;

async function waitFor(check: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

await t.test("PolicyWatcher reloads on change and keeps the last good policy", async (t) => {
  const directory = await mkdtemp(join(tmpdir(), "airlock-policy-"));
  const path = join(directory, "policy.yaml");
  const policyAllowing = (method: string): string => `version: 1\nrules:\n  - id: allow-${method.toLowerCase()}\n    match: { service: demo.v1.OpsService, method: ${method} }\n    effect: allow\n`;
  await writeFile(path, policyAllowing("GetStatus"));

  const reloads: Policy[] = [];
  const errors: AirlockError[] = [];
  const watcher = await PolicyWatcher.start(path, { onReload: (policy) => reloads.push(policy), onError: (error) => errors.push(error), debounceMs: 20 });
  t.teardown(async () => {
    await watcher.close();
    await rm(directory, { recursive: true, force: true });
  });
  t.equal(watcher.current().rules[0]?.id, "allow-getstatus");
  t.equal(watcher.current().source, path);

  await writeFile(path, policyAllowing("Tail"));
  await waitFor(() => watcher.current().rules[0]?.id === "allow-tail", "the rewritten policy");
  t.equal(reloads.at(-1), watcher.current(), "onReload got the new policy");
  t.equal(watcher.current().evaluate(call("Tail")).effect, "allow");

  // Editors save by writing a new file and renaming it over the old one.
  const temporary = join(directory, ".policy.yaml.swp");
  await writeFile(temporary, policyAllowing("RotateKey"));
  await rename(temporary, path);
  await waitFor(() => watcher.current().rules[0]?.id === "allow-rotatekey", "the policy renamed into place");

  const good = watcher.current();
  await writeFile(path, "version: 1\nrules:\n  - id: broken\n    match: { service: s.S, method: M }\n    effect: maybe\n");
  await waitFor(() => errors.length > 0, "onError for the broken file");
  t.equal(errors[0]?.code, Code.InvalidArgument);
  t.equal(errors[0]?.details.field, "rules[0].effect");
  t.equal(watcher.current(), good, "the last good policy stays in force");
  t.equal(watcher.current().evaluate(call("RotateKey")).effect, "allow");

  await writeFile(path, policyAllowing("GrantRole"));
  await waitFor(() => watcher.current().rules[0]?.id === "allow-grantrole", "recovery after a broken file");

  const watchersOpen = openWatchers();
  await watcher.close();
  t.equal(openWatchers(), watchersOpen - 1, "close() releases the directory watch");
  const reloadsAtClose = reloads.length;
  await writeFile(path, policyAllowing("ExportTable"));
  await new Promise((resolve) => setTimeout(resolve, 150));
  t.equal(reloads.length, reloadsAtClose, "no reloads after close");
  t.equal(watcher.current().rules[0]?.id, "allow-grantrole");
});

await t.test("PolicyWatcher.start fails on a missing or invalid file and leaves nothing open", async (t) => {
  const directory = await mkdtemp(join(tmpdir(), "airlock-policy-"));
  t.teardown(() => rm(directory, { recursive: true, force: true }));
  const watchersBefore = openWatchers();
  await t.rejects(PolicyWatcher.start(join(directory, "absent.yaml")), { code: Code.NotFound });
  const path = join(directory, "policy.yaml");
  await writeFile(path, "version: 1\nrules: nope\n");
  await t.rejects(PolicyWatcher.start(path), { code: Code.InvalidArgument, details: { field: "rules", source: path } });
  t.equal(openWatchers(), watchersBefore, "no file watcher is left open");
});

await t.test("anonymous: true lets callers without identity pass a rule; it is refused on approve rules", async (t) => {
  const policy = Policy.parse(
    `
version: 1
rules:
  - id: health
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
    anonymous: true
  - id: tail
    match: { service: demo.v1.OpsService, method: Tail }
    effect: allow
`,
    "anon.yaml",
  );
  t.same(
    policy.rules.map((rule) => [rule.id, rule.anonymous]),
    [
      ["health", true],
      ["tail", false],
    ],
  );
  const call = (method: string): PolicyCall => ({ service: ops, method, host: "h", request: () => ({}) });
  t.equal(policy.evaluate(call("GetStatus")).anonymous, true);
  t.equal(policy.evaluate(call("Tail")).anonymous, undefined, "a rule without the flag needs an authenticated agent");
  t.equal(policy.evaluate(call("GrantRole")).anonymous, undefined, "so does the default");
  t.match(explainCall(policy, call("Tail")).at(-1), /unauthenticated and rule tail is not anonymous/);
  t.notMatch(explainCall(policy, call("GetStatus")).join("\n"), /UNAUTHENTICATED/);

  const refused = (() => {
    try {
      Policy.parse(
        `version: 1
rules:
  - id: rotate
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    anonymous: true
    approve: { risk: low, reviewers: { all_of: [{ group: security }] }, credential: { kind: vault_token, policies: [p] } }
`,
        "bad.yaml",
      );
    } catch (error) {
      return error as AirlockError;
    }
    return undefined;
  })();
  t.equal(refused?.code, Code.InvalidArgument);
  t.match(refused?.rawMessage, /rules\[0\]\.anonymous/);
  t.match(refused?.rawMessage, /needs an authenticated agent/);
});
