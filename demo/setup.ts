/**
 * What the demo needs before its parts start, done for real and idempotently (so
 * running it again is safe): the key files in `AIRLOCK_DIR`, the demo tables in
 * PostgreSQL, and Vault's database secrets engine with the roles `demo/config/policy.yaml`
 * names. `deploy/compose/setup.ts` runs it from environment variables; `npm run demo` may
 * call it directly.
 * @module
 */
import { generateKeyPairSync } from "node:crypto";
import { access, chmod, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import pg from "pg";
import { configureDatabaseEngine, postgresRoleStatements } from "../broker/credentials.js";
import type { VaultClient } from "../common/vault.js";

/** The key id the demo broker signs decisions with and the demo sidecar trusts (`demo/config/*.yaml`). */
export const demoKeyId = "demo-1";

/** The files {@link writeDemoKeys} keeps in the keys directory, by name. */
export const demoKeyFileNames = {
  /** The broker's Ed25519 decision signing key, PKCS#8 PEM (broker.yaml `signing_key.file`). */
  brokerPrivateKey: "broker.pem",
  /** Its public half, SPKI PEM (sidecar.yaml `broker_keys`). */
  brokerPublicKey: "broker.pub.pem",
  /** The demo identity provider's Ed25519 token-signing key, PKCS#8 PEM (demo/issuer.ts; never the agent's). */
  idpPrivateKey: "idp.pem",
  /** Its public half, SPKI PEM: the sidecar's `AIRLOCK_IDP_PUBLIC_KEY`. */
  idpPublicKey: "idp.pub.pem",
} as const;

/** Absolute paths of the demo's key files. */
export type DemoKeyFiles = { readonly [K in keyof typeof demoKeyFileNames]: string };

/** The Vault database engine the demo policy's `database` credentials come from. */
export const demoDatabaseEngine = {
  /** `approve.credential.mount` in demo/config/policy.yaml. */
  mount: "database",
  /** Vault's name for the connection to the demo database. */
  connectionName: "demo",
  /** Role for ExportTable: read every table. */
  exportRole: "export",
  /** Role for ImportRows: read and insert into every table. */
  importRole: "import",
} as const;

/** Where the demo database is and how an administrator logs in to it. */
export interface DemoDatabase {
  readonly host: string;
  readonly port: number;
  readonly database: string;
  /** A user that may create tables and roles (Vault's database engine logs in as it). */
  readonly username: string;
  /** Its password; a server that trusts the connection ignores it. */
  readonly password: string;
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

/**
 * Makes sure the demo's key files exist in `dir` (created when missing): the
 * broker's decision key pair and the demo identity provider's token key pair, both Ed25519.
 * Existing files are kept, so parts that already loaded them stay in agreement;
 * when only some exist, every pair is written afresh. Private keys are mode 0600.
 */
export async function writeDemoKeys(dir: string): Promise<DemoKeyFiles> {
  const files: DemoKeyFiles = {
    brokerPrivateKey: join(dir, demoKeyFileNames.brokerPrivateKey),
    brokerPublicKey: join(dir, demoKeyFileNames.brokerPublicKey),
    idpPrivateKey: join(dir, demoKeyFileNames.idpPrivateKey),
    idpPublicKey: join(dir, demoKeyFileNames.idpPublicKey),
  };
  await mkdir(dir, { recursive: true });
  const present = await Promise.all(Object.values(files).map(exists));
  if (present.every(Boolean)) return files;
  for (const [privatePath, publicPath] of [
    [files.brokerPrivateKey, files.brokerPublicKey],
    [files.idpPrivateKey, files.idpPublicKey],
  ] as const) {
    const { privateKey, publicKey } = generateKeyPairSync("ed25519");
    await writeFile(privatePath, privateKey.export({ type: "pkcs8", format: "pem" }).toString(), { mode: 0o600 });
    // writeFile's mode applies only when it creates the file.
    await chmod(privatePath, 0o600);
    await writeFile(publicPath, publicKey.export({ type: "spki", format: "pem" }).toString(), { mode: 0o644 });
  }
  return files;
}

/** The demo's table and its first rows. */
const demoSchema = [
  "CREATE TABLE IF NOT EXISTS customers (id integer PRIMARY KEY, name text NOT NULL, email text NOT NULL)",
  `INSERT INTO customers (id, name, email) VALUES
     (1, 'Ada Lovelace', 'ada@example.com'),
     (2, 'Grace Hopper', 'grace@example.com'),
     (3, 'Katherine Johnson', 'katherine@example.com')
   ON CONFLICT (id) DO NOTHING`,
];

/** Creates the demo tables and rows in `db` when they are missing. */
export async function prepareDemoDatabase(db: DemoDatabase): Promise<void> {
  const client = new pg.Client({ host: db.host, port: db.port, database: db.database, user: db.username, password: db.password, connectionTimeoutMillis: 5000 });
  await client.connect();
  try {
    for (const statement of demoSchema) await client.query(statement);
  } finally {
    await client.end();
  }
}

/**
 * Mounts and configures Vault's database secrets engine for the demo: a connection
 * to `db` and the roles `export` (SELECT) and `import` (SELECT, INSERT) whose
 * users are dropped, open sessions included, when the broker revokes their lease.
 * Run it after {@link prepareDemoDatabase}: the grants cover the tables that exist
 * when a credential is issued.
 */
export async function configureDemoVault(vault: VaultClient, db: DemoDatabase): Promise<void> {
  const grants = (privileges: string) => `GRANT ${privileges} ON ALL TABLES IN SCHEMA public TO "{{name}}";`;
  await configureDatabaseEngine(vault, {
    mount: demoDatabaseEngine.mount,
    connectionName: demoDatabaseEngine.connectionName,
    connectionUrl: `postgresql://{{username}}:{{password}}@${db.host}:${db.port}/${db.database}?sslmode=disable`,
    username: db.username,
    password: db.password,
    roles: [
      { name: demoDatabaseEngine.exportRole, creationStatements: postgresRoleStatements(grants("SELECT")).creationStatements, defaultTtlSeconds: 300, maxTtlSeconds: 900 },
      { name: demoDatabaseEngine.importRole, creationStatements: postgresRoleStatements(grants("SELECT, INSERT")).creationStatements, defaultTtlSeconds: 300, maxTtlSeconds: 900 },
    ],
  });
}
