import { join } from "node:path";
import { Client, credentials, type Metadata } from "@grpc/grpc-js";
import { clone, equals, fromBinary, toBinary, toJsonString } from "@bufbuild/protobuf";
import { jetstreamManager } from "@nats-io/jetstream";
import { type KvEntry, Kvm } from "@nats-io/kv";
import { timestampFromMs, ValueSchema } from "@bufbuild/protobuf/wkt";
import { generateKeyPair } from "jose";
import t from "tap";
import { readAuditEvents, verifyTrail } from "../../broker/audit/index.js";
import { CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig, vote } from "../../broker/rules.js";
import { RequestStore } from "../../broker/store.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { type AirlockError, Code, callServerStream, callUnary, createLogger, createVaultClient } from "../../common/index.js";
import { useInfra } from "../../harness/index.js";
import { ApprovalRequestSchema, type AuditEvent, AuditEventType, type RequestRecord, RequestRecordSchema, RequestState } from "../../proto/index.js";
import { bucketStream, requestBucket, stateBucket } from "../../common/subjects.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { Policy } from "../../sidecar/index.js";
import { agentMetadata, streamOutcome } from "../helpers/agent.js";
import { exportRoles, opsPolicy, seedExportEngine, startAgentPath } from "../helpers/stack.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });

const admin = await seedExportEngine(t, { nats, vault, database });
const rootVault = createVaultClient({ address: vault.address, token: vault.rootToken });

const policyText = opsPolicy({ rotateRisk: "low", timeout: "20s", auditStatus: true });
const policy = Policy.parse(policyText);
const { key, agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "e2e", host: "e2e-host", policy: policyText, log });

const approvals = parseApprovalConfig(
  new ConfigReader(
    {
      groups: { "data-owners": ["dana@corp", "alice@corp"], security: ["sam@corp"] },
      auto_rules: [{ id: "low-risk", effect: "approve", when: { max_risk: "low" }, reason: "low risk actions are pre-approved" }],
    },
    "",
    join(dir, "broker.yaml"),
  ),
);
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const broker = await Broker.start({ nc, issuer: new CredentialIssuer({ vault: rootVault }), signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-1", log, tickIntervalMs: 200, orphanAfterMs: 1000 });
t.teardown(() => broker.close());

const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

function agent(extra: Record<string, string> = {}): Promise<Metadata> {
  return agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" }, extra);
}

/** The ExportTable the first test completes, as the broker reads it. */
let exported: RequestRecord | undefined;

async function pending(method: string): Promise<RequestRecord> {
  for (let i = 0; i < 100; i++) {
    const found = (await broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.method === method);
    if (found !== undefined) return found;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`no pending ${method} request`);
}

function dynamicRoles(): Promise<string[]> {
  return exportRoles(admin);
}

await t.test("approved ExportTable: the dynamic user works during the action and is gone within 1 s after", async (t) => {
  t.same(await dynamicRoles(), [], "no dynamic user before the approval");
  const rows = (async () => {
    const all = [];
    for await (const row of callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: await agent({ "x-airlock-reason": "monthly report" }) })) all.push(row.row);
    return all;
  })();
  const record = await pending("ExportTable");
  const self = await broker.decide(record.request?.id ?? "", { reviewer: "alice@corp", approve: true }).catch((e: unknown) => e);
  t.equal((self as AirlockError).code, Code.PermissionDenied, "the human the agent acts for cannot approve");
  await broker.decide(record.request?.id ?? "", { reviewer: "dana@corp", approve: true, reason: "report is due" });
  t.same(await rows, [
    { id: 1, name: "Ada" },
    { id: 2, name: "Grace" },
  ]);
  const finished = Date.now();
  let gone = false;
  while (Date.now() - finished < 1000 && !gone) {
    gone = (await dynamicRoles()).length === 0 && (await broker.get(record.request?.id ?? "")).lease?.revokedAt !== undefined;
    if (!gone) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  t.ok(gone, `the role is dropped and the lease revoked within 1 s (took ${Date.now() - finished} ms)`);
  // The record becomes COMPLETED after the revocation is recorded and audited: a few writes later.
  let done = await broker.get(record.request?.id ?? "");
  for (const until = Date.now() + 1000; done.state !== RequestState.COMPLETED && Date.now() < until; ) {
    await new Promise((resolve) => setTimeout(resolve, 25));
    done = await broker.get(record.request?.id ?? "");
  }
  t.equal(done.state, RequestState.COMPLETED);
  t.equal(done.lease?.revokedBy, "broker-1");
  exported = done;
});

await t.test("that ExportTable's request was stored once: no revision of its record holds it, every read joins it back", async (t) => {
  const id = exported?.request?.id ?? "";
  const request = exported?.request;
  if (request === undefined) throw new Error("no completed ExportTable");
  const admin = await nats.connect({ kind: "admin" });
  t.teardown(() => admin.close());
  const kvm = new Kvm(admin);
  const revisions: KvEntry[] = [];
  for await (const entry of await (await kvm.open(stateBucket)).history({ key: id })) if (entry.operation === "PUT") revisions.push(entry);
  // Intake, then the deciding vote, the lease and the completion: each a compare-and-set.
  t.ok(revisions.length >= 4, `${revisions.length} revisions of the record`);
  t.ok(
    revisions.every((entry) => fromBinary(RequestRecordSchema, entry.value).request === undefined),
    "none of them holds the request",
  );
  const stored: KvEntry[] = [];
  for await (const entry of await (await kvm.open(requestBucket)).history({ key: id })) stored.push(entry);
  t.equal(stored.length, 1, "the requests bucket holds one revision of it");
  const first = revisions[0];
  t.ok(first !== undefined && (stored[0]?.created.getTime() ?? Infinity) <= first.created.getTime(), "written before the record's first revision kept, never after");
  t.ok(equals(ApprovalRequestSchema, fromBinary(ApprovalRequestSchema, stored[0]?.value ?? new Uint8Array()), request), "it is the request get() returns");
  // One write per request in the whole bucket: its last sequence is the number of requests recorded so far.
  const jsm = await jetstreamManager(admin);
  t.equal((await jsm.streams.info(bucketStream(requestBucket))).state.last_seq, (await broker.list()).length, "the requests bucket took one write per request");
  // Bytes per compare-and-set: what each revision holds now, and what it held with the request embedded.
  const after = revisions.map((entry) => entry.value.length);
  const before = revisions.map((entry) => toBinary(RequestRecordSchema, { ...fromBinary(RequestRecordSchema, entry.value), request }).length);
  const sum = (sizes: number[]) => sizes.reduce((total, size) => total + size, 0);
  t.comment(`ExportTable request ${toBinary(ApprovalRequestSchema, request).length} bytes, stored once; record writes (bytes) with the request embedded: ${before.join(", ")} (${sum(before)}); without: ${after.join(", ")} (${sum(after)})`);
  t.ok(
    after.every((size, i) => (before[i] ?? 0) - size > toBinary(ApprovalRequestSchema, request).length),
    "each compare-and-set writes the request's bytes fewer",
  );
});

await t.test("an auto-approved RotateKey gets a live per-action token that is dead after completion; watch sees each step", async (t) => {
  const stopWatching = new AbortController();
  const seen: RequestState[] = [];
  const watching = (async () => {
    for await (const record of broker.watch(stopWatching.signal)) {
      if (record.request?.method !== "RotateKey") continue;
      seen.push(record.state);
      if (record.state === RequestState.COMPLETED && record.lease?.revokedAt !== undefined) break;
    }
  })();
  const response = await callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agent() });
  t.equal(response.version, 1, "the upstream accepted the per-action token");
  const record = (await broker.list()).find((r) => r.request?.method === "RotateKey");
  const accessor = record?.lease?.leaseId ?? "";
  t.ok(accessor !== "");
  let dead = false;
  for (let i = 0; i < 40 && !dead; i++) {
    dead = await rootVault.lookupAccessor(accessor).then(
      () => false,
      () => true,
    );
    if (!dead) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  t.ok(dead, "the token's accessor no longer resolves: revoked");
  await Promise.race([watching, new Promise((resolve) => setTimeout(resolve, 2000))]);
  stopWatching.abort();
  await watching;
  t.same([seen[0], seen.at(-1)], [RequestState.APPROVED, RequestState.COMPLETED], `watch saw the request from approval to completion (${seen.map((s) => RequestState[s]).join(" → ")})`);
});

await t.test("a reviewer's denial reaches the agent with the reason", async (t) => {
  const call = callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: await agent() });
  const outcome = streamOutcome(call) as Promise<AirlockError | undefined>;
  const record = await pending("ExportTable");
  await broker.decide(record.request?.id ?? "", { reviewer: "dana@corp", approve: false, reason: "not before the audit" });
  const error = await outcome;
  t.equal(error?.code, Code.PermissionDenied);
  t.match(error?.rawMessage ?? "", /not before the audit/);
});

await t.test("calls the sidecar decides alone are in the trail: denied by policy, refused, allowed by an audited rule", async (t) => {
  for (let i = 0; i < 3; i++) await callUnary(client, OpsService.method.getStatus, {}, { metadata: await agent() });
  const denied = await callUnary(client, OpsService.method.grantRole, { user: "mallory", role: "admin" }, { metadata: await agent() }).then(
    () => undefined,
    (e: unknown) => e as AirlockError,
  );
  t.equal(denied?.code, Code.PermissionDenied);
  const forged = await agentMetadata({ privateKey: (await generateKeyPair("EdDSA")).privateKey, issuer: "https://idp.test", audience: "airlock" });
  const refused = await callUnary(client, OpsService.method.getStatus, {}, { metadata: forged }).then(
    () => undefined,
    (e: unknown) => e as AirlockError,
  );
  t.equal(refused?.code, Code.Unauthenticated);
  const want = [AuditEventType.CALLS_ALLOWED, AuditEventType.CALL_DENIED, AuditEventType.CALL_REFUSED];
  let found: Map<AuditEventType, AuditEvent> = new Map();
  // The sidecar batches reports every 500 ms: the three allowed calls may land in one event or two.
  let allowedCount = 0;
  let allowedEvents = 0;
  const settled = () => found.size === want.length && allowedCount >= 3;
  for (const until = Date.now() + 10_000; !settled() && Date.now() < until; ) {
    found = new Map();
    allowedCount = 0;
    allowedEvents = 0;
    for await (const event of readAuditEvents(nc)) {
      if (!want.includes(event.type)) continue;
      found.set(event.type, event);
      if (event.type === AuditEventType.CALLS_ALLOWED && event.details?.method === "/demo.v1.OpsService/GetStatus") {
        allowedCount += Number(event.details.count);
        allowedEvents++;
      }
    }
    if (!settled()) await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const details = (type: AuditEventType) => found.get(type)?.details ?? {};
  t.match(details(AuditEventType.CALL_DENIED), { method: "/demo.v1.OpsService/GrantRole", rule: "default", agent: "spiffe://corp/agent/etl", onBehalfOf: "alice@corp", reason: "policy_deny", host: "e2e-host", count: 1 });
  t.match(details(AuditEventType.CALLS_ALLOWED), { method: "/demo.v1.OpsService/GetStatus", rule: "status", agent: "spiffe://corp/agent/etl" });
  t.equal(allowedCount, 3, "three allowed calls counted");
  t.ok(allowedEvents < 3, `aggregated: ${allowedEvents} event(s) for three calls, one per 500 ms batch, not one per call`);
  t.match(details(AuditEventType.CALL_REFUSED), { method: "/demo.v1.OpsService/GetStatus", reason: "unauthenticated", agent: "" });
  t.equal(found.get(AuditEventType.CALL_REFUSED)?.flagged, true, "a refused credential is flagged for alerting");
  t.equal(found.get(AuditEventType.CALL_DENIED)?.actor, "sidecar:e2e-host", "the host comes from the subject the server enforces");
});

await t.test("the audit trail holds every step and verifies", async (t) => {
  const events = [];
  for await (const event of readAuditEvents(nc)) events.push(event);
  t.ok(verifyTrail(events).intact);
  const types = new Set(events.map((e) => e.type));
  for (const type of [AuditEventType.REQUEST_RECEIVED, AuditEventType.VOTE_RECORDED, AuditEventType.DECIDED, AuditEventType.CREDENTIAL_ISSUED, AuditEventType.ACTION_COMPLETED, AuditEventType.CREDENTIAL_REVOKED]) {
    t.ok(types.has(type), `${AuditEventType[type]} is recorded`);
  }
  t.notMatch(JSON.stringify(events.map((e) => e.details)), /hvs\.|"password"/, "no secret in the audit trail");
  const exported = events.find((e) => e.type === AuditEventType.ACTION_COMPLETED && (e.details?.touched as Record<string, unknown> | undefined)?.table === "customers");
  t.same(exported?.details?.touched, { rows: "2", table: "customers" }, "what the export touched, from the upstream's airlock-touched trailer, is in its completion event");
});

await t.test("two replicas racing on the same requests decide and issue each exactly once", async (t) => {
  const second = await Broker.start({ nc, issuer: new CredentialIssuer({ vault: rootVault }), signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-2", log, tickIntervalMs: 200 });
  t.teardown(() => second.close());
  // Auto-approved RotateKey calls land on whichever replica the shared consumer hands them to.
  const calls = await Promise.all(Array.from({ length: 8 }, async (_, i) => callUnary(client, OpsService.method.rotateKey, { keyId: `race-${i}` }, { metadata: await agent() })));
  t.equal(calls.length, 8);
  const raced = (record: RequestRecord) => record.request?.request !== undefined && toJsonString(ValueSchema, record.request.request).includes('"race-');
  const fresh = (await broker.list()).filter(raced);
  t.equal(fresh.length, 8, "one request per call");
  const issuedPerRequest = new Map<string, number>();
  for await (const event of readAuditEvents(nc)) {
    if (event.type === AuditEventType.CREDENTIAL_ISSUED) issuedPerRequest.set(event.requestId, (issuedPerRequest.get(event.requestId) ?? 0) + 1);
  }
  for (const record of fresh) t.equal(issuedPerRequest.get(record.request?.id ?? ""), 1, `request ${record.request?.id} issued once`);
});

await t.test("a replica that dies between deciding and publishing: another takes over and the agent's call runs", async (t) => {
  const rows = (async () => {
    const all = [];
    for await (const row of callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: await agent() })) all.push(row.row);
    return all;
  })();
  const record = await pending("ExportTable");
  const requestId = record.request?.id ?? "";
  // What a replica writes just before it dies: the deciding vote with its claim on the decision, then nothing.
  const store = await RequestStore.open(nc);
  const stored = await store.get(requestId);
  if (stored?.record.request === undefined) throw new Error("no stored request");
  const voted = vote(stored.record, stored.record.request, approvals, { reviewer: "dana@corp", approve: true }, new Date());
  if (!voted.ok) throw voted.error;
  const claimed = clone(RequestRecordSchema, voted.record);
  claimed.decisionId = "claimed-by-a-dead-replica";
  claimed.updatedAt = timestampFromMs(Date.now() - 5000);
  t.not(await store.update(claimed, stored.revision), undefined);
  t.equal((await rows).length, 2, "a live replica issued the credential and published the decision");
  let issued = 0;
  for await (const event of readAuditEvents(nc)) if (event.type === AuditEventType.CREDENTIAL_ISSUED && event.requestId === requestId) issued++;
  t.equal(issued, 1, "issued once");
});

await t.test("Vault down: the request fails closed with a clear reason and no credential", async (t) => {
  const call = callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: await agent() });
  const outcome = streamOutcome(call) as Promise<AirlockError | undefined>;
  const record = await pending("ExportTable");
  await vault.stop();
  await broker.decide(record.request?.id ?? "", { reviewer: "dana@corp", approve: true });
  const error = await outcome;
  t.not(error, undefined, "the call did not run");
  t.match(error?.rawMessage ?? "", /no credential could be issued/);
  t.same(await dynamicRoles(), []);
});
