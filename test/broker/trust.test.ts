/**
 * The broker trusts no message it did not write. Each attack here is sent with
 * a real sidecar's own credential (what an agent on that host can read), so the
 * server lets it through, and the broker must refuse it, audit it flagged, count
 * it, and change nothing.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { readAuditEvents, verifyTrail } from "../../broker/audit/index.js";
import { CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { createLogger, createVaultClient } from "../../common/index.js";
import { ensureStreams, stateBucket, streams, subjects } from "../../common/subjects.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import {
  type ApprovalRequest,
  ApprovalRequestSchema,
  type AuditEvent,
  AuditEventType,
  type DecisionBody,
  CompletionSchema,
  DecisionBodySchema,
  DecisionSchema,
  type RequestRecord,
  RequestRecordSchema,
  RequestState,
  Risk,
  Verdict,
} from "../../proto/index.js";
import { Policy } from "../../sidecar/index.js";

const { nats, vault } = await useInfra(t, { nats: true, vault: true });
const log = createLogger({ name: "test", level: "silent" });

const policy = Policy.parse(`version: 1
default: deny
rules:
  - id: rotate
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    approve:
      risk: low
      reviewers: { all_of: [{ group: security }] }
      credential: { kind: vault_token, policies: [default], num_uses: 2, ttl: 1m }
      timeout: 30s
  - id: export
    match: { service: demo.v1.OpsService, method: ExportTable }
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: data-owners }] }
      credential: { kind: database, mount: database, role: export, ttl: 5m }
  - id: import
    match: { service: demo.v1.OpsService, method: ImportRows, hosts: [ingest-host] }
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: data-owners }] }
      credential: { kind: database, mount: database, role: import, ttl: 5m }
`);
const approvals = parseApprovalConfig(
  new ConfigReader(
    { groups: { security: ["sam@corp"], "data-owners": ["dana@corp"] }, auto_rules: [{ id: "low-risk", effect: "approve", when: { max_risk: "low" }, reason: "low risk is pre-approved" }] },
    "",
    "broker.yaml",
  ),
);
const brokerNc = await nats.connect({ kind: "broker" });
t.teardown(() => brokerNc.close());
// An intake consumer as an earlier version made it (30 s ack wait): the broker must bring it up to date.
const operatorJsm = await jetstreamManager(brokerNc);
await ensureStreams(operatorJsm);
await operatorJsm.consumers.add(streams.requests.name, { durable_name: "airlock-broker-intake", ack_policy: AckPolicy.Explicit, filter_subject: "airlock.request.>", deliver_policy: DeliverPolicy.All, ack_wait: 30_000_000_000, max_deliver: 8 });
const broker = await Broker.start({
  nc: brokerNc,
  issuer: new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: vault.rootToken }) }),
  signingKey: generateDecisionKey("k1").signing,
  approvals,
  policy: () => policy,
  replicaId: "trust-broker",
  log,
  tickIntervalMs: 100,
  orphanAfterMs: 300,
});
t.teardown(() => broker.close());

const hostA = await nats.connect({ kind: "sidecar", host: "host-a" });
t.teardown(() => hostA.close());
const hostB = await nats.connect({ kind: "sidecar", host: "host-b" });
t.teardown(() => hostB.close());

/** An ApprovalRequest as a (possibly hostile) sidecar would build it. */
function request(fields: MessageInitShape<typeof ApprovalRequestSchema> = {}): ApprovalRequest {
  const defaults: MessageInitShape<typeof ApprovalRequestSchema> = {
    id: randomUUID(),
    identity: { agent: "spiffe://corp/agent/etl", onBehalfOf: "alice@corp", chain: ["alice@corp", "spiffe://corp/agent/etl"], authenticatedBy: "jwt" },
    host: "host-a",
    service: "demo.v1.OpsService",
    method: "ExportTable",
    requestSha256: randomBytes(32),
    reason: "monthly report",
    risk: Risk.HIGH,
    ruleId: "export",
    reviewers: { allOf: [{ group: "data-owners", minApprovals: 1 }] },
    credential: { kind: { case: "database", value: { mount: "database", role: "export" } }, ttl: durationFromMs(300_000), injectHeader: "x-airlock-credential" },
    createdAt: timestampFromMs(Date.now()),
    deadline: timestampFromMs(Date.now() + 60_000),
  };
  return create(ApprovalRequestSchema, { ...defaults, ...fields } as MessageInitShape<typeof ApprovalRequestSchema>);
}

async function send(nc: NatsConnection, subject: string, bytes: Uint8Array): Promise<void> {
  await jetstream(nc).publish(subject, bytes);
}

async function refusals(reason: string): Promise<number> {
  return (await broker.metrics.refusals.get()).values.find((v) => v.labels.reason === reason)?.value ?? 0;
}

/** Waits for the flagged audit event of a refusal and returns it. */
async function refusalEvent(reason: string, requestId: string): Promise<AuditEvent | undefined> {
  let found: AuditEvent | undefined;
  await waitUntil(async () => {
    for await (const event of readAuditEvents(brokerNc)) {
      if (event.type === AuditEventType.SECURITY_EVENT && event.requestId === requestId && event.details?.refused === reason) found = event;
    }
    return found !== undefined;
  }, 10_000);
  return found;
}

/** The decision the broker published for host A's request, read as host A would. */
async function decisionFor(host: NatsConnection, hostName: string, requestId: string): Promise<DecisionBody | undefined> {
  const jsm = await jetstreamManager(host, { checkAPI: false });
  let body: DecisionBody | undefined;
  await waitUntil(async () => {
    const message = await jsm.direct.getMessage(streams.decisions.name, { last_by_subj: subjects.decision(hostName, requestId) });
    if (message !== null) body = fromBinary(DecisionBodySchema, fromBinary(DecisionSchema, message.data).body);
    return message !== null;
  }, 10_000);
  return body;
}

/** The first audit event of `requestId` that `match` accepts, waiting up to 10 s for it. */
async function refusalAudit(requestId: string, match: (event: AuditEvent) => boolean): Promise<AuditEvent | undefined> {
  let found: AuditEvent | undefined;
  await waitUntil(async () => {
    for await (const event of readAuditEvents(brokerNc)) if (found === undefined && event.requestId === requestId && match(event)) found = event;
    return found !== undefined;
  }, 10_000);
  return found;
}

async function assertRefused(t: Test, reason: string, requestId: string, before: number): Promise<void> {
  const event = await refusalEvent(reason, requestId);
  t.ok(event !== undefined, `a flagged SECURITY_EVENT names ${reason}`);
  t.equal(event?.flagged, true);
  t.ok((await refusals(reason)) > before, `airlock_broker_refusals_total{reason="${reason}"} counted it`);
}

await t.test("a consumer an earlier version made with a 30 s ack wait is updated at start", async (t) => {
  t.equal((await operatorJsm.consumers.info(streams.requests.name, "airlock-broker-intake")).config.ack_wait, 5_000_000_000);
});

await t.test("a request whose body names another host is refused, audited, counted and answered", async (t) => {
  const before = await refusals("host_mismatch");
  const forged = request({ host: "host-b" });
  await send(hostA, subjects.request("host-a", forged.id), toBinary(ApprovalRequestSchema, forged));
  await assertRefused(t, "host_mismatch", forged.id, before);
  t.equal((await decisionFor(hostA, "host-a", forged.id))?.verdict, Verdict.DENIED, "host A's agent is told at once");
  await t.rejects(broker.get(forged.id), "no record was created");
});

await t.test("a request for a rule its host may not have is refused; so is a rule the broker does not know", async (t) => {
  const beforeHost = await refusals("host_not_allowed");
  const importing = request({ method: "ImportRows", ruleId: "import", credential: { kind: { case: "database", value: { mount: "database", role: "import" } }, ttl: durationFromMs(60_000), injectHeader: "x" } });
  await send(hostA, subjects.request("host-a", importing.id), toBinary(ApprovalRequestSchema, importing));
  await assertRefused(t, "host_not_allowed", importing.id, beforeHost);
  await t.rejects(broker.get(importing.id), "no record for the write-capable role");

  const beforeRule = await refusals("unknown_rule");
  const made = request({ ruleId: "made-up-rule" });
  await send(hostA, subjects.request("host-a", made.id), toBinary(ApprovalRequestSchema, made));
  await assertRefused(t, "unknown_rule", made.id, beforeRule);

  const beforeMismatch = await refusals("rule_mismatch");
  const borrowed = request({ method: "GrantRole", ruleId: "rotate" });
  await send(hostA, subjects.request("host-a", borrowed.id), toBinary(ApprovalRequestSchema, borrowed));
  await assertRefused(t, "rule_mismatch", borrowed.id, beforeMismatch);
});

await t.test("the requirement, template and risk come from the broker's policy, not the message", async (t) => {
  // Asks, under the export rule, for no reviewers, low risk (which the auto rule would approve) and the import role.
  const greedy = request({
    risk: Risk.LOW,
    reviewers: { allOf: [] },
    credential: { kind: { case: "database", value: { mount: "database", role: "import" } }, ttl: durationFromMs(86_400_000), injectHeader: "x-airlock-credential" },
    deadline: timestampFromMs(Date.now() + 30 * 86_400_000),
  });
  await send(hostA, subjects.request("host-a", greedy.id), toBinary(ApprovalRequestSchema, greedy));
  let record: RequestRecord | undefined;
  await waitUntil(async () => (record = await broker.get(greedy.id).catch(() => undefined)) !== undefined, 10_000);
  t.equal(record?.state, RequestState.PENDING, "not auto-approved: the policy's risk is high");
  const stored = record?.request;
  t.equal(stored?.risk, Risk.HIGH);
  t.same(stored?.reviewers?.allOf.map((g) => g.group), ["data-owners"], "the policy's reviewers");
  t.equal(stored?.credential?.kind.case === "database" ? stored.credential.kind.value.role : "", "export", "the policy's template");
  t.equal(Number(stored?.credential?.ttl?.seconds), 300, "the policy's TTL");
  t.ok(Number(stored?.deadline?.seconds) * 1000 <= Date.now() + 3_600_000 + 5000, "the deadline is capped at the rule's timeout");
});

await t.test("completions count only from the host that holds an executing action, under its decision", async (t) => {
  const rotate = request({ method: "RotateKey", ruleId: "rotate", risk: Risk.HIGH });
  await send(hostA, subjects.request("host-a", rotate.id), toBinary(ApprovalRequestSchema, rotate));
  let record: RequestRecord | undefined;
  await waitUntil(async () => (record = await broker.get(rotate.id).catch(() => undefined))?.state === RequestState.EXECUTING, 10_000);
  t.equal(record?.state, RequestState.EXECUTING, "auto-approved by the policy's low risk, credential issued");
  const decisionId = record?.decisionId ?? "";
  const completion = (host: string, decision: string) =>
    toBinary(CompletionSchema, create(CompletionSchema, { completionId: `${rotate.id}.${decision}.completion`, requestId: rotate.id, decisionId: decision, host, statusCode: 0, finishedAt: timestampFromMs(Date.now()) }));

  const beforeWrongHost = await refusals("completion_wrong_host");
  await send(hostB, subjects.completion("host-b", rotate.id), completion("host-b", decisionId));
  await assertRefused(t, "completion_wrong_host", rotate.id, beforeWrongHost);
  const beforeDecision = await refusals("completion_decision_mismatch");
  await send(hostA, subjects.completion("host-a", rotate.id), completion("host-a", "not-the-decision"));
  await assertRefused(t, "completion_decision_mismatch", rotate.id, beforeDecision);
  const still = await broker.get(rotate.id);
  t.equal(still.state, RequestState.EXECUTING, "still executing");
  t.equal(still.lease?.revokedAt, undefined, "its credential was not revoked early by a forgery");

  await send(hostA, subjects.completion("host-a", rotate.id), completion("host-a", decisionId));
  await waitUntil(async () => (await broker.get(rotate.id)).state === RequestState.COMPLETED, 10_000);
  t.ok((await broker.get(rotate.id)).lease?.revokedAt !== undefined, "the real completion ends it and revokes the credential");

  const pending = request();
  await send(hostA, subjects.request("host-a", pending.id), toBinary(ApprovalRequestSchema, pending));
  await waitUntil(async () => (await broker.get(pending.id).catch(() => undefined)) !== undefined, 10_000);
  const beforePending = await refusals("completion_not_executing");
  const early = create(CompletionSchema, { completionId: `${pending.id}.x.completion`, requestId: pending.id, decisionId: "", host: "host-a", statusCode: 0 });
  await send(hostA, subjects.completion("host-a", pending.id), toBinary(CompletionSchema, early));
  await assertRefused(t, "completion_not_executing", pending.id, beforePending);
  t.equal((await broker.get(pending.id)).state, RequestState.PENDING, "a completion cannot skip the approval");
});

await t.test("junk is terminated and audited once; intake and the trail keep working", async (t) => {
  const before = await refusals("undecodable");
  const junkId = randomUUID();
  await send(hostA, subjects.request("host-a", junkId), new TextEncoder().encode("{this is not protobuf"));
  await send(hostA, subjects.completion("host-a", junkId), new Uint8Array([0xff, 0xff, 0xff, 0xff]));
  await send(hostA, subjects.security("host-a"), new TextEncoder().encode("\u0000 not json"));
  await waitUntil(async () => (await refusals("undecodable")) >= before + 2, 10_000);
  t.equal(await refusals("undecodable"), before + 2, "the bad request and completion, each refused once (never redelivered forever)");
  const intake = await jetstreamManager(brokerNc).then((jsm) => jsm.consumers.info(streams.requests.name, "airlock-broker-intake"));
  t.equal(intake.num_ack_pending, 0, "nothing of it is left to redeliver");
  const next = request();
  await send(hostA, subjects.request("host-a", next.id), toBinary(ApprovalRequestSchema, next));
  t.ok(await waitUntil(async () => (await broker.get(next.id).catch(() => undefined)) !== undefined, 10_000), "the next request is taken");
  const events = [];
  for await (const event of readAuditEvents(brokerNc)) events.push(event);
  t.ok(verifyTrail(events).intact, "the audit chain is intact");
});

await t.test("an approved record no vote or auto rule accounts for is never acted on", async (t) => {
  // Only a broker or an operator can write the state bucket; this plays a rogue operator.
  const admin = await nats.connect({ kind: "admin" });
  t.teardown(() => admin.close());
  const kv = await new Kvm(admin).open(stateBucket);
  const forged = request();
  const record = create(RequestRecordSchema, { request: forged, state: RequestState.APPROVED, decisionId: randomUUID(), updatedAt: timestampFromMs(Date.now() - 60_000) });
  const before = await refusals("unjustified_approval");
  await kv.create(forged.id, toBinary(RequestRecordSchema, record));
  await assertRefused(t, "unjustified_approval", forged.id, before);
  await waitUntil(async () => (await broker.get(forged.id)).state === RequestState.FAILED, 10_000);
  const after = await broker.get(forged.id);
  t.equal(after.state, RequestState.FAILED);
  t.equal(after.lease, undefined, "no credential was issued");
  t.equal((await decisionFor(hostA, "host-a", forged.id))?.verdict, Verdict.CANCELLED, "the agent is told no");
});

/** The audit events of one kind a host's call reports produced, read from the trail. */
async function reportEvents(host: string): Promise<AuditEvent[]> {
  const found: AuditEvent[] = [];
  for await (const event of readAuditEvents(brokerNc)) if (event.actor === `sidecar:${host}`) found.push(event);
  return found;
}

await t.test("a call report naming another host's request is not attached to it; a host's reports have a budget", async (t) => {
  const own = request();
  await send(hostA, subjects.request("host-a", own.id), toBinary(ApprovalRequestSchema, own));
  t.ok(await waitUntil(async () => (await broker.get(own.id).catch(() => undefined)) !== undefined, 10_000), "host A's request is taken");
  const report = (requestId: string, agent: string) => ({ outcome: "timed_out", method: "/demo.v1.OpsService/ExportTable", rule: "export", agent, requestId, count: 1 });
  const encode = (body: unknown) => new TextEncoder().encode(JSON.stringify(body));
  // Host B, which an agent controls, claims host A's request timed out.
  await send(hostB, subjects.security("host-b"), encode({ kind: "calls", calls: [report(own.id, "forger")] }));
  await send(hostA, subjects.security("host-a"), encode({ kind: "calls", calls: [report(own.id, "honest")] }));
  let fromB: AuditEvent[] = [];
  let fromA: AuditEvent[] = [];
  t.ok(
    await waitUntil(async () => {
      fromB = await reportEvents("host-b");
      fromA = (await reportEvents("host-a")).filter((event) => event.type === AuditEventType.CALL_TIMED_OUT);
      return fromB.length >= 2 && fromA.length >= 1;
    }, 10_000),
    "both reports are in the trail",
  );
  const forged = fromB.find((event) => event.type === AuditEventType.CALL_TIMED_OUT);
  t.equal(forged?.requestId, "", "host B's report is not attached to host A's request");
  t.match(forged?.details, { claimedRequestId: own.id, agent: "forger" });
  t.equal(forged?.flagged, true);
  t.match(fromB.find((event) => event.type === AuditEventType.SECURITY_EVENT && event.details?.reason === "call_reports_incomplete")?.details, { foreign: 1, malformed: 0 }, "the batch is flagged as naming a foreign request");
  t.equal(fromA[0]?.requestId, own.id, "host A's report on its own request keeps it");

  // Host B floods: three full batches in a minute are over the budget; what is over is counted once.
  const before = (await reportEvents("host-b")).length;
  const batch = Array.from({ length: 500 }, (_, i) => ({ outcome: "denied", method: `/demo.v1.OpsService/M${i}`, rule: "default", agent: "flood", count: 1 }));
  for (let i = 0; i < 3; i++) await send(hostB, subjects.security("host-b"), encode({ kind: "calls", calls: batch }));
  let flood: AuditEvent[] = [];
  t.ok(
    await waitUntil(async () => {
      flood = (await reportEvents("host-b")).slice(before);
      return flood.some((event) => event.details?.reason === "call_reports_rate_limited");
    }, 20_000),
    "the overflow is reported",
  );
  flood = (await reportEvents("host-b")).slice(before);
  t.ok(flood.length <= 1_000 + 1, `at most a minute's budget and one overflow event reached the trail (${flood.length})`);
  t.equal(flood.filter((event) => event.details?.reason === "call_reports_rate_limited").length, 1, "one overflow event, not one per batch");
});

await t.test("an executing action lives only while its own host's sidecar beats for it", async (t) => {
  // A second replica that judges silence after 2 s (the first waits the default 20 s).
  const watchNc = await nats.connect({ kind: "broker" });
  t.teardown(() => watchNc.close());
  const silenceMs = 2_000;
  const watcher = await Broker.start({
    nc: watchNc,
    issuer: new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: vault.rootToken }) }),
    signingKey: generateDecisionKey("k1").signing,
    approvals,
    policy: () => policy,
    replicaId: "heartbeat-watcher",
    log,
    tickIntervalMs: 100,
    consume: false,
    heartbeatSilenceMs: silenceMs,
  });
  t.teardown(() => watcher.close());
  // A third replica judging the same silence: the two race to end the action, and it must end once.
  const rivalNc = await nats.connect({ kind: "broker" });
  t.teardown(() => rivalNc.close());
  const rival = await Broker.start({
    nc: rivalNc,
    issuer: new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: vault.rootToken }) }),
    signingKey: generateDecisionKey("k1").signing,
    approvals,
    policy: () => policy,
    replicaId: "heartbeat-rival",
    log,
    tickIntervalMs: 100,
    consume: false,
    heartbeatSilenceMs: silenceMs,
  });
  t.teardown(() => rival.close());
  const rotate = request({ method: "RotateKey", ruleId: "rotate", risk: Risk.HIGH });
  await send(hostA, subjects.request("host-a", rotate.id), toBinary(ApprovalRequestSchema, rotate));
  let record: RequestRecord | undefined;
  await waitUntil(async () => (record = await broker.get(rotate.id).catch(() => undefined))?.state === RequestState.EXECUTING, 10_000);
  const decisionId = record?.decisionId ?? "";
  const beat = (nc: NatsConnection, host: string, decision: string) => nc.publish(subjects.heartbeat(host), JSON.stringify({ actions: [{ requestId: rotate.id, decisionId: decision }] }));

  // Host A beats for its action for three silences: it stays alive.
  const beatingUntil = Date.now() + 3 * silenceMs;
  t.ok(
    await waitUntil(async () => {
      beat(hostA, "host-a", decisionId);
      return Date.now() > beatingUntil;
    }, 20_000, 300),
    "three silences of beats",
  );
  t.equal((await broker.get(rotate.id)).state, RequestState.EXECUTING, "beaten for, it is still executing");

  // Host A goes silent. Host B beats for A's action, and A's own beats name another decision: neither counts.
  const silentSince = Date.now();
  let ended: RequestRecord | undefined;
  t.ok(
    await waitUntil(async () => {
      beat(hostB, "host-b", decisionId);
      beat(hostA, "host-a", "not-the-decision");
      ended = await broker.get(rotate.id);
      return ended.state === RequestState.FAILED;
    }, 20_000, 200),
    "the action is ended",
  );
  t.ok(Date.now() - silentSince < silenceMs + 5_000, `within its silence and a few ticks (${Date.now() - silentSince} ms)`);
  t.ok(ended?.lease?.revokedAt !== undefined, "its credential is revoked");
  t.ok(["heartbeat-watcher", "heartbeat-rival"].includes(ended?.lease?.revokedBy ?? ""), "by one of the replicas judging silence");
  const failure = await refusalAudit(rotate.id, (event) => event.type === AuditEventType.SECURITY_EVENT && typeof event.details?.failed === "string" && event.details.failed.startsWith("no heartbeat from host host-a"));
  t.equal(failure?.flagged, true, "a flagged event says why");
  const revoked = await refusalAudit(rotate.id, (event) => event.type === AuditEventType.CREDENTIAL_REVOKED);
  t.equal(revoked?.details?.why, "heartbeat_lost");
  const events: AuditEvent[] = [];
  for await (const event of readAuditEvents(brokerNc)) if (event.requestId === rotate.id) events.push(event);
  t.equal(events.filter((event) => event.type === AuditEventType.CREDENTIAL_REVOKED).length, 1, "revoked once in the trail, though two replicas raced");
  t.equal(events.filter((event) => event.type === AuditEventType.SECURITY_EVENT && event.flagged).length, 1, "and ended once");
});
