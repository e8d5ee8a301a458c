import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import t from "tap";

const run = promisify(execFile);
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const dir = await mkdtemp(join(tmpdir(), "airlock-cli-test-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));

async function airlock(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    // tsx resolved from this repo, as the CLI runs from an unrelated working directory.
    const { stdout, stderr } = await run(process.execPath, ["--import", import.meta.resolve("tsx"), join(root, "cli", "airlock.ts"), ...args], { cwd: dir });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failed = error as { code: number; stdout: string; stderr: string };
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
  }
}

await writeFile(
  join(dir, "policy.yaml"),
  `version: 1
default: deny
rules:
  - id: status
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow
  - id: big-exports
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: 'request.limit > 1000 || request.limit == 0'
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: data-owners, min_approvals: 2 }] }
      credential: { kind: database, mount: database, role: export, ttl: 5m }
`,
);

await t.test("policy test shows which rule fires and why", async (t) => {
  await writeFile(join(dir, "call.json"), JSON.stringify({ service: "demo.v1.OpsService", method: "ExportTable", request: { table: "customers", limit: 5000 } }));
  const result = await airlock("policy", "test", "--policy", "policy.yaml", "--call", "call.json");
  t.equal(result.code, 0, result.stderr);
  t.match(result.stdout, /status: no match/);
  t.match(result.stdout, /big-exports: fires: approve/);
  t.match(result.stdout, /=> approve \(rule big-exports\)/);

  await writeFile(join(dir, "call.json"), JSON.stringify({ service: "demo.v1.OpsService", method: "GrantRole", request: {} }));
  const denied = await airlock("policy", "test", "--policy", "policy.yaml", "--call", "call.json");
  t.match(denied.stdout, /=> deny \(rule default\)/);
});

await t.test("an invalid sidecar config exits non-zero naming the field and the reason", async (t) => {
  await writeFile(join(dir, "sidecar.yaml"), "listen: 127.0.0.1:0\nupstreams:\n  - { name: ops, address: not-an-address, descriptor_sets: [x.binpb] }\n");
  const bad = await airlock("sidecar", "--config", "sidecar.yaml");
  t.equal(bad.code, 1);
  t.match(bad.stderr, /upstreams\[0\]\.address must be host:port/);
  t.match(bad.stderr, /field: upstreams\[0\]\.address/);

  await writeFile(join(dir, "typo.yaml"), "listen: 127.0.0.1:0\nlisten_adress: 1\n");
  const typo = await airlock("sidecar", "--config", "typo.yaml");
  t.equal(typo.code, 1);
  t.match(typo.stderr, /upstreams/, "the first missing field is named");

  const missing = await airlock("sidecar", "--config", "nope.yaml");
  t.equal(missing.code, 1);
  t.match(missing.stderr, /cannot read config file/);
});

await t.test("no subcommand prints usage and exits 2", async (t) => {
  const result = await airlock();
  t.equal(result.code, 2);
  t.match(result.stderr, /usage:/);
});
