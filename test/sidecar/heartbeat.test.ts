/**
 * A running approved action is kept alive by its sidecar's heartbeats, and only by them: the
 * export's query is held by a table lock (a long action), the broker judges silence after
 * 1.5 s, and the action outlives many silences while the sidecar beats; it then completes
 * normally. (The broker's side, a silent host and forged beats, is in test/broker/trust.test.ts.)
 */
import { join } from "node:path";
import t from "tap";
import { CredentialIssuer } from "../../broker/credentials.js";
import { parseApprovalConfig } from "../../broker/rules.js";
import { Broker } from "../../broker/service.js";
import { ConfigReader } from "../../common/config.js";
import { type AirlockError, callServerStream, createLogger, createVaultClient } from "../../common/index.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { Policy } from "../../sidecar/index.js";
import { agentMetadata, streamOutcome } from "../helpers/agent.js";
import { holdCustomersLock, opsPolicy, seedExportEngine, startAgentPath } from "../helpers/stack.js";

const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });
const admin = await seedExportEngine(t, { nats, vault, database });
const policyText = opsPolicy();
const policy = Policy.parse(policyText);
const { key, agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "heartbeat", host: "beating-host", policy: policyText, log, heartbeatInterval: "200ms" });
const approvals = parseApprovalConfig(new ConfigReader({ groups: { "data-owners": ["dana@corp"] } }, "", join(dir, "broker.yaml")));
const nc = await nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const silenceMs = 1_500;
const broker = await Broker.start({
  nc,
  issuer: new CredentialIssuer({ vault: createVaultClient({ address: vault.address, token: vault.rootToken }) }),
  signingKey: key.signing,
  approvals,
  policy: () => policy,
  replicaId: "broker-1",
  log,
  tickIntervalMs: 100,
  heartbeatSilenceMs: silenceMs,
});
t.teardown(() => broker.close());
const { Client, credentials } = await import("@grpc/grpc-js");
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

await t.test("a long approved action outlives many heartbeat silences while its sidecar beats, then completes", async (t) => {
  // The export's SELECT waits on this lock: the action runs for as long as the test holds it.
  const unlock = await holdCustomersLock(t, admin);
  const metadata = await agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock" });
  const outcome = streamOutcome(callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata })) as Promise<AirlockError | undefined>;
  let id = "";
  t.ok(
    await waitUntil(async () => {
      id = (await broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.method === "ExportTable")?.request?.id ?? "";
      return id !== "";
    }, 20_000),
    "the export is held",
  );
  await broker.decide(id, { reviewer: "dana@corp", approve: true, reason: "ok" });
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.EXECUTING, 20_000), "approved and executing");
  const executingSince = Date.now();
  // Four silences pass with the query blocked; every tick the broker could have ended it.
  t.ok(
    await waitUntil(async () => (await broker.get(id)).state !== RequestState.EXECUTING || Date.now() - executingSince > 4 * silenceMs, 30_000),
    "four silences passed, or the action ended",
  );
  const during = await broker.get(id);
  t.equal(during.state, RequestState.EXECUTING, "the sidecar's heartbeats kept the action alive");
  t.equal(during.lease?.revokedAt, undefined, "and its credential");
  await unlock();
  t.equal(await outcome, undefined, "the export ran to the end");
  t.ok(await waitUntil(async () => (await broker.get(id)).state === RequestState.COMPLETED, 20_000), "completed by its completion, not ended by silence");
});
