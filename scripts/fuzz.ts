/**
 * `npm run fuzz [-- --seconds N]`: the fast-check fuzz targets of
 * test/sidecar/fuzz (frame reader, HPACK decoder with the nghttp2 differential
 * oracle, gRPC message framer) for N seconds per property (default 600),
 * where `npm test` gives each 3 s. A failure prints fast-check's shrunk
 * counterexample and seed (replay with AIRLOCK_FUZZ_SEED); add the input to
 * test/fixtures/fuzz and a regression test.
 */
import { spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const at = process.argv.indexOf("--seconds");
const seconds = at >= 0 ? Number(process.argv[at + 1]) : 600;
if (!Number.isFinite(seconds) || seconds <= 0) {
  console.error("usage: npm run fuzz [-- --seconds N]");
  process.exit(2);
}
const tap = spawn(join(root, "node_modules", ".bin", "tap"), ["--timeout", "0", "--jobs", "1", "--disable-coverage", "test/sidecar/fuzz"], {
  cwd: root,
  stdio: "inherit",
  env: { ...process.env, AIRLOCK_FUZZ_SECONDS: String(seconds) },
});
tap.once("exit", (code) => process.exit(code ?? 1));
