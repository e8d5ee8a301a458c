import { Writable } from "node:stream";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import pg from "pg";
import t, { type Test } from "tap";
import {
  brokerVaultPolicy,
  CredentialIssuer,
  configureDatabaseEngine,
  configureTokenRole,
  credentialIssuerDefaults,
  type IssuedCredential,
  postgresRoleStatements,
} from "../../broker/credentials.js";
import { AirlockError, Code, createLogger, createVaultClient } from "../../common/index.js";
import { delay, startVault, useInfra } from "../../harness/index.js";
import { type ApprovalRequest, ApprovalRequestSchema, type CredentialTemplateSchema } from "../../proto/index.js";

const { vault, database } = await useInfra(t, { vault: true, database: true });

// The broker's client acts with the dev server's root token; the sidecar's has no token at all:
// the wrapping token is its only credential, as in production.
const broker = createVaultClient({ address: vault.address, token: vault.rootToken });
const sidecar = createVaultClient({ address: vault.address });

// Every issuer in this file logs here, so the test can check that no secret reached a log line.
const logLines: string[] = [];
const logger = createLogger({
  name: "broker",
  level: "info",
  destination: new Writable({
    write(chunk: Buffer, _encoding, done) {
      logLines.push(chunk.toString("utf8"));
      done();
    },
  }),
});
const issuer = new CredentialIssuer({ vault: broker, logger });

const admin = new pg.Client({ connectionString: database.url });
await admin.connect();
await admin.query("CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL)");
await admin.query("INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace')");
// Teardowns run last-registered first: this one runs before the harness drops the database.
t.teardown(() => admin.end());

let sequence = 0;
function approvalRequest(credential: MessageInitShape<typeof CredentialTemplateSchema> | undefined): ApprovalRequest {
  sequence++;
  return create(ApprovalRequestSchema, {
    id: `req-${sequence}`,
    identity: { agent: "spiffe://agents/exporter", onBehalfOf: "ada@example.com" },
    host: "host-1",
    service: "demo.v1.OpsService",
    method: "ExportTable",
    ruleId: "export-customers",
    ...(credential === undefined ? {} : { credential }),
  });
}

function secondsUntil(when: Date): number {
  return (when.getTime() - Date.now()) / 1000;
}

async function caught(promise: Promise<unknown>): Promise<AirlockError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(error instanceof AirlockError)) throw new Error(`expected an AirlockError, got ${String(error)}`);
  return error;
}

function assertNoSecretIn(t: Test, what: string, text: string, secrets: readonly string[]): void {
  for (const secret of secrets) t.notOk(text.includes(secret), `${what} does not contain the secret`);
}

/** How many tokens and leases Vault holds: what "issued nothing" is checked against (LIST needs sudo; root has it). */
async function vaultInventory(): Promise<{ tokens: number; leases: number }> {
  const list = async (path: string) => {
    const response = await fetch(`${vault.address}/v1/${path}`, { method: "LIST", headers: { "X-Vault-Token": vault.rootToken } });
    if (response.status === 404) return 0;
    return ((await response.json()) as { data: { keys: string[] } }).data.keys.length;
  };
  return { tokens: await list("auth/token/accessors"), leases: await list("sys/leases/lookup/airlock-db/creds/export/") };
}

// --- the database engine against this test's database. All setup happens before the first
// subtest: tap ends the root test once its subtests have drained, even mid top-level await.
const adminUrl = new URL(database.url);
const engine = {
  mount: "airlock-db",
  connectionName: "test",
  // The machine's PostgreSQL trusts loopback logins, so the password Vault is given is not checked.
  connectionUrl: `postgresql://{{username}}:{{password}}@${database.host}:${database.port}/${database.name}?sslmode=disable`,
  username: decodeURIComponent(adminUrl.username) || "postgres",
  password: "unused-on-trusted-loopback",
  roles: [
    {
      name: "export",
      // CREATE on the schema lets the user own a table, so revocation must handle owned objects and grants.
      ...postgresRoleStatements('GRANT SELECT ON customers TO "{{name}}"; GRANT CREATE ON SCHEMA public TO "{{name}}";'),
      defaultTtlSeconds: 300,
      maxTtlSeconds: 600,
    },
  ],
};
await configureDatabaseEngine(broker, engine);

await broker.writePolicy("airlock-action-rotate", 'path "secret/data/keys/*" { capabilities = ["read"] }');

await t.test("vault_token: issued wrapped, unwraps once, carries the request's meta, policies and ttl, and dies on revoke", async (t) => {
  const request = approvalRequest({ kind: { case: "vaultToken", value: { policies: ["airlock-action-rotate"], numUses: 5 } }, ttl: durationFromMs(120_000), injectHeader: "x-vault-token" });
  const issued = await issuer.issue(request);
  t.equal(issued.kind, "vault_token");
  t.equal(issued.delivery.kind, "vault_token");
  t.equal(issued.delivery.injectHeader, "x-vault-token");
  t.match(issued.delivery.wrappingToken, /^hvs\./);
  t.ok(issued.delivery.wrappingAccessor !== "");
  const wrapExpiresAt = issued.delivery.wrapExpiresAt;
  if (wrapExpiresAt === undefined) throw new Error("the delivery has no wrap expiry");
  const wrapLeft = secondsUntil(timestampDate(wrapExpiresAt));
  t.ok(wrapLeft > 50 && wrapLeft <= credentialIssuerDefaults.wrapTtlSeconds, `the wrapping token lives the default 60 s (${wrapLeft.toFixed(1)} s left)`);
  const left = secondsUntil(issued.expiresAt);
  t.ok(left > 110 && left <= 121, `expiresAt is the template's ttl from now (${left.toFixed(1)} s)`);

  // As the sidecar does it: the wrapping token is the only credential it needs.
  const unwrapped = await sidecar.unwrap(issued.delivery.wrappingToken);
  const token = unwrapped.auth?.clientToken ?? "";
  t.match(token, /^hvs\./, "the wrapped response holds a token");
  t.equal(unwrapped.auth?.accessor, issued.leaseId, "the broker kept the token's accessor as the lease id");
  assertNoSecretIn(t, "the issued credential", JSON.stringify({ ...issued, delivery: { ...issued.delivery, wrapExpiresAt: undefined } }), [token]);

  const info = await sidecar.lookupSelf(token);
  t.same(info.meta, { airlock_request_id: request.id, airlock_rule_id: "export-customers", airlock_agent: "spiffe://agents/exporter" });
  t.same([...info.policies].sort(), ["airlock-action-rotate", "default"]);
  t.ok(info.ttl > 0 && info.ttl <= 120, `ttl ${info.ttl} s is at most the template's 120 s`);
  t.ok(info.numUses > 0 && info.numUses <= 5, `uses are limited (${info.numUses} left)`);
  t.equal(info.orphan, true, "an orphan: it does not die with the broker's token");
  t.equal(info.renewable, false, "not renewable: the upstream cannot stretch its life");

  const again = await caught(sidecar.unwrap(issued.delivery.wrappingToken));
  t.equal(again.code, Code.PermissionDenied, "a second unwrap is refused");

  await issuer.revoke(issued);
  const dead = await caught(sidecar.lookupSelf(token));
  t.equal(dead.code, Code.PermissionDenied, "the revoked token is dead");
  t.equal((await caught(broker.lookupAccessor(issued.leaseId))).code, Code.NotFound, "its accessor is gone");
  await issuer.revoke(issued);
  await issuer.revoke({ kind: "vault_token", leaseId: issued.leaseId });
  t.pass("revoking again succeeds");
  assertNoSecretIn(t, "the broker's log", logLines.join(""), [token, issued.delivery.wrappingToken]);
});

function databaseRequest(ttlMs = 60_000): ApprovalRequest {
  return approvalRequest({ kind: { case: "database", value: { mount: "airlock-db", role: "export" } }, ttl: durationFromMs(ttlMs), injectHeader: "" });
}

function userClient(user: string, password: string): pg.Client {
  return new pg.Client({ host: database.host, port: database.port, database: database.name, user, password });
}

async function roleExists(name: string): Promise<boolean> {
  return (await admin.query("SELECT 1 FROM pg_roles WHERE rolname = $1", [name])).rowCount === 1;
}

await t.test("configuring the engine again is idempotent, and a mount of another type is refused", async (t) => {
  await configureDatabaseEngine(broker, engine);
  t.pass("second configuration succeeded");
  const error = await caught(broker.mount("airlock-db", "kv"));
  t.equal(error.code, Code.AlreadyExists);
});

await t.test("database: issued wrapped with a lease cut to the template's ttl; revoke ends the open session and drops the user", async (t) => {
  const issued = await issuer.issue(databaseRequest());
  t.equal(issued.kind, "database");
  t.equal(issued.delivery.kind, "database");
  t.equal(issued.delivery.injectHeader, credentialIssuerDefaults.injectHeader, "an empty inject_header gets the sidecar's default");
  t.match(issued.leaseId, /^airlock-db\/creds\/export\//);
  const lease = await broker.lookupLease(issued.leaseId);
  t.ok(lease.ttl > 0 && lease.ttl <= 60, `Vault holds the lease for the template's 60 s, not the role's 300 s (${lease.ttl} s)`);
  const left = secondsUntil(issued.expiresAt);
  t.ok(left > 55 && left <= 61, `expiresAt follows the shortened lease (${left.toFixed(1)} s)`);

  const unwrapped = await sidecar.unwrap(issued.delivery.wrappingToken);
  const { username, password } = unwrapped.data as { username: string; password: string };
  t.match(username, /^v-/);
  t.ok(typeof password === "string" && password.length > 0);
  t.equal((await caught(sidecar.unwrap(issued.delivery.wrappingToken))).code, Code.PermissionDenied, "a second unwrap is refused");
  assertNoSecretIn(t, "the issued credential", JSON.stringify({ ...issued, delivery: { ...issued.delivery, wrapExpiresAt: undefined } }), [password]);
  const validUntil = (await admin.query<{ until: Date }>("SELECT rolvaliduntil AS until FROM pg_roles WHERE rolname = $1", [username])).rows[0]?.until;
  t.ok(validUntil !== undefined && secondsUntil(validUntil) <= 70, "the password expires with the shortened lease too");

  // The action's session: it reads, creates something it owns, and stays open.
  const session = userClient(username, password);
  const ended = new Promise<{ at: number; error: Error | undefined }>((resolve) => {
    let failure: Error | undefined;
    session.on("error", (error) => (failure = error));
    session.on("end", () => resolve({ at: performance.now(), error: failure }));
  });
  t.teardown(() => session.end().catch(() => undefined));
  await session.connect();
  const { rows } = await session.query<{ id: number; name: string }>("SELECT id, name FROM customers ORDER BY id");
  t.same(rows, [
    { id: 1, name: "Ada" },
    { id: 2, name: "Grace" },
  ]);
  await session.query("CREATE TABLE action_output (n int)");

  const started = performance.now();
  await issuer.revoke(issued);
  const revokeMs = performance.now() - started;
  const outcome = await Promise.race([ended, delay(1000).then(() => undefined)]);
  t.ok(outcome !== undefined, "the open session was terminated within 1 s");
  if (outcome !== undefined) {
    t.match(outcome.error?.message ?? "", /terminat/, "by the revocation statements");
    t.comment(`database revoke: sys/leases/revoke answered in ${revokeMs.toFixed(1)} ms; the open session ended ${(outcome.at - started).toFixed(1)} ms after revoke began`);
  }

  const late = userClient(username, password);
  const refused = await late.connect().then(
    () => undefined,
    (error: unknown) => error as { code?: string; message: string },
  );
  await late.end().catch(() => undefined);
  t.ok(refused !== undefined, "a new login fails");
  t.match(refused?.message ?? "", /does not exist/);
  t.equal(await roleExists(username), false, "the role is gone from pg_roles");
  const owner = (await admin.query<{ owner: string }>("SELECT tableowner AS owner FROM pg_tables WHERE tablename = 'action_output'")).rows[0]?.owner;
  t.equal(owner, engine.username, "what the action created survives, owned by the engine's user");
  t.equal((await caught(broker.lookupLease(issued.leaseId))).code, Code.NotFound, "the lease is gone");

  await issuer.revoke(issued);
  t.pass("revoking again succeeds");
  assertNoSecretIn(t, "the broker's log", logLines.join(""), [password, issued.delivery.wrappingToken]);
});

await t.test("database: revoking a lease whose user was already dropped by hand succeeds and clears the lease", async (t) => {
  const issued = await issuer.issue(databaseRequest());
  const { username } = (await sidecar.unwrap(issued.delivery.wrappingToken)).data as { username: string };
  await admin.query(`DROP OWNED BY "${username}"; DROP ROLE "${username}"`);
  await issuer.revoke(issued);
  t.equal((await caught(broker.lookupLease(issued.leaseId))).code, Code.NotFound);
});

await t.test("bad templates are invalid_argument and issue nothing", async (t) => {
  const cases: Array<[string, ApprovalRequest]> = [
    ["no template", approvalRequest(undefined)],
    ["no kind", approvalRequest({ ttl: durationFromMs(60_000) })],
    ["no ttl", approvalRequest({ kind: { case: "vaultToken", value: { policies: ["airlock-action-rotate"], numUses: 1 } } })],
    // Vault would give a token without policies its creator's policies: here, root's.
    ["no policies", approvalRequest({ kind: { case: "vaultToken", value: { policies: [], numUses: 1 } }, ttl: durationFromMs(60_000) })],
    ["the root policy", approvalRequest({ kind: { case: "vaultToken", value: { policies: ["root"], numUses: 1 } }, ttl: durationFromMs(60_000) })],
    ["no database role", approvalRequest({ kind: { case: "database", value: { mount: "airlock-db", role: "" } }, ttl: durationFromMs(60_000) })],
  ];
  const before = await vaultInventory();
  for (const [name, request] of cases) {
    const error = await caught(issuer.issue(request));
    t.equal(error.code, Code.InvalidArgument, name);
    t.equal(error.details.requestId, request.id);
  }
  const unknownRole = await caught(issuer.issue(approvalRequest({ kind: { case: "database", value: { mount: "airlock-db", role: "nope" } }, ttl: durationFromMs(60_000) })));
  t.equal(unknownRole.code, Code.InvalidArgument, "a role the engine does not have is Vault's invalid_argument");
  t.same(await vaultInventory(), before, "no token and no lease was created");
});

await t.test("a broker token with only brokerVaultPolicy issues and revokes both kinds through an orphan token role", async (t) => {
  await configureTokenRole(broker, { name: "airlock-action", allowedPoliciesGlob: ["airlock-action-*"], maxTtlSeconds: 3600 });
  await broker.writePolicy("airlock-broker", brokerVaultPolicy({ tokenRole: "airlock-action", databaseMounts: ["airlock-db"] }));
  const created = await fetch(`${vault.address}/v1/auth/token/create`, {
    method: "POST",
    headers: { "X-Vault-Token": vault.rootToken },
    body: JSON.stringify({ policies: ["airlock-broker"], ttl: "10m", no_default_policy: true }),
  });
  const brokerToken = ((await created.json()) as { auth: { client_token: string } }).auth.client_token;
  const limited = createVaultClient({ address: vault.address, token: brokerToken });
  const scoped = new CredentialIssuer({ vault: limited, tokenRole: "airlock-action" });

  const token = await scoped.issue(approvalRequest({ kind: { case: "vaultToken", value: { policies: ["airlock-action-rotate"], numUses: 1 } }, ttl: durationFromMs(60_000) }));
  const info = await limited.lookupAccessor(token.leaseId);
  t.equal(info.orphan, true, "the role makes it an orphan without sudo");
  t.same([...info.policies].sort(), ["airlock-action-rotate", "default"]);
  await scoped.revoke(token);
  t.equal((await caught(limited.lookupAccessor(token.leaseId))).code, Code.NotFound);

  const outside = await caught(scoped.issue(approvalRequest({ kind: { case: "vaultToken", value: { policies: ["airlock-broker"], numUses: 1 } }, ttl: durationFromMs(60_000) })));
  t.equal(outside.code, Code.InvalidArgument, "a policy outside the role's globs is refused by Vault");

  const withoutRole = await caught(
    new CredentialIssuer({ vault: limited }).issue(approvalRequest({ kind: { case: "vaultToken", value: { policies: ["airlock-action-rotate"], numUses: 1 } }, ttl: durationFromMs(60_000) })),
  );
  t.equal(withoutRole.code, Code.PermissionDenied, "without the role, the policy grants no create-orphan");

  const db = await scoped.issue(databaseRequest(30_000));
  t.ok((await limited.lookupLease(db.leaseId)).ttl <= 30, "shortening the lease needs no more than the policy");
  await scoped.revoke(db);
  t.equal((await caught(limited.lookupLease(db.leaseId))).code, Code.NotFound);
});

await t.test("Vault stopped: issue rejects with unavailable and returns nothing", async (t) => {
  const other = await startVault();
  const down = createVaultClient({ address: other.address, token: other.rootToken, timeoutMs: 1000 });
  await down.writePolicy("airlock-action-rotate", 'path "secret/*" { capabilities = ["read"] }');
  const stopped = new CredentialIssuer({ vault: down });
  await other.stop();
  let result: IssuedCredential | undefined;
  for (const request of [
    approvalRequest({ kind: { case: "vaultToken", value: { policies: ["airlock-action-rotate"], numUses: 1 } }, ttl: durationFromMs(60_000) }),
    databaseRequest(),
  ]) {
    const error = await caught(
      stopped.issue(request).then((issued) => {
        result = issued;
        return issued;
      }),
    );
    t.equal(error.code, Code.Unavailable, request.credential?.kind.case ?? "");
    t.equal(result, undefined, "nothing was returned");
  }
  t.equal((await caught(stopped.revoke({ kind: "database", leaseId: "airlock-db/creds/export/x" }))).code, Code.Unavailable, "revoke fails loudly, so the caller retries");
});
