import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Client, credentials } from "@grpc/grpc-js";
import { generateKeyPair } from "jose";
import t from "tap";
import { parseBrokerConfig, startBroker } from "../../broker/index.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { AirlockError, callServerStream, Code, createLogger, createVaultClient } from "../../common/index.js";
import { startOpsServer } from "../../demo/ops/index.js";
import { freePort, useInfra } from "../../harness/index.js";
import { RequestState } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { agentMetadata } from "../helpers/agent.js";
import { exportRoles, opsPolicy, seedExportEngine, startTestSidecar } from "../helpers/stack.js";

// Two broker replicas: A is a real `airlock broker` process that a failpoint stops at an
// exact step of an approval, where the test kills it with SIGKILL; B runs on and must
// finish (or safely undo) what A started, leaving no credential alive.
const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
const log = createLogger({ name: "test", level: "silent" });

const admin = await seedExportEngine(t, { nats, vault, database });
const rootVault = createVaultClient({ address: vault.address, token: vault.rootToken });
const ops = await startOpsServer({ database: { host: database.host, port: database.port, database: database.name }, vaultAddress: vault.address });
t.teardown(() => ops.close());

const dir = await mkdtemp(join(tmpdir(), "airlock-failover-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const key = generateDecisionKey("k1");
await writeFile(join(dir, "broker.pem"), key.publicKeyPem);
await writeFile(join(dir, "broker-signing.pem"), key.signing.privateKey.export({ type: "pkcs8", format: "pem" }));
await writeFile(join(dir, "policy.yaml"), opsPolicy());
const agentKeys = await generateKeyPair("EdDSA");
const sidecar = await startTestSidecar(t, { nats, vault, database }, { dir, upstream: ops.address, host: "failover-host", agentPublicKey: agentKeys.publicKey, log });

const danaToken = "dana-failover-token";
function brokerConfig(replica: string, http: string): Record<string, unknown> {
  return {
    nats: { url: nats.url },
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

const survivor = await startBroker(parseBrokerConfig(new ConfigReader(brokerConfig("replica-b", "127.0.0.1:0"), "", join(dir, "b.yaml"))), { log });
t.teardown(() => survivor.close());

/** Starts replica A as its own process, armed to stop at `failpointName`. */
async function startReplicaA(failpointName: string): Promise<{ child: ChildProcess; url: string; reached: Promise<void> }> {
  const port = await freePort();
  const configPath = join(dir, `a-${failpointName}.yaml`);
  await writeFile(configPath, JSON.stringify(brokerConfig(`replica-a-${failpointName}`, `127.0.0.1:${port}`)));
  const cli = fileURLToPath(new URL("../../cli/airlock.ts", import.meta.url));
  const child = spawn(process.execPath, ["--import", import.meta.resolve("tsx"), cli, "broker", "--config", configPath], {
    env: { ...process.env, AIRLOCK_FAILPOINTS: `${failpointName}=pause` },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
  });
  let stderr = "";
  const reached = new Promise<void>((resolve) => {
    child.stderr?.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
      if (stderr.includes(`failpoint ${failpointName} reached`)) resolve();
    });
  });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 300; i++) {
    const ready = await fetch(`${url}/readyz`).then(
      (r) => r.ok,
      () => false,
    );
    if (ready) return { child, url, reached };
    if (child.exitCode !== null) throw new Error(`replica A exited: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`replica A never became ready: ${stderr}`);
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
    const found = (await survivor.broker.list()).find((r) => r.state === RequestState.PENDING);
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
  a.child.kill("SIGKILL");
  await new Promise<void>((resolve) => (a.child.exitCode !== null || a.child.signalCode !== null ? resolve() : a.child.once("exit", () => resolve())));
  await vote;
  return id;
}

await t.test("replica A killed after deciding, before issuing: B takes over, issues once, the action runs, the lease is revoked", async (t) => {
  const call = exportCall();
  const id = await killMidApproval("broker.before_issue");
  const outcome = await call;
  t.equal(outcome.code, 0, `the agent's call completed through replica B (${outcome.message})`);
  t.equal(outcome.rows, 2);
  // The lease is revoked first, then the record marked completed: wait for both.
  let record = await survivor.broker.get(id);
  for (let i = 0; i < 200 && (record.lease?.revokedAt === undefined || record.state !== RequestState.COMPLETED); i++) {
    await new Promise((resolve) => setTimeout(resolve, 25));
    record = await survivor.broker.get(id);
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

await t.test("replica A killed after issuing, before publishing: B revokes A's credential and fails the request closed", async (t) => {
  const call = exportCall();
  const id = await killMidApproval("broker.before_publish");
  const issued = await survivor.broker.get(id);
  t.equal(issued.state === RequestState.EXECUTING || issued.state === RequestState.FAILED, true, "A issued and recorded the credential before it died");
  const outcome = await call;
  t.not(outcome.code, 0, "the agent gets no credential from a dead replica's half-finished approval");
  t.match(outcome.message, /died before delivering the credential/);
  let record = await survivor.broker.get(id);
  for (let i = 0; i < 200 && (record.lease?.revokedAt === undefined || record.state !== RequestState.FAILED); i++) {
    await new Promise((resolve) => setTimeout(resolve, 25));
    record = await survivor.broker.get(id);
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
