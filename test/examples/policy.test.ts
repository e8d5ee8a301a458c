// examples/policy.yaml loads with the sidecar's real policy loader and does what its
// comments say, and every service, method and request field it names exists in
// examples/proto; examples/sidecar.yaml and examples/broker.yaml parse with the real
// config parsers and define what the policy needs: the examples cannot rot. Nothing is
// generated at run time (the policy loader needs no descriptors; the proto is read as text).
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { JsonObject } from "@bufbuild/protobuf";
import t from "tap";
import { parseBrokerConfig } from "../../broker/server.js";
import { AirlockError, readConfigFile } from "../../common/index.js";
import { parseSidecarConfig, Policy, type PolicyCall, type PolicyVerdict } from "../../sidecar/index.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const policyPath = join(root, "examples", "policy.yaml");
const protoPath = join(root, "examples", "proto", "acme", "platform", "v1", "platform.proto");
const policy = Policy.parse(readFileSync(policyPath, "utf8"), policyPath);

/** The services, their methods and request types, and every message's fields, read from the proto's text. */
function readProto(text: string): { packageName: string; methods: Map<string, { service: string; method: string; input: string }>; messages: Map<string, string[]> } {
  const code = text.replace(/\/\/[^\n]*/g, "");
  const packageName = /^\s*package\s+([\w.]+)\s*;/m.exec(code)?.[1] ?? "";
  const methods = new Map<string, { service: string; method: string; input: string }>();
  for (const service of code.matchAll(/service\s+(\w+)\s*\{([^}]*)\}/g)) {
    for (const rpc of (service[2] ?? "").matchAll(/rpc\s+(\w+)\s*\(\s*(?:stream\s+)?(\w+)\s*\)/g)) {
      const name = `${packageName}.${service[1] ?? ""}`;
      methods.set(`${name}/${rpc[1] ?? ""}`, { service: name, method: rpc[1] ?? "", input: rpc[2] ?? "" });
    }
  }
  const messages = new Map<string, string[]>();
  for (const message of code.matchAll(/message\s+(\w+)\s*\{([^}]*)\}/g)) {
    const fields = [...(message[2] ?? "").matchAll(/(?:^|;|\n)\s*(?:repeated\s+)?(?:map\s*<[^>]*>|[\w.]+)\s+(\w+)\s*=\s*\d+/g)].map((field) => field[1] ?? "");
    messages.set(message[1] ?? "", fields);
  }
  return { packageName, methods, messages };
}

/** proto field name → its protobuf JSON name (lowerCamelCase), as the sidecar shows requests to policy. */
function jsonName(field: string): string {
  return field.replace(/_([a-z0-9])/g, (_, letter: string) => letter.toUpperCase());
}

const proto = readProto(readFileSync(protoPath, "utf8"));

function call(service: string, method: string, request: JsonObject = {}, extra: Partial<PolicyCall> = {}): PolicyCall {
  return {
    service: `acme.platform.v1.${service}`,
    method,
    host: "build-runner-7",
    identity: { agent: "spiffe://acme/agent/ops-bot", onBehalfOf: "alice@acme.example", chain: ["spiffe://acme/agent/ops-bot", "alice@acme.example"], authenticatedBy: "jwt" },
    now: new Date("2025-03-04T10:00:00Z"),
    request: () => request,
    ...extra,
  };
}

function verdict(c: PolicyCall): PolicyVerdict {
  return policy.evaluate(c);
}

await t.test("examples/policy.yaml loads with the real policy loader", async (t) => {
  t.equal(policy.defaultEffect, "deny");
  t.ok(policy.rules.length >= 10);
  const kinds = new Set(policy.rules.flatMap((rule) => (rule.approve === undefined ? [] : [rule.approve.credential.kind])));
  t.same([...kinds].sort(), ["database", "vault_token"], "both kinds of credential are shown");
});

await t.test("every rule names a service and method that exist in examples/proto", async (t) => {
  t.equal(proto.packageName, "acme.platform.v1");
  t.ok(proto.methods.size >= 9, "the proto was read");
  for (const rule of policy.rules) {
    t.not(rule.service, "*", `${rule.id}: names its service`);
    t.not(rule.method, "*", `${rule.id}: names its method`);
    t.ok(proto.methods.has(`${rule.service}/${rule.method}`), `${rule.id}: ${rule.service}/${rule.method} exists`);
  }
  const covered = new Set(policy.rules.map((rule) => `${rule.service}/${rule.method}`));
  for (const path of proto.methods.keys()) t.ok(covered.has(path), `${path} has a rule (nothing is left to the default by accident)`);
});

await t.test("conditions and redactions use request fields the method's request message has, by their JSON names", async (t) => {
  for (const rule of policy.rules) {
    const input = proto.methods.get(`${rule.service}/${rule.method}`)?.input ?? "";
    const fields = (proto.messages.get(input) ?? []).map(jsonName);
    t.ok(fields.length > 0 || rule.when === undefined, `${rule.id}: ${input} was read`);
    for (const match of (rule.when ?? "").matchAll(/request\.(\w+)/g)) t.ok(fields.includes(match[1] ?? ""), `${rule.id}: request.${match[1]} is a field of ${input}`);
    for (const path of rule.approve?.redact ?? []) t.ok(fields.includes(path.split(".")[0] ?? ""), `${rule.id}: redact ${path} starts at a field of ${input}`);
  }
});

await t.test("reads are allowed; an unknown method is denied by default", async (t) => {
  t.equal(verdict(call("DataService", "ListTables")).effect, "allow");
  t.equal(verdict(call("KeyService", "GetKey")).effect, "allow");
  t.equal(verdict(call("AccessService", "ListRoleBindings")).effect, "allow");
  t.equal(verdict(call("InfraService", "GetDeployment")).effect, "allow");
  const unknown = verdict(call("DataService", "DropTable"));
  t.equal(unknown.effect, "deny");
  t.equal(unknown.ruleId, "default");
});

await t.test("data export: personal data needs two groups and a reason; small exports are low risk", async (t) => {
  const personal = verdict(call("DataService", "ExportTable", { table: "customers", filter: { email: "bob@example.com" } }));
  t.equal(personal.ruleId, "export-personal-data");
  t.equal(personal.approve?.risk, "high");
  t.same(
    personal.approve?.reviewers.allOf.map((requirement) => requirement.group),
    ["data-owners", "privacy"],
  );
  t.same(personal.approve?.redact, ["filter.email"]);
  t.equal(personal.approve?.requireReason, true);
  t.same(personal.approve?.credential, { kind: "database", mount: "warehouse", role: "readonly", ttlMs: 900_000, injectHeader: "x-airlock-credential", description: "SELECT on the warehouse" });
  t.match(personal.approve?.description, /personal data/, "reviewers are told why it is risky");

  const small = verdict(call("DataService", "ExportTable", { table: "orders", rowLimit: 500 }));
  t.equal(small.ruleId, "export-small");
  t.equal(small.approve?.risk, "low");
  const whole = verdict(call("DataService", "ExportTable", { table: "orders" }));
  t.equal(whole.ruleId, "export-table", "no row limit: the whole table");
  t.equal(whole.approve?.risk, "medium");
});

await t.test("key rotation: production keys need two security approvers", async (t) => {
  const production = verdict(call("KeyService", "RotateKey", { keyId: "prod/payments-signing" }));
  t.equal(production.ruleId, "rotate-production-key");
  t.same(production.approve?.reviewers.allOf, [{ group: "security", minApprovals: 2 }]);
  t.same(production.approve?.credential, { kind: "vault_token", policies: ["kms-rotate-prod"], numUses: 3, ttlMs: 120_000, injectHeader: "x-airlock-credential", description: "rotate production KMS keys" });
  t.equal(verdict(call("KeyService", "RotateKey", { keyId: "staging/payments-signing" })).ruleId, "rotate-key");
});

await t.test("role grants: admin roles and self-grants are denied, others need security", async (t) => {
  for (const role of ["admin", "owner", "billing-admin"]) {
    const denied = verdict(call("AccessService", "GrantRole", { principal: "user:bob@acme.example", role, scope: "project/billing" }));
    t.equal(denied.effect, "deny", role);
    t.equal(denied.ruleId, "no-admin-grants", role);
  }
  const self = verdict(call("AccessService", "GrantRole", { principal: "user:alice@acme.example", role: "editor", scope: "project/billing" }));
  t.equal(self.effect, "deny");
  t.equal(self.ruleId, "no-self-grants");
  const grant = verdict(call("AccessService", "GrantRole", { principal: "user:bob@acme.example", role: "viewer", scope: "project/billing" }));
  t.equal(grant.ruleId, "grant-role");
  t.equal(grant.approve?.reviewers.breakGlass, true);
  const missingRole = verdict(call("AccessService", "GrantRole", { principal: "user:bob@acme.example" }));
  t.equal(missingRole.effect, "deny", "a request without a role fails closed");
});

await t.test("infrastructure: small non-production scaling is allowed; production changes need SRE and the CAB, by day", async (t) => {
  t.equal(verdict(call("InfraService", "ScaleDeployment", { environment: "staging", deployment: "api", replicas: 4 })).effect, "allow");
  t.equal(verdict(call("InfraService", "ScaleDeployment", { environment: "staging", deployment: "api", replicas: 40 })).ruleId, "scale-deployment");
  t.equal(verdict(call("InfraService", "ScaleDeployment", { environment: "production", deployment: "api", replicas: 4 })).ruleId, "scale-deployment");

  const change = { environment: "production", changeId: "CHG-1042", planUrl: "https://ci.acme.example/plans/1042", variables: { db_password: "s3cret" } };
  const day = verdict(call("InfraService", "ApplyChange", change));
  t.equal(day.ruleId, "apply-production-change");
  t.equal(day.approve?.risk, "critical");
  t.same(day.approve?.reviewers.allOf, [
    { group: "sre", minApprovals: 2 },
    { group: "change-advisory", minApprovals: 1 },
  ]);
  t.same(day.approve?.redact, ["variables"]);
  t.equal(day.approve?.timeoutMs, 4 * 3_600_000);
  const night = verdict(call("InfraService", "ApplyChange", change, { now: new Date("2025-03-04T23:30:00Z") }));
  t.equal(night.effect, "deny");
  t.equal(night.ruleId, "no-night-production-changes");
  t.equal(verdict(call("InfraService", "ApplyChange", { ...change, environment: "staging" }, { now: new Date("2025-03-04T23:30:00Z") })).ruleId, "apply-change");
});

await t.test("examples/sidecar.yaml parses with parseSidecarConfig, fronting the proto's services with this policy", async (t) => {
  const config = parseSidecarConfig(await readConfigFile(join(root, "examples", "sidecar.yaml"), { env: {} }));
  t.equal(config.policyFile, policyPath);
  t.same(config.upstreams[0]?.descriptorSets, [join(root, "examples", "descriptors.binpb")], "the descriptor set the README builds, next to the config");
  t.same([...(config.upstreams[0]?.services ?? [])].sort(), [...new Set([...proto.methods.values()].map((method) => method.service))].sort());
  t.same(
    config.agentAuth.map((auth) => auth.kind),
    ["mtls", "jwt"],
  );
  t.ok(config.tls?.clientCa !== undefined, "agents must present a client certificate");
  t.same(config.nats.servers, ["tls://nats.internal:4222"], "the default when AIRLOCK_NATS_URL is unset");
});

await t.test("examples/broker.yaml parses with parseBrokerConfig and defines every group the policy names", async (t) => {
  const brokerPath = join(root, "examples", "broker.yaml");
  const config = parseBrokerConfig(await readConfigFile(brokerPath, { env: { AIRLOCK_VAULT_SECRET_ID: "secret-id-from-the-environment" } }));
  t.same(config.vault.auth, { kind: "approle", roleId: "airlock-broker", secretId: "secret-id-from-the-environment", mount: "approle" });
  const named = new Set(policy.rules.flatMap((rule) => [...(rule.approve?.reviewers.allOf.map((requirement) => requirement.group) ?? []), ...(rule.approve?.reviewers.escalation === undefined ? [] : [rule.approve.reviewers.escalation.group])]));
  for (const group of named) t.ok(config.approvals.groups.has(group), `group ${group} is defined`);
  for (const [group, members] of config.approvals.groups) {
    const needed = Math.max(0, ...policy.rules.flatMap((rule) => rule.approve?.reviewers.allOf.filter((requirement) => requirement.group === group).map((requirement) => requirement.minApprovals) ?? []));
    t.ok(members.length >= needed, `${group} has enough members (${members.length}) for its largest min_approvals (${needed})`);
  }
  const missing = await readConfigFile(brokerPath, { env: {} }).then(
    () => undefined,
    (error: unknown) => error,
  );
  t.ok(missing instanceof AirlockError && missing.details.field === "vault.auth.secret_id", "the secret comes from the environment, and its absence names the field");
});
