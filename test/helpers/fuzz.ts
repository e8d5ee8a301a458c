import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Parameters } from "fast-check";

/**
 * How long each fuzz property runs: `AIRLOCK_FUZZ_SECONDS` (`npm run fuzz` sets
 * it high), else 3 s, so `npm test` runs them for a short bounded time.
 */
export function fuzzSeconds(): number {
  const value = Number(process.env.AIRLOCK_FUZZ_SECONDS ?? "3");
  return Number.isFinite(value) && value > 0 ? value : 3;
}

/**
 * The seed `npm test` fuzzes with when `AIRLOCK_FUZZ_SEED` is unset: fixed, so the suite (and CI)
 * replays the same inputs each time and a failure is a change in the code, not a lucky draw.
 * `npm run fuzz` (which sets `AIRLOCK_FUZZ_SECONDS`) draws a new seed each run to explore.
 */
export const testFuzzSeed = 20_261_204;

/** fast-check parameters for a time-bounded run: as many runs as fit, shrinking included. */
export function fuzzParameters<T>(extra: Parameters<T> = {}): Parameters<T> {
  const fixed = process.env.AIRLOCK_FUZZ_SECONDS === undefined ? testFuzzSeed : undefined;
  const seed = process.env.AIRLOCK_FUZZ_SEED === undefined ? fixed : Number(process.env.AIRLOCK_FUZZ_SEED);
  return { numRuns: 1_000_000_000, interruptAfterTimeLimit: fuzzSeconds() * 1000, markInterruptAsFailure: false, ...(seed === undefined ? {} : { seed }), ...extra };
}

const corpusDir = join(dirname(fileURLToPath(import.meta.url)), "..", "fixtures", "fuzz");

/** A checked-in corpus of interesting inputs (hex strings), replayed on every run. */
export function corpus(name: string): Buffer[] {
  const entries = JSON.parse(readFileSync(join(corpusDir, `${name}.json`), "utf8")) as { hex: string; why: string }[];
  return entries.map((entry) => Buffer.from(entry.hex, "hex"));
}
