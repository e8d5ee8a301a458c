import pg from "pg";
import t from "tap";
import { startPostgres, useInfra } from "../../harness/index.js";

const { postgres, database } = await useInfra(t, { database: true });

async function query<R extends pg.QueryResultRow>(url: string, sql: string): Promise<R[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<R>(sql)).rows;
  } finally {
    await client.end();
  }
}

await t.test("each test file gets a fresh, empty database of its own", async (t) => {
  t.match(database.name, /^airlock_test_[0-9a-f]{12}$/);
  const [row] = await query<{ db: string }>(database.url, "SELECT current_database() AS db");
  t.equal(row?.db, database.name);
  const tables = await query(database.url, "SELECT 1 FROM pg_tables WHERE schemaname = 'public'");
  t.equal(tables.length, 0);
  t.match(postgres.version, /^\d+(\.\d+)?$/);
});

await t.test("drop removes the database even with a session still open", async (t) => {
  const scratch = await postgres.createDatabase();
  const client = new pg.Client({ connectionString: scratch.url });
  await client.connect();
  client.on("error", () => undefined);
  await scratch.drop();
  await client.end().catch(() => undefined);
  const rows = await query(postgres.adminUrl, `SELECT 1 FROM pg_database WHERE datname = '${scratch.name}'`);
  t.equal(rows.length, 0);
});

await t.test("without a server to use, the harness starts its own from Debian's postgresql", async (t) => {
  const own = await startPostgres({ mode: "own" });
  t.ok(own.owned);
  t.not(own.port, 5432);
  const db = await own.createDatabase();
  const [row] = await query<{ one: number }>(db.url, "SELECT 1 AS one");
  t.equal(row?.one, 1);
  await db.drop();
  await own.stop();
  await t.rejects(query(own.adminUrl, "SELECT 1"), "stopped with its data dir");
});
