import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import t from "tap";

// The README's demo command, exactly as a new user runs it, in auto-approve mode.
const root = fileURLToPath(new URL("../..", import.meta.url));

async function runDemo(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn("npm", ["run", "--silent", "demo", "--", ...args], { cwd: root, env: { ...process.env, AIRLOCK_LOG_LEVEL: "warn" } });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
  return { code, stdout, stderr };
}

await t.test("npm run demo -- --auto-approve: every step as scripted, credentials revoked, ends with `demo ok`", async (t) => {
  const { code, stdout, stderr } = await runDemo(["--auto-approve"]);
  t.equal(code, 0, `exit code (stderr: ${stderr.slice(-2000)})`);
  const lines = stdout.trimEnd().split("\n");
  t.equal(lines.at(-1), "demo ok", "the last line is `demo ok`");
  t.match(stdout, /approver console: http:\/\/127\.0\.0\.1:\d+\/console\//, "prints the console URL");
  t.match(stdout, /sign in as dana@example\.com .* with token dana-[0-9a-f]+/, "prints a reviewer sign-in");
  t.match(stdout, /step 1\/4: done: demo\.v1\.OpsService/, "the status check passed straight through");
  t.match(stdout, /ExportTable \(\w+\) held for approval: needs 1 from data-owners/, "the export waited for approval");
  t.match(stdout, /step 2\/4: done: 3 rows exported/, "the export ran with its dynamic credential");
  t.match(stdout, /step 4\/4: permission_denied: denied by rule ops-grant-role/, "the role grant was denied by policy");
  t.match(stdout, /check {2}ExportTable: database user v-\S+ can no longer log in/, "the dynamic PostgreSQL user is gone");
  t.match(stdout, /check {2}RotateKey: Vault token \S+ is revoked/, "the per-action Vault token is dead");
  const table = lines.filter((line) => /^ {7}(action|GetStatus|ExportTable|RotateKey|GrantRole) /.test(line));
  t.equal(table.length, 5, "a summary table of four actions");
  t.match(table[0] ?? "", /action\s+decision\s+approver\s+credential lease\s+revoked after/);
  t.match(table.find((l) => l.includes("ExportTable")) ?? "", /approved\s+dana@example\.com\s+\S+\s+\d+ ms/);
  t.match(table.find((l) => l.includes("RotateKey")) ?? "", /approved\s+sam@example\.com\s+\S+\s+\d+ ms/);
  t.notMatch(stdout + stderr, /dana-[0-9a-f]+.*dana-[0-9a-f]+.*dana-[0-9a-f]+/s, "the reviewer token is printed for sign-in only, not logged");
  t.notMatch(stdout + stderr, /"password"|hvs\.[A-Za-z0-9]{20,}/, "no credential appears in the output");
});

await t.test("a bad option fails with a clear message and a non-zero exit", async (t) => {
  const { code, stderr } = await runDemo(["--no-such-option"]);
  t.not(code, 0);
  t.match(stderr, /no-such-option/);
});
