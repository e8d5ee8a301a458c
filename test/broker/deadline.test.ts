// No credential outlives its action's deadline: an approval whose credential Vault only hands
// over after the deadline (a stalled Vault) has it revoked at once, and the agent is told.
import { join } from "node:path";
import t from "tap";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { readAuditEvents } from "../../broker/audit/index.js";
import { CredentialIssuer } from "../../broker/credentials.js";
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

await t.test("Vault stalls past the deadline after an approval: the late credential is revoked at once, the record fails, the trail says why", async (t) => {
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome = streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) as Promise<AirlockError | undefined>;
  const pending = await until("the pending export", async () => (await broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.method === "ExportTable"));
  const id = pending.request?.id ?? "";
  const requestDeadline = pending.request?.deadline;
  if (requestDeadline === undefined) throw new Error("the held request has no deadline");
  const deadline = timestampDate(requestDeadline).getTime();

  vault.freeze();
  let thawed = false;
  t.teardown(() => {
    if (!thawed) vault.thaw();
  });
  const decided = broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  // Vault holds the issue call; let the deadline pass before it answers.
  await until("the deadline to pass", async () => (Date.now() > deadline + 300 ? true : undefined));
  vault.thaw();
  thawed = true;
  await decided;

  const failed: RequestRecord = await until("the request to fail", async () => {
    const record = await broker.get(id);
    return record.state === RequestState.FAILED ? record : undefined;
  });
  t.equal(failed.lease, undefined, "no lease was ever recorded as live for it");
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
