// No credential outlives its action's deadline: an approval whose credential Vault only hands
// over after the deadline (a stalled Vault) has it revoked at once, and the agent is told.
import { join } from "node:path";
import t, { type Test } from "tap";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { readAuditEvents } from "../../broker/audit/index.js";
import { brokerVaultPolicy, CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { type AirlockError, callServerStream, createLogger, createVaultClient } from "../../common/index.js";
import { useInfra } from "../../harness/index.js";
import { AuditEventType, type RequestRecord, RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { Policy } from "../../sidecar/index.js";
import { agentMetadata, streamOutcome } from "../helpers/agent.js";
import { exportRoles, opsPolicy, seedExportEngine, startAgentPath } from "../helpers/stack.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });
const admin = await seedExportEngine(t, { nats, vault, database });

// A short deadline, and a Vault client patient enough to outlast it: the stall ends after the deadline.
const policyText = opsPolicy({ timeout: "3s" });
const policy = Policy.parse(policyText);
const { key, agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "deadline", host: "deadline-host", policy: policyText, log });
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"] } }, "", join(dir, "broker.yaml")));
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const patientVault = createVaultClient({ address: vault.address, token: vault.rootToken, timeoutMs: 30_000 });
const broker = await Broker.start({ nc, issuer: new CredentialIssuer({ vault: patientVault }), signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-1", log, tickIntervalMs: 200 });
t.teardown(() => broker.close());

const { Client, credentials } = await import("@grpc/grpc-js");
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

async function until<T>(what: string, probe: () => Promise<T | undefined>, ms = 20_000): Promise<T> {
  for (const end = Date.now() + ms; Date.now() < end; ) {
    const found = await probe();
    if (found !== undefined) return found;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * Holds an export, approves it on `replica` while Vault is frozen, and thaws Vault only once
 * the request's deadline has passed: the credential arrives late. Resolves once the request failed.
 */
async function approvePastDeadline(t: Test, replica: Broker): Promise<{ id: string; failed: RequestRecord; outcome: Promise<AirlockError | undefined> }> {
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome = streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) as Promise<AirlockError | undefined>;
  const pending = await until("the pending export", async () => (await replica.list()).find((r) => r.state === RequestState.PENDING && r.request?.method === "ExportTable"));
  const id = pending.request?.id ?? "";
  const requestDeadline = pending.request?.deadline;
  if (requestDeadline === undefined) throw new Error("the held request has no deadline");
  const deadline = timestampDate(requestDeadline).getTime();

  vault.freeze();
  let thawed = false;
  t.teardown(() => {
    if (!thawed) vault.thaw();
  });
  const decided = replica.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  // Vault holds the issue call; let the deadline pass before it answers.
  await until("the deadline to pass", async () => (Date.now() > deadline + 300 ? true : undefined));
  vault.thaw();
  thawed = true;
  await decided;

  const failed: RequestRecord = await until("the request to fail", async () => {
    const record = await replica.get(id);
    return record.state === RequestState.FAILED ? record : undefined;
  });
  return { id, failed, outcome };
}

await t.test("Vault stalls past the deadline after an approval: the late credential is revoked at once, the record fails, the trail says why", async (t) => {
  const { id, failed, outcome } = await approvePastDeadline(t, broker);
  t.ok(failed.lease !== undefined && failed.lease.revokedAt !== undefined, "the late lease is on record, revoked");
  t.same(await exportRoles(admin), [], "the database user Vault made late is gone");
  const error = await outcome;
  t.not(error, undefined, "the agent's call did not run");
  const events = [];
  for await (const event of readAuditEvents(nc)) if (event.requestId === id) events.push(event);
  const revoked = events.find((e) => e.type === AuditEventType.CREDENTIAL_REVOKED);
  t.equal(revoked?.details?.why, "issued_past_deadline", "the trail says the late credential was revoked, and why");
  const flagged = events.find((e) => e.type === AuditEventType.SECURITY_EVENT && e.flagged);
  t.match(flagged?.details?.failed, /after the action's deadline and was revoked at once/, "and flags it with the reason");
});

/** A Vault token with the broker's policy minus revocation: Vault itself refuses the revoke. */
async function tokenThatCannotRevoke(): Promise<string> {
  const vaultApi = async (method: string, path: string, body: unknown): Promise<unknown> => {
    const response = await fetch(`${vault.address}/v1/${path}`, { method, headers: { "x-vault-token": vault.rootToken }, body: JSON.stringify(body) });
    if (!response.ok) throw new Error(`vault ${path}: ${response.status} ${await response.text()}`);
    return response.status === 204 ? undefined : response.json();
  };
  const policy = brokerVaultPolicy({ databaseMounts: ["database"] })
    .split("\n")
    .filter((line) => !line.includes("sys/leases/revoke"))
    .join("\n");
  await vaultApi("PUT", "sys/policies/acl/broker-no-revoke", { policy });
  const created = (await vaultApi("POST", "auth/token/create", { policies: ["broker-no-revoke"], ttl: "1h", no_parent: true })) as { auth: { client_token: string } };
  return created.auth.client_token;
}

let stuck: Broker | undefined;
let healthy: Broker | undefined;

await t.test("a late credential whose revocation fails stays on record as live, and a replica that can revoke it does", async (t) => {
  await broker.close();
  const stuckNc = await nats.connect({ kind: "broker" });
  t.teardown(() => stuckNc.close());
  const stuckVault = createVaultClient({ address: vault.address, token: await tokenThatCannotRevoke(), timeoutMs: 30_000 });
  stuck = await Broker.start({ nc: stuckNc, issuer: new CredentialIssuer({ vault: stuckVault }), signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-stuck", log, tickIntervalMs: 200 });
  const stuckReplica = stuck;
  t.teardown(() => stuckReplica.close());

  const { id, failed, outcome } = await approvePastDeadline(t, stuckReplica);
  t.ok(failed.lease !== undefined && failed.lease.leaseId !== "" && failed.lease.revokedAt === undefined, "the late lease is on record as live: the reconciler will not forget it");
  t.not(await outcome, undefined, "the agent's call did not run");
  t.equal((await exportRoles(admin)).length, 1, "Vault refused the revoke: the late database user still exists");
  const events = [];
  for await (const event of readAuditEvents(nc)) if (event.requestId === id) events.push(event);
  t.match(events.find((e) => e.type === AuditEventType.SECURITY_EVENT && e.details?.leaseId !== undefined)?.details, { failed: "issued past the deadline and not revoked" }, "the trail flags the live credential");

  // Another replica, whose token may revoke, reconciles the recorded lease.
  healthy = await Broker.start({ nc, issuer: new CredentialIssuer({ vault: patientVault }), signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-2", log, tickIntervalMs: 200 });
  const healthyReplica = healthy;
  t.teardown(() => healthyReplica.close());
  const revoked = await until("the reconciler to revoke it", async () => {
    const record = await healthyReplica.get(id);
    return record.lease?.revokedAt !== undefined ? record : undefined;
  });
  t.equal(revoked.lease?.revokedBy, "broker-2");
  t.same(await exportRoles(admin), [], "the database user is gone");
});

await t.test("an approval finalized inside the deadline margin issues nothing: the decision could not reach the agent in time", async (t) => {
  await Promise.all([stuck?.close(), healthy?.close()]);
  const marginNc = await nats.connect({ kind: "broker" });
  t.teardown(() => marginNc.close());
  // The policy's timeout is 3 s: with a 2.9 s margin, an approval given after the first 100 ms is too late to act on.
  const marginal = await Broker.start({ nc: marginNc, issuer: new CredentialIssuer({ vault: patientVault }), signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-margin", log, tickIntervalMs: 200, deadlineMarginMs: 2_900 });
  t.teardown(() => marginal.close());
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome = streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) as Promise<AirlockError | undefined>;
  const pending = await until("the pending export", async () => (await marginal.list()).find((r) => r.state === RequestState.PENDING && r.request?.method === "ExportTable"));
  const id = pending.request?.id ?? "";
  const createdAt = pending.request?.createdAt;
  if (createdAt === undefined) throw new Error("the held request has no creation time");
  await until("the margin to start", async () => (Date.now() > timestampDate(createdAt).getTime() + 200 ? true : undefined));
  await marginal.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  const failed = await until("the request to fail", async () => {
    const record = await marginal.get(id);
    return record.state === RequestState.FAILED ? record : undefined;
  });
  t.equal(failed.lease, undefined, "no credential was issued");
  t.not(await outcome, undefined, "the agent's call did not run");
  const events = [];
  for await (const event of readAuditEvents(nc)) if (event.requestId === id) events.push(event);
  t.equal(events.filter((e) => e.type === AuditEventType.CREDENTIAL_ISSUED).length, 0, "the trail has no issuance");
  t.match(events.find((e) => e.type === AuditEventType.SECURITY_EVENT && e.flagged)?.details?.failed, /too close to or after the action's deadline: nothing was issued/);
});
