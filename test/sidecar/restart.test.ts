/**
 * A sidecar killed (-9) mid-call and started again says hello: the brokers end what its host was
 * executing (lease revoked, record failed, flagged `sidecar_restarted`) well before the heartbeat
 * silence. Another host's hello, or one on another host's subject, ends nothing. An agent that
 * names its call (`x-airlock-call-id`) and retries it after the crash is told what became of it.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import t from "tap";
import { readAuditEvents } from "../../broker/audit/index.js";
import { CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { AirlockError, Code, callServerStream, createLogger, createVaultClient } from "../../common/index.js";
import { freePort, useInfra, waitUntil } from "../../harness/index.js";
import { AuditEventType, RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { callIdKeyFromSeed, callIds, callRequestId, Policy } from "../../sidecar/index.js";
import { agentMetadata, streamOutcome } from "../helpers/agent.js";
import { exportRoles, holdCustomersLock, opsPolicy, seedExportEngine, startAgentPath, startSidecarProcess } from "../helpers/stack.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });
const admin = await seedExportEngine(t, { nats, vault, database });
const policyText = opsPolicy();
const policy = Policy.parse(policyText);
// The upstream, keys and policy directory (its in-process sidecar, on another host, stays idle).
const { ops, key, agentKeys, dir } = await startAgentPath(t, { nats, vault, database }, { name: "sidecar-restart", host: "idle-host", policy: policyText, log });
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"] } }, "", join(dir, "broker.yaml")));
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
// A silence far longer than the test's bound: only the restarted sidecar's hello can end the action in time.
const silenceMs = 120_000;
const broker = await Broker.start({
  nc,
  issuer: new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: vault.rootToken }) }),
  signingKey: key.signing,
  approvals,
  policy: () => policy,
  replicaId: "broker-1",
  log,
  tickIntervalMs: 200,
  heartbeatSilenceMs: silenceMs,
});
t.teardown(() => broker.close());

const host = "crash-host";
const listen = `127.0.0.1:${await freePort()}`;
const metrics = `127.0.0.1:${await freePort()}`;
const sidecarOptions = { dir, upstream: ops.address, host, agentPublicKey: agentKeys.publicKey, listen, metrics, heartbeatInterval: "1s" };
const first = await startSidecarProcess(t, { nats, vault, database }, sidecarOptions);
// The sidecar process running now: each subtest that kills it starts the next, stopped at the file's end.
let current = first;
const suite = t;
const { Client, credentials } = await import("@grpc/grpc-js");
const client = new Client(listen, credentials.createInsecure());
t.teardown(() => client.close());

// The sidecar keys call ids with its NATS seed; the test reads the same seed to know the ids.
const callIdKey = callIdKeyFromSeed(await readFile((await nats.credentials({ kind: "sidecar", host })).auth.seedFile, "utf8"));
const idOf = (callId: string) => callRequestId(callIdKey, { host, agent: "spiffe://corp/agent/etl", onBehalfOf: "alice@corp", callId });

const hostRequests = async (): Promise<Set<string>> => new Set((await broker.list()).filter((r) => r.request?.host === host).map((r) => r.request?.id ?? ""));
const hostRequestsSince = async (before: ReadonlySet<string>): Promise<string[]> => [...(await hostRequests())].filter((id) => !before.has(id));

const exportWith = async (callId: string) => {
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" }, { "x-airlock-call-id": callId });
  return streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata }));
};

await t.test("kill -9 the sidecar mid-call: its restart ends the action and revokes the lease long before the heartbeat silence", async (t) => {
  // The export's SELECT waits on this lock: the action is mid-call when the sidecar dies.
  const unlock = await holdCustomersLock(t, admin);
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome = streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) as Promise<AirlockError | undefined>;
  let id = "";
  t.ok(
    await waitUntil(async () => {
      id = (await broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.host === host)?.request?.id ?? "";
      return id !== "";
    }, 30_000),
    "the export is held",
  );
  await broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.EXECUTING && (await exportRoles(admin)).length === 1, 20_000), "approved, executing, its database user live");

  // Hostile neighbours: another host's hello, and one on this host's subject, which the server refuses.
  const foreign = await nats.connect({ kind: "sidecar", host: "other-host" });
  t.teardown(() => foreign.close());
  foreign.publish("airlock.heartbeat.other-host", JSON.stringify({ hello: true, instance: "x", actions: [] }));
  foreign.publish(`airlock.heartbeat.${host}`, JSON.stringify({ hello: true, instance: "x", actions: [] }));
  await foreign.flush().catch(() => undefined);
  // The broker handles beats as they come; a few ticks are more than enough for a wrong one to act.
  await new Promise((resolve) => setTimeout(resolve, 2_000));
  const untouched = await broker.get(id);
  t.equal(untouched.state, RequestState.EXECUTING, "another host's hello ends nothing of this host's");
  t.equal(untouched.lease?.revokedAt, undefined, "and revokes nothing");

  await first.kill();
  const killed = Date.now();
  t.not(await outcome, undefined, "the agent's call died with its sidecar");
  current = await startSidecarProcess(suite, { nats, vault, database }, sidecarOptions);
  const restarted = Date.now();
  t.ok(
    await waitUntil(async () => {
      const record = await broker.get(id);
      return record.state === RequestState.FAILED && record.lease?.revokedAt !== undefined;
    }, 60_000),
    "the restarted sidecar's hello ended the action",
  );
  const ended = Date.now();
  t.comment(`lease revoked ${((ended - killed) / 1000).toFixed(2)} s after the kill, ${((ended - restarted) / 1000).toFixed(2)} s after the new sidecar was ready; heartbeat silence ${silenceMs / 1000} s`);
  t.ok(ended - killed < silenceMs / 2, "well before the heartbeat silence");
  t.same(await exportRoles(admin), [], "the database user is gone");
  const events = [];
  for await (const event of readAuditEvents(nc)) if (event.requestId === id) events.push(event);
  t.equal(events.filter((e) => e.type === AuditEventType.CREDENTIAL_REVOKED && e.details?.why === "sidecar_restarted").length, 1, "one revocation in the trail, naming the restart");
  t.ok(
    events.some((e) => e.type === AuditEventType.SECURITY_EVENT && e.flagged && e.details?.ended === "sidecar_restarted" && e.details.host === host),
    "a flagged event says the restarted sidecar abandoned it",
  );
  await unlock();
});

await t.test("a call id retried after the sidecar died mid-call is told the outcome is unknown, and nothing runs twice", async (t) => {
  const unlock = await holdCustomersLock(t, admin);
  const before = await hostRequests();
  const callId = "export-after-crash-1";
  const id = idOf(callId);
  const outcome = exportWith(callId);
  t.ok(await waitUntil(async () => (await broker.list()).some((r) => r.request?.id === id && r.state === RequestState.PENDING), 30_000), "held under the id its call id names");
  await broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.EXECUTING && (await exportRoles(admin)).length === 1, 20_000), "executing");
  // Mid-call for certain: the upstream's SELECT, made with the credential the sidecar injected, waits on the lock.
  t.ok(
    // The admin session holds the lock in an open transaction, where the activity view is a snapshot: cleared on each look.
    await waitUntil(async () => (await admin.query("SELECT pg_stat_clear_snapshot()")) && (await admin.query("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND usename = ANY($1)", [await exportRoles(admin)])).rowCount === 1, 20_000),
    "the upstream is running the export",
  );
  await current.kill();
  t.not(await outcome, undefined, "the agent's call died with its sidecar");
  current = await startSidecarProcess(suite, { nats, vault, database }, sidecarOptions);

  const retried = AirlockError.from(await exportWith(callId));
  t.equal(retried.code, Code.Aborted, retried.message);
  t.equal(retried.details.reason, "outcome_unknown", "the agent is told the action may have run");
  t.equal(retried.details.requestId, id);
  t.same(await hostRequestsSince(before), [id], "no second request was made");
  await unlock();
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.FAILED, 30_000), "the restart ended the action");
  t.same(await exportRoles(admin), [], "no database user is left");
});

await t.test("a call id retried after the sidecar died while it waited resumes the same request, which runs once", async (t) => {
  const before = await hostRequests();
  const callId = "export-while-waiting-1";
  const id = idOf(callId);
  const outcome = exportWith(callId);
  t.ok(await waitUntil(async () => (await broker.list()).some((r) => r.request?.id === id && r.state === RequestState.PENDING), 30_000), "held");
  await current.kill();
  t.not(await outcome, undefined, "the waiting call died with its sidecar");
  current = await startSidecarProcess(suite, { nats, vault, database }, sidecarOptions);

  const retried = exportWith(callId);
  // The retry waits on the same request: the reviewer approves that one.
  await broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  t.equal(await retried, undefined, "the retried call ran to its end");
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.COMPLETED, 20_000), "completed");
  t.same(await hostRequestsSince(before), [id], "no second request was made");

  const again = AirlockError.from(await exportWith(callId));
  t.equal(again.code, Code.FailedPrecondition, `the same call id once more runs nothing: ${again.message}`);
  t.equal(again.details.reason, "already_ran");
  t.equal(again.details.upstreamStatus, 0, "and says how the upstream answered");
});

await t.test("a call id approved while its sidecar was down is told the restart ended it: nothing runs on a revoked credential", async (t) => {
  const before = await hostRequests();
  const callId = "export-approved-while-down-1";
  const id = idOf(callId);
  const outcome = exportWith(callId);
  t.ok(await waitUntil(async () => (await broker.list()).some((r) => r.request?.id === id && r.state === RequestState.PENDING), 30_000), "held");
  await current.kill();
  t.not(await outcome, undefined, "the waiting call died with its sidecar");
  // Approved (and its database user made) while no sidecar runs on the host.
  await broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  const decidedBy = Date.now();
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.EXECUTING, 20_000), "executing, with nobody to run it");
  // Older than the clock skew the sidecar allows when its next run starts: the hello alone ends it (no hand-back).
  t.ok(await waitUntil(async () => Date.now() > decidedBy + callIds.clockSkewMs, 10_000), "the decision is older than the skew allowed");
  current = await startSidecarProcess(suite, { nats, vault, database }, sidecarOptions);
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.FAILED, 20_000), "the restarted sidecar's hello ended it");
  t.same(await exportRoles(admin), [], "its database user is gone");

  const retried = AirlockError.from(await exportWith(callId));
  t.equal(retried.code, Code.Aborted, retried.message);
  t.equal(retried.details.reason, "ended_by_restart", "told it did not run, rather than the upstream's refusal of a revoked credential");
  t.equal(retried.details.requestId, id);
  t.same(await hostRequestsSince(before), [id], "no second request was made");
  t.equal((await broker.get(id)).state, RequestState.FAILED, "still failed: nothing ran");
});

await t.test("the same call id again while the first call waits or runs is call_in_progress; nothing runs twice", async (t) => {
  const unlock = await holdCustomersLock(t, admin);
  const callId = "export-twice-at-once";
  const id = idOf(callId);
  const first = exportWith(callId);
  t.ok(await waitUntil(async () => (await broker.list()).some((r) => r.request?.id === id && r.state === RequestState.PENDING), 30_000), "held");
  const waiting = AirlockError.from(await exportWith(callId));
  t.equal(waiting.code, Code.AlreadyExists, waiting.message);
  t.equal(waiting.details.reason, "call_in_progress", "a second wait would take the first's decision");
  await broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  t.ok(
    await waitUntil(async () => (await admin.query("SELECT pg_stat_clear_snapshot()")) && (await admin.query("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND usename = ANY($1)", [await exportRoles(admin)])).rowCount === 1, 20_000),
    "the first call runs upstream",
  );
  const running = AirlockError.from(await exportWith(callId));
  t.equal(running.code, Code.AlreadyExists, running.message);
  t.equal(running.details.reason, "call_in_progress");
  await unlock();
  t.equal(await first, undefined, "the first call ran to its end, once");
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.COMPLETED, 20_000), "completed");

  // This sidecar's run answered ended_by_restart (the subtest before) and call_in_progress: outcomes, not faults.
  const exposed = await (await fetch(`http://${metrics}/metrics`)).text();
  for (const reason of ["call_in_progress", "ended_by_restart"]) t.match(exposed, new RegExp(`airlock_sidecar_rejections_total\\{reason="${reason}"\\} [1-9]`), reason);
  t.notMatch(exposed, /reason="internal"/, "none of them counted as a fault inside the sidecar");
});

await t.test("call ids: a malformed one is refused; the same id from another agent or host names another request", async (t) => {
  const bad = AirlockError.from(await exportWith("has spaces/and slashes"));
  t.equal(bad.code, Code.InvalidArgument);
  t.equal(bad.details.reason, "invalid_call_id");
  // A call id of a call that ran, reused for another payload: refused, and the other call is not asked for.
  const before = await hostRequests();
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" }, { "x-airlock-call-id": "export-while-waiting-1" });
  const reused = AirlockError.from(await streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "orders" }, { metadata })));
  t.equal(reused.code, Code.FailedPrecondition, reused.message);
  t.equal(reused.details.reason, "call_id_reused");
  t.equal(reused.details.requestId, idOf("export-while-waiting-1"), "it names the call the id is taken by");
  t.same(await hostRequestsSince(before), [], "nothing new was asked");
  const base = { host, agent: "spiffe://corp/agent/etl", onBehalfOf: "alice@corp", callId: "x" };
  const mine = callRequestId(callIdKey, base);
  t.match(mine, /^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/, "a version-8 UUID, the shape request ids have");
  t.equal(callRequestId(callIdKey, base), mine, "the same call names the same request");
  t.not(callRequestId(callIdKey, { ...base, agent: "spiffe://corp/agent/other" }), mine, "another agent's");
  t.not(callRequestId(callIdKey, { ...base, host: "other-host" }), mine, "another host's");
  t.not(callRequestId(callIdKey, { ...base, onBehalfOf: "bob@corp" }), mine, "for another human");
  t.not(callRequestId(callIdKeyFromSeed("SUAOTHERHOSTSSEED"), base), mine, "without this host's key, nobody can compute it");
  t.throws(() => callRequestId(callIdKey, { ...base, callId: "x".repeat(129) }), /x-airlock-call-id/);
});
