/**
 * The one-shot `setup` service of docker-compose.yml: `node --import tsx deploy/compose/setup.ts`.
 * Writes the demo's keys into `AIRLOCK_DIR`, creates the demo table in PostgreSQL and
 * configures Vault's database secrets engine (see `demo/setup.ts`). Idempotent: a
 * second `docker compose up` keeps the keys and changes nothing else.
 *
 * Environment:
 * - `AIRLOCK_DIR`: the keys directory (a volume the broker, sidecar and agent mount).
 * - `AIRLOCK_VAULT_ADDR`, `AIRLOCK_VAULT_TOKEN`: Vault and a token that may mount engines.
 * - `AIRLOCK_DEMO_PG_URL`: `postgres://user:password@host:port/database`, an administrator
 *   of the demo database; Vault's database engine connects with the same user, host and port.
 * @module
 */
import { AirlockError, Code } from "../../common/errors.js";
import { createVaultClient } from "../../common/vault.js";
import { configureDemoVault, type DemoDatabase, prepareDemoDatabase, writeDemoKeys } from "../../demo/setup.js";

function required(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") throw new AirlockError(Code.InvalidArgument, `the environment variable ${name} is required`, { details: { field: name } });
  return value;
}

function demoDatabase(text: string): DemoDatabase {
  const invalid = () => new AirlockError(Code.InvalidArgument, "AIRLOCK_DEMO_PG_URL must look like postgres://user:password@host:5432/database", { details: { field: "AIRLOCK_DEMO_PG_URL" } });
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw invalid();
  }
  const database = decodeURIComponent(url.pathname.replace(/^\//, ""));
  if (!/^postgres(ql)?:$/.test(url.protocol) || url.hostname === "" || url.username === "" || database === "") throw invalid();
  return {
    host: url.hostname,
    port: url.port === "" ? 5432 : Number(url.port),
    database,
    username: decodeURIComponent(url.username),
    password: decodeURIComponent(url.password),
  };
}

async function main(): Promise<void> {
  const dir = required("AIRLOCK_DIR");
  const db = demoDatabase(required("AIRLOCK_DEMO_PG_URL"));
  const vault = createVaultClient({ address: required("AIRLOCK_VAULT_ADDR"), token: required("AIRLOCK_VAULT_TOKEN") });
  const keys = await writeDemoKeys(dir);
  console.log(`keys ready in ${dir}: ${Object.values(keys).join(", ")}`);
  await prepareDemoDatabase(db);
  console.log(`demo table ready in ${db.host}:${db.port}/${db.database}`);
  await configureDemoVault(vault, db);
  console.log("vault database engine ready: roles export, import");
}

main().catch((error: unknown) => {
  const failure = AirlockError.from(error);
  console.error(`setup: ${failure.rawMessage}`);
  process.exitCode = 1;
});
