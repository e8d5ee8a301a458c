import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import t from "tap";
import { stringify } from "yaml";
import { AirlockError, Code } from "../../common/errors.js";
import { loadForwarderConfig, PositionStore } from "../../forwarder/index.js";

const dir = await mkdtemp(join(tmpdir(), "airlock-forwarder-config-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));

const nats = { url: "tls://127.0.0.1:4222", auth: { kind: "nkey", seed_file: "audit.nk" }, tls: { ca_file: "ca.pem" } };
const hec = { name: "splunk", kind: "splunk_hec", url: "https://splunk.corp:8088", token: "${HEC_TOKEN}" };
let files = 0;
async function configFile(body: Record<string, unknown>): Promise<string> {
  const file = join(dir, `forwarder-${files++}.yaml`);
  await writeFile(file, stringify({ nats, position_file: "position.json", ...body }));
  return file;
}
/** The error a config fails with: its code and the field it names. */
async function failure(body: Record<string, unknown>, env: Record<string, string> = { HEC_TOKEN: "t0k3n" }): Promise<{ code: Code; field: unknown; message: string }> {
  try {
    await loadForwarderConfig(await configFile(body), { env });
  } catch (error) {
    if (!(error instanceof AirlockError)) throw error;
    return { code: error.code, field: error.details.field, message: error.message };
  }
  throw new Error("the config was accepted");
}

await t.test("a good config: defaults filled in, secrets from the environment, paths resolved", async (t) => {
  const config = await loadForwarderConfig(
    await configFile({ sinks: [hec, { kind: "syslog", address: "siem.corp:6514", tls: { ca_file: "siem-ca.pem" } }, { kind: "webhook", url: "https://hooks.corp/audit", secret: "${HOOK_SECRET:-s3cret}" }] }),
    { env: { HEC_TOKEN: "t0k3n" } },
  );
  t.equal(config.positionFile, join(dir, "position.json"));
  t.match(config, { batchSize: 100, pollIntervalMs: 1000, requestTimeoutMs: 30_000, retry: { initialMs: 250, maxMs: 30_000 } });
  t.match(config.sinks[0], { name: "splunk", kind: "splunk_hec", token: "t0k3n", source: "airlock", sourcetype: "airlock:audit" });
  t.match(config.sinks[1], { name: "syslog", kind: "syslog", host: "siem.corp", port: 6514, facility: 10, appName: "airlock", tls: { caFile: join(dir, "siem-ca.pem") } });
  t.match(config.sinks[2], { name: "webhook", kind: "webhook", secret: "s3cret" });
});

await t.test("the example config in forwarder/ parses", async (t) => {
  const example = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "forwarder", "forwarder.example.yaml");
  const config = await loadForwarderConfig(example, { env: { SPLUNK_HEC_TOKEN: "t", AIRLOCK_AUDIT_WEBHOOK_SECRET: "s" } });
  t.same(
    config.sinks.map((sink) => `${sink.name}:${sink.kind}`),
    ["splunk:splunk_hec", "syslog:syslog", "soar:webhook"],
  );
});

await t.test("bad input fails with invalid_argument naming the field", async (t) => {
  const cases: Array<[string, Record<string, unknown>, string, RegExp, Record<string, string>?]> = [
    ["an unknown sink kind", { sinks: [{ kind: "kafka", url: "x" }] }, "sinks[0].kind", /must be one of splunk_hec, syslog, webhook/],
    ["a HEC sink without a token", { sinks: [{ kind: "splunk_hec", url: "https://splunk:8088" }] }, "sinks[0].token", /is required/],
    ["a token from an unset variable", { sinks: [hec] }, "sinks[0].token", /HEC_TOKEN is not set/, {}],
    ["a webhook without a secret", { sinks: [hec, { kind: "webhook", url: "https://h/a" }] }, "sinks[1].secret", /is required/],
    ["a URL with credentials", { sinks: [{ ...hec, url: "https://user:pw@splunk:8088" }] }, "sinks[0].url", /must not carry credentials/],
    ["two sinks with one name", { sinks: [hec, { ...hec }] }, "sinks[1].name", /repeats "splunk"/],
    ["a client certificate without its key", { sinks: [{ kind: "syslog", address: "s:6514", tls: { cert_file: "c.pem" } }] }, "sinks[0].tls.cert_file", /go together/],
    ["a facility out of range", { sinks: [{ kind: "syslog", address: "s:6514", facility: 24 }] }, "sinks[0].facility", /from 0 to 23/],
    ["an unbounded batch", { batch_size: 100_000, sinks: [hec] }, "batch_size", /from 1 to 1000/],
    ["a bad poll interval", { poll_interval: "soon", sinks: [hec] }, "poll_interval", /duration/],
    ["a misspelt key", { sinks: [{ ...hec, indx: "main" }] }, "sinks[0].indx", /is not a known setting/],
    ["no sinks", { sinks: [] }, "sinks", /non-empty list/],
  ];
  for (const [what, body, field, message, env] of cases) {
    const found = await failure(body, env);
    t.match(found, { code: Code.InvalidArgument, field, message }, what);
    t.notMatch(found.message, "t0k3n", `${what}: no secret in the message`);
  }
});

await t.test("the position file: written whole by rename, read back, a damaged one refused", async (t) => {
  const file = join(dir, "positions", "p.json");
  await mkdir(dirname(file));
  const store = await PositionStore.open(file);
  t.equal(store.get("splunk"), 0n, "no file: nothing delivered yet");
  await Promise.all([store.set("splunk", 5n), store.set("hook", 3n), store.set("splunk", 7n)]);
  await store.set("splunk", 6n);
  t.equal(store.get("splunk"), 7n, "a position never moves back");
  t.same(await readdir(dirname(file)), ["p.json"], "no temporary file left");
  t.same(JSON.parse(await readFile(file, "utf8")), { version: 1, sinks: { splunk: { sequence: "7" }, hook: { sequence: "3" } } });
  t.same((await PositionStore.open(file)).all(), new Map([["splunk", 7n], ["hook", 3n]]), "read back after a restart");
  await writeFile(file, '{"version":1,"sinks":{"splunk":{"sequence":"7"');
  await t.rejects(PositionStore.open(join(dir, "missing", "p.json")), { code: Code.FailedPrecondition, details: { field: "position_file" } }, "a directory that is not there fails at start");
  await t.rejects(PositionStore.open(file), { code: Code.DataLoss, details: { field: "position_file" } }, "a torn or edited file is refused, not guessed at");
});

const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "cli", "airlock.ts");
await t.test("airlock forwarder with a bad config exits 1 naming the field", async (t) => {
  const file = await configFile({ sinks: [{ kind: "kafka" }] });
  const run = promisify(execFile)(process.execPath, ["--import", import.meta.resolve("tsx"), cli, "forwarder", "--config", file]);
  const error = (await run.then(() => undefined, (e: unknown) => e)) as { code: number; stderr: string } | undefined;
  t.equal(error?.code, 1);
  t.match(error?.stderr, /sinks\[0\]\.kind must be one of splunk_hec, syslog, webhook \(field: sinks\[0\]\.kind\)/);
});
