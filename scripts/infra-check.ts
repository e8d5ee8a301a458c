/**
 * `npm run infra:check`: starts NATS, Vault and PostgreSQL through the harness,
 * prints `infra ok nats=<v> vault=<v> postgres=<v>`, and stops them. Exits 1
 * naming what is missing and how to get it.
 */
import { startNats, startPostgres, startVault } from "../harness/index.js";

type Stoppable = { stop(): Promise<void> };
const started: Stoppable[] = [];
const problems: string[] = [];

async function attempt<T extends Stoppable>(name: string, start: () => Promise<T>): Promise<T | undefined> {
  try {
    const server = await start();
    started.push(server);
    return server;
  } catch (error) {
    problems.push(`${name}: ${error instanceof Error ? error.message : String(error)}`);
    return undefined;
  }
}

const [nats, vault, postgres] = await Promise.all([attempt("nats", startNats), attempt("vault", startVault), attempt("postgres", startPostgres)]);
for (const server of started.reverse()) await server.stop();

if (nats === undefined || vault === undefined || postgres === undefined) {
  console.error(`infra not ok:\n${problems.map((p) => `  ${p}`).join("\n")}`);
  process.exitCode = 1;
} else {
  console.log(`infra ok nats=${nats.version} vault=${vault.version} postgres=${postgres.version}`);
}
