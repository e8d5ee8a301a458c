/**
 * Decision delivery survives a NATS restart: approvals whose credentials Vault hands over while
 * NATS is down reach their agents within seconds of the server coming back, nobody is told
 * "expired", and every record ends COMPLETED with its credential revoked. Real nats-server
 * (stopped and started on the same port and store), Vault, PostgreSQL and sidecar.
 */
import { join } from "node:path";
import t, { type Test } from "tap";
import { readAuditEvents } from "../../broker/audit/index.js";
import { CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { callServerStream, createLogger, createVaultClient } from "../../common/index.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { type AuditEvent, AuditEventType, type RequestRecord, RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { Policy } from "../../sidecar/index.js";
import { agentMetadata, streamOutcome } from "../helpers/agent.js";
import { exportRoles, holdCustomersLock, opsPolicy, seedExportEngine, startAgentPath } from "../helpers/stack.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: process.env.AIRLOCK_LOG_LEVEL ?? "silent" });
const admin = await seedExportEngine(t, { nats, vault, database });
// The agents wait 40 s: the outage and the delivery after it must fit well inside.
const policyText = opsPolicy({ timeout: "40s" });
const policy = Policy.parse(policyText);
const { key, agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "nats-restart", host: "restart-host", policy: policyText, log, heartbeatInterval: "1s" });
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"] } }, "", join(dir, "broker.yaml")));
// As `airlock broker` connects: reconnect for ever.
const nc = await nats.connect({ kind: "broker" }, { maxReconnectAttempts: -1, reconnectTimeWait: 250 });
t.teardown(() => nc.close());
// Patient enough to outlast the frozen Vault below.
const issuer = new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: vault.rootToken, timeoutMs: 30_000 }) });
const broker = await Broker.start({ nc, issuer, signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-1", log, tickIntervalMs: 200, heartbeatSilenceMs: 10_000 });
t.teardown(() => broker.close());
const { Client, credentials } = await import("@grpc/grpc-js");
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

const agents = 4;

await t.test("approvals issued while NATS restarts reach every agent within seconds of its return; none is told expired", async (t) => {
  const outcomes: Promise<{ error: Error | undefined; at: number }>[] = [];
  for (let i = 0; i < agents; i++) {
    const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" }, { "x-airlock-reason": `restart ${i}` });
    outcomes.push(streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })).then((error) => ({ error, at: Date.now() })));
  }
  let ids: string[] = [];
  t.ok(
    await waitUntil(async () => {
      ids = (await broker.list()).filter((r) => r.state === RequestState.PENDING && r.request?.method === "ExportTable").map((r) => r.request?.id ?? "");
      return ids.length === agents;
    }, 30_000),
    "every export is held",
  );

  // Vault holds the issuance, so the decisions are published exactly while NATS is away.
  vault.freeze();
  let thawed = false;
  t.teardown(() => {
    if (!thawed) vault.thaw();
  });
  const decided = Promise.allSettled(ids.map((id) => broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" })));
  t.ok(await waitUntil(async () => (await Promise.all(ids.map((id) => broker.get(id)))).every((r) => r.state === RequestState.APPROVED), 20_000), "every request is approved, its credential on its way");
  // A restart (stop, then start on the same port and store) with every approval's Vault answer
  // coming back while the server is away.
  await nats.pause();
  vault.thaw();
  thawed = true;
  await nats.resume();
  const back = Date.now();
  log.warn({ back }, "NATS is back");

  const results = await Promise.all(outcomes);
  const after = results.map((r) => (r.at - back) / 1000);
  t.comment(`delivered after NATS came back, in seconds: ${after.map((s) => s.toFixed(2)).join(" ")}`);
  for (const [i, result] of results.entries()) {
    t.equal(result.error, undefined, `agent ${i}'s approved export ran (${result.error?.message ?? "ok"})`);
  }
  // Typically 3-6 s here; a write the restart left unanswered three times falls back to the takeover (`takeover_after`, 10 s).
  t.ok(Math.max(...after) < 30, `every agent had its decision well inside its 40 s wait after NATS came back (slowest ${Math.max(...after).toFixed(2)} s)`);
  for (const settled of await decided) if (settled.status === "rejected") log.warn({ err: settled.reason }, "decide rejected");

  t.ok(
    await waitUntil(async () => (await Promise.all(ids.map((id) => broker.get(id)))).every((r) => r.state === RequestState.COMPLETED && r.lease?.revokedAt !== undefined), 30_000),
    "every record ends COMPLETED with its credential revoked",
  );
  t.same(await exportRoles(admin), [], "no database user Vault made is left");
  // Writes resent after the restart left no event twice in the trail. A completion's record and
  // its audit batch are written side by side, so the trail may take the batch after the record
  // reads COMPLETED: wait for every completion's event, then count.
  let events: AuditEvent[] = [];
  await waitUntil(async () => {
    events = [];
    for await (const event of readAuditEvents(nc)) if (ids.includes(event.requestId)) events.push(event);
    return ids.every((id) => events.some((e) => e.requestId === id && e.type === AuditEventType.ACTION_COMPLETED));
  }, 10_000);
  for (const id of ids) {
    const of = (type: AuditEventType) => events.filter((e) => e.requestId === id && e.type === type).length;
    // The vote that decides and the published decision (which names its decision id) are two DECIDED events.
    const published = events.filter((e) => e.requestId === id && e.type === AuditEventType.DECIDED && typeof e.details?.decisionId === "string").length;
    t.same([published, of(AuditEventType.DECIDED), of(AuditEventType.CREDENTIAL_ISSUED), of(AuditEventType.CREDENTIAL_REVOKED), of(AuditEventType.ACTION_COMPLETED)], [1, 2, 1, 1, 1], `request ${id}: one decision, issuance, revocation and completion in the trail`);
  }
});

/** Holds an export mid-call: approved, executing, its SELECT waiting on the customers lock until `unlock`. */
async function runningExport(t: Test, reason: string): Promise<{ id: string; outcome: Promise<unknown>; unlock: () => Promise<void> }> {
  const unlock = await holdCustomersLock(t, admin);
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" }, { "x-airlock-reason": reason });
  const outcome = streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata }));
  let id = "";
  t.ok(
    await waitUntil(async () => {
      id = (await broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.reason === reason)?.request?.id ?? "";
      return id !== "";
    }, 30_000),
    "held",
  );
  await broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.EXECUTING && (await exportRoles(admin)).length === 1, 20_000), "executing");
  return { id, outcome, unlock };
}

/** The record of `id` once it is no longer executing. */
async function settled(t: Test, id: string): Promise<RequestRecord> {
  t.ok(
    await waitUntil(async () => {
      const record = await broker.get(id).catch(() => undefined);
      return record !== undefined && record.state !== RequestState.EXECUTING;
    }, 30_000),
    "the record settles",
  );
  return broker.get(id);
}

await t.test("an action that ends while NATS is away still completes: its completion is sent again, and it beats until then", async (t) => {
  // The export's SELECT waits on the lock: the action is running when NATS goes.
  const { id, outcome, unlock } = await runningExport(t, "ends while NATS is away");
  await nats.pause();
  await unlock();
  t.equal(await outcome, undefined, "the agent's export ended well while NATS was away");
  // The outage outlasts the sidecar's publish timeout (5 s), so the first completion publish fails.
  await new Promise((resolve) => setTimeout(resolve, 6_000));
  await nats.resume();

  const record = await settled(t, id);
  t.equal(RequestState[record.state], "COMPLETED", `completed, not ended as silent (${record.completion?.statusMessage ?? ""})`);
  t.not(record.lease?.revokedAt, undefined, "its credential revoked");
  t.same(await exportRoles(admin), [], "no database user left");
});

await t.test("a sidecar shut down while NATS is away still delivers the completion of an action that ended: it is completed, not ended as silent", async (t) => {
  const { id, outcome, unlock } = await runningExport(t, "ends as its sidecar shuts down");
  await nats.pause();
  await unlock();
  t.equal(await outcome, undefined, "the agent's export ended well while NATS was away");
  // Shut down (as on SIGTERM) with the completion not yet taken; NATS comes back while the sidecar closes.
  const closing = sidecar.close();
  await nats.resume();
  await closing;
  const record = await settled(t, id);
  t.equal(RequestState[record.state], "COMPLETED", `completed before the sidecar closed, not ended as silent (${record.completion?.statusMessage ?? ""})`);
  t.same(await exportRoles(admin), [], "no database user left");
});
