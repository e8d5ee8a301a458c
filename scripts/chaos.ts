/**
 * `npm run chaos [-- --seconds 45 --rate 15 --settle-seconds 45 --call-bound-seconds 45 --faults none,broker_kill,… --keep-logs]`:
 * steady auto-approved privileged traffic through real processes (NATS, two broker processes,
 * one sidecar process, the Vault dev server, PostgreSQL, the demo upstream as its own process),
 * with each fault injected in turn at a third of its window. Prints one line per fault,
 *   chaos: fault=<name> actions=… ok=… failed_clearly=… lost=… duplicated=… credentials_alive_after=… unknown_credentials=… audit=intact|broken
 * (each preceded by a `chaos_detail:` line for context), and last
 *   chaos: lost=… duplicated=… credentials_alive_after=… unknown_credentials=…
 * Exits 1 unless every total is zero and the trail verified after every fault.
 * What each figure means and where it is read from: docs/chaos.md.
 */
import { randomUUID } from "node:crypto";
import { appendFileSync } from "node:fs";
import { mkdir, open, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { create, toBinary } from "@bufbuild/protobuf";
import { Kvm } from "@nats-io/kv";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Client, credentials, Metadata, type ServiceError } from "@grpc/grpc-js";
import { exportSPKI, generateKeyPair, SignJWT } from "jose";
import pg from "pg";
import { readAuditEvents, writeAuditKey } from "../broker/audit/index.js";
import { configureDatabaseEngine, postgresRoleStatements } from "../broker/credentials.js";
import { isSettled, stateName } from "../broker/index.js";
import { RequestStore } from "../broker/store.js";
import { startChaosBus, type ChaosBus } from "../chaos/bus.js";
import {
  type CallOutcome,
  chaosPassed,
  chaosTotals,
  type CreatedCredential,
  type FaultLine,
  faultLine,
  judgeCredentials,
  parseVaultAuditLine,
  type StartedCall,
  stringsIn,
  tallyCalls,
  totalsLine,
} from "../chaos/tally.js";
import { generateDecisionKey } from "../common/decision.js";
import { AirlockError, Code } from "../common/errors.js";
import { stateBucket } from "../common/subjects.js";
import { natsConfigSection, type NatsConnectionConfig } from "../common/nats.js";
import { createVaultClient } from "../common/vault.js";
import { delay, freePort, makeTempDir, ManagedProcess, startPostgres, startVault, waitUntil } from "../harness/index.js";
import { descriptorSetPath } from "../proto/index.js";
import { OpsService } from "../proto/gen/demo/v1/ops_pb.js";
import type { RequestRecord } from "../proto/index.js";

/** The faults, in the order they run; `none` is the baseline. */
export const chaosFaults = ["none", "broker_kill", "nats_restart", "vault_pause", "sidecar_kill"] as const;
type Fault = (typeof chaosFaults)[number];

/** Defaults of the run's options: five windows of 45 s plus settling fit in under 10 minutes. */
const chaosDefaults = { seconds: 45, rate: 15, settleSeconds: 45, callBoundSeconds: 45, vaultPauseSeconds: 10, approvalTimeout: "30s", credentialTtl: "5m" } as const;

function parseOptions() {
  const { values } = parseArgs({
    options: {
      seconds: { type: "string" },
      rate: { type: "string" },
      "settle-seconds": { type: "string" },
      "call-bound-seconds": { type: "string" },
      faults: { type: "string" },
      "keep-logs": { type: "boolean" },
    },
    strict: true,
  });
  const number = (name: string, raw: string | undefined, fallback: number, min: number, max: number): number => {
    if (raw === undefined) return fallback;
    const value = Number(raw);
    if (!Number.isFinite(value) || value < min || value > max) throw new AirlockError(Code.InvalidArgument, `--${name} must be a number from ${min} to ${max}`, { details: { field: name } });
    return value;
  };
  const faults = (values.faults ?? chaosFaults.join(",")).split(",").map((f) => f.trim());
  for (const fault of faults) {
    if (!(chaosFaults as readonly string[]).includes(fault)) throw new AirlockError(Code.InvalidArgument, `--faults: unknown fault ${fault} (one of ${chaosFaults.join(", ")})`, { details: { field: "faults" } });
  }
  const seconds = number("seconds", values.seconds, chaosDefaults.seconds, 6, 600);
  return {
    seconds,
    rate: number("rate", values.rate, chaosDefaults.rate, 0.5, 200),
    settleSeconds: number("settle-seconds", values["settle-seconds"], chaosDefaults.settleSeconds, 1, 600),
    callBoundSeconds: number("call-bound-seconds", values["call-bound-seconds"], chaosDefaults.callBoundSeconds, 31, 600),
    faults: faults as Fault[],
    keepLogs: values["keep-logs"] === true,
  };
}

/** A config's `nats` line for a role's credential. */
function natsYaml(config: NatsConnectionConfig, replicas?: number): string {
  return `nats: ${JSON.stringify({ ...natsConfigSection(config), ...(replicas === undefined ? {} : { replicas }) })}`;
}

/** A part of the stack run as its own process, restartable, with its output appended to a log file. */
class Part {
  private process: ManagedProcess | undefined;
  constructor(
    readonly name: string,
    private readonly args: readonly string[],
    private readonly logFile: string,
    /** Ready when this URL answers 2xx, or when the output matches this pattern. */
    private readonly ready: string | RegExp,
    private readonly env: Record<string, string> = {},
  ) {}

  async start(): Promise<void> {
    const child = new ManagedProcess(this.name, process.execPath, ["--import", "tsx", ...this.args], { cwd: root, env: { ...process.env, ...this.env } });
    this.process = child;
    const log = (chunk: Buffer) => appendFileSync(this.logFile, chunk);
    child.child.stdout?.on("data", log);
    child.child.stderr?.on("data", log);
    appendFileSync(this.logFile, `--- ${new Date().toISOString()} started ${this.name} (pid ${child.child.pid ?? "?"})\n`);
    const ready = this.ready;
    if (ready instanceof RegExp) {
      await child.waitForOutput(ready, 60_000);
      return;
    }
    const healthy = await waitUntil(async () => !child.hasExited && (await fetch(ready)).ok, 60_000, 100);
    if (!healthy || child.hasExited) throw new Error(`${this.name} did not become healthy (log: ${this.logFile}):\n${child.recentOutput}`);
  }

  /** kill -9, as a crash: nothing of it runs after this. */
  async kill(): Promise<void> {
    const child = this.process;
    if (child === undefined) return;
    appendFileSync(this.logFile, `--- ${new Date().toISOString()} SIGKILL ${this.name}\n`);
    child.child.kill("SIGKILL");
    await child.stop();
    this.process = undefined;
  }

  async stop(): Promise<void> {
    await this.process?.stop();
    this.process = undefined;
  }
}

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const table = "chaos_actions";
const host = "chaos";
/** Where Vault keeps the leases of the run's database role. */
const leasePrefix = "database/creds/chaos/";

/** The load generator: one ImportRows call every 1/rate s, each with its own call id, through the sidecar. */
class LoadGenerator {
  readonly calls = new Map<string, { outcome: CallOutcome | undefined }>();
  private timer: NodeJS.Timeout | undefined;
  private counter = 0;
  private readonly client: Client;

  constructor(
    sidecarAddress: string,
    private readonly token: string,
    private readonly callBoundMs: number,
  ) {
    // An agent that reconnects promptly when its sidecar comes back (grpc-js would otherwise back
    // off for up to two minutes and fail every call meanwhile, which measures the client, not Airlock).
    this.client = new Client(sidecarAddress, credentials.createInsecure(), { "grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1000 });
  }

  get inFlight(): number {
    return [...this.calls.values()].filter((c) => c.outcome === undefined).length;
  }

  start(prefix: string, rate: number): void {
    // Paced by the clock, not by the timer's ticks: on a busy machine a tick comes late, and the
    // calls due by then all start, so the offered load stays at `rate` whatever the timer does.
    const startedAt = Date.now();
    let started = 0;
    const tick = () => {
      const due = Math.floor(((Date.now() - startedAt) * rate) / 1000) + 1;
      for (; started < due; started++) this.call(`${prefix}-${this.counter++}-${randomUUID().slice(0, 8)}`);
    };
    tick();
    this.timer = setInterval(tick, 20);
  }

  stopStarting(): void {
    clearInterval(this.timer);
  }

  /** Resolves once every started call has an outcome (each has the bound as its deadline, so this ends). */
  async drained(): Promise<void> {
    while (this.inFlight > 0) await delay(100);
  }

  /** The window's calls with what the agent saw, then forgets them. */
  take(): StartedCall[] {
    const taken = [...this.calls].map(([callId, c]) => ({ callId, outcome: c.outcome ?? ({ kind: "unanswered" } as const) }));
    this.calls.clear();
    return taken;
  }

  close(): void {
    this.stopStarting();
    this.client.close();
  }

  /** Calls made again after an answer without Airlock's code. */
  retries = 0;

  /**
   * Starts one call, named by `x-airlock-call-id` as a careful agent names its calls. A dropped
   * connection (UNAVAILABLE or INTERNAL without Airlock's code) tells the agent nothing, so it makes the same
   * call again, same call id, 250 ms later, until it gets an answer or its bound passes: the
   * sidecar resumes the request the call id names, or says what became of it.
   */
  private call(callId: string): void {
    const entry: { outcome: CallOutcome | undefined } = { outcome: undefined };
    this.calls.set(callId, entry);
    const deadline = new Date(Date.now() + this.callBoundMs);
    const schema = OpsService.method.importRows.input;
    const message = Buffer.from(toBinary(schema, create(schema, { table, row: { call_id: callId } })));
    const pass = (bytes: Buffer) => bytes;
    const attempt = () => {
      const metadata = new Metadata();
      metadata.set("authorization", `Bearer ${this.token}`);
      metadata.set("x-airlock-call-id", callId);
      const stream = this.client.makeClientStreamRequest("/demo.v1.OpsService/ImportRows", pass, pass, metadata, { deadline }, (error: ServiceError | null) => {
        if (error === null || error === undefined) {
          entry.outcome = { kind: "ok" };
          return;
        }
        const airlockCode = error.metadata?.get("x-airlock-error-code")[0];
        const coded = typeof airlockCode === "string" ? airlockCode : undefined;
        // The agent's own deadline (the run's bound) fired: no one answered it.
        if (Number(error.code) === Code.DeadlineExceeded && coded === undefined) {
          entry.outcome = { kind: "unanswered" };
          return;
        }
        const outcome: CallOutcome = { kind: "error", code: error.code, airlockCode: coded, message: error.details, ...reasonOf(error) };
        // A broken connection (UNAVAILABLE, or INTERNAL for a reset stream) is retried, and so is
        // the sidecar's `call_in_progress` (the same call still held from a connection it has not
        // seen drop yet): an upstream's own error, without Airlock's code too, is its answer.
        const dropped = coded === undefined && (Number(error.code) === Code.Unavailable || Number(error.code) === Code.Internal);
        const inProgress = outcome.kind === "error" && outcome.reason === "call_in_progress";
        if ((dropped || inProgress) && Date.now() + 250 < deadline.getTime()) {
          this.retries++;
          setTimeout(attempt, 250);
          return;
        }
        entry.outcome = outcome;
      });
      stream.on("error", () => undefined);
      stream.write(message);
      stream.end();
    };
    attempt();
  }
}

/** `details.reason` of the sidecar's `x-airlock-error-details` trailer, when there is one. */
function reasonOf(error: ServiceError): { reason?: string } {
  const raw = error.metadata?.get("x-airlock-error-details")[0];
  if (typeof raw !== "string") return {};
  try {
    const reason = (JSON.parse(raw) as { reason?: unknown }).reason;
    return typeof reason === "string" ? { reason } : {};
  } catch {
    return {};
  }
}

/** Reads Vault's file audit device from where the last read ended: the credentials it logged as created. */
class VaultAuditReader {
  private offset = 0;
  constructor(private readonly file: string) {}

  async readNew(): Promise<{ credentials: CreatedCredential[]; wrappingAccessors: string[] }> {
    const handle = await open(this.file, "r").catch(() => undefined);
    if (handle === undefined) return { credentials: [], wrappingAccessors: [] };
    try {
      const { size } = await handle.stat();
      const buffer = Buffer.alloc(size - this.offset);
      await handle.read(buffer, 0, buffer.length, this.offset);
      const text = buffer.toString("utf8");
      // Only whole lines: a line Vault is still writing is read next time.
      const end = text.lastIndexOf("\n") + 1;
      this.offset += Buffer.byteLength(text.slice(0, end));
      const credentials: CreatedCredential[] = [];
      const wrappingAccessors: string[] = [];
      for (const line of text.slice(0, end).split("\n")) {
        const facts = parseVaultAuditLine(line);
        if (facts.credential !== undefined) credentials.push(facts.credential);
        if (facts.wrappingAccessor !== undefined) wrappingAccessors.push(facts.wrappingAccessor);
      }
      return { credentials, wrappingAccessors };
    } finally {
      await handle.close();
    }
  }
}

async function main(): Promise<void> {
  const options = parseOptions();
  const started = Date.now();
  const say = (line: string) => console.log(line);
  const dir = await makeTempDir("chaos");
  const logDir = join(dir.path, "logs");
  await mkdir(logDir);
  const cleanups: (() => Promise<unknown>)[] = [];
  try {
    const [bus, vault, postgres] = await Promise.all([startChaosBus(), startVault(), startPostgres()]);
    cleanups.push(() => bus.stop(), () => vault.stop(), () => postgres.stop());
    const database = await postgres.createDatabase();
    cleanups.push(() => database.drop());
    say(`chaos_setup: ${bus.description}; vault ${vault.version}; postgresql ${postgres.version}; logs in ${logDir}${options.keepLogs ? "" : " (removed at the end; --keep-logs keeps them)"}`);

    // The upstream's table: one row per execution, keyed by the call id the load generator sent.
    // No unique key on purpose: a second execution of one action is a second row, counted as a duplicate.
    const admin = new pg.Client({ connectionString: database.url });
    await admin.connect();
    cleanups.push(() => admin.end());
    await admin.query(`CREATE TABLE ${table} (call_id text NOT NULL, executed_at timestamptz NOT NULL DEFAULT clock_timestamp())`);
    const rootVault = createVaultClient({ address: vault.address, token: vault.rootToken });
    await configureDatabaseEngine(rootVault, {
      mount: "database",
      connectionName: "chaos",
      connectionUrl: `postgresql://{{username}}:{{password}}@${database.host}:${database.port}/${database.name}?sslmode=disable`,
      username: "postgres",
      password: "",
      roles: [{ name: "chaos", creationStatements: postgresRoleStatements(`GRANT SELECT, INSERT ON ${table} TO "{{name}}";`).creationStatements, defaultTtlSeconds: 300, maxTtlSeconds: 900 }],
    });
    // Vault's own record of what it created: its file audit device, accessors in the clear.
    const vaultAuditFile = join(dir.path, "vault-audit.log");
    // Where Vault refuses audit devices made through its API, the run says so and falls back on
    // the leases it sees alive while it polls (a lease created and revoked between polls is then missed).
    await vaultApi(vault.address, vault.rootToken, "PUT", "sys/audit/chaos", { type: "file", options: { file_path: vaultAuditFile, hmac_accessor: "false" } }).catch((error: unknown) =>
      say(`chaos_setup: Vault's audit device could not be enabled (${AirlockError.from(error).rawMessage}); credentials are seen only by polling Vault's lease list`),
    );
    const vaultAudit = new VaultAuditReader(vaultAuditFile);

    // Keys: the brokers' decision and audit key (one key id, shared by both replicas), the agent's token.
    const key = generateDecisionKey("chaos");
    await writeFile(join(dir.path, "broker-public.pem"), key.publicKeyPem);
    await writeFile(join(dir.path, "broker-private.pem"), key.signing.privateKey.export({ type: "pkcs8", format: "pem" }).toString(), { mode: 0o600 });
    const checkpointDir = join(dir.path, "checkpoints");
    await mkdir(checkpointDir);
    // Each replica signs the trail and its checkpoints with its own audit key; the key ring names both.
    const replicas = ["a", "b"] as const;
    const auditKeys = await Promise.all(replicas.map((replica) => writeAuditKey(join(dir.path, "audit-keys"), `chaos-audit-${replica}`)));
    const keyringFile = join(dir.path, "audit-keyring.yaml");
    await writeFile(keyringFile, `keys:\n${auditKeys.map((k, i) => `  - key_id: chaos-audit-${replicas[i] ?? ""}\n    public_key_file: ${JSON.stringify(k.publicKeyFile)}\n`).join("")}`);
    const agentKeys = await generateKeyPair("EdDSA");
    const agentPublicPem = await exportSPKI(agentKeys.publicKey);
    const agentToken = await new SignJWT({ act_for: "chaos@corp" })
      .setProtectedHeader({ alg: "EdDSA" })
      .setSubject("spiffe://chaos/agent")
      .setIssuer("https://idp.chaos")
      .setAudience("airlock")
      .setExpirationTime("2h")
      .sign(agentKeys.privateKey);
    await writeFile(
      join(dir.path, "policy.yaml"),
      [
        "version: 1",
        "rules:",
        "  - id: chaos-import",
        "    match: { service: demo.v1.OpsService, method: ImportRows }",
        "    effect: approve",
        "    approve:",
        "      risk: low",
        "      reviewers: { all_of: [{ group: security, min_approvals: 1 }] }",
        `      credential: { kind: database, mount: database, role: chaos, ttl: ${chaosDefaults.credentialTtl} }`,
        `      timeout: ${chaosDefaults.approvalTimeout}`,
      ].join("\n"),
    );

    // The demo upstream, as its own process.
    const upstreamPort = await freePort();
    const upstream = new Part("ops upstream", ["demo/ops/main.ts"], join(logDir, "upstream.log"), /listening on/, {
      AIRLOCK_OPS_LISTEN: `127.0.0.1:${upstreamPort}`,
      AIRLOCK_OPS_DATABASE_URL: `postgres://${database.host}:${database.port}/${database.name}`,
      AIRLOCK_VAULT_ADDR: vault.address,
    });
    cleanups.push(() => upstream.stop());
    await upstream.start();

    // Two broker replicas, one config each (their own replica id and HTTP port).
    const brokerNats = natsYaml(await bus.credentials({ kind: "broker" }), bus.replicas);
    const brokers: Part[] = [];
    for (const [index, replica] of replicas.entries()) {
      const port = await freePort();
      const config = join(dir.path, `broker-${replica}.yaml`);
      await writeFile(
        config,
        [
          brokerNats,
          `vault: { address: "${vault.address}", auth: { kind: token, token: "${vault.rootToken}" } }`,
          "signing_key: { key_id: chaos, file: broker-private.pem }",
          `audit: { signing_key: { key_id: chaos-audit-${replica}, file: ${JSON.stringify(auditKeys[index]?.privateKeyFile ?? "")} }, keyring: ${JSON.stringify(keyringFile)}, checkpoints: { kind: directory, dir: "${checkpointDir}", every_events: 200, interval: 30s } }`,
          "policy: policy.yaml",
          "approvals:",
          "  groups: { security: [sam@corp] }",
          "  auto_rules: [{ id: chaos-auto, effect: approve, when: { max_risk: low }, reason: pre-approved for the chaos run }]",
          `http: 127.0.0.1:${port}`,
          `replica_id: broker-${replica}`,
          "log_level: warn",
        ].join("\n"),
      );
      const broker = new Part(`broker-${replica}`, ["cli/airlock.ts", "broker", "--config", config], join(logDir, `broker-${replica}.log`), `http://127.0.0.1:${port}/healthz`);
      cleanups.push(() => broker.stop());
      brokers.push(broker);
    }
    for (const broker of brokers) await broker.start();

    const sidecarPort = await freePort();
    const sidecarMetrics = await freePort();
    await writeFile(
      join(dir.path, "sidecar.yaml"),
      [
        `listen: 127.0.0.1:${sidecarPort}`,
        "upstreams:",
        `  - { name: ops, address: "127.0.0.1:${upstreamPort}", descriptor_sets: ["${descriptorSetPath}"] }`,
        natsYaml(await bus.credentials({ kind: "sidecar", host })),
        `vault: { address: "${vault.address}" }`,
        "broker_keys: { chaos: broker-public.pem }",
        `host: ${host}`,
        "policy: policy.yaml",
        `agent_auth: [{ kind: jwt, issuer: "https://idp.chaos", audience: airlock, keys: { kind: static, public_keys: [${JSON.stringify(agentPublicPem)}] } }]`,
        `metrics: { listen: "127.0.0.1:${sidecarMetrics}" }`,
        // One agent sends all the traffic: at the default 16 held approvals it is refused
        // (resource_exhausted, a clear failure) whenever a fault slows decisions, which would hide
        // what the fault does to the calls held. Raised so every call reaches the flow.
        "limits: { max_outstanding_approvals_per_agent: 10000 }",
        "log_level: warn",
      ].join("\n"),
    );
    const sidecar = new Part("sidecar", ["cli/airlock.ts", "sidecar", "--config", join(dir.path, "sidecar.yaml")], join(logDir, "sidecar.log"), `http://127.0.0.1:${sidecarMetrics}/healthz`);
    cleanups.push(() => sidecar.stop());
    await sidecar.start();
    say(`chaos_setup: upstream, 2 brokers and the sidecar running after ${((Date.now() - started) / 1000).toFixed(1)} s; ${options.faults.length} windows of ${options.seconds} s at ${options.rate} actions/s, fault at ${(options.seconds / 3).toFixed(1)} s, settle bound ${options.settleSeconds} s`);

    const load = new LoadGenerator(`127.0.0.1:${sidecarPort}`, agentToken, options.callBoundSeconds * 1000);
    cleanups.push(() => Promise.resolve(load.close()));
    const observer = new Observer(bus, vault.address, vault.rootToken, admin);
    // Whatever Vault created before the first window (nothing per action) is no window's.
    await vaultAudit.readNew();

    const lines: FaultLine[] = [];
    for (const fault of options.faults) {
      const windowStart = new Date();
      // Besides Vault's audit log: every lease seen alive while the window runs that was not alive before it.
      const aliveAtStart = await observer.aliveIds();
      const seenLeases = new Set<string>();
      let polling = true;
      const poller = (async () => {
        while (polling) {
          const alive = await observer.aliveIds().catch(() => new Set<string>());
          for (const id of alive) if (id.startsWith(leasePrefix) && !aliveAtStart.has(id)) seenLeases.add(id);
          await delay(1000);
        }
      })();
      load.start(fault, options.rate);
      await delay((options.seconds * 1000) / 3);
      let repair: () => Promise<void> = () => Promise.resolve();
      switch (fault) {
        case "none":
          break;
        case "broker_kill": {
          const victim = brokers[0];
          await victim?.kill();
          repair = () => victim?.start() ?? Promise.resolve();
          break;
        }
        case "nats_restart":
          await bus.restartOneNode();
          break;
        case "vault_pause":
          vault.freeze();
          await delay(chaosDefaults.vaultPauseSeconds * 1000);
          vault.thaw();
          break;
        case "sidecar_kill":
          // Mid-call: only once a call is held or running in it.
          await waitUntil(() => Promise.resolve(load.inFlight > 0), 10_000, 5);
          await sidecar.kill();
          await sidecar.start();
          break;
      }
      await delay(Math.max(0, windowStart.getTime() + options.seconds * 1000 - Date.now()));
      load.stopStarting();
      // Settle, within one bound from the end of the traffic: every call answered (or past its own
      // deadline), every record of the window final, and no credential the window made still alive.
      const windowCredentials: CreatedCredential[] = [];
      const wrappingAccessors: string[] = [];
      const readVault = async () => {
        const fresh = await vaultAudit.readNew();
        windowCredentials.push(...fresh.credentials);
        wrappingAccessors.push(...fresh.wrappingAccessors);
      };
      let unsettled = 0;
      await waitUntil(
        async () => {
          await readVault();
          unsettled = (await observer.records(windowStart)).filter((r) => !isSettled(r)).length;
          const alive = await observer.aliveIds();
          return load.inFlight === 0 && unsettled === 0 && windowCredentials.every((c) => !alive.has(c.id));
        },
        options.settleSeconds * 1000,
        1000,
      );
      // A call still waiting has the run's bound as its deadline: it ends by then, answered or not.
      await load.drained();
      polling = false;
      await poller;
      await readVault();
      const loggedIds = new Set(windowCredentials.map((c) => c.id));
      const missedByLog = [...seenLeases].filter((id) => !loggedIds.has(id));
      windowCredentials.push(...missedByLog.map((id) => ({ kind: "lease" as const, id, path: leasePrefix.slice(0, -1) })));
      const taken = load.take();
      const retried = load.retries;
      load.retries = 0;
      const calls = tallyCalls(taken, await observer.executions());
      const examples = new Map<string, string>();
      for (const call of taken) if (call.outcome.kind === "error" && !examples.has(String(call.outcome.code))) examples.set(String(call.outcome.code), call.outcome.message.slice(0, 140));
      const alive = await observer.aliveIds();
      const named = await observer.namedCredentials();
      const credentials = judgeCredentials(windowCredentials, alive, named);
      const audit = await verifyTrail(await bus.credentials({ kind: "audit" }), keyringFile, checkpointDir);
      const records = await observer.records(windowStart);
      const states = new Map<string, number>();
      for (const record of records) states.set(stateName(record.state), (states.get(stateName(record.state)) ?? 0) + 1);
      const line: FaultLine = { fault, calls, credentials, auditIntact: audit.intact };
      lines.push(line);
      const wrapAlive = wrappingAccessors.filter((a) => alive.has(a)).length;
      say(
        `chaos_detail: fault=${fault} failed_unclear=${calls.failedUnclear} lost_unanswered=${calls.unanswered} lost_executed_but_failed=${calls.executedButFailed} lost_ok_not_executed=${calls.okWithoutExecution}` +
          ` retried=${retried} told_outcome_unknown=${calls.toldUnknown} told_outcome_unknown_ran=${calls.toldUnknownRan}` +
          ` failures=${[...calls.failureCodes].map(([code, n]) => `${code}:${n}`).join(",") || "-"} records=${records.length} unsettled=${unsettled} states=${[...states].map(([s, n]) => `${s}:${n}`).join(",")}` +
          ` vault_created=${new Set(windowCredentials.map((c) => c.id)).size} seen_alive_not_logged=${missedByLog.length} wrapping_tokens_alive=${wrapAlive}${audit.intact ? "" : ` audit_verify=${JSON.stringify(audit.line)}`}`,
      );
      if (examples.size > 0) say(`chaos_failure_examples: fault=${fault} ${[...examples].map(([code, message]) => `${code}=${JSON.stringify(message)}`).join(" ")}`);
      say(faultLine(line));
      await repair();
    }
    say(totalsLine(chaosTotals(lines)));
    say(`chaos_setup: done in ${((Date.now() - started) / 1000).toFixed(0)} s`);
    process.exitCode = chaosPassed(lines) ? 0 : 1;
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup().catch((error: unknown) => console.error(`chaos: cleanup failed: ${AirlockError.from(error).rawMessage}`));
    if (options.keepLogs) console.log(`chaos_setup: kept ${dir.path} (the parts' logs, Vault's audit log, configs and checkpoints)`);
    else await dir.remove();
  }
}

/**
 * The trail verified by the product's own verifier, as an operator runs it: `airlock audit verify`
 * as the audit role, against the key ring of both replicas' audit keys and their checkpoints.
 * Intact when it exits 0; its verdict line is kept for the report.
 */
async function verifyTrail(reader: NatsConnectionConfig, keyringFile: string, checkpointDir: string): Promise<{ intact: boolean; line: string }> {
  const auth = reader.auth;
  if (auth.kind !== "nkey") throw new AirlockError(Code.InvalidArgument, "the audit reader's credential is not an nkey seed file");
  const args = ["audit", "verify", "--nats", reader.servers[0] ?? "", "--nats-seed", auth.seedFile, "--keys", keyringFile, "--checkpoints", checkpointDir];
  if (reader.tls?.caFile !== undefined) args.push("--nats-ca", reader.tls.caFile);
  const verify = new ManagedProcess("airlock audit verify", process.execPath, ["--import", "tsx", "cli/airlock.ts", ...args], { cwd: root });
  const code = await verify.exited;
  await verify.stop();
  const line = verify.recentOutput.trim().split("\n").pop() ?? "";
  return { intact: code === 0, line };
}

/** A raw Vault HTTP API call as the root token (the observer's own, never the brokers'). */
async function vaultApi(address: string, token: string, method: string, path: string, body?: unknown): Promise<Record<string, unknown> | undefined> {
  // Bounded: a paused Vault must not stall the observer.
  const response = await fetch(`${address}/v1/${path}`, { method, headers: { "X-Vault-Token": token }, signal: AbortSignal.timeout(5000), ...(body === undefined ? {} : { body: JSON.stringify(body) }) });
  if (response.status === 404) return undefined;
  if (!response.ok) throw new AirlockError(Code.Unavailable, `Vault ${method} ${path} answered ${response.status}: ${await response.text()}`);
  return response.status === 204 ? {} : ((await response.json()) as Record<string, unknown>);
}

/** The chaos run's view of the servers' own state: request records, the trail, Vault, PostgreSQL. */
class Observer {
  /** Records already settled: final, so not read again. */
  private readonly settled = new Map<string, RequestRecord>();

  constructor(
    private readonly bus: ChaosBus,
    private readonly vaultAddress: string,
    private readonly rootToken: string,
    private readonly admin: pg.Client,
  ) {}

  /** Every record in the state bucket (settled ones from the cache); a fresh connection each time, since NATS may have restarted. */
  async allRecords(): Promise<RequestRecord[]> {
    const nc = await this.bus.connect({ kind: "broker" }, { name: "airlock-chaos-observer" });
    try {
      // Read as an observer: the bucket as it is, never created or brought to other settings.
      const kv = await new Kvm(nc).open(stateBucket);
      const store = await RequestStore.observe(nc);
      const ids = new Set<string>();
      for await (const key of await kv.keys()) ids.add(key);
      const found: RequestRecord[] = [];
      for (const id of ids) {
        const cached = this.settled.get(id);
        if (cached !== undefined) {
          found.push(cached);
          continue;
        }
        // Through the broker's store: a record joined with its request, stored apart from it.
        const record = (await store.get(id))?.record;
        if (record === undefined) continue;
        if (isSettled(record)) this.settled.set(id, record);
        found.push(record);
      }
      return found;
    } finally {
      await nc.close();
    }
  }

  /** Records created since `since`. */
  async records(since: Date): Promise<RequestRecord[]> {
    return (await this.allRecords()).filter((r) => r.request?.createdAt !== undefined && timestampDate(r.request.createdAt) >= since);
  }

  /** Every lease id and accessor any request record or audit event names. */
  async namedCredentials(): Promise<Set<string>> {
    const named = new Set<string>();
    for (const record of await this.allRecords()) if (record.lease !== undefined && record.lease.leaseId !== "") named.add(record.lease.leaseId);
    const reader = await this.bus.connect({ kind: "audit" }, { name: "airlock-chaos-observer" });
    try {
      for await (const event of readAuditEvents(reader, { onUndecodable: () => undefined })) stringsIn(event.details ?? {}, named);
    } finally {
      await reader.close();
    }
    return named;
  }

  /** Lease ids under the chaos role and token accessors Vault holds alive now (root's own included). */
  async aliveIds(): Promise<Set<string>> {
    const alive = new Set<string>();
    const leases = await vaultApi(this.vaultAddress, this.rootToken, "GET", `sys/leases/lookup/${leasePrefix}?list=true`);
    for (const key of (leases?.data as { keys?: string[] } | undefined)?.keys ?? []) alive.add(`${leasePrefix}${key}`);
    const accessors = await vaultApi(this.vaultAddress, this.rootToken, "GET", "auth/token/accessors?list=true");
    for (const key of (accessors?.data as { keys?: string[] } | undefined)?.keys ?? []) alive.add(key);
    return alive;
  }

  /** Rows in the upstream's table per call id: how many times each action executed. */
  async executions(): Promise<Map<string, number>> {
    const rows = await this.admin.query<{ call_id: string; n: string }>(`SELECT call_id, count(*) AS n FROM ${table} GROUP BY call_id`);
    return new Map(rows.rows.map((r) => [r.call_id, Number(r.n)]));
  }
}

await main();
