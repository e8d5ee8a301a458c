/**
 * `npm run demo`: the whole product on this machine, from real NATS, Vault and
 * PostgreSQL (through the harness) to the broker, a sidecar, the demo upstream
 * and a demo agent whose privileged calls wait for a human. With
 * `autoApprove`, a second demo reviewer approves through the reviewers' API
 * and the run ends with a summary and `demo ok`.
 *
 * Everything started is stopped by {@link DemoRun.stop}; nothing is left behind.
 * @module
 */
import { createPrivateKey, randomBytes } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";
import { buildConsole } from "../approver-console/build.js";
import { isSettled, parseBrokerConfig, type RunningBroker, startBroker, stateName, type TrailVerdict } from "../broker/index.js";
import { ReviewerClient } from "../cli/reviewer-client.js";
import { ConfigReader, expandConfigVariables } from "../common/config.js";
import { parse as parseYaml } from "yaml";
import { AirlockError, Code } from "../common/errors.js";
import { createLogger } from "../common/logger.js";
import { createVaultClient } from "../common/vault.js";
import { approveDevice, freePort, makeTempDir, resolveVaultBinary, startNats, startOidcProvider, startPostgres, startVault } from "../harness/index.js";
import { type RequestRecord, RequestState } from "../proto/index.js";
import { parseSidecarConfig, startSidecar } from "../sidecar/index.js";
import { type AgentStepResult, runDemoAgent } from "./agent.js";
import { startOpsServer } from "./ops/index.js";
import { configureDemoVault, demoKeyId, prepareDemoDatabase, writeDemoKeys } from "./setup.js";
import { type BusCheck, checkBusBoundary } from "./bus-check.js";
import { checkAuditTrail, demoCheckpointDir } from "./audit-check.js";
import { demoIssuerDefaults, exchangeToken, startDemoIssuer } from "./issuer.js";
import { startNotificationReceiver } from "./notify-receiver.js";

/** Options of {@link runDemo}. */
export interface DemoOptions {
  /** Approve held calls through the API as the demo reviewers, then stop. @default false */
  readonly autoApprove?: boolean;
  /** Where the story goes. @default console.log */
  readonly print?: (line: string) => void;
  /** Where the console is served. @default 127.0.0.1:9465, or a free port when that one is taken */
  readonly brokerHttp?: string;
  /** Log level of the broker and sidecar (their JSON lines go to stderr). @default "warn" */
  readonly logLevel?: string;
}

/** One action of the summary table. */
export interface DemoActionSummary {
  readonly action: string;
  readonly decision: string;
  readonly approver: string;
  /** The Vault lease id or token accessor, shortened; "-" when no credential was issued. */
  readonly lease: string;
  /** Milliseconds from the end of the upstream call to the lease's revocation; undefined when none. */
  readonly revokedAfterMs: number | undefined;
  /** Proof the credential is dead, in words. */
  readonly proof: string;
}

/** A finished demo run. */
export interface DemoResult {
  readonly ok: boolean;
  /** The steps that did not end as expected, in words. */
  readonly failures: readonly string[];
  readonly actions: readonly DemoActionSummary[];
  readonly steps: readonly AgentStepResult[];
  /** What the NATS server answered the demo sidecar's credential when it tried to cross the boundary. */
  readonly bus: BusCheck;
  /** The trail verified as the audit role against the broker's key and its checkpoints. */
  readonly audit: TrailVerdict;
  /** Notifications the demo's webhook receiver took (signature checked), by event kind. */
  readonly notified: ReadonlyMap<string, number>;
}

/** A running demo, stoppable at any point. */
export interface DemoRun {
  /** Resolves when the agent's script and the checks are done. */
  readonly done: Promise<DemoResult>;
  /** Stops everything started so far, in reverse order. Safe to call more than once. */
  stop(): Promise<void>;
}

const configDir = fileURLToPath(new URL("./config/", import.meta.url));

/** The demo's reviewers at its identity provider (passwords are made per run). */
const demoReviewers = [
  { email: "dana@example.com", groups: ["data-owners"] },
  { email: "sam@example.com", groups: ["security"] },
] as const;

/** The demo identity provider's clients: the console (the broker runs its code flow) and the CLI (device flow). */
export const demoSsoClients = { console: "airlock-console", cli: "airlock-cli" } as const;

/**
 * Reads demo/config/broker.yaml with `env` and gives it single sign-on through the
 * demo's OpenID Provider at `issuer`: people sign in to the console there, and the API
 * takes the provider's ID tokens for the CLI as bearer tokens. (docker compose keeps the
 * file's fixed dev tokens: a provider reachable at one address from the browser and the
 * broker's container is not wired there.)
 */
async function demoBrokerConfig(env: Record<string, string>, sso: { issuer: string; clientSecret: string; sessionKeyFile: string }): Promise<ConfigReader> {
  const path = `${configDir}broker.yaml`;
  const raw = expandConfigVariables(parseYaml(await readFile(path, "utf8")), path, { env }) as Record<string, unknown>;
  raw.reviewers = {
    auth: { kind: "oidc", issuer: sso.issuer, audience: demoSsoClients.cli, jwks_url: `${sso.issuer}/jwks` },
    sso: {
      provider_name: "the demo identity provider",
      issuer: sso.issuer,
      client_id: demoSsoClients.console,
      client_secret: sso.clientSecret,
      scopes: ["openid", "email", "profile", "groups", "offline_access"],
      cli_client_id: demoSsoClients.cli,
    },
    sessions: { key_file: sso.sessionKeyFile, max_age: "8h" },
  };
  return new ConfigReader(raw, "", path);
}

/** An ID token for the CLI's client, as `airlock login` gets it: the device flow, with the person played here. */
async function deviceFlowToken(issuer: string, user: { email: string; password: string }): Promise<string> {
  const started = (await (await fetch(`${issuer}/device/auth`, { method: "POST", body: new URLSearchParams({ client_id: demoSsoClients.cli, scope: "openid email profile groups" }) })).json()) as { device_code: string; verification_uri_complete: string };
  await approveDevice(started.verification_uri_complete, user);
  const tokens = (await (await fetch(`${issuer}/token`, { method: "POST", body: new URLSearchParams({ client_id: demoSsoClients.cli, grant_type: "urn:ietf:params:oauth:grant-type:device_code", device_code: started.device_code }) })).json()) as { id_token?: string };
  if (tokens.id_token === undefined) throw new AirlockError(Code.Unauthenticated, `the demo identity provider gave ${user.email} no ID token`);
  return tokens.id_token;
}

type Closer = { name: string; close: () => Promise<unknown> };

/** Starts the demo; see {@link DemoRun}. */
export function runDemo(options: DemoOptions = {}): DemoRun {
  const print = options.print ?? ((line: string) => console.log(line));
  const closers: Closer[] = [];
  const abort = new AbortController();
  let stopping: Promise<void> | undefined;
  const stopAll = async () => {
    // Closers added while stopping (a start that was under way) are stopped too.
    for (let closer = closers.pop(); closer !== undefined; closer = closers.pop()) {
      await closer.close().catch((error: unknown) => print(`demo   could not stop ${closer?.name ?? ""}: ${AirlockError.from(error).rawMessage}`));
    }
  };
  const stop = (): Promise<void> => {
    abort.abort();
    stopping ??= stopAll();
    return stopping;
  };
  /** Records what to stop; after stop() it stops it at once and ends the start-up. */
  const track = async (closer: Closer): Promise<void> => {
    if (!abort.signal.aborted) {
      closers.push(closer);
      return;
    }
    await closer.close().catch(() => undefined);
    throw new AirlockError(Code.Canceled, "the demo was stopped");
  };
  const done = (async (): Promise<DemoResult> => {
    const started = Date.now();
    print("demo   starting NATS, Vault and PostgreSQL (a machine's first run builds Vault from source first: 15-25 minutes, with progress)");
    await resolveVaultBinary();
    const servers = await Promise.allSettled([startNats(), startVault(), startPostgres()]);
    // Whatever did start is stopped, even when another server failed to.
    for (const [index, server] of servers.entries()) {
      if (server.status === "fulfilled") await track({ name: ["NATS", "Vault", "PostgreSQL"][index] ?? "a server", close: () => server.value.stop() });
    }
    const [nats, vault, postgres] = servers.map((server) => {
      if (server.status === "rejected") throw server.reason;
      return server.value;
    }) as [Awaited<ReturnType<typeof startNats>>, Awaited<ReturnType<typeof startVault>>, Awaited<ReturnType<typeof startPostgres>>];
    const database = await postgres.createDatabase();
    await track({ name: "the demo database", close: () => database.drop() });
    print(`demo   NATS server ${nats.version} at ${nats.url} (TLS, an nkey credential per role and host), Vault ${vault.version} at ${vault.address}, PostgreSQL ${postgres.version} database ${database.name}`);

    const keys = await makeTempDir("airlock-demo-");
    await track({ name: "the key directory", close: () => keys.remove() });
    const keyFiles = await writeDemoKeys(keys.path);
    const db = { host: database.host, port: database.port, database: database.name, username: "postgres", password: "" };
    await prepareDemoDatabase(db);
    const rootVault = createVaultClient({ address: vault.address, token: vault.rootToken });
    await configureDemoVault(rootVault, db);
    print("demo   seeded table customers (3 rows); Vault's database engine issues per-action users for it");

    await buildConsole({ ifMissing: true });
    const ops = await startOpsServer({ database: { host: database.host, port: database.port, database: database.name }, vaultAddress: vault.address });
    await track({ name: "the ops upstream", close: () => ops.close() });

    // broker.yaml's fixed dev tokens (docker compose's sign-in): random here and never printed, since
    // this demo replaces that section with single sign-on (demoBrokerConfig).
    const tokens = { dana: `dana-${randomBytes(12).toString("hex")}`, sam: `sam-${randomBytes(12).toString("hex")}` };
    // Someone is told about each request: a webhook receiver that prints every delivery.
    const notifySecret = randomBytes(24).toString("hex");
    // The console's address is known once the broker listens (9465, or a free port when that one is taken).
    const links: { console?: string } = {};
    const receiver = await startNotificationReceiver({ secret: notifySecret, print, consoleUrl: () => links.console });
    await track({ name: "the notification receiver", close: () => receiver.close() });
    // Reviewers sign in at a real OpenID Provider; it starts after the broker (whose address its
    // console client needs), on a port chosen now (the broker reads its metadata on first use).
    const passwords = { dana: `dana-${randomBytes(4).toString("hex")}`, sam: `sam-${randomBytes(4).toString("hex")}` };
    const idpPort = await freePort();
    const sso = { issuer: `http://127.0.0.1:${idpPort}`, clientSecret: randomBytes(24).toString("hex"), sessionKeyFile: join(keys.path, "session.key") };
    await writeFile(sso.sessionKeyFile, randomBytes(32).toString("hex"), { mode: 0o600 });
    const logLevel = options.logLevel ?? "warn";
    const demoHost = "demo-host";
    const brokerNats = await nats.credentials({ kind: "broker" });
    const sidecarNats = await nats.credentials({ kind: "sidecar", host: demoHost });
    const env: Record<string, string> = {
      AIRLOCK_NATS_URL: nats.url,
      AIRLOCK_NATS_CA: nats.caFile,
      AIRLOCK_HOST: demoHost,
      AIRLOCK_VAULT_ADDR: vault.address,
      AIRLOCK_VAULT_TOKEN: vault.rootToken,
      AIRLOCK_DIR: keys.path,
      AIRLOCK_AUDIT_CHECKPOINTS: demoCheckpointDir(keys.path),
      AIRLOCK_OPS_ADDR: ops.address,
      AIRLOCK_DEMO_DANA_TOKEN: tokens.dana,
      AIRLOCK_DEMO_SAM_TOKEN: tokens.sam,
      AIRLOCK_BROKER_HTTP: options.brokerHttp ?? "127.0.0.1:9465",
      AIRLOCK_SIDECAR_LISTEN: "127.0.0.1:0",
      AIRLOCK_SIDECAR_METRICS: "127.0.0.1:0",
      AIRLOCK_IDP_PUBLIC_KEY: (await readFile(keyFiles.idpPublicKey, "utf8")).trim(),
      AIRLOCK_LOG_LEVEL: logLevel,
      AIRLOCK_NOTIFY_URL: receiver.url,
      AIRLOCK_NOTIFY_SECRET: notifySecret,
      AIRLOCK_CONSOLE_URL: `http://${options.brokerHttp ?? "127.0.0.1:9465"}/console/`,
    };
    const log = createLogger({ name: "demo", level: logLevel, destination: process.stderr });
    let broker: RunningBroker;
    try {
      broker = await startBroker(parseBrokerConfig(await demoBrokerConfig({ ...env, AIRLOCK_NATS_SEED_FILE: brokerNats.auth.seedFile }, sso)), { log });
    } catch (error) {
      if (options.brokerHttp !== undefined) throw error;
      // 9465 is taken (another demo, another broker): any free port will do.
      broker = await startBroker(
        parseBrokerConfig(await demoBrokerConfig({ ...env, AIRLOCK_NATS_SEED_FILE: brokerNats.auth.seedFile, AIRLOCK_BROKER_HTTP: "127.0.0.1:0" }, sso)),
        { log },
      );
    }
    await track({ name: "the broker", close: () => broker.close() });
    links.console = `${broker.httpUrl}/console/`;
    const reviewerIdp = await startOidcProvider({
      port: idpPort,
      users: [
        { ...demoReviewers[0], password: passwords.dana },
        { ...demoReviewers[1], password: passwords.sam },
      ],
      clients: [
        { clientId: demoSsoClients.console, clientSecret: sso.clientSecret, redirectUris: [`${broker.httpUrl}/api/v1/sso/callback`] },
        { clientId: demoSsoClients.cli },
      ],
    });
    await track({ name: "the reviewers' identity provider", close: () => reviewerIdp.stop() });
    const sidecarPath = `${configDir}sidecar.yaml`;
    const sidecarRaw = expandConfigVariables(parseYaml(await readFile(sidecarPath, "utf8")), sidecarPath, { env: { ...env, AIRLOCK_NATS_SEED_FILE: sidecarNats.auth.seedFile } });
    const sidecar = await startSidecar(parseSidecarConfig(new ConfigReader(sidecarRaw, "", sidecarPath)), { log });
    await track({ name: "the sidecar", close: () => sidecar.close() });
    print(`demo   broker, sidecar (${sidecar.address}) and ops upstream running (${((Date.now() - started) / 1000).toFixed(1)} s)`);
    print("");
    print(`       approver console: ${broker.httpUrl}/console/`);
    print(`       click "Sign in with the demo identity provider" (${reviewerIdp.issuer}), then sign in as`);
    print(`         dana@example.com (data-owners) with password ${passwords.dana}`);
    print(`         sam@example.com  (security)    with password ${passwords.sam}`);
    print(`       or from a terminal: AIRLOCK_URL=${broker.httpUrl} npm run airlock -- login   (then: npm run airlock -- requests ls)`);
    print(`       notifications go to a signed webhook at ${receiver.url}; its lines start with "notify"`);
    print("");

    const admin = new pg.Client({ connectionString: database.url });
    await admin.connect();
    await track({ name: "the admin connection", close: () => admin.end() });
    const tracker = new ActionTracker(broker, admin, rootVault, print);
    await track({ name: "the broker watch", close: () => tracker.stop() });
    if (options.autoApprove === true) {
      // The auto-approver is a machine: the provider's tokens for the CLI, got with the device flow.
      const approver = new AutoApprover(broker.httpUrl, { dana: await deviceFlowToken(reviewerIdp.issuer, { email: "dana@example.com", password: passwords.dana }), sam: await deviceFlowToken(reviewerIdp.issuer, { email: "sam@example.com", password: passwords.sam }) }, print);
      await track({ name: "the auto-approver", close: () => approver.stop() });
    } else {
      print("demo   privileged steps wait for you: approve or deny them in the console (or with the CLI)");
    }

    // The identity provider holds the token key; the agent holds a client secret and the human's session.
    const clientSecret = randomBytes(24).toString("hex");
    const idp = await startDemoIssuer({
      privateKey: createPrivateKey(await readFile(keyFiles.idpPrivateKey, "utf8")),
      issuer: demoIssuerDefaults.issuer,
      audiences: [demoIssuerDefaults.audience],
      clients: { [demoIssuerDefaults.clientId]: { secret: clientSecret, agent: demoIssuerDefaults.agent } },
    });
    await track({ name: "the identity provider", close: () => idp.close() });
    const session = await idp.signIn(demoIssuerDefaults.human);
    print(`demo   identity provider at ${idp.tokenUrl}: ${demoIssuerDefaults.human} signed in; the agent exchanges that session for its tokens (RFC 8693)`);
    const token = () => exchangeToken({ tokenUrl: idp.tokenUrl, clientId: demoIssuerDefaults.clientId, clientSecret, subjectToken: session, audience: demoIssuerDefaults.audience });
    const steps = await runDemoAgent({ sidecarAddress: sidecar.address, token, print, signal: abort.signal });
    if (abort.signal.aborted) throw new AirlockError(Code.Canceled, "the demo was stopped");
    const actions = await tracker.settle(steps);
    // The boundary, tried with the demo sidecar's own credential: what an agent on its host can read.
    const bus = await checkBusBoundary(sidecarNats, demoHost);
    // The trail as evidence: a checkpoint of its head now, then the whole trail verified against it.
    await broker.broker.checkpointAudit();
    const audit = await checkAuditTrail(await nats.credentials({ kind: "audit" }), {
      keyId: demoKeyId,
      publicKeyFile: keyFiles.brokerPublicKey,
      checkpointDir: demoCheckpointDir(keys.path),
      keyringFile: join(keys.path, "audit-keyring.yaml"),
    });
    // A human may deny a held step: that is the product working, not the demo failing.
    const heldAndDenied = (step: AgentStepResult): boolean => options.autoApprove !== true && step.outcome === "permission_denied" && actions.some((a) => a.action === step.method && a.decision === "denied");
    const failures = [
      ...steps.filter((s) => s.outcome !== s.expected && !heldAndDenied(s)).map((s) => `step "${s.step}" ended ${s.outcome} (${s.summary}), expected ${s.expected}`),
      ...actions.filter((a) => a.decision === "approved" && a.revokedAfterMs === undefined).map((a) => `the credential of ${a.action} was not revoked`),
      ...Object.entries(bus)
        .filter(([, answer]) => answer !== "refused")
        .map(([attempt]) => `the NATS server allowed the sidecar's credential an attempt it must refuse: ${attempt}`),
      ...(audit.intact ? [] : [`the audit trail does not verify: ${audit.error ?? ""} ${audit.problem}`]),
      ...((receiver.received.get("review_requested") ?? 0) === 0 ? ["no review request reached the notification receiver"] : []),
    ];
    return { ok: failures.length === 0, failures, actions, steps, bus, audit, notified: receiver.received };
  })();
  return { done, stop };
}

/** Approves what the demo reviewers are needed for, through the reviewers' HTTP API. */
class AutoApprover {
  private readonly abort = new AbortController();
  private readonly loop: Promise<void>;

  constructor(baseUrl: string, tokens: { dana: string; sam: string }, print: (line: string) => void) {
    const reviewers = [new ReviewerClient(baseUrl, tokens.dana), new ReviewerClient(baseUrl, tokens.sam)];
    const names = ["dana@example.com", "sam@example.com"];
    this.loop = (async () => {
      const decided = new Set<string>();
      while (!this.abort.signal.aborted) {
        for (const [index, reviewer] of reviewers.entries()) {
          const pending = await reviewer.list({ state: "pending", needsMe: "true" }).catch(() => []);
          for (const view of pending) {
            const id = view.record.request?.id ?? "";
            if (decided.has(id)) continue;
            decided.add(id);
            await reviewer.decide(id, true, "approved by the demo's auto-approver").then(
              () => print(`review ${names[index] ?? ""} approved ${view.record.request?.method ?? ""} (${id.slice(0, 8)}) through the API`),
              (error: unknown) => print(`review ${names[index] ?? ""} could not approve ${id.slice(0, 8)}: ${AirlockError.from(error).rawMessage}`),
            );
          }
        }
        await new Promise((resolve) => setTimeout(resolve, 150));
      }
    })();
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.loop;
  }
}

interface Tracked {
  record: RequestRecord;
  /** The PostgreSQL user of a database credential, seen while the action ran. */
  databaseUser?: string;
  printed: Set<string>;
  /** The proof that the credential is dead, taken as soon as its revocation was seen. */
  proof?: string;
}

/** Follows the broker's records: prints each request's life, and proves each credential dead afterwards. */
class ActionTracker {
  private readonly abort = new AbortController();
  private readonly byId = new Map<string, Tracked>();
  private readonly loop: Promise<void>;

  constructor(
    broker: RunningBroker,
    private readonly admin: pg.Client,
    private readonly vault: ReturnType<typeof createVaultClient>,
    private readonly print: (line: string) => void,
  ) {
    this.loop = (async () => {
      try {
        for await (const record of broker.broker.watch(this.abort.signal)) await this.follow(record);
      } catch (error) {
        if (!this.abort.signal.aborted) print(`demo   lost the broker watch: ${AirlockError.from(error).rawMessage}`);
      }
    })();
  }

  private once(tracked: Tracked, key: string, line: string): void {
    if (tracked.printed.has(key)) return;
    tracked.printed.add(key);
    this.print(line);
  }

  private async follow(record: RequestRecord): Promise<void> {
    const request = record.request;
    if (request === undefined) return;
    const tracked = this.byId.get(request.id) ?? { record, printed: new Set<string>() };
    tracked.record = record;
    this.byId.set(request.id, tracked);
    const name = `${request.method} (${request.id.slice(0, 8)})`;
    if (record.state === RequestState.PENDING) {
      const needs = record.outstanding.map((g) => `${g.minApprovals} from ${g.group}`).join(" and ");
      this.once(tracked, "pending", `broker ${name} held for approval: needs ${needs}; risk ${riskName(request.risk)}, rule ${request.ruleId}`);
    }
    if (record.lease !== undefined && record.lease.leaseId !== "") {
      this.once(tracked, "issued", `broker ${name} approved by ${approvers(record)}; Vault issued a one-action ${record.lease.kind} credential (${shortLease(record.lease.leaseId)})`);
      if (record.lease.kind === "database" && tracked.databaseUser === undefined && record.lease.revokedAt === undefined) {
        // Roles belong to the whole PostgreSQL server: only one that can read this database's table is the action's.
        const users = await this.admin.query<{ rolname: string }>("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%' AND has_table_privilege(rolname, 'customers', 'SELECT')").catch(() => ({ rows: [] }));
        const user = users.rows[0]?.rolname;
        if (user !== undefined) tracked.databaseUser = user;
      }
    }
    if (record.state === RequestState.DENIED) this.once(tracked, "denied", `broker ${name} denied: ${record.votes.at(-1)?.reason ?? ""}`);
    if (record.lease?.revokedAt !== undefined && !tracked.printed.has("revoked")) {
      this.once(tracked, "revoked", `broker ${name} done: the sidecar reported the call's end and ${record.lease.revokedBy} revoked the credential at once`);
      // Right after the action, not at the end: the credential is dead already.
      tracked.proof = await this.prove(tracked);
      this.print(`check  ${request.method}: ${tracked.proof}`);
    }
  }

  /** Waits for each approved action's revocation (up to 10 s), proves the credential dead, and summarizes. */
  async settle(steps: readonly AgentStepResult[]): Promise<DemoActionSummary[]> {
    const summaries: DemoActionSummary[] = [];
    for (const step of steps) {
      const tracked = [...this.byId.values()].find((t) => t.record.request?.method === step.method);
      if (tracked === undefined) {
        summaries.push({ action: step.method, decision: step.outcome === "ok" ? "allowed by policy" : step.outcome === "permission_denied" ? "denied by policy" : step.outcome, approver: "-", lease: "-", revokedAfterMs: undefined, proof: "no credential needed" });
        continue;
      }
      // The watch can trail the agent's call by a moment: wait for the final state and, when a
      // credential was issued, its revocation.
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline && !isSettled(tracked.record)) await new Promise((resolve) => setTimeout(resolve, 50));
      const { record } = tracked;
      const lease = record.lease;
      const revokedAt = lease?.revokedAt === undefined ? undefined : Number(lease.revokedAt.seconds) * 1000 + Math.floor(lease.revokedAt.nanos / 1e6);
      const proof = lease === undefined || lease.leaseId === "" ? "no credential issued" : (tracked.proof ?? (await this.prove(tracked)));
      if (tracked.proof === undefined && lease !== undefined && lease.leaseId !== "") this.print(`check  ${step.method}: ${proof}`);
      summaries.push({
        action: step.method,
        decision: stateName(record.state) === "completed" ? "approved" : stateName(record.state),
        approver: approvers(record),
        lease: lease === undefined || lease.leaseId === "" ? "-" : shortLease(lease.leaseId),
        revokedAfterMs: revokedAt === undefined ? undefined : Math.max(0, revokedAt - step.endedAt.getTime()),
        proof,
      });
    }
    return summaries;
  }

  private async prove(tracked: Tracked): Promise<string> {
    const lease = tracked.record.lease;
    if (lease === undefined) return "no credential issued";
    if (lease.kind === "database") {
      const user = tracked.databaseUser;
      if (user === undefined) return `lease ${shortLease(lease.leaseId)} revoked (its user was not seen)`;
      const exists = (await this.admin.query("SELECT 1 FROM pg_roles WHERE rolname = $1", [user])).rowCount !== 0;
      const login = new pg.Client({ host: this.admin.host, port: this.admin.port, database: this.admin.database, user, password: "the-old-password-is-useless-anyway", connectionTimeoutMillis: 3000 });
      const loginError = await login.connect().then(
        async () => {
          await login.end();
          return undefined;
        },
        (error: unknown) => (error instanceof Error ? error.message : String(error)),
      );
      return loginError === undefined || exists ? `DANGER: database user ${user} still exists` : `database user ${user} can no longer log in (${loginError})`;
    }
    const dead = await this.vault.lookupAccessor(lease.leaseId).then(
      () => false,
      () => true,
    );
    return dead ? `Vault token ${shortLease(lease.leaseId)} is revoked (its accessor no longer resolves)` : `DANGER: Vault token ${shortLease(lease.leaseId)} is still alive`;
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.loop;
  }
}

function approvers(record: RequestRecord): string {
  const approving = record.votes.filter((v) => v.approve).map((v) => v.reviewer);
  if (record.state === RequestState.DENIED) return record.votes.filter((v) => !v.approve).map((v) => `${v.reviewer} (said no)`).join(", ") || "-";
  return approving.length === 0 ? "-" : approving.join(", ");
}

function shortLease(id: string): string {
  return id.length > 28 ? `…${id.slice(-24)}` : id;
}


function riskName(risk: number): string {
  return ["unspecified", "low", "medium", "high", "critical"][risk] ?? "unspecified";
}

/** The summary table, one line per action, aligned. */
export function summaryTable(actions: readonly DemoActionSummary[]): string[] {
  const rows = [["action", "decision", "approver", "credential lease", "revoked after"], ...actions.map((a) => [a.action, a.decision, a.approver, a.lease, a.revokedAfterMs === undefined ? "-" : `${a.revokedAfterMs} ms`])];
  const widths = rows[0]?.map((_, column) => Math.max(...rows.map((row) => (row[column] ?? "").length))) ?? [];
  return rows.map((row) => row.map((cell, column) => cell.padEnd(widths[column] ?? 0)).join("  ").trimEnd());
}
