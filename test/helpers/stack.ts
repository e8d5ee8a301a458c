/**
 * The whole product for end-to-end tests: real NATS, Vault and PostgreSQL from
 * the harness, the demo upstream, a sidecar, and a broker replica started from
 * its config the way `airlock broker` starts it (reviewers' API and console
 * included). Everything stops in the test's teardown.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Client, credentials, type Metadata } from "@grpc/grpc-js";
import { type CryptoKey, exportSPKI, generateKeyPair } from "jose";
import pg from "pg";
import type { Test } from "tap";
import { configureDatabaseEngine, postgresRoleStatements } from "../../broker/credentials.js";
import { parseBrokerConfig, type RunningBroker, startBroker } from "../../broker/index.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { AirlockError, callServerStream, callUnary, Code, createLogger, createVaultClient, type Logger } from "../../common/index.js";
import { startOpsServer } from "../../demo/ops/index.js";
import { type NatsBus, type NatsServer, useInfra } from "../../harness/index.js";
import { ensureStreams } from "../../common/subjects.js";
import { natsConfigSection, type NatsConnectionConfig } from "../../common/nats.js";
import { jetstreamManager } from "@nats-io/jetstream";
import { descriptorSetPath, type RequestRecord } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { parseSidecarConfig, type Sidecar, startSidecar } from "../../sidecar/index.js";
import { agentMetadata } from "./agent.js";

/** The outcome of an agent call: code 0 on success, else the gRPC code and message. */
export interface CallOutcome {
  readonly code: number;
  readonly details: string;
  readonly rows?: number;
}

/** A running stack. */
export interface Stack {
  /** `http://127.0.0.1:<port>` of the broker: API, console (`/console/`), metrics. */
  readonly brokerUrl: string;
  /** The second broker replica's `http://127.0.0.1:<port>`, when {@link StackOptions.secondReplica} asked for one. */
  readonly secondBrokerUrl?: string;
  /** The broker replica. */
  readonly broker: RunningBroker;
  /** The stack's NATS. */
  readonly nats: NatsServer;
  /** The sidecar's host name (in NATS subjects). */
  readonly host: string;
  /** Static reviewer tokens: dana@example.com (data-owners), sam@example.com (security), alice@example.com (the agent's human; data-owners too). */
  readonly tokens: { readonly dana: string; readonly sam: string; readonly alice: string };
  /** ExportTable of `customers` through the sidecar, held for data-owners. */
  callExportTable(reason: string, extra?: Record<string, string>): Promise<CallOutcome>;
  /** RotateKey through the sidecar, held for security. */
  callRotateKey(reason: string): Promise<CallOutcome>;
  /** GrantRole through the sidecar: no rule allows it, so the policy default denies it there. */
  callGrantRole(): Promise<CallOutcome>;
}

/** Options of {@link startStack}. */
export interface StackOptions {
  /** Extra top-level sections of broker.yaml (e.g. `notifications`). */
  readonly brokerConfig?: Record<string, unknown>;
  /** The broker's reviewer gRPC listen address; off when absent. */
  readonly reviewerGrpc?: string;
  /** Options of the tests' policy ({@link opsPolicy}); RotateKey's risk stays medium. */
  readonly policy?: Omit<OpsPolicyOptions, "rotateRisk">;
  /** Start a second broker replica from the same config. @default false */
  readonly secondReplica?: boolean;
  /** Top-level sections of the second replica's broker.yaml that differ from the first's (over `brokerConfig`), e.g. where it calls Slack. */
  readonly secondReplicaConfig?: Record<string, unknown>;
  /** Requests whose approval needs a step-up (`startBroker`'s option of that name). */
  readonly requiresStepUp?: (record: RequestRecord) => boolean;
}

/** Options of {@link opsPolicy}. */
export interface OpsPolicyOptions {
  /** RotateKey's risk (an auto rule may approve `low`); without it RotateKey has no rule (denied). */
  readonly rotateRisk?: "low" | "medium";
  /** How long a held call waits for its decision. @default "60s" */
  readonly timeout?: string;
  /** Report the GetStatus calls the policy allows to the audit trail (`audit: true`). */
  readonly auditStatus?: boolean;
  /** ExportTable's rule asks for step-up (`step_up: true`), or with a string, for step-up with that `acr`. */
  readonly exportStepUp?: boolean | string;
}

/**
 * The tests' policy for the demo upstream: GetStatus allowed, ExportTable held
 * for 1 of data-owners with a database credential (role `export`), RotateKey
 * held for 1 of security with a Vault token.
 */
export function opsPolicy(options: OpsPolicyOptions = {}): string {
  const timeout = options.timeout ?? "60s";
  const rotate =
    options.rotateRisk === undefined
      ? ""
      : `  - id: rotate
    match: { service: demo.v1.OpsService, method: RotateKey }
    effect: approve
    approve:
      risk: ${options.rotateRisk}
      reviewers: { all_of: [{ group: security, min_approvals: 1 }] }
      credential: { kind: vault_token, policies: [default], num_uses: 5, ttl: 1m }
      timeout: ${timeout}
`;
  const stepUp = options.exportStepUp === undefined || options.exportStepUp === false ? "" : `      step_up: ${options.exportStepUp === true ? "true" : `{ acr: ${options.exportStepUp} }`}\n`;
  return `version: 1
default: deny
rules:
  - id: status
    match: { service: demo.v1.OpsService, method: GetStatus }
    effect: allow${options.auditStatus === true ? "\n    audit: true" : ""}
  - id: export
    match: { service: demo.v1.OpsService, method: ExportTable }
    description: An export copies customer records out of the database for good.
    effect: approve
    approve:
      risk: high
      reviewers: { all_of: [{ group: data-owners, min_approvals: 1 }] }
      credential: { kind: database, mount: database, role: export, ttl: 5m, description: SELECT on customers }
      timeout: ${timeout}
${stepUp}${rotate}`;
}

/** The servers a test's building blocks sit on (what `useInfra` returns). */
export interface StackInfra {
  readonly nats: Pick<NatsBus, "credentials" | "connect">;
  /** Replicas the streams are provisioned with (a cluster's `nats.replicas`). @default 1 */
  readonly replicas?: number;
  readonly vault: { readonly address: string; readonly rootToken: string };
  readonly database: { readonly url: string; readonly host: string; readonly port: number; readonly name: string };
}

/**
 * Seeds `customers` (2 rows) and configures Vault's database engine (mount
 * `database`, role `export`: SELECT on customers, 5 min). Returns an admin
 * connection closed at teardown.
 */
export async function seedExportEngine(t: Test, infra: StackInfra): Promise<pg.Client> {
  const { vault, database } = infra;
  const admin = new pg.Client({ connectionString: database.url });
  await admin.connect();
  t.teardown(() => admin.end());
  await admin.query("CREATE TABLE customers (id int PRIMARY KEY, name text)");
  await admin.query("INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace')");
  await configureDatabaseEngine(createVaultClient({ address: vault.address, token: vault.rootToken }), {
    mount: "database",
    connectionName: "app",
    connectionUrl: `postgresql://{{username}}:{{password}}@${database.host}:${database.port}/${database.name}?sslmode=disable`,
    username: "postgres",
    password: "unused-on-a-trusting-server",
    roles: [{ name: "export", creationStatements: postgresRoleStatements('GRANT SELECT ON customers TO "{{name}}";').creationStatements, defaultTtlSeconds: 300, maxTtlSeconds: 600 }],
  });
  return admin;
}

/**
 * Names of the dynamic database users Vault made for the `export` role that still exist and can
 * read this test's `customers`. Roles are shared by every database of a PostgreSQL server, and
 * test files run side by side on one server: the privilege check keeps another file's users out.
 */
/**
 * Locks the demo's `customers` table in `admin`'s session (an open transaction) until the
 * returned `unlock`, or the test's end: an export's SELECT waits on it, so the action stays
 * mid-call for as long as the test needs.
 */
export async function holdCustomersLock(t: Test, admin: pg.Client): Promise<() => Promise<void>> {
  await admin.query("BEGIN");
  await admin.query("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE");
  let locked = true;
  const unlock = async () => {
    if (!locked) return;
    locked = false;
    await admin.query("COMMIT");
  };
  t.teardown(unlock);
  return unlock;
}

export async function exportRoles(admin: pg.Client): Promise<string[]> {
  return (await admin.query<{ rolname: string }>("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%export%' AND has_table_privilege(rolname, 'customers', 'SELECT')")).rows.map((r) => r.rolname);
}

/** An `airlock broker` running as its own process. */
export interface BrokerProcess {
  readonly child: ChildProcess;
  /** `http://127.0.0.1:<port>` of its HTTP API. */
  readonly url: string;
  /** Resolves when the armed failpoint is reached. */
  readonly reached: Promise<void>;
  /** SIGKILLs it and waits for the exit. */
  kill(): Promise<void>;
}

/**
 * Starts `airlock broker --config <configPath>` as a process, armed with a
 * failpoint (`common/failpoints.ts`), and waits for its /readyz at `url`.
 * Killed at teardown if still running.
 */
export async function startBrokerProcess(t: Test, options: { readonly configPath: string; readonly url: string; readonly failpoint: string; readonly action?: "pause" | "stop" }): Promise<BrokerProcess> {
  const armed = `${options.failpoint}=${options.action ?? "pause"}`;
  const started = await spawnAirlockPart(t, { part: "broker", configPath: options.configPath, readyUrl: `${options.url}/readyz`, env: { AIRLOCK_FAILPOINTS: armed } });
  const reached = new Promise<void>((resolve) => {
    const check = () => {
      if (started.stderr().includes(`failpoint ${options.failpoint} reached`)) resolve();
    };
    check();
    started.child.stderr?.on("data", check);
  });
  return { child: started.child, url: options.url, reached, kill: started.kill };
}

/**
 * Starts `airlock <part> --config <configPath>` as its own process and waits until `readyUrl`
 * answers OK (30 s at most, failing with what the process wrote to stderr). SIGKILLed at teardown.
 */
async function spawnAirlockPart(
  t: Test,
  options: { readonly part: "broker" | "sidecar"; readonly configPath: string; readonly readyUrl: string; readonly env?: Readonly<Record<string, string>> },
): Promise<{ readonly child: ChildProcess; readonly kill: () => Promise<void>; readonly stderr: () => string }> {
  const cli = fileURLToPath(new URL("../../cli/airlock.ts", import.meta.url));
  const child = spawn(process.execPath, ["--import", import.meta.resolve("tsx"), cli, options.part, "--config", options.configPath], {
    env: { ...process.env, ...options.env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
  };
  t.teardown(kill);
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-16_000);
  });
  for (let i = 0; i < 600; i++) {
    const ready = await fetch(options.readyUrl).then(
      (r) => r.ok,
      () => false,
    );
    if (ready) return { child, kill, stderr: () => stderr };
    if (child.exitCode !== null) throw new Error(`the ${options.part} process exited: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`the ${options.part} process never became ready: ${stderr}`);
}

/** Options of {@link startTestSidecar}. */
export interface TestSidecarOptions {
  /** Where `policy.yaml` and `broker.pem` (the broker's public key, id k1) are. */
  readonly dir: string;
  /** `host:port` of the demo upstream. */
  readonly upstream: string;
  readonly host: string;
  /** The public key agent tokens (issuer https://idp.test, audience airlock) are verified with. */
  readonly agentPublicKey: CryptoKey;
  readonly log: Logger;
  /** The sidecar's `heartbeat_interval`. @default the sidecar's default */
  readonly heartbeatInterval?: string;
}

/** The `nats` section of a config for a connection config. */
export const natsSection: (config: NatsConnectionConfig) => Record<string, unknown> = natsConfigSection;

/**
 * Creates the bus streams as an operator would before any sidecar starts (a broker creates
 * them too; a sidecar may not).
 */
export async function provisionStreams(nats: Pick<NatsBus, "connect">, replicas?: number): Promise<void> {
  const admin = await nats.connect({ kind: "admin" });
  try {
    await ensureStreams(await jetstreamManager(admin), replicas === undefined ? {} : { replicas });
  } finally {
    await admin.close();
  }
}

/** The values of the tests' `sidecar.yaml` (see {@link startTestSidecar}); `listen` and the metrics address default to any free port. */
export async function testSidecarValues(infra: StackInfra, options: Omit<TestSidecarOptions, "log" | "dir"> & { readonly listen?: string; readonly metrics?: string }): Promise<Record<string, unknown>> {
  return {
    listen: options.listen ?? "127.0.0.1:0",
    upstreams: [{ name: "ops", address: options.upstream, descriptor_sets: [descriptorSetPath] }],
    nats: natsSection(await infra.nats.credentials({ kind: "sidecar", host: options.host })),
    vault: { address: infra.vault.address },
    broker_keys: { k1: "broker.pem" },
    host: options.host,
    policy: "policy.yaml",
    agent_auth: [{ kind: "jwt", issuer: "https://idp.test", audience: "airlock", keys: { kind: "static", public_keys: [await exportSPKI(options.agentPublicKey)] } }],
    metrics: { listen: options.metrics ?? "127.0.0.1:0" },
    ...(options.heartbeatInterval === undefined ? {} : { heartbeat_interval: options.heartbeatInterval }),
    log_level: "error",
  };
}

/** A sidecar in front of the demo upstream, trusting broker key k1; closed at teardown. */
export async function startTestSidecar(t: Test, infra: StackInfra, options: TestSidecarOptions): Promise<Sidecar> {
  await provisionStreams(infra.nats, infra.replicas);
  const sidecar = await startSidecar(parseSidecarConfig(new ConfigReader(await testSidecarValues(infra, options), "", join(options.dir, "sidecar.yaml"))), { log: options.log });
  t.teardown(() => sidecar.close());
  return sidecar;
}

/** An `airlock sidecar` running as its own process (see {@link startSidecarProcess}). */
export interface SidecarProcess {
  readonly child: ChildProcess;
  /** SIGKILLs it (no goodbye of any kind) and waits for the exit. */
  kill(): Promise<void>;
}

/**
 * Starts `airlock sidecar --config <dir>/<name>.json` as a process with {@link testSidecarValues}
 * on the given listen and metrics addresses, and waits for its /readyz. Killed at teardown.
 */
export async function startSidecarProcess(t: Test, infra: StackInfra, options: Omit<TestSidecarOptions, "log" | "agentPublicKey"> & { readonly agentPublicKey: CryptoKey; readonly listen: string; readonly metrics: string }): Promise<SidecarProcess> {
  await provisionStreams(infra.nats, infra.replicas);
  const configPath = join(options.dir, `sidecar-${options.host}.json`);
  await writeFile(configPath, JSON.stringify(await testSidecarValues(infra, options)));
  const { child, kill } = await spawnAirlockPart(t, { part: "sidecar", configPath, readyUrl: `http://${options.metrics}/readyz` });
  return { child, kill };
}

/** What {@link startAgentPath} started: the way from an agent to the demo upstream, without a broker. */
export interface AgentPath {
  /** The demo upstream. */
  readonly ops: Awaited<ReturnType<typeof startOpsServer>>;
  /** The broker's decision key, id k1: `broker.pem` (public) and `broker-signing.pem` (private) in `dir`. */
  readonly key: ReturnType<typeof generateDecisionKey>;
  /** The key pair agent tokens are signed with. */
  readonly agentKeys: Awaited<ReturnType<typeof generateKeyPair>>;
  /** A temporary directory holding the keys and `policy.yaml`, for the test's config files too. */
  readonly dir: string;
  readonly sidecar: Sidecar;
}

/**
 * Starts the demo upstream and a sidecar in front of it (see {@link startTestSidecar}),
 * with a fresh broker key and agent key pair and `policy` in a temporary directory named
 * after `name`; everything is stopped and removed at teardown.
 */
export async function startAgentPath(
  t: Test,
  infra: StackInfra,
  options: { readonly name: string; readonly host: string; readonly policy: string; readonly log: Logger; readonly heartbeatInterval?: string },
): Promise<AgentPath> {
  const { database } = infra;
  const ops = await startOpsServer({ database: { host: database.host, port: database.port, database: database.name }, vaultAddress: infra.vault.address });
  t.teardown(() => ops.close());
  const key = generateDecisionKey("k1");
  const agentKeys = await generateKeyPair("EdDSA");
  const dir = await mkdtemp(join(tmpdir(), `airlock-${options.name}-`));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, "broker.pem"), key.publicKeyPem);
  await writeFile(join(dir, "broker-signing.pem"), key.signing.privateKey.export({ type: "pkcs8", format: "pem" }));
  await writeFile(join(dir, "policy.yaml"), options.policy);
  const sidecar = await startTestSidecar(t, infra, {
    dir,
    upstream: ops.address,
    host: options.host,
    agentPublicKey: agentKeys.publicKey,
    log: options.log,
    ...(options.heartbeatInterval === undefined ? {} : { heartbeatInterval: options.heartbeatInterval }),
  });
  return { ops, key, agentKeys, dir, sidecar };
}

/** Starts the stack; everything is stopped in `t`'s teardown. */
export async function startStack(t: Test, options: StackOptions = {}): Promise<Stack> {
  const { nats, vault, database } = await useInfra(t, { nats: true, vault: true, database: true });
  const log = createLogger({ name: "stack", level: process.env.AIRLOCK_LOG_LEVEL ?? "silent" });

  await seedExportEngine(t, { nats, vault, database });

  const { agentKeys, dir, sidecar } = await startAgentPath(t, { nats, vault, database }, { name: "stack", host: "stack-host", policy: opsPolicy({ ...options.policy, rotateRisk: "medium" }), log });

  const tokens = { dana: "dana-dev-token-0001", sam: "sam-dev-token-0001", alice: "alice-dev-token-0001" };
  const brokerValues: Record<string, unknown> = {
          nats: natsSection(await nats.credentials({ kind: "broker" })),
          vault: { address: vault.address, auth: { kind: "token", token: vault.rootToken } },
          signing_key: { key_id: "k1", file: "broker-signing.pem" },
          policy: "policy.yaml",
          approvals: { groups: { "data-owners": ["dana@example.com", "alice@example.com"], security: ["sam@example.com"] } },
          http: "127.0.0.1:0",
          reviewers: {
            auth: {
              kind: "static",
              tokens: [
                { token: tokens.dana, reviewer: "dana@example.com", groups: ["data-owners"] },
                { token: tokens.sam, reviewer: "sam@example.com", groups: ["security"] },
                { token: tokens.alice, reviewer: "alice@example.com", groups: ["data-owners"] },
              ],
            },
            ...(options.reviewerGrpc === undefined ? {} : { grpc: options.reviewerGrpc }),
          },
          replica_id: "stack-broker",
          log_level: "silent",
          ...options.brokerConfig,
        };
  const broker = await startBroker(parseBrokerConfig(new ConfigReader(brokerValues, "", join(dir, "broker.yaml"))), { log, ...(options.requiresStepUp === undefined ? {} : { requiresStepUp: options.requiresStepUp }) });
  t.teardown(() => broker.close());
  // Another replica of the same config: the two share the work and the reviewers' sessions.
  const secondBroker = options.secondReplica === true ? await startBroker(parseBrokerConfig(new ConfigReader({ ...brokerValues, ...options.secondReplicaConfig, http: "127.0.0.1:0", replica_id: "stack-broker-2" }, "", join(dir, "broker.yaml"))), { log }) : undefined;
  if (secondBroker !== undefined) t.teardown(() => secondBroker.close());

  const client = new Client(sidecar.address, credentials.createInsecure());
  t.teardown(() => client.close());
  const agent = (extra: Record<string, string> = {}): Promise<Metadata> =>
    agentMetadata({ privateKey: agentKeys.privateKey, issuer: "https://idp.test", audience: "airlock", actFor: "alice@example.com", subject: "spiffe://example/agent/reporter" }, extra);

  const outcomeOf = (error: unknown): CallOutcome => {
    const airlock = AirlockError.from(error, Code.Unknown);
    return { code: airlock.code, details: airlock.rawMessage };
  };

  return {
    brokerUrl: broker.httpUrl,
    ...(secondBroker === undefined ? {} : { secondBrokerUrl: secondBroker.httpUrl }),
    broker,
    nats,
    host: "stack-host",
    tokens,
    async callExportTable(reason, extra = {}) {
      try {
        let rows = 0;
        for await (const row of callServerStream(client, OpsService.method.exportTable, { table: "customers" }, { metadata: await agent({ "x-airlock-reason": reason, ...extra }) })) {
          if (row.row !== undefined) rows++;
        }
        return { code: 0, details: "", rows };
      } catch (error) {
        return outcomeOf(error);
      }
    },
    async callRotateKey(reason) {
      try {
        await callUnary(client, OpsService.method.rotateKey, { keyId: "signing" }, { metadata: await agent({ "x-airlock-reason": reason }) });
        return { code: 0, details: "" };
      } catch (error) {
        return outcomeOf(error);
      }
    },
    async callGrantRole() {
      try {
        await callUnary(client, OpsService.method.grantRole, { user: "mallory", role: "admin" }, { metadata: await agent() });
        return { code: 0, details: "" };
      } catch (error) {
        return outcomeOf(error);
      }
    },
  };
}
