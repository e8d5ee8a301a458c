/**
 * `npm run vault:build`: finds or builds the Vault-API server binary the
 * harness uses, printing where it came from. Building happens once per machine
 * into the cache (AIRLOCK_CACHE_DIR, default ~/.cache/airlock).
 */
import { resolveVaultBinary } from "../harness/vault.js";

const started = Date.now();
try {
  const binary = await resolveVaultBinary();
  console.log(`vault ${binary.source}: ${binary.path} (${((Date.now() - started) / 1000).toFixed(1)}s)`);
} catch (error) {
  console.error(error instanceof Error ? error.message : String(error));
  process.exitCode = 1;
}
