import { randomBytes } from "node:crypto";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import pg from "pg";
import t from "tap";
import { type AirlockError, Code, callBidiStream, callClientStream, callServerStream, callUnary } from "../../common/index.js";
import { startOpsServer } from "../../demo/ops/index.js";
import { useInfra } from "../../harness/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";

const { vault, database } = await useInfra(t, { vault: true, database: true });

const role = `airlock_t_${randomBytes(5).toString("hex")}`;
const password = `pw-${randomBytes(8).toString("hex")}`;
const admin = new pg.Client({ connectionString: database.url });
await admin.connect();
await admin.query("CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text)");
await admin.query("INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Grace', 'grace@example.com'), (3, 'Linus', NULL)");
await admin.query("CREATE TABLE imports (sku text, qty int)");
await admin.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}'`);
await admin.query(`GRANT SELECT ON customers TO ${role}; GRANT INSERT ON imports TO ${role}`);
// Teardowns run last-registered first: this one runs before the harness drops the database.
t.teardown(async () => {
  await admin.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`);
  await admin.end();
});

const ops = await startOpsServer({ database: { host: database.host, port: database.port, database: database.name }, vaultAddress: vault.address });
t.teardown(() => ops.close());
const client = new Client(ops.address, credentials.createInsecure());
t.teardown(() => client.close());

function withCredential(value: string): Metadata {
  const metadata = new Metadata();
  metadata.set("x-airlock-credential", value);
  return metadata;
}

const dbCredential = withCredential(JSON.stringify({ username: role, password }));

async function collect<T>(stream: AsyncIterable<T>): Promise<T[]> {
  const items: T[] = [];
  for await (const item of stream) items.push(item);
  return items;
}

async function vaultToken(): Promise<string> {
  const response = await fetch(`${vault.address}/v1/auth/token/create`, {
    method: "POST",
    headers: { "X-Vault-Token": vault.rootToken },
    body: JSON.stringify({ policies: ["default"], ttl: "60s" }),
  });
  return ((await response.json()) as { auth: { client_token: string } }).auth.client_token;
}

await t.test("GetStatus is unprivileged", async (t) => {
  const status = await callUnary(client, OpsService.method.getStatus, {});
  t.equal(status.service, "demo.v1.OpsService");
  t.ok(status.startedAt);
});

await t.test("ExportTable refuses to run without the injected credential", async (t) => {
  const error = (await collect(callServerStream(client, OpsService.method.exportTable, { table: "customers" })).catch((e: unknown) => e)) as AirlockError;
  t.equal(error.code, Code.Unauthenticated);
  t.match(error.rawMessage, /through the Airlock sidecar/);
});

await t.test("ExportTable streams the rows it reads as the injected database user", async (t) => {
  const rows = await collect(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: dbCredential }));
  t.same(
    rows.map((r) => r.row),
    [
      { id: 1, name: "Ada", email: "ada@example.com" },
      { id: 2, name: "Grace", email: "grace@example.com" },
      { id: 3, name: "Linus", email: null },
    ],
  );
  const limited = await collect(callServerStream(client, OpsService.method.exportTable, { table: "customers", limit: 2 }, { metadata: dbCredential }));
  t.equal(limited.length, 2);
});

// A revoked dynamic user no longer exists. (The machine's PostgreSQL may trust
// loopback logins, so a wrong password alone is not always refused.)
await t.test("a credential for a user that does not exist is PERMISSION_DENIED and is not echoed", async (t) => {
  const wrong = withCredential(JSON.stringify({ username: `${role}_revoked`, password: "not-the-password" }));
  const error = (await collect(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: wrong })).catch((e: unknown) => e)) as AirlockError;
  t.equal(error.code, Code.PermissionDenied);
  t.notMatch(error.message, "not-the-password");
});

await t.test("bad input is INVALID_ARGUMENT naming the field, across the wire", async (t) => {
  const error = (await collect(callServerStream(client, OpsService.method.exportTable, { table: "customers; DROP TABLE customers" }, { metadata: dbCredential })).catch(
    (e: unknown) => e,
  )) as AirlockError;
  t.equal(error.code, Code.InvalidArgument);
  t.same(error.details, { field: "table" });
  const [{ count } = { count: "0" }] = (await admin.query<{ count: string }>("SELECT count(*) FROM customers")).rows;
  t.equal(count, "3", "nothing changed");
});

await t.test("ImportRows inserts every streamed row as the injected user", async (t) => {
  const response = await callClientStream(
    client,
    OpsService.method.importRows,
    [
      { table: "imports", row: { sku: "A-1", qty: 3 } },
      { table: "imports", row: { sku: "B-2", qty: 5 } },
    ],
    { metadata: dbCredential },
  );
  t.equal(response.rowsImported, 2);
  const { rows } = await admin.query<{ sku: string; qty: number }>("SELECT sku, qty FROM imports ORDER BY sku");
  t.same(rows, [
    { sku: "A-1", qty: 3 },
    { sku: "B-2", qty: 5 },
  ]);
});

await t.test("RotateKey runs only with a live Vault token", async (t) => {
  const missing = (await callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }).catch((e: unknown) => e)) as AirlockError;
  t.equal(missing.code, Code.Unauthenticated);

  const token = await vaultToken();
  const first = await callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: withCredential(token) });
  const second = await callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: withCredential(token) });
  t.equal(first.version, 1);
  t.equal(second.version, 2);

  await fetch(`${vault.address}/v1/auth/token/revoke-self`, { method: "POST", headers: { "X-Vault-Token": token } });
  const revoked = (await callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: withCredential(token) }).catch((e: unknown) => e)) as AirlockError;
  t.equal(revoked.code, Code.PermissionDenied);
  t.match(revoked.rawMessage, /not live/);
});

await t.test("GrantRole runs only with a live Vault token", async (t) => {
  const granted = await callUnary(client, OpsService.method.grantRole, { user: "mallory", role: "admin" }, { metadata: withCredential(await vaultToken()) });
  t.ok(granted.granted);
  const forged = (await callUnary(client, OpsService.method.grantRole, { user: "mallory", role: "admin" }, { metadata: withCredential("hvs.forged") }).catch(
    (e: unknown) => e,
  )) as AirlockError;
  t.equal(forged.code, Code.PermissionDenied);
});

await t.test("Tail answers each request on a bidi stream", async (t) => {
  const call = callBidiStream(client, OpsService.method.tail);
  const lines: string[] = [];
  const done = new Promise<void>((resolve, reject) => {
    call.on("data", (message: { line: string }) => lines.push(message.line));
    call.on("end", resolve);
    call.on("error", reject);
  });
  call.write({ $typeName: "demo.v1.TailRequest", filter: "RotateKey" });
  call.write({ $typeName: "demo.v1.TailRequest", filter: "no-such-thing" });
  call.end();
  await done;
  t.equal(lines.length, 2);
  t.match(lines[0], /RotateKey key=signing version=2/);
  t.match(lines[1], /no line matches "no-such-thing"/);
});
