import type { Test } from "tap";
import { findLeaks, handleBaseline } from "./leaks.js";
import { type NatsServer, startNats } from "./nats.js";
import { type PostgresServer, startPostgres, type TestDatabase } from "./postgres.js";
import { startVault, type VaultServer } from "./vault.js";

/** Which real servers a test file needs. */
export interface InfraNeeds {
  readonly nats?: boolean;
  readonly vault?: boolean;
  /** A fresh database of its own on the PostgreSQL server. */
  readonly database?: boolean;
}

/** The servers a test file asked for; a field is present exactly when it was asked for. */
export type Infra<N extends InfraNeeds> = (N["nats"] extends true ? { readonly nats: NatsServer } : unknown) &
  (N["vault"] extends true ? { readonly vault: VaultServer } : unknown) &
  (N["database"] extends true ? { readonly postgres: PostgresServer; readonly database: TestDatabase } : unknown);

/**
 * Starts the real servers a test file needs and pairs each with its cleanup:
 * at the end of `t` they are stopped in reverse order, and then the file fails
 * if anything is left open (a process, temp dir, database, socket or server
 * the test itself opened and did not close).
 */
export async function useInfra<const N extends InfraNeeds>(t: Test, needs: N): Promise<Infra<N>> {
  const baseline = handleBaseline();
  const cleanups: Array<() => Promise<void>> = [];
  t.teardown(async () => {
    const failures: string[] = [];
    for (const cleanup of cleanups.reverse()) {
      await cleanup().catch((error: unknown) => failures.push(`cleanup failed: ${String(error)}`));
    }
    failures.push(...(await findLeaks(baseline)));
    if (failures.length > 0) throw new Error(`test left things behind:\n- ${failures.join("\n- ")}`);
  });
  const infra: Record<string, unknown> = {};
  // allSettled, so a server that did start is still stopped when another one fails.
  const [natsResult, vaultResult, postgresResult] = await Promise.allSettled([
    needs.nats === true ? startNats() : undefined,
    needs.vault === true ? startVault() : undefined,
    needs.database === true ? startPostgres() : undefined,
  ]);
  const nats = natsResult.status === "fulfilled" ? natsResult.value : undefined;
  const vault = vaultResult.status === "fulfilled" ? vaultResult.value : undefined;
  const postgres = postgresResult.status === "fulfilled" ? postgresResult.value : undefined;
  if (nats !== undefined) {
    infra.nats = nats;
    cleanups.push(() => nats.stop());
  }
  if (vault !== undefined) {
    infra.vault = vault;
    cleanups.push(() => vault.stop());
  }
  if (postgres !== undefined) {
    infra.postgres = postgres;
    cleanups.push(() => postgres.stop());
  }
  for (const result of [natsResult, vaultResult, postgresResult]) {
    if (result.status === "rejected") throw result.reason;
  }
  if (postgres !== undefined) {
    const database = await postgres.createDatabase();
    infra.database = database;
    cleanups.push(() => database.drop());
  }
  return infra as Infra<N>;
}
