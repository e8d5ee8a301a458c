import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import t, { type Test } from "tap";
import { stringify } from "yaml";
import { clone } from "@bufbuild/protobuf";
import { jetstream } from "@nats-io/jetstream";
import { AuditLog, auditEventToJsonLine, auditStream, readAuditEvents } from "../../broker/audit/index.js";
import { AirlockError, Code } from "../../common/errors.js";
import { Forwarder, type ForwarderConfig, loadForwarderConfig } from "../../forwarder/index.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { type AuditEvent, AuditEventSchema, AuditEventType } from "../../proto/index.js";
import { makeTestPki } from "../helpers/pki.js";
import { startHecReceiver, startSyslogReceiver, startWebhookReceiver } from "../helpers/siem-receivers.js";

const { nats } = await useInfra(t, { nats: true });
const broker = await nats.connect({ kind: "broker" });
t.teardown(() => broker.close());
const log = await AuditLog.open(broker);
const reader = await nats.credentials({ kind: "audit" });
const pki = makeTestPki();
t.teardown(() => pki.remove());
const dir = await mkdtemp(join(tmpdir(), "airlock-forwarder-test-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));

const hecToken = "6f1b2c3d-hec-token-secret";
const webhookSecret = "webhook-secret-for-tests";
const env = { HEC_TOKEN: hecToken, WEBHOOK_SECRET: webhookSecret };

/** Appends `count` events (every fifth flagged); resolves with the trail's last sequence. */
let total = 0;
async function append(count: number): Promise<number> {
  const entries = Array.from({ length: count }, (_, i) => ({
    type: i % 5 === 4 ? AuditEventType.SECURITY_EVENT : AuditEventType.VOTE_RECORDED,
    actor: `reviewer-${total + i}@corp "quoted" [x]`,
    requestId: `r${total + i}`,
    details: { n: total + i },
    flagged: i % 5 === 4,
  }));
  const written = await log.appendAll(entries);
  total = Number(written.at(-1)?.sequence ?? 0n);
  return total;
}

const upTo = (n: number) => Array.from({ length: n }, (_, i) => BigInt(i + 1));

/** Writes a forwarder.yaml with secrets as ${ENV} references; returns its path. */
async function writeConfig(name: string, sinks: unknown[], extra: Record<string, unknown> = {}): Promise<string> {
  const file = join(dir, `${name}.yaml`);
  await writeFile(
    file,
    stringify({
      nats: { url: nats.url, auth: { kind: "nkey", seed_file: reader.auth.seedFile }, tls: { ca_file: nats.caFile } },
      position_file: join(dir, `${name}.position.json`),
      batch_size: 7,
      poll_interval: "20ms",
      request_timeout: "2s",
      retry: { initial: "10ms", max: "100ms" },
      sinks,
      ...extra,
    }),
  );
  return file;
}

async function positions(name: string): Promise<Record<string, bigint>> {
  try {
    const parsed = JSON.parse(await readFile(join(dir, `${name}.position.json`), "utf8")) as { sinks: Record<string, { sequence: string }> };
    return Object.fromEntries(Object.entries(parsed.sinks).map(([sink, entry]) => [sink, BigInt(entry.sequence)]));
  } catch {
    return {};
  }
}

const syslogTls = { ca_file: pki.path("ca.crt"), cert_file: pki.path("agent.crt"), key_file: pki.path("agent.key") };

async function receivers(t: Test) {
  const hec = await startHecReceiver(hecToken, { key: pki.file("server.key"), cert: pki.file("server.crt") });
  t.teardown(() => hec.close());
  const syslog = await startSyslogReceiver({ key: pki.file("server.key"), cert: pki.file("server.crt"), ca: pki.file("ca.crt") });
  t.teardown(() => syslog.close());
  const webhook = await startWebhookReceiver(webhookSecret);
  t.teardown(() => webhook.close());
  const sinks = [
    { name: "splunk", kind: "splunk_hec", url: hec.url, token: "${HEC_TOKEN}", index: "security", tls: { ca_file: pki.path("ca.crt") } },
    { name: "syslog", kind: "syslog", address: `127.0.0.1:${syslog.port}`, facility: 10, hostname: "airlock-test", tls: syslogTls },
    { name: "hook", kind: "webhook", url: `${webhook.url}/audit`, secret: "${WEBHOOK_SECRET}" },
  ];
  return { hec, syslog, webhook, sinks };
}

async function start(t: Test, config: ForwarderConfig, onSinkFailed?: (sink: string, error: AirlockError) => void): Promise<Forwarder> {
  const forwarder = await Forwarder.start({ config, log: quietLog, ...(onSinkFailed === undefined ? {} : { onSinkFailed }) });
  t.teardown(() => forwarder.close());
  return forwarder;
}

/** Log lines go to a buffer the tests read (no secret may appear in one). */
const logged: string[] = [];
const { createLogger } = await import("../../common/logger.js");
const quietLog = createLogger({ name: "forwarder", level: "debug", destination: { write: (line: string) => logged.push(line) } as unknown as NodeJS.WritableStream });

/**
 * Waits until `probe` holds, failing the test with `what` after 60 s: generous, because the CLI
 * tests start the forwarder as a process, which takes many seconds on a busy shared machine.
 */
async function until(t: Test, what: string, probe: () => boolean): Promise<void> {
  t.ok(await waitUntil(async () => probe(), 60_000, 10), what);
}

/** Whether every sink of `forwarder` has acknowledged through sequence `n` (a receiver may count a batch before the forwarder reads its answer). */
function allAt(forwarder: Forwarder, n: number): boolean {
  return forwarder.stats().every((s) => s.position >= BigInt(n));
}

await t.test("every sink gets every sequence exactly once, in order, in its real format", async (t) => {
  const n = await append(40);
  const { hec, syslog, webhook, sinks } = await receivers(t);
  const forwarder = await start(t, await loadForwarderConfig(await writeConfig("all", sinks), { env }));
  await until(t, "all three receivers caught up", () => hec.accepted.length >= n && syslog.accepted.length >= n && webhook.accepted.length >= n);
  // Live trail: appended after the forwarder started.
  const m = await append(9);
  // A receiver counts a batch before its answer reaches the forwarder; wait for the forwarder's own positions.
  await until(t, "the new events followed", () => hec.accepted.length >= m && syslog.accepted.length >= m && webhook.accepted.length >= m && allAt(forwarder, m));
  await forwarder.close();
  t.same(hec.accepted, upTo(m), "HEC: 1..N once each, in order");
  t.same(syslog.accepted, upTo(m), "syslog: 1..N once each, in order");
  t.same(webhook.accepted, upTo(m), "webhook: 1..N once each, in order");
  t.same(hec.refused, [], "HEC accepted the token and every body");
  t.same(webhook.refused, [], "every webhook signature verified");
  t.same(syslog.errors, [], "every syslog frame parsed");
  const first = syslog.messages[0];
  t.equal(first?.pri, 10 * 8 + 5, "authpriv.notice");
  t.equal(syslog.messages[4]?.pri, 10 * 8 + 4, "a flagged event is authpriv.warning");
  t.match(first, { version: "1", hostname: "airlock-test", appName: "airlock", procId: "-", msgId: "AUDIT", sdId: "airlock@32473", params: { seq: "1", type: "VOTE_RECORDED", actor: 'reviewer-0@corp "quoted" [x]', request_id: "r0", flagged: "false" } });
  t.same(await positions("all"), { splunk: BigInt(m), syslog: BigInt(m), hook: BigInt(m) }, "every position at the last event");
  for (const line of forwarder.summary()) t.match(line, new RegExp(`forwarded=${m} lost=0 retries=0 failures=0 position=${m} state=stopped`));
  const logText = logged.join("");
  t.notMatch(logText, hecToken, "the HEC token is in no log line");
  t.notMatch(logText, webhookSecret, "the webhook secret is in no log line");
});

await t.test("a sink that is down (connections refused, or HEC busy) loses nothing and holds its position", async (t) => {
  const { hec, syslog, webhook, sinks } = await receivers(t);
  await append(5);
  const forwarder = await start(t, await loadForwarderConfig(await writeConfig("outage", sinks), { env }));
  await until(t, "caught up before the outage", () => hec.accepted.length >= total && syslog.accepted.length >= total);
  const before = total;
  hec.mode = "busy";
  await syslog.down();
  const n = await append(30);
  const stats = () => Object.fromEntries(forwarder.stats().map((s) => [s.name, s]));
  await until(t, "both down sinks retried", () => (stats().splunk?.retries ?? 0) >= 3 && (stats().syslog?.retries ?? 0) >= 3);
  await until(t, "the webhook, still up, is not held up by them", () => webhook.accepted.length >= n);
  const during = await positions("outage");
  t.equal(during.splunk, BigInt(before), "HEC's position stays at what it acknowledged");
  t.equal(during.syslog, BigInt(before), "syslog's position stays at what it acknowledged");
  t.equal(hec.accepted.length, before, "HEC accepted nothing while busy");
  hec.mode = "ok";
  await syslog.up();
  await until(t, "both caught up after the outage", () => hec.accepted.length >= n && syslog.accepted.length >= n && allAt(forwarder, n));
  await forwarder.close();
  t.same(hec.accepted, upTo(n), "HEC: nothing lost, order kept, no duplicate");
  t.same(syslog.accepted, upTo(n), "syslog: nothing lost, order kept, no duplicate");
  t.same(webhook.accepted, upTo(n));
  for (const s of forwarder.stats()) t.match(s, { forwarded: n, lost: 0, failures: 0, position: BigInt(n) }, s.name);
});

await t.test("stopped mid-stream and started again from its position file: no gap, duplicates only at the restart", async (t) => {
  const { hec, syslog, webhook, sinks } = await receivers(t);
  const n = await append(20);
  const config = await loadForwarderConfig(await writeConfig("restart", sinks), { env });
  // HEC takes the third batch and never answers it, as a collector that hangs after indexing.
  const first = await start(t, config);
  hec.holdAfter = 14;
  await until(t, "a third batch taken and left unanswered", () => hec.held() === 1);
  await first.close();
  const acknowledged = (await positions("restart")).splunk ?? 0n;
  t.equal(acknowledged, BigInt(hec.accepted.length), "the position is what HEC acknowledged, not what it was sent");
  hec.holdAfter = undefined;
  const second = await start(t, config);
  await until(t, "every sink caught up after the restart", () => hec.accepted.length >= n && syslog.accepted.length >= n && webhook.accepted.length >= n && (second.stats()[0]?.position ?? 0n) >= BigInt(n));
  await second.close();
  t.same([...new Set(hec.seen)].sort((a, b) => Number(a - b)), upTo(n), "no sequence missing");
  const duplicates = hec.seen.filter((sequence, index) => hec.seen.indexOf(sequence) !== index);
  t.ok(duplicates.length > 0 && duplicates.every((sequence) => sequence > acknowledged && sequence <= acknowledged + 7n), "the duplicates are the unanswered batch, told apart by sequence");
  t.same(hec.accepted, upTo(n), "what HEC acknowledged is 1..N in order");
  t.same(syslog.accepted.filter((s, i, all) => all.indexOf(s) === i), upTo(n), "syslog: no gap");
});

await t.test("HEC refusing the token stops that sink with a stable code; its position does not move", async (t) => {
  const { hec, webhook, sinks } = await receivers(t);
  hec.setToken("another-token");
  const n = await append(3);
  const failed: Array<{ sink: string; error: AirlockError }> = [];
  const forwarder = await start(t, await loadForwarderConfig(await writeConfig("refused", [sinks[0], sinks[2]]), { env }), (sink, error) => failed.push({ sink, error }));
  await until(t, "the sink failed", () => failed.length === 1);
  await until(t, "the webhook still delivered everything", () => webhook.accepted.length >= n);
  await forwarder.close();
  t.equal(failed[0]?.sink, "splunk");
  t.ok(failed[0]?.error instanceof AirlockError);
  t.equal(failed[0]?.error.code, Code.PermissionDenied, "403 from HEC is permission_denied");
  t.equal(failed[0]?.error.retryable, false);
  t.match(failed[0]?.error.details, { status: 403, hecCode: 4, sink: "splunk" });
  t.notMatch(failed[0]?.error.message ?? "", hecToken, "the error does not carry the token");
  t.equal(hec.refused.length, 1, "one attempt, not retried");
  t.equal((await positions("refused")).splunk, undefined, "HEC's position never advanced");
  t.match(forwarder.stats()[0], { state: "failed", failures: 1, forwarded: 0, position: 0n });
});

const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "cli", "airlock.ts");
function runCli(args: string[]): { child: ChildProcess; output: () => string; exited: Promise<number | null> } {
  const child = spawn(process.execPath, ["--import", import.meta.resolve("tsx"), cli, ...args], { env: { ...process.env, ...env, AIRLOCK_LOG_LEVEL: "warn" }, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  return { child, output: () => output, exited };
}

await t.test("airlock forwarder: killed with SIGKILL mid-stream, restarted, then SIGTERM prints forwarded=N lost=0", async (t) => {
  const { hec, syslog, webhook, sinks } = await receivers(t);
  const n = await append(30);
  const config = await writeConfig("cli", sinks);
  webhook.mode = "hold";
  const crashed = runCli(["forwarder", "--config", config]);
  t.teardown(() => crashed.child.kill("SIGKILL"));
  await until(t, "the webhook holds a batch; the other sinks go on", () => webhook.held() === 1 && hec.accepted.length >= n);
  t.ok(await waitUntil(async () => (await positions("cli")).splunk === BigInt(n) && (await positions("cli")).syslog === BigInt(n), 60_000), "HEC's and syslog's positions durable at N");
  crashed.child.kill("SIGKILL");
  await crashed.exited;
  t.equal((await positions("cli")).hook, undefined, "the unanswered webhook batch did not move its position");
  webhook.mode = "ok";
  const restarted = runCli(["forwarder", "--config", config]);
  t.teardown(() => restarted.child.kill("SIGKILL"));
  await until(t, "every sink caught up after the restart", () => webhook.accepted.length >= n && syslog.accepted.length >= n);
  t.ok(await waitUntil(async () => Object.values(await positions("cli")).every((p) => p === BigInt(n)), 60_000), "every position at N");
  restarted.child.kill("SIGTERM");
  t.equal(await restarted.exited, 0, "SIGTERM closes cleanly");
  t.same(webhook.accepted, upTo(n), "webhook: 1..N once each after the restart");
  t.same(hec.accepted, upTo(n), "HEC: nothing sent twice (its position was durable before the kill)");
  t.same([...new Set(syslog.accepted)], upTo(n));
  // The restarted process had nothing left for HEC and syslog, all of it for the webhook.
  t.match(restarted.output(), new RegExp(`forwarder sink=hook kind=webhook forwarded=${n} lost=0`));
  t.match(restarted.output(), new RegExp(`forwarder sink=splunk kind=splunk_hec forwarded=0 lost=0 .*position=${n} `));
  t.notMatch(crashed.output() + restarted.output(), hecToken);
});

await t.test("airlock forwarder exits 1 naming the sink when HEC refuses the token", async (t) => {
  const { hec, sinks } = await receivers(t);
  hec.setToken("rotated");
  const result = runCli(["forwarder", "--config", await writeConfig("cli-refused", [sinks[0]])]);
  t.teardown(() => result.child.kill("SIGKILL"));
  t.equal(await result.exited, 1);
  t.match(result.output(), /forwarder sink splunk stopped: \[permission_denied\] .*HTTP 403/);
  t.match(result.output(), /forwarder sink=splunk kind=splunk_hec forwarded=0 lost=0 retries=0 failures=1 position=0 state=failed/);
});

// Last in the file: it leaves a message in the trail that is not an event.
await t.test("a message in the trail that is not an audit event is skipped and logged once; it does not stall the sinks", async (t) => {
  const { hec, webhook, sinks } = await receivers(t);
  const n = await append(3);
  // Only an administrator can write this: the junk, then an event after it.
  const admin = await nats.connect({ kind: "admin" });
  t.teardown(() => admin.close());
  const js = jetstream(admin);
  await js.publish(auditStream.subject, "{not an audit event");
  let last: AuditEvent | undefined;
  for await (const event of readAuditEvents(broker, { onUndecodable: () => undefined })) last = event;
  const after = clone(AuditEventSchema, last as AuditEvent);
  after.sequence = BigInt(n + 1);
  after.eventId = `${after.eventId}-after`;
  await js.publish(auditStream.subject, auditEventToJsonLine(after));
  logged.length = 0;
  const forwarder = await start(t, await loadForwarderConfig(await writeConfig("junk", [sinks[0], sinks[2]]), { env }));
  await until(t, "both sinks passed the junk", () => hec.accepted.length >= n + 1 && webhook.accepted.length >= n + 1 && allAt(forwarder, n + 1));
  await forwarder.close();
  t.same(hec.accepted, upTo(n + 1), "HEC: every event, the one after the junk too");
  t.same(webhook.accepted, upTo(n + 1));
  for (const s of forwarder.stats()) t.match(s, { lost: 0, failures: 0, readErrors: 0 }, s.name);
  t.equal(logged.filter((line) => line.includes("not an audit event")).length, 1, "logged once, not once per sink or per read");
  await t.rejects(
    (async () => {
      for await (const event of readAuditEvents(broker)) void event;
    })(),
    { code: Code.DataLoss },
    "a reader that does not skip (verification) stops there with data_loss",
  );
});
