import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import t from "tap";

const run = promisify(execFile);
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const fixture = "test/fixtures/leaky.fixture.ts";

async function runFixture(leak: string): Promise<{ code: number; output: string }> {
  // Its own output dir, so the fixture's expected failures stay out of this run's results.
  const outputDir = await mkdtemp(join(tmpdir(), "airlock-leaky-"));
  try {
    const args = ["--reporter=tap", "--disable-coverage", "--allow-empty-coverage", `--output-dir=${outputDir}`, fixture];
    const { stdout, stderr } = await run(join(root, "node_modules", ".bin", "tap"), args, {
      cwd: root,
      env: { ...process.env, LEAK: leak },
    });
    return { code: 0, output: stdout + stderr };
  } catch (error) {
    const failed = error as { code: number; stdout: string; stderr: string };
    return { code: failed.code, output: failed.stdout + failed.stderr };
  } finally {
    await rm(outputDir, { recursive: true, force: true });
  }
}

await t.test("a test that cleans up passes the teardown check", async (t) => {
  const result = await runFixture("");
  t.equal(result.code, 0, result.output);
});

await t.test("a leaked child process fails the test file", async (t) => {
  const result = await runFixture("process");
  t.not(result.code, 0);
  t.match(result.output, /test left things behind/);
  t.match(result.output, /ProcessWrap/);
});

await t.test("a leaked socket fails the test file", async (t) => {
  const result = await runFixture("socket");
  t.not(result.code, 0);
  t.match(result.output, /test left things behind/);
  t.match(result.output, /TCP(Socket|Server)Wrap/);
});
