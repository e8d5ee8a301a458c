// The auditor's report (`airlock audit report`): a real signed trail on a real nats-server with
// real checkpoints, the real command line, and the page read back in a real Chromium.
// Screenshots go to test-output/screenshots/.
import { execFile } from "node:child_process";
import { createPrivateKey } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { promisify } from "node:util";
import type { Page } from "playwright-core";
import t, { type Test } from "tap";
import { type AuditEntry, auditEventTime, auditEventToJsonLine, AuditLog, Checkpointer, DirectoryCheckpointSink, readAuditEvents, readCheckpointDirectory, renderAuditReport, writeAuditKey } from "../../broker/audit/index.js";
import { createLogger } from "../../common/logger.js";
import { useInfra } from "../../harness/index.js";
import { type AuditEvent, AuditEventType } from "../../proto/index.js";
import { launchBrowser, newPage, screenshot } from "../helpers/browser.js";

const { nats } = await useInfra(t, { nats: true });
const broker = await nats.connect({ kind: "broker" });
t.teardown(() => broker.close());

const dir = await mkdtemp(join(tmpdir(), "airlock-audit-report-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const keyDir = join(dir, "keys");
const checkpointDir = join(dir, "checkpoints");
const files = await writeAuditKey(keyDir, "broker-1");
const signer = { keyId: "broker-1", privateKey: createPrivateKey(await readFile(files.privateKeyFile, "utf8")) };
const keyringFile = join(keyDir, "keyring.yaml");
await writeFile(keyringFile, "keys:\n  - key_id: broker-1\n    public_key_file: broker-1.pub.pem\n");

const checkpointer = await Checkpointer.start({
  nc: broker,
  sink: new DirectoryCheckpointSink(checkpointDir, 1000),
  signer,
  everyEvents: 5,
  intervalMs: 3_600_000,
  log: createLogger({ name: "test", level: "silent" }),
});
t.teardown(() => checkpointer.close());
const log = await AuditLog.open(broker, { signer, onWritten: (count) => checkpointer.noteWritten(count) });

/** Appends the entries as one batch; the written events. */
const append = (...entries: AuditEntry[]) => log.appendAll(entries);

/** The instant just after `event`, once the clock has passed it: a period boundary no event shares. */
async function instantAfter(event: AuditEvent): Promise<Date> {
  const after = auditEventTime(event).getTime() + 1;
  // Waits on the clock itself (a millisecond or two), not on a fixed sleep.
  while (Date.now() <= after) await new Promise((resolve) => setImmediate(resolve));
  return new Date(after);
}

// The details below have the shapes broker/service.ts writes (intake, the rules' events, the
// decision, the credential, the completion, a sidecar's call reports).
const received = (requestId: string, agent: string, method: string, rule: string, reason: string, onBehalfOf: string): AuditEntry => ({
  type: AuditEventType.REQUEST_RECEIVED,
  actor: agent,
  requestId,
  details: { service: "ops.v1.OpsService", method, host: "host-a", rule, reason, onBehalfOf },
});
const voted = (requestId: string, reviewer: string, approve: boolean, reason: string): AuditEntry => ({
  type: AuditEventType.VOTE_RECORDED,
  actor: reviewer,
  requestId,
  details: { kind: "voted", reviewer, approve, group: "sre", reason, breakGlass: false },
});
const decided = (requestId: string, verdict: "APPROVED" | "DENIED", cause: string, by: string[], reason: string): AuditEntry[] => [
  { type: AuditEventType.DECIDED, actor: "broker-1", requestId, details: { kind: verdict.toLowerCase(), cause, by, reason } },
  { type: AuditEventType.DECIDED, actor: "broker-1", requestId, details: { verdict, reason, decisionId: `d-${requestId}` } },
];
const issued = (requestId: string): AuditEntry => ({ type: AuditEventType.CREDENTIAL_ISSUED, actor: "broker-1", requestId, details: { kind: "database", expiresAt: new Date(Date.now() + 300_000).toISOString() } });
const revoked = (requestId: string): AuditEntry => ({ type: AuditEventType.CREDENTIAL_REVOKED, actor: "broker-1", requestId, details: { why: "completion", kind: "database" } });
const call = (type: AuditEventType, method: string, rule: string, agent: string, reason: string): AuditEntry => ({
  type,
  actor: "sidecar:host-a",
  details: { host: "host-a", method, rule, agent, onBehalfOf: "erin@corp", reason, count: 3, firstAt: new Date().toISOString(), lastAt: new Date().toISOString() },
  flagged: type === AuditEventType.CALL_REFUSED,
});

// Before the period: one approved request the report must leave out.
const before = await append(received("req-old", "agent:old", "Old", "old-rule", "an old request", "olga@corp"), ...decided("req-old", "APPROVED", "votes", ["olga@corp"], "old approval"));
const since = await instantAfter(before.at(-1) as AuditEvent);

const script = "<script>window.__pwned = 1</script>";
const inPeriod = [
  // An approval by two reviewers, its credential issued, revoked on completion.
  ...(await append(
    received("req-deploy", "agent:deployer", "Deploy", "deploy-prod", "ship release 1.2.3", "alice@corp"),
    voted("req-deploy", "bob@corp", true, "release notes checked"),
    voted("req-deploy", "carol@corp", true, "change ticket CHG-42 approved"),
    ...decided("req-deploy", "APPROVED", "votes", ["bob@corp", "carol@corp"], "change ticket CHG-42 approved"),
    issued("req-deploy"),
  )),
  ...(await append(revoked("req-deploy"), { type: AuditEventType.ACTION_COMPLETED, actor: "sidecar:host-a", requestId: "req-deploy", details: { statusCode: 0, statusMessage: "" } })),
  // Break-glass.
  ...(await append(
    received("req-glass", "agent:fixer", "RestartDatabase", "db-restart", "primary is down", "pager@corp"),
    { type: AuditEventType.BREAK_GLASS, actor: "oncall@corp", requestId: "req-glass", details: { kind: "break_glass", flagged: true, reviewer: "oncall@corp", reason: "outage INC-7, nobody else awake", notify: ["sec@corp"] }, flagged: true },
    ...decided("req-glass", "APPROVED", "break_glass", ["oncall@corp"], "outage INC-7, nobody else awake"),
    issued("req-glass"),
  )),
  // A reviewer's denial, of a request whose agent and reason try to inject a script.
  ...(await append(
    received("req-drop", `agent:${script}`, "DropTable", "schema-change", `cleanup ${script}`, "mallory@corp"),
    voted("req-drop", "dana@corp", false, "not during the freeze"),
    ...decided("req-drop", "DENIED", "denial", ["dana@corp"], "not during the freeze"),
  )),
  // Calls the sidecar decided alone: a policy denial and a refusal.
  ...(await append(
    call(AuditEventType.CALL_DENIED, "/ops.v1.OpsService/DeleteBackups", "never-delete-backups", "agent:cleaner", "policy_deny"),
    call(AuditEventType.CALL_REFUSED, "/ops.v1.OpsService/Deploy", "", "agent:anonymous", "unauthenticated"),
  )),
];
const until = await instantAfter(inPeriod.at(-1) as AuditEvent);
// After the period: the break-glass credential's revocation (it completes a request of the
// period) and a request of its own, which the report must leave out.
await append(revoked("req-glass"), received("req-late", "agent:late", "Late", "late-rule", "a later request", "larry@corp"), ...decided("req-late", "DENIED", "denial", ["dana@corp"], "too late"));
// Closing writes the last checkpoint and waits for any in flight, so the count below is final.
await checkpointer.close();
const checkpointCount = (await readCheckpointDirectory(checkpointDir)).checkpoints.length;

const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "cli", "airlock.ts");
const reader = await nats.credentials({ kind: "audit" });
const period = ["--since", since.toISOString(), "--until", until.toISOString()];

/** Runs `airlock audit report …`; its exit code and output. */
async function report(out: string, source: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const args = ["--import", import.meta.resolve("tsx"), cli, "audit", "report", ...period, "--out", out, ...source, "--keys", keyringFile, "--checkpoints", checkpointDir];
  return promisify(execFile)(process.execPath, args).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (error: unknown) => error as { code: number; stdout: string; stderr: string },
  );
}

const browser = await launchBrowser(t);

/** Opens a report file; every request the page makes is recorded (there must be none but the file). */
async function open(t: Test, file: string): Promise<{ page: Page; requests: string[] }> {
  const page = await newPage(t, browser);
  const requests: string[] = [];
  page.on("request", (request) => requests.push(request.url()));
  await page.goto(pathToFileURL(file).href);
  return { page, requests };
}

const texts = (within: Pick<Page, "locator">, selector: string) => within.locator(selector).allTextContents();

await t.test("the report of a verified trail: actions, approvers, break-glass, denials, refusals, checkpoints", async (t) => {
  const out = join(dir, "report.html");
  const run = await report(out, ["--nats", nats.url, "--nats-seed", reader.auth.seedFile, "--nats-ca", nats.caFile]);
  t.equal(run.code, 0, run.stderr);
  t.match(run.stdout, new RegExp(`^audit ok events=\\d+ signed=\\d+ checkpoints=${checkpointCount} verified=yes$`, "m"));
  const { page, requests } = await open(t, out);

  // The header.
  t.match(await page.locator(".generated-at").textContent(), /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$/, "generated at, in UTC");
  t.equal(await page.locator(".period time").first().getAttribute("datetime"), since.toISOString(), "the period's start");
  t.equal(await page.locator(".period time").nth(1).getAttribute("datetime"), until.toISOString(), "the period's end");
  t.equal(await page.locator(".count-events").textContent(), String(inPeriod.length), "events in the period");

  // One card per request of the period; the ones before and after it are not there.
  const cards = await page.locator("article.action").all();
  t.same((await Promise.all(cards.map((card) => card.getAttribute("data-request-id")))).sort(), ["req-deploy", "req-drop", "req-glass"]);
  t.equal(await page.locator("body").textContent().then((text) => /req-old|req-late|agent:old|agent:late/.test(text ?? "")), false, "nothing outside the period");

  const deploy = page.locator('article[data-request-id="req-deploy"]');
  t.equal(await deploy.locator("h3").textContent(), "ops.v1.OpsService/Deploy", "the call");
  t.equal(await deploy.locator(".agent").textContent(), "agent:deployer", "who asked");
  t.equal(await deploy.locator(".on-behalf-of").textContent(), "alice@corp", "for whom");
  t.equal(await deploy.locator(".reason").textContent(), "ship release 1.2.3", "why");
  t.equal(await deploy.locator(".rule").textContent(), "deploy-prod", "the rule");
  t.same(await texts(deploy, ".approver-name"), ["bob@corp", "carol@corp"], "the approvers");
  t.same(await texts(deploy, ".approver-reason"), ["release notes checked", "change ticket CHG-42 approved"], "and their reasons");
  t.match(await deploy.locator(".credential-issued").textContent(), /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(database, expires /, "credential issued");
  t.match(await deploy.locator(".credential-revoked").textContent(), /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(completion\)$/, "and revoked");
  t.equal(await deploy.locator(".outcome").textContent(), "Completed", "the outcome");

  // Break-glass: highlighted and labelled, on its card and in its own list.
  const glass = page.locator('article[data-request-id="req-glass"]');
  t.match(await glass.getAttribute("class"), /\bbreak-glass\b/, "the break-glass card has the class");
  t.ok(await glass.locator("header .break-glass-label").isVisible(), "and a visible label");
  t.equal(await glass.locator("header .break-glass-label").textContent(), "BREAK-GLASS");
  t.same(await texts(glass, ".approver-reason"), ["outage INC-7, nobody else awake"]);
  t.match(await glass.locator(".credential-revoked").textContent(), /\(after the period\) \(completion\)/, "its revocation after the period still shows");
  // Strings, as the tests compile without the DOM's types.
  const background = (id: string) => page.evaluate(`getComputedStyle(document.querySelector('article[data-request-id="${id}"]')).backgroundColor`);
  const glassBackground = await background("req-glass");
  const plainBackground = await background("req-deploy");
  t.comment(`break-glass card background ${String(glassBackground)}, others ${String(plainBackground)}`);
  t.not(glassBackground, plainBackground, "the highlight is rendered, not only a class name");
  t.equal(await page.locator("table.break-glass-uses tr.break-glass").count(), 1, "one break-glass use listed");
  t.equal(await page.locator("article.action.break-glass").count(), 1, "and only that card highlighted");

  // Denials: by a reviewer, and by policy at a sidecar; and the refused call.
  t.same(await texts(page, "table.reviewer-denials .denial-reason"), ["not during the freeze"]);
  t.same(await texts(page, "table.policy-denials .call-reason"), ["policy_deny"]);
  t.match(await page.locator("table.policy-denials tbody tr").textContent(), /DeleteBackups.*never-delete-backups/s);
  t.same(await texts(page, "table.refused-calls .call-reason"), ["unauthenticated"]);

  // The verification.
  t.match(await page.locator("#verification").getAttribute("class"), /\bverified\b/);
  t.equal(await page.locator(".verdict").textContent(), "Verified");
  t.match(await page.locator(".verdict-line").textContent(), new RegExp(`^audit ok events=\\d+ signed=\\d+ checkpoints=${checkpointCount} verified=yes$`), "the verdict line, with the checkpoint count");
  const covering = await page.locator("table.checkpoints tr.checkpoint").count();
  t.ok(covering >= 1 && covering <= checkpointCount, `checkpoints covering the period are listed (${covering} of ${checkpointCount})`);
  const [writer, index, sequence] = await texts(page.locator("table.checkpoints tr.checkpoint").first(), "td");
  t.same([writer, /^\d+$/.test(index ?? ""), /^\d+$/.test(sequence ?? "")], ["broker-1", true, true], "writer, index, sequence");
  t.match(await page.locator(".anchoring").textContent(), /are all anchored by a checkpoint/);

  // The injected script is text, and nothing ran.
  t.equal(await page.locator("script").count(), 0, "no script element");
  t.equal(await page.evaluate("typeof window.__pwned"), "undefined", "nothing ran");
  const drop = page.locator('article[data-request-id="req-drop"]');
  t.equal(await drop.locator(".agent").textContent(), `agent:${script}`, "the agent shows as text");
  t.equal(await drop.locator(".reason").textContent(), `cleanup ${script}`, "the reason shows as text");

  t.same(requests, [pathToFileURL(out).href], "the page fetched nothing but itself");
  t.equal(await page.locator(".unproven").count(), 0, "nothing is marked unproven");
  await screenshot(t, page, "verified");
});

await t.test("a tampered export gives a report that says BROKEN and names the error", async (t) => {
  const events: AuditEvent[] = [];
  for await (const event of readAuditEvents(broker)) events.push(event);
  const lines = events.map(auditEventToJsonLine);
  const index = events.findIndex((event) => event.requestId === "req-drop" && event.type === AuditEventType.VOTE_RECORDED);
  // An auditor is handed an export in which a denial became an approval.
  lines[index] = (lines[index] ?? "").replace('"approve":false', '"approve":true');
  t.not(lines[index], auditEventToJsonLine(events[index] as AuditEvent), "the line was edited");
  const file = join(dir, "tampered.jsonl");
  await writeFile(file, `${lines.join("\n")}\n`);
  const out = join(dir, "tampered.html");
  const run = await report(out, ["--file", file]);
  t.equal(run.code, 1, "the command fails");
  t.match(run.stdout, new RegExp(`^audit BROKEN error=event_altered at=${String(events[index]?.sequence)} `, "m"));
  const { page } = await open(t, out);
  t.match(await page.locator("#verification").getAttribute("class"), /\bbroken\b/);
  t.equal(await page.locator(".verdict").textContent(), "BROKEN: event_altered", "BROKEN, with the error's name");
  t.match(await page.locator(".verdict-line").textContent(), /^audit BROKEN error=event_altered /);
  t.match(await page.locator("#verification").textContent(), /not proven \(marked UNPROVEN\); treat it as unreliable/);
  // What rests on the edited event and after is marked; the request before it is not.
  t.equal(await page.locator('article[data-request-id="req-drop"] header .unproven').count(), 1, "the tampered request is marked unproven");
  t.equal(await page.locator('article[data-request-id="req-deploy"] .unproven').count(), 0, "an earlier request is not");
  t.equal(await page.locator("table.policy-denials .unproven").count(), 1, "nor are later events proven");
  await screenshot(t, page, "broken");
});

await t.test("the page is a pure function of its input, and escapes what it is given", async (t) => {
  const verdict = { intact: true, eventsChecked: 0, signed: 0, checkpoints: 0, firstBrokenSequence: 0, problem: "" };
  const input = { events: inPeriod, verdict, checkpoints: [], checkpointsGiven: false, since, until, generatedAt: new Date("2030-01-02T03:04:05Z") };
  const page = renderAuditReport(input);
  t.equal(renderAuditReport(input), page, "the same input, the same page");
  t.notOk(page.includes(script), "no raw script tag");
  t.ok(page.includes("&lt;script&gt;window.__pwned = 1&lt;/script&gt;"), "escaped");
  t.match(page, /No checkpoints were given/, "a report without checkpoints says what that leaves unproven");
  t.match(page, /2030-01-02 03:04:05 UTC/);
});
