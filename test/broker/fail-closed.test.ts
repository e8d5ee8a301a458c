import { join } from "node:path";
import { Client, credentials } from "@grpc/grpc-js";
import { DiscardPolicy, jetstreamManager } from "@nats-io/jetstream";
import t from "tap";
import { auditStream, readAuditEvents, verifyTrail } from "../../broker/audit/index.js";
import { CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { type AirlockError, callUnary, Code, createLogger, createVaultClient } from "../../common/index.js";
import { streams, subjects } from "../../common/subjects.js";
import { useInfra } from "../../harness/index.js";
import type { AuditEvent, RequestRecord } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { agentMetadata } from "../helpers/agent.js";
import { opsPolicy, startAgentPath } from "../helpers/stack.js";
import { Policy } from "../../sidecar/index.js";

// The broker writes an approved action's lease record and its audit batch side by side; only when
// both are stored does the decision leave. Here the audit trail refuses writes (a full stream), so
// the credential Vault issued must be revoked at once and no decision may reach the sidecar.

const infra = await useInfra(t, { nats: true, vault: true, database: true });
const { nats, vault } = infra;
const log = createLogger({ name: "test", level: "silent" });
const rootVault = createVaultClient({ address: vault.address, token: vault.rootToken });

const policyText = opsPolicy({ rotateRisk: "low", timeout: "20s" });
const policy = Policy.parse(policyText);
const { key, agentKeys, dir, sidecar } = await startAgentPath(t, infra, { name: "fail-closed", host: "fail-host", policy: policyText, log });

const approvals = parseApprovalConfig(
  new ConfigReader({ groups: { security: ["sam@corp"] }, auto_rules: [{ id: "low-risk", effect: "approve", when: { max_risk: "low" }, reason: "pre-approved" }] }, "", join(dir, "broker.yaml")),
);
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
// Stream settings are an operator's to change, not the broker's.
const operator = await nats.connect({ kind: "admin" });
t.teardown(() => operator.close());
const jsm = await jetstreamManager(operator);
const broker = await Broker.start({ nc, issuer: new CredentialIssuer({ vault: rootVault }), signingKey: key.signing, approvals, policy: () => policy, replicaId: "broker-1", log, tickIntervalMs: 200 });
t.teardown(() => broker.close());

const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

await t.test("the audit trail refuses writes: the issued token is revoked at once and no decision leaves", async (t) => {
  const before = await jsm.streams.info(auditStream.name);
  // Full and refusing new messages: every append now fails, as it would with JetStream out of space.
  await jsm.streams.update(auditStream.name, { ...before.config, max_msgs: Math.max(1, before.state.messages), discard: DiscardPolicy.New });
  let restored = false;
  const restore = async () => {
    if (restored) return;
    restored = true;
    await jsm.streams.update(auditStream.name, { ...before.config });
  };
  t.teardown(restore);

  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome = callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata, deadline: new Date(Date.now() + 4000) }).then(
    () => undefined,
    (error: unknown) => error as AirlockError,
  );

  let record: RequestRecord | undefined;
  for (let i = 0; i < 200 && record?.lease?.revokedAt === undefined; i++) {
    record = (await broker.list()).find((r) => r.request?.method === "RotateKey");
    if (record?.lease?.revokedAt === undefined) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  const requestId = record?.request?.id ?? "";
  const accessor = record?.lease?.leaseId ?? "";
  t.not(accessor, "", "Vault issued a token and its lease was recorded");
  t.not(record?.lease?.revokedAt, undefined, "the lease is marked revoked");
  const alive = await rootVault.lookupAccessor(accessor).then(
    () => true,
    () => false,
  );
  t.notOk(alive, "the token's accessor no longer resolves: revoked");

  const error = await outcome;
  t.not(error, undefined, "the agent's call did not run");
  t.equal(error?.code, Code.DeadlineExceeded, "the agent waited in vain: no decision arrived");
  const decision = await jsm.streams.getMessage(streams.decisions.name, { last_by_subj: subjects.decision("fail-host", requestId) }).catch(() => null);
  t.equal(decision, null, "no decision was published for the request");

  await restore();
  const events: AuditEvent[] = [];
  for await (const event of readAuditEvents(nc)) events.push(event);
  t.ok(verifyTrail(events).intact, "the trail is still one unbroken chain");
  t.notOk(
    events.some((event) => event.requestId === requestId && event.details?.verdict === "APPROVED"),
    "no DECIDED event claims an approval that never left",
  );
});
