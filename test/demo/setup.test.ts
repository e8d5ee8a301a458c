// demo/setup.ts against real Vault and PostgreSQL: the keys it writes are the ones the
// broker and sidecar accept, and the database engine it configures issues the users the
// demo policy's `export` and `import` roles promise — nothing more — and drops them on revoke.
import { createPrivateKey, createPublicKey, sign, verify } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { generateKeyPair, SignJWT } from "jose";
import pg from "pg";
import t from "tap";
import { DecisionKeyRing } from "../../common/decision.js";
import { createVaultClient } from "../../common/vault.js";
import { Code } from "../../common/errors.js";
import { demoIssuerDefaults, exchangeToken, startDemoIssuer } from "../../demo/issuer.js";
import { configureDemoVault, type DemoDatabase, demoDatabaseEngine, demoKeyId, prepareDemoDatabase, writeDemoKeys } from "../../demo/setup.js";
import { makeTempDir, useInfra } from "../../harness/index.js";
import { AgentAuthenticator } from "../../sidecar/identity.js";

const { vault, database } = await useInfra(t, { vault: true, database: true });
const dir = await makeTempDir("demo-setup");
t.teardown(() => dir.remove());

const root = createVaultClient({ address: vault.address, token: vault.rootToken });
const sidecarVault = createVaultClient({ address: vault.address });
const db: DemoDatabase = { host: database.host, port: database.port, database: database.name, username: "postgres", password: "unused-on-a-trusting-server" };

// All of setup happens before the first subtest (tap ends the root test once subtests drain).
const keys = await writeDemoKeys(join(dir.path, "keys"));
const keysAgain = await writeDemoKeys(join(dir.path, "keys"));
await prepareDemoDatabase(db);
await prepareDemoDatabase(db);
await configureDemoVault(root, db);
await configureDemoVault(root, db);

async function issue(role: string): Promise<{ username: string; password: string; leaseId: string }> {
  const wrapped = await root.databaseCredentials({ mount: demoDatabaseEngine.mount, role, wrapTtlSeconds: 60, ttlSeconds: 60 });
  const secret = await sidecarVault.unwrap(wrapped.wrappingToken);
  return { username: String(secret.data.username), password: String(secret.data.password), leaseId: wrapped.leaseId };
}

async function asUser<T>(user: { username: string; password: string }, work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ host: db.host, port: db.port, database: db.database, user: user.username, password: user.password });
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

async function sqlState(promise: Promise<unknown>): Promise<string | undefined> {
  return promise.then(
    () => undefined,
    (error: unknown) => (error as { code?: string }).code,
  );
}

async function roleExists(name: string): Promise<boolean> {
  const admin = new pg.Client({ connectionString: database.url });
  await admin.connect();
  try {
    return (await admin.query("SELECT 1 FROM pg_roles WHERE rolname = $1", [name])).rowCount === 1;
  } finally {
    await admin.end();
  }
}

await t.test("the keys: written once, private ones 0600, and kept on a second run", async (t) => {
  t.same(keysAgain, keys);
  for (const path of [keys.brokerPrivateKey, keys.idpPrivateKey]) t.equal((await stat(path)).mode & 0o777, 0o600, `${path} is 0600`);
  const second = await Promise.all(Object.values(keysAgain).map((path) => readFile(path, "utf8")));
  const first = await Promise.all(Object.values(keys).map((path) => readFile(path, "utf8")));
  t.same(second, first, "a second run keeps the same keys");
});

await t.test("the broker key pair: an Ed25519 signing key the sidecar's key ring accepts the public half of", async (t) => {
  const privateKey = createPrivateKey(await readFile(keys.brokerPrivateKey, "utf8"));
  t.equal(privateKey.asymmetricKeyType, "ed25519", "what the broker requires of signing_key.file");
  const publicPem = await readFile(keys.brokerPublicKey, "utf8");
  t.doesNotThrow(() => DecisionKeyRing.fromPem({ [demoKeyId]: publicPem }));
  const message = Buffer.from("decision body");
  t.ok(verify(null, message, createPublicKey(publicPem), sign(null, message, privateKey)), "the two halves belong together");
});

await t.test("the identity provider: the agent exchanges the human's session for a token the sidecar attests both of; forged sessions and wrong secrets are refused", async (t) => {
  const authenticator = await AgentAuthenticator.create([
    { kind: "jwt", issuer: demoIssuerDefaults.issuer, audience: demoIssuerDefaults.audience, delegation: "token_exchange", keys: { kind: "static", publicKeys: [await readFile(keys.idpPublicKey, "utf8")] } },
  ]);
  const idp = await startDemoIssuer({
    privateKey: createPrivateKey(await readFile(keys.idpPrivateKey, "utf8")),
    issuer: demoIssuerDefaults.issuer,
    audiences: [demoIssuerDefaults.audience],
    clients: { "ops-bot": { secret: "s3cret", agent: "spiffe://demo/agent/ops-bot" } },
  });
  t.teardown(() => idp.close());
  const exchange = (subjectToken: string, clientSecret = "s3cret", audience: string = demoIssuerDefaults.audience) => exchangeToken({ tokenUrl: idp.tokenUrl, clientId: "ops-bot", clientSecret, subjectToken, audience });
  const token = await exchange(await idp.signIn("alex@example.com"));
  const identity = await authenticator.authenticate({ headers: { authorization: `Bearer ${token}` } });
  t.same([identity?.agent, identity?.onBehalfOf, identity?.attestation], ["spiffe://demo/agent/ops-bot", "alex@example.com", { agent: "token_exchange:airlock-demo", human: "token_exchange:airlock-demo" }]);
  // The agent cannot make up a human: a session it signed itself is not the provider's.
  const forgedSession = await new SignJWT({}).setProtectedHeader({ alg: "EdDSA" }).setSubject("dana@example.com").setIssuer(demoIssuerDefaults.issuer).setAudience(demoIssuerDefaults.sessionAudience).setExpirationTime("1m").sign((await generateKeyPair("EdDSA")).privateKey);
  await t.rejects(exchange(forgedSession), { code: Code.Unauthenticated, details: { error: "invalid_grant" } });
  await t.rejects(exchange(await idp.signIn("alex@example.com"), "wrong"), { code: Code.Unauthenticated, details: { error: "invalid_client" } });
  // A client id that names an inherited property of the client table is no client.
  for (const clientId of ["__proto__", "constructor", "toString"]) {
    await t.rejects(exchangeToken({ tokenUrl: idp.tokenUrl, clientId, clientSecret: "s3cret", subjectToken: await idp.signIn("alex@example.com"), audience: demoIssuerDefaults.audience }), { code: Code.Unauthenticated, details: { error: "invalid_client" } }, clientId);
  }
  // The provider's session token for a person, presented to the sidecar as an agent token, is refused.
  await t.rejects(authenticator.authenticate({ headers: { authorization: `Bearer ${await idp.signIn("alex@example.com")}` } }), { code: Code.Unauthenticated });
  await t.rejects(exchange(await idp.signIn("alex@example.com"), "s3cret", "another-service"), { code: Code.Unauthenticated, details: { error: "invalid_target" } });
  // An exchanged token is not a session: it cannot be exchanged again for another audience or actor.
  await t.rejects(exchange(token), { code: Code.Unauthenticated, details: { error: "invalid_grant" } });
  // A self-signed agent token naming its human in a claim is refused by the sidecar.
  const selfMade = await new SignJWT({ act_for: "alex@example.com" }).setProtectedHeader({ alg: "EdDSA" }).setSubject("spiffe://demo/agent/ops-bot").setIssuer(demoIssuerDefaults.issuer).setAudience(demoIssuerDefaults.audience).setExpirationTime("1m").sign((await generateKeyPair("EdDSA")).privateKey);
  await t.rejects(authenticator.authenticate({ headers: { authorization: `Bearer ${selfMade}` } }), { code: Code.Unauthenticated });
});

await t.test("the demo table holds its rows once, however often setup runs", async (t) => {
  const admin = new pg.Client({ connectionString: database.url });
  await admin.connect();
  t.teardown(() => admin.end());
  t.equal((await admin.query("SELECT id FROM customers")).rowCount, 3);
});

await t.test("export: a user that can read and not write, dropped when its lease is revoked", async (t) => {
  const user = await issue(demoDatabaseEngine.exportRole);
  t.equal(await asUser(user, async (client) => (await client.query("SELECT * FROM customers")).rowCount), 3);
  t.equal(await sqlState(asUser(user, (client) => client.query("INSERT INTO customers VALUES (10, 'Eve', 'eve@example.com')"))), "42501", "INSERT is refused");
  t.ok(await roleExists(user.username));
  await root.revokeLease(user.leaseId);
  t.notOk(await roleExists(user.username), "revoking the lease drops the user");
});

await t.test("import: a user that can insert, dropped when its lease is revoked", async (t) => {
  const user = await issue(demoDatabaseEngine.importRole);
  await asUser(user, (client) => client.query("INSERT INTO customers VALUES (4, 'Mary Jackson', 'mary@example.com')"));
  t.equal(await asUser(user, async (client) => (await client.query("SELECT * FROM customers WHERE id = 4")).rowCount), 1);
  t.equal(await sqlState(asUser(user, (client) => client.query("DELETE FROM customers"))), "42501", "DELETE is refused");
  await root.revokeLease(user.leaseId);
  t.notOk(await roleExists(user.username));
});
