/**
 * `npm test`: makes sure the Vault and nats-server binaries exist (building them once per
 * machine, with progress, before any test's timeout starts), runs tap with the given
 * arguments, then prints the plain summary line `N passed, N failed` that CI reads.
 *
 * A test is a top-level test point of a test file (a `t.test` block or a
 * top-level assertion); a file that fails outside its points (a crash, a leak
 * found at teardown) counts as one failed test too.
 */
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { buildConsole } from "../approver-console/build.js";
import { resolveNatsServer } from "../harness/nats.js";
import { resolveVaultBinary } from "../harness/vault.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const resultsDir = join(root, ".tap", "test-results");

// The browser tests need Chromium: name the missing prerequisite and how to install it before any test starts.
const args = process.argv.slice(2);
const browserTests = args.filter((arg) => !arg.startsWith("-")).length === 0 || args.some((arg) => arg.startsWith("test/console") || arg === "test");
const chromium = process.env.AIRLOCK_CHROMIUM ?? "/usr/bin/chromium";
if (browserTests && !existsSync(chromium)) {
  process.stderr.write(`missing prerequisite: Chromium (${chromium}) for the console's browser tests.\n  install it: sudo apt-get install chromium   (or set AIRLOCK_CHROMIUM to a Chromium binary; .ci/run installs it)\n`);
  console.log("0 passed, 1 failed");
  process.exit(1);
}

const vault = await resolveVaultBinary();
process.stderr.write(`vault binary: ${vault.path} (${vault.source})\n`);
// The pinned nats-server too (built once per machine from the Go module proxy), before any test's timeout starts.
process.stderr.write(`nats-server binary: ${await resolveNatsServer()}\n`);

// The broker serves the built console and the browser tests drive it: build it from the current sources.
try {
  await buildConsole();
} catch (error) {
  console.log("0 passed, 1 failed");
  throw error;
}

rmSync(resultsDir, { recursive: true, force: true });
const tap = spawn(join(root, "node_modules", ".bin", "tap"), process.argv.slice(2), { cwd: root, stdio: "inherit" });
const exitCode = await new Promise<number>((resolve) => tap.once("exit", (code, signal) => resolve(code ?? (signal === null ? 1 : 128))));

let passed = 0;
let failed = 0;
// What failed, named again just above the summary: a log cut to its last lines still says which tests.
const failedNames: string[] = [];
const files = existsSync(resultsDir) ? readdirSync(resultsDir, { recursive: true, encoding: "utf8" }).filter((f) => f.endsWith(".tap")) : [];
for (const file of files.sort()) {
  const lines = readFileSync(join(resultsDir, file), "utf8").split("\n");
  const points = lines.filter((line) => /^(not )?ok \d+/.test(line));
  const failures = points.filter((line) => line.startsWith("not ok") && !/# (SKIP|TODO)/i.test(line));
  passed += points.length - failures.length;
  failed += failures.length;
  for (const line of failures) {
    const subtest = line.replace(/^not ok \d+ - /, "").replace(/ # time=.*$/, "");
    // The first failed assertion inside it, if the file lists one before the point.
    const end = lines.indexOf(line);
    const start = lines.slice(0, end).findLastIndex((l) => /^(not )?ok \d+/.test(l)) + 1;
    const assertion = lines.slice(start, end).find((l) => /^ {4}not ok \d+/.test(l));
    failedNames.push(`${file.replace(/\.tap$/, "")} :: ${subtest}${assertion === undefined ? "" : ` :: ${assertion.trim()}`}`);
  }
  const plan = lines.find((line) => /^1\.\.\d+/.test(line));
  if (points.length === 0 || plan === undefined) {
    failed += 1;
    failedNames.push(`${file.replace(/\.tap$/, "")} :: the file itself (no test points or no plan: a crash, a timeout or a leak at teardown)`);
  }
}
if (files.length === 0 && exitCode !== 0) failed += 1;
if (failedNames.length > 0) console.log(`failed tests:\n${failedNames.map((name) => `  ${name.slice(0, 400)}`).join("\n")}`);
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed > 0 || exitCode !== 0 ? 1 : 0;
