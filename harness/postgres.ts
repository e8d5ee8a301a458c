import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import { chmod, chown } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import pg from "pg";
import { freePort, ManagedProcess, makeTempDir, type TempDir, track } from "./resources.js";

const run = promisify(execFile);

/** Options of {@link startPostgres}. */
export interface PostgresOptions {
  /**
   * The admin connection URL of a running server to use.
   * @default process.env.AIRLOCK_PG_URL ?? "postgres://postgres@127.0.0.1:5432/postgres"
   */
  readonly url?: string;
  /**
   * `auto`: use the server at `url` when one answers, else start one;
   * `own`: always start a private server in a temp dir.
   * @default process.env.AIRLOCK_PG_MODE ?? "auto"
   */
  readonly mode?: "auto" | "own";
}

/** A fresh database for one test file, dropped by {@link TestDatabase.drop}. */
export interface TestDatabase {
  readonly name: string;
  /** Superuser connection URL to this database. */
  readonly url: string;
  readonly host: string;
  readonly port: number;
  /** Drops the database, ending any session still in it. */
  drop(): Promise<void>;
}

/** A PostgreSQL server: the machine's, or one the harness started. */
export interface PostgresServer {
  readonly host: string;
  readonly port: number;
  /** Superuser connection URL to the `postgres` database. */
  readonly adminUrl: string;
  /** e.g. `15.19` */
  readonly version: string;
  /** Whether the harness started this server (and so stops it). */
  readonly owned: boolean;
  /** Creates a uniquely named, empty database. */
  createDatabase(): Promise<TestDatabase>;
  /** Stops an owned server and removes its data dir; leaves a shared server running. */
  stop(): Promise<void>;
}

/** Defaults of {@link PostgresOptions}. */
export const postgresDefaults = { url: "postgres://postgres@127.0.0.1:5432/postgres", mode: "auto" } as const;

async function withClient<T>(url: string, work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 3000 });
  const untrack = track("connection", `postgres ${new URL(url).host}`, () => false);
  try {
    await client.connect();
    return await work(client);
  } finally {
    await client.end().catch(() => undefined);
    untrack();
  }
}

async function serverVersion(url: string): Promise<string> {
  return withClient(url, async (client) => {
    const result = await client.query<{ server_version: string }>("SHOW server_version");
    return (result.rows[0]?.server_version ?? "").split(" ")[0] ?? "";
  });
}

/** The bin dir of Debian's newest installed PostgreSQL, or of pg_ctl on PATH. */
function postgresBinDir(): string | undefined {
  const debianRoot = "/usr/lib/postgresql";
  if (existsSync(debianRoot)) {
    const versions = readdirSync(debianRoot)
      .filter((name) => existsSync(join(debianRoot, name, "bin", "initdb")))
      .sort((a, b) => Number(b) - Number(a));
    if (versions[0] !== undefined) return join(debianRoot, versions[0], "bin");
  }
  return undefined;
}

async function postgresUser(): Promise<{ uid: number; gid: number } | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  // PostgreSQL refuses to run as root; Debian's package creates a postgres user.
  try {
    const uid = Number((await run("id", ["-u", "postgres"])).stdout.trim());
    const gid = Number((await run("id", ["-g", "postgres"])).stdout.trim());
    return { uid, gid };
  } catch (error) {
    throw new Error("running as root and no 'postgres' user exists to run PostgreSQL as: apt-get install postgresql", { cause: error });
  }
}

function databaseApi(host: string, port: number, adminUrl: string) {
  return async (): Promise<TestDatabase> => {
    const name = `airlock_test_${randomBytes(6).toString("hex")}`;
    await withClient(adminUrl, (client) => client.query(`CREATE DATABASE ${name}`));
    const url = new URL(adminUrl);
    url.pathname = `/${name}`;
    let dropped = false;
    const untrack = track("database", name, () => dropped);
    return {
      name,
      url: url.toString(),
      host,
      port,
      async drop() {
        await withClient(adminUrl, (client) => client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`));
        dropped = true;
        untrack();
      },
    };
  };
}

async function startOwnPostgres(): Promise<PostgresServer> {
  const bin = postgresBinDir();
  if (bin === undefined) throw new Error("PostgreSQL not found: no server answers and no initdb under /usr/lib/postgresql; install it with 'apt-get install postgresql'");
  const user = await postgresUser();
  const dir: TempDir = await makeTempDir("postgres");
  const asUser = user === undefined ? {} : { uid: user.uid, gid: user.gid };
  if (user !== undefined) {
    await chown(dir.path, user.uid, user.gid);
    await chmod(dir.path, 0o700);
  }
  const data = join(dir.path, "data");
  const port = await freePort();
  let server: ManagedProcess | undefined;
  try {
    const initdb = new ManagedProcess("initdb", join(bin, "initdb"), ["-D", data, "-U", "postgres", "--auth=trust", "--no-sync"], asUser);
    const code = await initdb.exited;
    await initdb.stop();
    if (code !== 0) throw new Error(`initdb failed (exit ${code}):\n${initdb.recentOutput}`);
    server = new ManagedProcess(
      "postgres",
      join(bin, "postgres"),
      ["-D", data, "-p", String(port), "-c", "listen_addresses=127.0.0.1", "-k", dir.path, "-c", "fsync=off", "-c", "max_connections=200"],
      asUser,
    );
    await server.waitForOutput(/ready to accept connections/, 30_000);
  } catch (error) {
    await server?.stop();
    await dir.remove();
    throw error;
  }
  const adminUrl = `postgres://postgres@127.0.0.1:${port}/postgres`;
  const running = server;
  return {
    host: "127.0.0.1",
    port,
    adminUrl,
    version: await serverVersion(adminUrl),
    owned: true,
    createDatabase: databaseApi("127.0.0.1", port, adminUrl),
    async stop() {
      // SIGINT is PostgreSQL's fast shutdown: it ends sessions and exits cleanly.
      running.child.kill("SIGINT");
      await running.stop();
      await dir.remove();
    },
  };
}

/**
 * The PostgreSQL server tests use: the one at `url` when it answers (mode
 * `auto`), else a private one started from Debian's postgresql in a temp dir.
 */
export async function startPostgres(options: PostgresOptions = {}): Promise<PostgresServer> {
  const mode = options.mode ?? (process.env.AIRLOCK_PG_MODE === "own" ? "own" : postgresDefaults.mode);
  const adminUrl = options.url ?? process.env.AIRLOCK_PG_URL ?? postgresDefaults.url;
  if (mode === "auto") {
    const version = await serverVersion(adminUrl).catch(() => undefined);
    if (version !== undefined) {
      const url = new URL(adminUrl);
      const port = Number(url.port || "5432");
      return {
        host: url.hostname,
        port,
        adminUrl,
        version,
        owned: false,
        createDatabase: databaseApi(url.hostname, port, adminUrl),
        stop: () => Promise.resolve(),
      };
    }
  }
  return startOwnPostgres();
}
