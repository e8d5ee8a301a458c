import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Client, credentials } from "@grpc/grpc-js";
import { jetstreamManager } from "@nats-io/jetstream";
import t from "tap";
import { parseBrokerConfig, readAuditEvents, type RunningBroker, startBroker } from "../../broker/index.js";
import { ConfigReader } from "../../common/config.js";
import { streams, subjects } from "../../common/subjects.js";
import { AirlockError, callServerStream, Code, createLogger, createVaultClient } from "../../common/index.js";
import { freePort, useInfra, waitUntil } from "../../harness/index.js";
import { AuditEventType, RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { agentMetadata } from "../helpers/agent.js";
import { type BrokerProcess, exportRoles, natsSection, opsPolicy, seedExportEngine, startAgentPath, startBrokerProcess } from "../helpers/stack.js";

// Two broker replicas: A is a real `airlock broker` process that a failpoint stops at an
// exact step of an approval, where the test kills it with SIGKILL; B runs on and must
// finish (or safely undo) what A started, leaving no credential alive.
const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });

const admin = await seedExportEngine(t, { nats, vault, database });
const rootVault = createVaultClient({ address: vault.address, token: vault.rootToken });
const { agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "failover", host: "failover-host", policy: opsPolicy(), log });

const danaToken = "dana-failover-token";
const brokerNats = natsSection(await nats.credentials({ kind: "broker" }));
function brokerConfig(replica: string, http: string): Record<string, unknown> {
  return {
    nats: brokerNats,
    policy: join(dir, "policy.yaml"),
    vault: { address: vault.address, auth: { kind: "token", token: vault.rootToken } },
    signing_key: { key_id: "k1", file: join(dir, "broker-signing.pem") },
    approvals: { groups: { "data-owners": ["dana@example.com"] } },
    http,
    reviewers: { auth: { kind: "static", tokens: [{ token: danaToken, reviewer: "dana@example.com", groups: ["data-owners"] }] } },
    replica_id: replica,
    takeover_after: "1s",
    log_level: "warn",
  };
}

// Replica B starts with the first subtest that needs it, so the first one can have A take a request alone.
let started: RunningBroker | undefined;
async function survivorBroker(): Promise<RunningBroker> {
  if (started === undefined) {
    started = await startBroker(parseBrokerConfig(new ConfigReader(brokerConfig("replica-b", "127.0.0.1:0"), "", join(dir, "b.yaml"))), { log });
    const running = started;
    t.teardown(() => running.close());
  }
  return started;
}

/** Starts replica A as its own process, armed to stop at `failpointName` (for good, or with `stop` until SIGCONT). */
async function startReplicaA(failpointName: string, action: "pause" | "stop" = "pause"): Promise<BrokerProcess> {
  const port = await freePort();
  const configPath = join(dir, `a-${failpointName}-${action}.yaml`);
  await writeFile(configPath, JSON.stringify(brokerConfig(`replica-a-${failpointName}-${action}`, `127.0.0.1:${port}`)));
  return startBrokerProcess(t, { configPath, url: `http://127.0.0.1:${port}`, failpoint: failpointName, action });
}

async function connectNats() {
  const nc = await nats.connect({ kind: "broker" });
  t.teardown(() => nc.close());
  return nc;
}

const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

async function exportCall(): Promise<{ code: number; rows: number; message: string }> {
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock", actFor: "alice@example.com" }, { "x-airlock-reason": "failover drill" });
  let rows = 0;
  try {
    for await (const row of callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) if (row.row !== undefined) rows++;
    return { code: 0, rows, message: "" };
  } catch (error) {
    const failure = AirlockError.from(error);
    return { code: failure.code, rows, message: failure.rawMessage };
  }
}

async function pendingId(): Promise<string> {
  for (let i = 0; i < 200; i++) {
    const found = (await (await survivorBroker()).broker.list()).find((r) => r.state === RequestState.PENDING);
    if (found?.request !== undefined) return found.request.id;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error("no pending request");
}

const dynamicRoles = (): Promise<string[]> => exportRoles(admin);

async function killMidApproval(failpointName: string): Promise<string> {
  const a = await startReplicaA(failpointName);
  const id = await pendingId();
  // Dana approves through replica A's API; A claims the decision, then stops at the failpoint.
  const vote = fetch(`${a.url}/api/v1/requests/${id}/decision`, { method: "POST", headers: { authorization: `Bearer ${danaToken}`, "content-type": "application/json" }, body: JSON.stringify({ approve: true, reason: "go" }) }).catch(
    () => undefined,
  );
  await a.reached;
  await a.kill();
  await vote;
  return id;
}

await t.test("replica A killed after auditing a request, before storing it: B gets it again, stores and audits it; nothing is lost", async (t) => {
  const a = await startReplicaA("broker.after_intake_audit");
  const call = exportCall();
  await a.reached;
  await a.kill();
  const killedAt = Date.now();
  const survivor = await survivorBroker();
  // JetStream redelivers the unacknowledged request to B once its ack wait (5 s) has passed.
  let record;
  for (let i = 0; i < 900 && record === undefined; i++) {
    record = (await survivor.broker.list()).find((r) => r.state === RequestState.PENDING);
    if (record === undefined) await new Promise((resolve) => setTimeout(resolve, 50));
  }
  t.ok(record !== undefined, "the request A never stored is stored by B");
  const redeliveredMs = Date.now() - killedAt;
  t.ok(redeliveredMs < 20_000, `redelivered within the 5 s ack wait and B's start, far inside the request's timeout (${redeliveredMs} ms)`);
  const id = record?.request?.id ?? "";
  const received = [];
  for await (const event of readAuditEvents(await connectNats())) if (event.requestId === id && event.type === AuditEventType.REQUEST_RECEIVED) received.push(event.actor);
  t.ok(received.length >= 1, `its arrival is in the audit trail (${received.length} times: A audited it, B again on redelivery)`);
  await survivor.broker.decide(id, { reviewer: "dana@example.com", approve: true, reason: "go" });
  const outcome = await call;
  t.equal(outcome.code, 0, `the agent's call, held all along, ran (${outcome.message})`);
  t.equal(outcome.rows, 2);
});

await t.test("replica A killed after deciding, before issuing: B takes over, issues once, the action runs, the lease is revoked", async (t) => {
  const call = exportCall();
  const id = await killMidApproval("broker.before_issue");
  const outcome = await call;
  t.equal(outcome.code, 0, `the agent's call completed through replica B (${outcome.message})`);
  t.equal(outcome.rows, 2);
  // The lease is revoked first, then the record marked completed: wait for both.
  let record = await (await survivorBroker()).broker.get(id);
  for (let i = 0; i < 200 && (record.lease?.revokedAt === undefined || record.state !== RequestState.COMPLETED); i++) {
    await new Promise((resolve) => setTimeout(resolve, 25));
    record = await (await survivorBroker()).broker.get(id);
  }
  t.equal(record.state, RequestState.COMPLETED);
  t.equal(record.lease?.revokedBy, "replica-b", "the surviving replica revoked the lease");
  t.same(await dynamicRoles(), [], "no dynamic database user is left");
  t.same(
    record.votes.map((v) => v.reviewer),
    ["dana@example.com"],
    "dana's vote, cast on A, counted once",
  );
});

await t.test("replica A killed after Vault made its credential, before recording it: B fails it closed and sweeps A's credential from Vault", async (t) => {
  const call = exportCall();
  const id = await killMidApproval("broker.after_issue");
  t.equal((await dynamicRoles()).length, 1, "Vault made A's database user; no record names it");
  const outcome = await call;
  // A database user carries no intent, so only one older than Vault's settle time is judged nobody's:
  // too soon for B's takeover, which fails the request closed and leaves the intent to the sweep.
  t.not(outcome.code, 0, "no action runs on a half-finished issuance");
  t.match(outcome.message, /died while issuing its credential/);
  const survivor = await survivorBroker();
  t.ok(await waitUntil(async () => (await dynamicRoles()).length === 0, 60_000), "A's database user is found and revoked");
  t.ok(await waitUntil(async () => (await survivor.broker.get(id)).lease?.revokedAt !== undefined, 20_000), "and the intent resolved on the record");
  const record = await survivor.broker.get(id);
  t.equal(record.state, RequestState.FAILED);
  const swept = [];
  for await (const event of readAuditEvents(await connectNats())) if (event.requestId === id && (event.details?.why === "issuance_swept" || event.details?.why === "orphaned_issuance_swept")) swept.push(event);
  t.equal(swept.reduce((sum, event) => sum + Number(event.details?.found ?? 0), 0), 1, "the trail names the one credential A's issuance made");
  t.ok(swept.every((event) => event.flagged), "flagged");
});

await t.test("replica A killed after issuing, before publishing: B revokes A's credential and fails the request closed", async (t) => {
  const call = exportCall();
  const id = await killMidApproval("broker.before_publish");
  const issued = await (await survivorBroker()).broker.get(id);
  t.equal(issued.state === RequestState.EXECUTING || issued.state === RequestState.FAILED, true, "A issued and recorded the credential before it died");
  const outcome = await call;
  t.not(outcome.code, 0, "the agent gets no credential from a dead replica's half-finished approval");
  t.match(outcome.message, /died before delivering the credential/);
  let record = await (await survivorBroker()).broker.get(id);
  for (let i = 0; i < 200 && (record.lease?.revokedAt === undefined || record.state !== RequestState.FAILED); i++) {
    await new Promise((resolve) => setTimeout(resolve, 25));
    record = await (await survivorBroker()).broker.get(id);
  }
  t.equal(record.state, RequestState.FAILED);
  t.ok(record.lease?.leaseId !== undefined && record.lease.leaseId !== "", "the credential A issued is on record");
  t.equal(record.lease?.revokedBy, "replica-b", "B revoked A's credential");
  t.same(await dynamicRoles(), [], "the database user A had Vault create is gone");
  const lookup = await rootVault.lookupLease(record.lease?.leaseId ?? "").then(
    () => "alive",
    (error: unknown) => AirlockError.from(error).code,
  );
  t.not(lookup, "alive", `Vault no longer knows the lease (${String(lookup)})`);
  t.ok(([Code.NotFound, Code.InvalidArgument, Code.PermissionDenied] as Code[]).includes(lookup as Code));
});

await t.test("replica A frozen just before publishing and woken after B took over publishes nothing: one decision for the request", async (t) => {
  const a = await startReplicaA("broker.before_publish", "stop");
  const call = exportCall();
  const id = await pendingId();
  const vote = fetch(`${a.url}/api/v1/requests/${id}/decision`, { method: "POST", headers: { authorization: `Bearer ${danaToken}`, "content-type": "application/json" }, body: JSON.stringify({ approve: true, reason: "go" }) }).then(
    (response) => response.status,
    () => 0,
  );
  // A has issued and recorded the credential, signed its approval, and stopped itself there.
  await a.reached;
  const survivor = await survivorBroker();
  t.ok(await waitUntil(async () => (await survivor.broker.get(id)).state === RequestState.FAILED, 20_000), "B took the orphaned approval over and failed it closed");
  const outcome = await call;
  t.match(outcome.message, /died before delivering the credential/, "the agent was told by B's decision");
  // Woken long past the takeover: A's publish window, counted from its record write, is over.
  a.child.kill("SIGCONT");
  t.not(await vote, 200, "A's approval ends without delivering anything");
  const nc = await connectNats();
  const subject = subjects.decision("failover-host", id);
  const info = await (await jetstreamManager(nc)).streams.info(streams.decisions.name, { subjects_filter: subject });
  t.equal(info.state.subjects?.[subject], 1, "one decision for the request on the stream: B's, not A's too");
  t.same(await dynamicRoles(), [], "no database user is left");
  await a.kill();
});
