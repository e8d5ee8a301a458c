/**
 * An approval that reaches the sidecar after its agent was told "expired" is never used, and its
 * credential does not wait for the heartbeat silence: the sidecar hands it back (a completion
 * under its decision id saying it did not run), and the broker revokes the credential and ends
 * the record at once. To make the approval late on purpose, the broker accepts approvals long
 * after the deadline (a negative margin, as a broker whose clock is behind would) and Vault is
 * frozen until the agent's wait has ended.
 */
import { join } from "node:path";
import t from "tap";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { type AirlockError, callServerStream, Code, createLogger, createVaultClient } from "../../common/index.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { notRunLate } from "../../sidecar/approvals.js";
import { Policy } from "../../sidecar/index.js";
import { agentMetadata, streamOutcome } from "../helpers/agent.js";
import { exportRoles, opsPolicy, seedExportEngine, startAgentPath } from "../helpers/stack.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });
const admin = await seedExportEngine(t, { nats, vault, database });
const policyText = opsPolicy({ timeout: "4s" });
const policy = Policy.parse(policyText);
const { key, agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "late-approval", host: "late-host", policy: policyText, log });
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"] } }, "", join(dir, "broker.yaml")));
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const silenceMs = 120_000;
const broker = await Broker.start({
  nc,
  issuer: new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: vault.rootToken, timeoutMs: 60_000 }) }),
  signingKey: key.signing,
  approvals,
  policy: () => policy,
  replicaId: "broker-late",
  log,
  tickIntervalMs: 200,
  // Issues and publishes up to 60 s past the deadline: the decision is certain to come late.
  deadlineMarginMs: -60_000,
  heartbeatSilenceMs: silenceMs,
});
t.teardown(() => broker.close());
const { Client, credentials } = await import("@grpc/grpc-js");
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

await t.test("an approval that arrives after the agent was told expired is handed back: credential revoked, record completed, nothing ran", async (t) => {
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome = streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) as Promise<AirlockError | undefined>;
  let id = "";
  t.ok(
    await waitUntil(async () => {
      id = (await broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.method === "ExportTable")?.request?.id ?? "";
      return id !== "";
    }, 30_000),
    "the export is held",
  );
  vault.freeze();
  let thawed = false;
  t.teardown(() => {
    if (!thawed) vault.thaw();
  });
  const decided = broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  const error = await outcome;
  t.equal(error?.code, Code.DeadlineExceeded, "the agent was told its request expired");
  vault.thaw();
  thawed = true;
  await decided;
  const thawedAt = Date.now();
  t.ok(
    await waitUntil(async () => {
      const record = await broker.get(id);
      return record.state === RequestState.COMPLETED && record.lease?.revokedAt !== undefined;
    }, 30_000),
    "the handed-back approval completed the record and revoked its credential",
  );
  t.comment(`ended ${((Date.now() - thawedAt) / 1000).toFixed(2)} s after the late approval was issued; heartbeat silence ${silenceMs / 1000} s`);
  const record = await broker.get(id);
  t.equal(record.completion?.statusCode, Code.DeadlineExceeded, "the completion says it did not run");
  t.equal(record.completion?.statusMessage, notRunLate);
  const deadline = record.request?.deadline;
  t.ok(deadline !== undefined && (record.lease?.issuedAt === undefined ? 0 : timestampDate(record.lease.issuedAt).getTime()) > timestampDate(deadline).getTime(), "the credential was issued after the deadline");
  t.same(await exportRoles(admin), [], "the database user is gone");
});
