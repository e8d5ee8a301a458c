/**
 * Regenerates the protobuf-es code and the binary descriptor set under
 * proto/gen from proto/. With --check it exits 1 when the checked-in output
 * had drifted from the sources (after writing the fresh output, so the fix is
 * to commit it).
 */
import { execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const protoDir = join(root, "proto");
const genDir = join(protoDir, "gen");
const bin = join(root, "node_modules", ".bin");
const check = process.argv.includes("--check");

function files(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, encoding: "utf8" })
    .filter((path) => statSync(join(dir, path)).isFile())
    .sort();
}

const scratch = mkdtempSync(join(tmpdir(), "airlock-generate-"));
try {
  const env = { ...process.env, PATH: `${bin}:${process.env.PATH ?? ""}` };
  execFileSync(join(bin, "buf"), ["generate", "--template", "buf.gen.yaml", "-o", scratch], { cwd: protoDir, env, stdio: "inherit" });
  // The sidecar loads this at run time to proxy services it has no generated code for.
  execFileSync(join(bin, "buf"), ["build", "-o", join(scratch, "gen", "descriptors.binpb")], { cwd: protoDir, env, stdio: "inherit" });
  const fresh = join(scratch, "gen");
  const drifted = [...new Set([...files(fresh), ...files(genDir)])].filter((path) => {
    const a = join(fresh, path);
    const b = join(genDir, path);
    return !existsSync(a) || !existsSync(b) || !readFileSync(a).equals(readFileSync(b));
  });
  if (drifted.length > 0) {
    rmSync(genDir, { recursive: true, force: true });
    cpSync(fresh, genDir, { recursive: true });
  }
  if (drifted.length === 0) {
    console.log(`proto/gen is up to date (${files(genDir).length} files)`);
  } else if (check) {
    console.error(`proto/gen had drifted from proto/ and was regenerated; commit it:\n  ${drifted.map((p) => relative(root, join(genDir, p))).join("\n  ")}`);
    process.exitCode = 1;
  } else {
    console.log(`regenerated proto/gen (${drifted.length} files changed)`);
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
