import { spawn } from "node:child_process";
import { connect as connectTcp } from "node:net";
import pg from "pg";
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
  t.equal(lines.at(-3), "bus ok anonymous=refused foreign_host=refused state_write=refused audit_write=refused", "the bus boundary line, from what the NATS server answered");
  const audit = /^audit ok events=(\d+) signed=(\d+) checkpoints=(\d+) verified=yes$/.exec(lines.at(-2) ?? "");
  t.ok(audit !== null, `the audit line, from verifying the trail against the checkpoints, just before: ${lines.at(-2) ?? ""}`);
  t.ok(Number(audit?.[1]) > 10 && audit?.[2] === audit?.[1], "every event of the trail is signed");
  t.ok(Number(audit?.[3]) >= 1, "at least one checkpoint written outside NATS");
  t.match(lines.at(-4) ?? "", /^notify ok review_requested=2( decided=[12])?$/, "the notification line: the webhook receiver was told of both held calls");
  t.match(stdout, /notify review requested: ExportTable \(\w+\) → groups data-owners; reviewers dana@example\.com; http:\/\/127\.0\.0\.1:\d+\/console\/#\/requests\//, "each review request is printed as it reaches the receiver");
  t.match(stdout, /notify → tell alice@example\.com, for whom the agent acted: ExportTable was approved/, "and each outcome, with the human to tell");
  t.match(stdout, /NATS server 2\.\d+\.\d+ at tls:\/\/127\.0\.0\.1:\d+/, "the NATS line names the server's version, over TLS");
  t.match(stdout, /approver console: http:\/\/127\.0\.0\.1:\d+\/console\//, "prints the console URL");
  t.match(stdout, /Sign in with the demo identity provider/, "reviewers sign in through the provider");
  t.match(stdout, /dana@example\.com \(data-owners\) with password dana-[0-9a-f]+/, "prints a reviewer's sign-in at the provider");
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
  t.notMatch(stdout + stderr, /dana-[0-9a-f]+.*dana-[0-9a-f]+.*dana-[0-9a-f]+/s, "the reviewer's password is printed for sign-in only, not logged");
  t.notMatch(stdout + stderr, /"password"|hvs\.[A-Za-z0-9]{20,}/, "no credential appears in the output");
  t.notMatch(stdout + stderr, /\bS[UAON][A-Z2-7]{50,}/, "no NATS nkey seed appears in the output");
});

await t.test("a bad option fails with a clear message and a non-zero exit", async (t) => {
  const { code, stderr } = await runDemo(["--no-such-option"]);
  t.not(code, 0);
  t.match(stderr, /no-such-option/);
});

await t.test("Ctrl-C while the agent waits for a human: everything stops, nothing is left running", async (t) => {
  const child = spawn("npm", ["run", "--silent", "demo"], { cwd: root, env: { ...process.env, AIRLOCK_LOG_LEVEL: "warn" }, detached: true });
  let stdout = "";
  const held = new Promise<void>((resolve) => {
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString();
      if (/held for approval/.test(stdout)) resolve();
    });
  });
  child.stderr.resume();
  const exited = new Promise<string>((resolve) => child.once("exit", (code, signal) => resolve(signal ?? String(code))));
  const outputEnded = new Promise<void>((resolve) => child.stdout.once("end", () => resolve()));
  await held;
  // The terminal sends SIGINT to the whole foreground process group.
  process.kill(-(child.pid ?? 0), "SIGINT");
  t.ok(["130", "SIGINT"].includes(await exited), "the demo ends as Ctrl-C asked (exit 130, or npm's own death by SIGINT)");
  // npm may die of the SIGINT before the demo under it has finished stopping: the output ends
  // when every process holding it (the demo included) has exited.
  await outputEnded;
  t.match(stdout, /stopped; nothing left running/);
  const nats = /NATS server \S+ at tls:\/\/127\.0\.0\.1:(\d+)/.exec(stdout)?.[1];
  const vault = /Vault \S+ at http:\/\/127\.0\.0\.1:(\d+)/.exec(stdout)?.[1];
  const database = /database (airlock_\w+)/.exec(stdout)?.[1];
  for (const [name, port] of [["NATS", nats], ["Vault", vault]] as const) {
    const refused = await new Promise<boolean>((resolve) => {
      const socket = connectTcp(Number(port), "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(false);
      });
      socket.once("error", () => resolve(true));
    });
    t.ok(port !== undefined && refused, `${name} (port ${port ?? "?"}) is stopped`);
  }
  const admin = new pg.Client({ connectionString: process.env.AIRLOCK_PG_URL ?? "postgres://postgres@127.0.0.1:5432/postgres" });
  const reachable = await admin.connect().then(
    () => true,
    () => false,
  );
  if (reachable) {
    const left = await admin.query("SELECT 1 FROM pg_database WHERE datname = $1", [database]);
    await admin.end();
    t.equal(left.rowCount, 0, `the demo database ${database ?? "?"} is dropped`);
  }
});
