// The demo's configs (demo/config/), as `npm run demo` and docker-compose.yml use them,
// parsed by the real parsers with a test environment: they cannot rot unnoticed.
import { generateKeyPairSync } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";
import { parseApprovalConfig } from "../../broker/rules.js";
import { parseBrokerConfig } from "../../broker/server.js";
import { AirlockError, Code, type ConfigEnv, readConfigFile } from "../../common/index.js";
import { demoDatabaseEngine, demoKeyFileNames, demoKeyId } from "../../demo/setup.js";
import { descriptorSetPath } from "../../proto/index.js";
import { parseSidecarConfig, Policy, type PolicyCall } from "../../sidecar/index.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const configDir = join(root, "demo", "config");
const sidecarPath = join(configDir, "sidecar.yaml");
const brokerPath = join(configDir, "broker.yaml");
const policyPath = join(configDir, "policy.yaml");

const env: ConfigEnv = {
  AIRLOCK_NATS_URL: "tls://nats:4222",
  AIRLOCK_NATS_SEED_FILE: "/nats/demo-host.nk",
  AIRLOCK_NATS_CA: "/nats/ca.pem",
  AIRLOCK_VAULT_ADDR: "http://vault:8200",
  AIRLOCK_VAULT_TOKEN: "root-token",
  AIRLOCK_OPS_ADDR: "ops:50051",
  AIRLOCK_DIR: "/airlock",
  AIRLOCK_AUDIT_CHECKPOINTS: "/checkpoints",
  AIRLOCK_IDP_PUBLIC_KEY: generateKeyPairSync("ed25519").publicKey.export({ type: "spki", format: "pem" }).toString(),
  AIRLOCK_DEMO_DANA_TOKEN: "dana-token",
  AIRLOCK_DEMO_SAM_TOKEN: "sam-token",
  AIRLOCK_NOTIFY_SECRET: "a-notify-secret-for-tests",
};

const policy = Policy.parse(await readFile(policyPath, "utf8"), policyPath);

function call(method: string): PolicyCall {
  return { service: "demo.v1.OpsService", method, host: "demo-host", request: () => ({}) };
}

await t.test("sidecar.yaml parses with parseSidecarConfig and the test environment", async (t) => {
  const config = parseSidecarConfig(await readConfigFile(sidecarPath, { env }));
  t.same(config.listen, { host: "127.0.0.1", port: 7443 }, "listen defaults to loopback");
  t.same(config.metrics, { host: "127.0.0.1", port: 9464 });
  t.equal(config.upstreams.length, 1);
  t.equal(config.upstreams[0]?.address, "ops:50051");
  t.same(config.upstreams[0]?.descriptorSets, [descriptorSetPath], "the checked-in descriptor set, resolved against demo/config/");
  t.ok(existsSync(descriptorSetPath));
  t.same(config.nats, { servers: ["tls://nats:4222"], auth: { kind: "nkey", seedFile: "/nats/demo-host.nk" }, tls: { caFile: "/nats/ca.pem" } });
  t.equal(config.vault.address, "http://vault:8200");
  t.same(config.brokerKeys, { [demoKeyId]: `/airlock/${demoKeyFileNames.brokerPublicKey}` });
  t.equal(config.host, "demo-host");
  t.equal(config.policyFile, policyPath, "the policy next to it");
  t.equal(config.agentAuth.length, 1);
  const auth = config.agentAuth[0];
  t.equal(auth?.kind, "jwt");
  if (auth?.kind === "jwt") {
    t.equal(auth.issuer, "airlock-demo");
    t.equal(auth.audience, "airlock-sidecar");
    t.same(auth.keys, { kind: "static", publicKeys: [env.AIRLOCK_IDP_PUBLIC_KEY] }, "the key text from the environment, newlines kept");
  }
  t.equal(config.logLevel, "info");
});

await t.test("sidecar.yaml takes the container addresses from the environment", async (t) => {
  const config = parseSidecarConfig(
    await readConfigFile(sidecarPath, { env: { ...env, AIRLOCK_SIDECAR_LISTEN: "0.0.0.0:7443", AIRLOCK_SIDECAR_METRICS: "0.0.0.0:9464", AIRLOCK_HOST: "compose", AIRLOCK_LOG_LEVEL: "debug" } }),
  );
  t.same(config.listen, { host: "0.0.0.0", port: 7443 });
  t.same(config.metrics, { host: "0.0.0.0", port: 9464 });
  t.equal(config.host, "compose");
  t.equal(config.logLevel, "debug");
});

await t.test("a missing variable fails naming the field and the variable", async (t) => {
  const { AIRLOCK_OPS_ADDR: _unused, ...withoutOps } = env;
  const error = await readConfigFile(sidecarPath, { env: withoutOps }).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(error instanceof AirlockError);
  t.equal((error as AirlockError).code, Code.InvalidArgument);
  t.same((error as AirlockError).details, { field: "upstreams[0].address", source: sidecarPath, variable: "AIRLOCK_OPS_ADDR" });
});

await t.test("policy.yaml loads with the real policy loader and gives each method its effect", async (t) => {
  t.equal(policy.defaultEffect, "deny");
  t.equal(policy.evaluate(call("GetStatus")).effect, "allow");
  t.equal(policy.evaluate(call("Tail")).effect, "allow");
  const grant = policy.evaluate(call("GrantRole"));
  t.equal(grant.effect, "deny");
  t.equal(grant.ruleId, "ops-grant-role");
  t.equal(policy.evaluate({ ...call("Anything"), service: "other.v1.Service" }).effect, "deny", "default deny");

  const exportTable = policy.evaluate(call("ExportTable"));
  t.equal(exportTable.effect, "approve");
  t.same(exportTable.approve, {
    risk: "high",
    description: "An export copies customer records (names, emails, plans) out of the database; once out, they cannot be called back.",
    reviewers: { allOf: [{ group: "data-owners", minApprovals: 1 }], breakGlass: false },
    credential: { kind: "database", mount: "database", role: "export", ttlMs: 300_000, injectHeader: "x-airlock-credential", description: "SELECT on customers" },
    redact: [],
    requireReason: true,
    timeoutMs: 3_600_000,
  });

  const rotate = policy.evaluate(call("RotateKey"));
  t.equal(rotate.effect, "approve");
  t.equal(rotate.approve?.risk, "medium");
  t.same(rotate.approve?.reviewers.allOf, [{ group: "security", minApprovals: 1 }]);
  t.same(rotate.approve?.credential, { kind: "vault_token", policies: ["default"], numUses: 5, ttlMs: 60_000, injectHeader: "x-airlock-credential", description: "Vault's default policy only (the token can look itself up)" });

  t.equal(policy.evaluate(call("ImportRows")).effect, "deny", "the write-capable import is not for the demo host");
  const importRows = policy.evaluate({ ...call("ImportRows"), host: "ingest-host" });
  t.equal(importRows.effect, "approve", "only for the ingest host");
  t.equal(importRows.approve?.risk, "high");
  t.same(importRows.approve?.credential, { kind: "database", mount: "database", role: "import", ttlMs: 300_000, injectHeader: "x-airlock-credential", description: "SELECT and INSERT on customers" });
});

await t.test("the database credentials the policy asks for are the ones demo/setup.ts configures in Vault", async (t) => {
  for (const rule of policy.rules) {
    const credential = rule.approve?.credential;
    if (credential?.kind !== "database") continue;
    t.equal(credential.mount, demoDatabaseEngine.mount, `${rule.id}: mount`);
    t.ok(([demoDatabaseEngine.exportRole, demoDatabaseEngine.importRole] as string[]).includes(credential.role), `${rule.id}: role ${credential.role}`);
  }
});

await t.test("broker.yaml: approvals parse with parseApprovalConfig; every group the policy names exists", async (t) => {
  const broker = await readConfigFile(brokerPath, { env });
  const approvals = parseApprovalConfig(broker.object("approvals"));
  t.same(Object.fromEntries(approvals.groups), { "data-owners": ["dana@example.com"], security: ["sam@example.com"] });
  for (const rule of policy.rules) {
    for (const requirement of rule.approve?.reviewers.allOf ?? []) t.ok(approvals.groups.has(requirement.group), `${rule.id}: group ${requirement.group} is defined`);
  }
});

await t.test("broker.yaml: the other sections, after expansion", async (t) => {
  const broker = await readConfigFile(brokerPath, { env });
  t.equal(broker.address("http").text, "127.0.0.1:9465", "the console on loopback by default");
  t.equal((await readConfigFile(brokerPath, { env: { ...env, AIRLOCK_BROKER_HTTP: "0.0.0.0:9465" } })).address("http").text, "0.0.0.0:9465");
  const nats = broker.object("nats");
  t.equal(nats.string("url"), "tls://nats:4222");
  const vault = broker.object("vault");
  t.equal(vault.string("address"), "http://vault:8200");
  t.same({ kind: vault.object("auth").string("kind"), token: vault.object("auth").string("token") }, { kind: "token", token: "root-token" });
  const signing = broker.object("signing_key");
  t.equal(signing.string("key_id"), demoKeyId, "the key id the sidecar trusts");
  t.equal(signing.file("file"), `/airlock/${demoKeyFileNames.brokerPrivateKey}`);
  const auth = broker.object("reviewers").object("auth");
  t.equal(auth.string("kind"), "static");
  const tokens = auth.list("tokens").map((entry) => ({ token: entry.string("token"), reviewer: entry.string("reviewer"), groups: entry.strings("groups") }));
  t.same(tokens, [
    { token: "dana-token", reviewer: "dana@example.com", groups: ["data-owners"] },
    { token: "sam-token", reviewer: "sam@example.com", groups: ["security"] },
  ]);
});

await t.test("broker.yaml as a whole parses with parseBrokerConfig", async (t) => {
  const config = parseBrokerConfig(await readConfigFile(brokerPath, { env }));
  t.equal(config.signingKey.keyId, demoKeyId);
  t.same(config.http, { host: "127.0.0.1", port: 9465 });
  t.ok(config.reviewers !== undefined, "with the reviewers' API");
  t.same(
    config.notifications.webhooks.map((webhook) => webhook.url),
    ["http://127.0.0.1:9466/airlock/notifications"],
    "someone is notified: the demo's webhook receiver on loopback, by default",
  );
  t.equal(config.notifications.webhooks[0]?.secret, "a-notify-secret-for-tests", "signed with the secret from the environment");
  t.equal(config.policyFile, policyPath, "the central policy is the sidecar's policy file");
});
