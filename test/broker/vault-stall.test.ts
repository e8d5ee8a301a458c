/**
 * Issuance survives a Vault stall: Vault is frozen (SIGSTOP) for longer than the broker's Vault
 * timeout while it issues, so the broker gives up and fails the request; when Vault wakes it
 * still creates the secret. The broker recorded the intent before calling, and its sweep finds
 * and revokes what Vault made: no token and no database user outlives the failed request. The
 * broker acts with a token holding only brokerVaultPolicy (least privilege), through a token role.
 */
import { join } from "node:path";
import t, { type Test } from "tap";
import { readAuditEvents } from "../../broker/audit/index.js";
import { brokerVaultPolicy, CredentialIssuer, configureTokenRole, intentMetaKey } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { AirlockError, callServerStream, callUnary, Code, createLogger, createVaultClient } from "../../common/index.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { AuditEventType, RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { Policy } from "../../sidecar/index.js";
import { agentMetadata, streamOutcome } from "../helpers/agent.js";
import { exportRoles, opsPolicy, seedExportEngine, startAgentPath } from "../helpers/stack.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });
const admin = await seedExportEngine(t, { nats, vault, database });
const policyText = opsPolicy({ rotateRisk: "medium" });
const policy = Policy.parse(policyText);
const { key, agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "vault-stall", host: "stall-host", policy: policyText, log });
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"], security: ["sam@corp"] } }, "", join(dir, "broker.yaml")));

// The broker's own Vault token: brokerVaultPolicy and nothing else; per-action tokens through a token role.
const root = createVaultClient({ address: vault.address, token: vault.rootToken });
await configureTokenRole(root, { name: "airlock-action", allowedPoliciesGlob: ["default"], maxTtlSeconds: 3600 });
await root.writePolicy("airlock-broker-stall", brokerVaultPolicy({ tokenRole: "airlock-action", databaseMounts: ["database"] }));
const created = await fetch(`${vault.address}/v1/auth/token/create`, {
  method: "POST",
  headers: { "X-Vault-Token": vault.rootToken },
  body: JSON.stringify({ policies: ["airlock-broker-stall"], ttl: "1h", no_default_policy: true }),
});
const brokerToken = ((await created.json()) as { auth: { client_token: string } }).auth.client_token;
// A short Vault timeout: the stall below outlasts it.
const vaultTimeoutMs = 1_000;
const issuer = new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: brokerToken, timeoutMs: vaultTimeoutMs }), tokenRole: "airlock-action" });
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const broker = await Broker.start({ nc, issuer, signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-1", log, tickIntervalMs: 200 });
t.teardown(() => broker.close());
const { Client, credentials } = await import("@grpc/grpc-js");
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

/** Tokens Vault holds now whose metadata names `requestId` (looked up with the root token). */
async function tokensOf(requestId: string): Promise<string[]> {
  const found: string[] = [];
  for (const accessor of await root.listTokenAccessors()) {
    const info = await root.lookupAccessor(accessor).catch(() => undefined);
    if (info?.meta.airlock_request_id === requestId) found.push(accessor);
  }
  return found;
}

/**
 * Holds a call, freezes Vault, approves it (the broker's issue call times out), thaws Vault
 * after three timeouts: Vault then makes the secret nobody waits for. Resolves with the
 * request id and the agent's error once the request failed.
 */
async function stallDuringIssue(t: Test, method: "ExportTable" | "RotateKey", reviewer: string, beforeFreeze: () => Promise<void> = async () => undefined): Promise<{ id: string; error: AirlockError | undefined }> {
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome =
    method === "ExportTable"
      ? (streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) as Promise<AirlockError | undefined>)
      : callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata }).then(
          () => undefined,
          (error: unknown) => AirlockError.from(error),
        );
  let id = "";
  t.ok(
    await waitUntil(async () => {
      id = (await broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.method === method)?.request?.id ?? "";
      return id !== "";
    }, 30_000),
    `the ${method} is held`,
  );
  await beforeFreeze();
  vault.freeze();
  let thawed = false;
  t.teardown(() => {
    if (!thawed) vault.thaw();
  });
  const decided = broker.decide(id, { reviewer, approve: true, reason: "ok" }).catch((error: unknown) => error);
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.FAILED, 30_000), "the issue call timed out: the request failed");
  const error = AirlockError.from(await outcome);
  await new Promise((resolve) => setTimeout(resolve, 2 * vaultTimeoutMs));
  vault.thaw();
  thawed = true;
  await decided;
  return { id, error };
}

await t.test("a token Vault makes after the broker gave up on it is found by its intent and revoked", async (t) => {
  const { id, error } = await stallDuringIssue(t, "RotateKey", "sam@corp");
  t.equal(error?.code, Code.Aborted, "the agent got a clear error with a stable code");
  t.match(error?.rawMessage, /no credential could be issued/);
  const failed = await broker.get(id);
  t.equal(failed.lease?.intent, failed.decisionId, "the record holds the intent: the decision id Vault's token carries");
  // Vault sometimes drops the call whose client has gone, sometimes makes the token anyway. When
  // it dropped it, the token it could have made is made here, as Vault makes it: carrying the intent.
  const madeByVault = (await tokensOf(id)).length;
  if (madeByVault === 0) await root.createToken({ policies: ["default"], ttlSeconds: 300, numUses: 1, meta: { airlock_request_id: id, [intentMetaKey]: failed.decisionId }, wrapTtlSeconds: 60 });
  t.comment(madeByVault === 0 ? "Vault dropped the stalled call; the test made the token" : "Vault made the token after the broker gave up on it");
  const accessors = await tokensOf(id);
  // Vault has woken: the token it made for the intent exists until the sweep finds it.
  t.ok(
    await waitUntil(async () => (await broker.get(id)).lease?.revokedAt !== undefined, 60_000),
    "the sweep resolved the intent",
  );
  t.same(await tokensOf(id), [], "no token made for the failed request is alive");
  const events = [];
  for await (const event of readAuditEvents(nc)) if (event.requestId === id) events.push(event);
  const swept = events.find((e) => e.type === AuditEventType.CREDENTIAL_REVOKED && e.details?.why === "issuance_swept");
  t.ok(swept?.flagged === true && swept.details?.found === 1, "the trail names the token Vault made late, revoked by the sweep");
  t.same(swept?.details?.revoked, accessors, "by its accessor, so no token Vault made is unknown to the trail");
  t.equal(swept?.details?.intent, failed.decisionId, "and the intent it was made for");
});

await t.test("a database user Vault makes after the broker gave up on it is swept from the role's leases", async (t) => {
  // Vault's database engine drops a read whose client has gone (the stalled call's own lease is
  // rarely made), so the lease Vault makes for the intent is made here, at the moment of the call,
  // by a read the broker never sees: exactly what the sweep must find.
  let late = "";
  const { id, error } = await stallDuringIssue(t, "ExportTable", "dana@corp", async () => {
    const read = await fetch(`${vault.address}/v1/database/creds/export`, { headers: { "X-Vault-Token": vault.rootToken } });
    late = ((await read.json()) as { lease_id: string }).lease_id;
  });
  t.ok((await exportRoles(admin)).length >= 1, "a database user nobody holds exists");
  t.not(error, undefined, "the agent's export did not run");
  t.match(error?.rawMessage, /no credential could be issued/);
  t.ok(
    await waitUntil(async () => (await broker.get(id)).lease?.revokedAt !== undefined, 90_000),
    "the sweep resolved the intent",
  );
  t.same(await exportRoles(admin), [], "no database user made for the failed request exists");
  t.same(await root.listLeases("database/creds/export"), [], "and Vault holds no lease for the role");
  const events = [];
  for await (const event of readAuditEvents(nc)) if (event.requestId === id) events.push(event);
  t.equal((await root.lookupLease(late).catch((e: unknown) => AirlockError.from(e))) instanceof AirlockError, true, "the lease the broker never saw is revoked");
  const swept = events.find((e) => e.type === AuditEventType.CREDENTIAL_REVOKED && e.details?.why === "issuance_swept");
  t.ok(swept?.flagged === true && typeof swept.details?.found === "number" && swept.details.found >= 1, "the trail names the swept lease");
  const named = swept?.details?.revoked;
  t.ok(Array.isArray(named) && named.includes(late), "by its lease id, so no database user Vault made is unknown to the trail");
});
