import { readFile } from "node:fs/promises";
import { createPrivateKey, type KeyObject } from "node:crypto";
import { hostname } from "node:os";
import { type ConfigReader, readConfigFile } from "../common/config.js";
import { AirlockError, Code } from "../common/errors.js";
import { createLogger, type Logger } from "../common/logger.js";
import { connectNats, type NatsConnectionConfig, parseNatsConfig, parseNatsReplicas } from "../common/nats.js";
import { createVaultClient } from "../common/vault.js";
import { configureTokenRole, CredentialIssuer, type TokenRoleConfig } from "./credentials.js";
import { type ApprovalConfig, parseApprovalConfig } from "./rules.js";
import { AuditKeyRing, checkpointDefaults, DirectoryCheckpointSink } from "./audit/index.js";
import { Broker, brokerDefaults } from "./service.js";
import { PolicyWatcher } from "../sidecar/index.js";
import { parseReviewerAuthConfig, ReviewerAuthenticator, type ReviewerAuthConfig } from "./reviewers/auth.js";
import { startReviewerGrpc, type RunningReviewerGrpc } from "./reviewers/grpc.js";
import { createBrokerHttpApp } from "./reviewers/http.js";
import { parseStepUpConfig, type StepUpConfig, StepUpService, stepUpNeed } from "./stepup/index.js";
import { parseSessionConfig, readSessionKey, Sealer, type SessionConfig } from "./reviewers/session.js";
import { parseSsoConfig, SsoClient, type SsoConfig } from "./reviewers/sso.js";
import { type NotificationsConfig, noNotifications, parseNotificationsConfig, KvChatPositions, KvSlackModalTickets, ReviewNotifier, type StepUpPredicate } from "./notify/index.js";

/** How the broker authenticates to Vault: a union keyed by `kind`. */
export type VaultAuth = { readonly kind: "token"; readonly token: string } | { readonly kind: "approle"; readonly roleId: string; readonly secretId: string; readonly mount: string };

/** The broker's whole configuration, validated. */
export interface BrokerConfig {
  /** NATS, with the broker role's own credential. */
  readonly nats: NatsConnectionConfig;
  /** `nats.replicas`: copies a JetStream cluster keeps of every stream and bucket (1, 3 or 5). */
  readonly natsReplicas: number;
  readonly vault: { readonly address: string; readonly auth: VaultAuth; readonly tokenRole?: TokenRoleSetup };
  /** The Ed25519 private key (PKCS#8 PEM file) decisions are signed with, and its key id. */
  readonly signingKey: { readonly keyId: string; readonly file: string };
  /** The audit trail's signing key, key ring and checkpoints. */
  readonly audit: AuditConfig;
  readonly approvals: ApprovalConfig;
  /**
   * The policy file (the sidecars' format): each request's reviewer requirement and credential
   * template come from the rule it names here. Reloaded when it changes.
   */
  readonly policyFile: string;
  /** Where /metrics, /healthz and /readyz are served. @default 127.0.0.1:9465 */
  readonly http: { readonly host: string; readonly port: number };
  /** Slack, Teams and webhook notifications. @default none */
  readonly notifications: NotificationsConfig;
  /** The reviewers' API; without it the broker serves only /metrics and health. */
  readonly reviewers?: ReviewerApiConfig;
  /** @default the machine's host name and the process id */
  readonly replicaId: string;
  /**
   * How long a decided request may wait for its decision to be published before
   * another replica takes it over (the deciding replica died), in ms. @default 10000
   */
  readonly takeoverAfterMs: number;
  /**
   * How long an executing action may go without a heartbeat from its sidecar before its
   * credential is revoked and the record fails, in ms (`heartbeat_silence`). @default 20000
   */
  readonly heartbeatSilenceMs: number;
  /**
   * How long a settled record stays in the state bucket after its last change before it moves
   * to the history stream, in ms (`state.retention`). @default 3600000 (1h)
   */
  readonly retentionMs: number;
  /** @default info */
  readonly logLevel: string;
}

/**
 * The token role per-action Vault tokens are created through (`vault.token_role`): the
 * broker then needs no sudo and cannot grant policies outside `allowedPoliciesGlob`.
 */
export interface TokenRoleSetup extends TokenRoleConfig {
  /** Write the role at start (needs `auth/token/roles/*` on the broker's token); else it must exist. @default false */
  readonly configure: boolean;
}

/** Where checkpoints go: a union keyed by `kind`, so object stores and webhooks can follow. */
export type CheckpointSinkConfig = { readonly kind: "directory"; readonly dir: string; readonly periodMs: number };

/** The `audit` section of {@link BrokerConfig}. */
export interface AuditConfig {
  /** The key this replica signs audit events and checkpoints with. @default the decision `signing_key` */
  readonly signingKey?: { readonly keyId: string; readonly file: string };
  /** The key ring file naming every replica's audit key (see `AuditKeyRing.load`). @default this replica's key alone */
  readonly keyringFile?: string;
  /** Signed checkpoints outside NATS; none when absent (the broker then warns at start). */
  readonly checkpoints?: { readonly sink: CheckpointSinkConfig; readonly everyEvents: number; readonly intervalMs: number };
}

function auditConfig(reader: ConfigReader | undefined): AuditConfig {
  if (reader === undefined) return {};
  const signing = reader.optionalObject("signing_key");
  const signingKey = signing === undefined ? undefined : { keyId: signing.string("key_id"), file: signing.file("file") };
  signing?.done();
  const keyringFile = reader.optionalFile("keyring");
  const section = reader.optionalObject("checkpoints");
  let checkpoints: AuditConfig["checkpoints"];
  if (section !== undefined) {
    section.oneOf("kind", ["directory"] as const);
    const sink: CheckpointSinkConfig = { kind: "directory", dir: section.file("dir"), periodMs: section.duration("period", checkpointDefaults.period) };
    checkpoints = { sink, everyEvents: section.integer("every_events", checkpointDefaults.everyEvents, 1, 1_000_000), intervalMs: section.duration("interval", checkpointDefaults.interval) };
    section.done();
  }
  reader.done();
  return { ...(signingKey === undefined ? {} : { signingKey }), ...(keyringFile === undefined ? {} : { keyringFile }), ...(checkpoints === undefined ? {} : { checkpoints }) };
}

/** The reviewers' API section of {@link BrokerConfig}. */
export interface ReviewerApiConfig {
  readonly auth: ReviewerAuthConfig;
  /** Requests a minute one reviewer may make (HTTP and gRPC each). @default 300 */
  readonly ratePerMinute: number;
  /** Where `airlock.v1.ReviewerService` is served over gRPC; off when absent. */
  readonly grpc?: { readonly host: string; readonly port: number };
  /** The console's public origin behind a proxy that rewrites `Host` (`https://airlock.example.com`). */
  readonly publicOrigin?: string;
  /** Step-up for approvals (`step_up`): passkeys' relying party, and the risk from which approving needs it. */
  readonly stepUp?: StepUpConfig;
  /** Single sign-on for people in the console (docs/sso.md); needs `sessions`. */
  readonly sso?: SsoConfig;
  /** Sealed browser sessions every replica can read (a shared key file). */
  readonly sessions?: SessionConfig;
}

/** Defaults of {@link BrokerConfig}. */
export const brokerConfigDefaults = { http: "127.0.0.1:9465", logLevel: "info", approleMount: "approle", ratePerMinute: 300, takeoverAfter: "10s", heartbeatSilence: "20s", retention: "1h" } as const;

function reviewerApiConfig(reader: ConfigReader): ReviewerApiConfig {
  const auth = parseReviewerAuthConfig(reader.object("auth"));
  const ratePerMinute = reader.integer("rate_limit_per_minute", brokerConfigDefaults.ratePerMinute, 1, 100_000);
  const grpc = reader.has("grpc") ? reader.address("grpc") : undefined;
  const publicOrigin = reader.optionalString("public_origin");
  if (publicOrigin !== undefined && (!URL.canParse(publicOrigin) || new URL(publicOrigin).origin !== publicOrigin)) {
    throw reader.fail(`${reader.path}.public_origin`, "must be an origin such as https://airlock.example.com (scheme, host, optional port; no path)");
  }
  const stepUp = reader.has("step_up") ? parseStepUpConfig(reader.object("step_up")) : (reader.optionalObject("step_up"), undefined);
  const sso = reader.has("sso") ? parseSsoConfig(reader.object("sso")) : (reader.optionalObject("sso"), undefined);
  const sessions = reader.has("sessions") ? parseSessionConfig(reader.object("sessions")) : (reader.optionalObject("sessions"), undefined);
  if (sso !== undefined && sessions === undefined) throw reader.fail(`${reader.path}.sessions`, "is required with sso (sessions.key_file: a key every replica shares)");
  reader.done();
  return {
    auth,
    ratePerMinute,
    ...(grpc === undefined ? {} : { grpc: { host: grpc.host, port: grpc.port } }),
    ...(publicOrigin === undefined ? {} : { publicOrigin }),
    ...(stepUp === undefined ? {} : { stepUp }),
    ...(sso === undefined ? {} : { sso }),
    ...(sessions === undefined ? {} : { sessions }),
  };
}

function vaultAuth(reader: ConfigReader): VaultAuth {
  const kind = reader.oneOf("kind", ["token", "approle"] as const);
  const auth: VaultAuth =
    kind === "token"
      ? { kind, token: reader.string("token") }
      : { kind, roleId: reader.string("role_id"), secretId: reader.string("secret_id"), mount: reader.string("mount", brokerConfigDefaults.approleMount) };
  reader.done();
  return auth;
}

function tokenRoleSetup(reader: ConfigReader): TokenRoleSetup {
  const name = reader.string("name");
  if (!/^[A-Za-z0-9_.-]+$/.test(name)) throw reader.fail(`${reader.path}.name`, "must be a plain role name (letters, digits, . _ -)");
  const setup: TokenRoleSetup = {
    name,
    allowedPoliciesGlob: reader.strings("allowed_policies_glob"),
    maxTtlSeconds: Math.ceil(reader.duration("max_ttl", "1h") / 1000),
    configure: reader.boolean("configure", false),
  };
  reader.done();
  return setup;
}


/** Validates a parsed broker config; every error names the field. */
export function parseBrokerConfig(root: ConfigReader): BrokerConfig {
  const natsSection = root.object("nats");
  const natsReplicas = parseNatsReplicas(natsSection);
  const natsConfig = parseNatsConfig(natsSection);
  const vault = root.object("vault");
  const tokenRole = vault.has("token_role") ? tokenRoleSetup(vault.object("token_role")) : undefined;
  const vaultConfig = { address: vault.string("address"), auth: vaultAuth(vault.object("auth")), ...(tokenRole === undefined ? {} : { tokenRole }) };
  vault.done();
  const signing = root.object("signing_key");
  const signingKey = { keyId: signing.string("key_id"), file: signing.file("file") };
  signing.done();
  const approvals = parseApprovalConfig(root.object("approvals"));
  const audit = auditConfig(root.optionalObject("audit"));
  const policyFile = root.file("policy");
  const http = root.address("http", brokerConfigDefaults.http);
  const reviewers = root.has("reviewers") ? reviewerApiConfig(root.object("reviewers")) : undefined;
  const stateSection = root.optionalObject("state");
  const retentionMs = stateSection?.duration("retention", brokerConfigDefaults.retention) ?? brokerDefaults.retentionMs;
  stateSection?.done();
  const notifications = root.has("notifications") ? parseNotificationsConfig(root.object("notifications")) : (root.optionalObject("notifications"), noNotifications);
  const config: BrokerConfig = {
    notifications,
    ...(reviewers === undefined ? {} : { reviewers }),
    nats: natsConfig,
    natsReplicas,
    vault: vaultConfig,
    signingKey,
    audit,
    approvals,
    policyFile,
    http: { host: http.host, port: http.port },
    replicaId: root.string("replica_id", `${hostname()}-${process.pid}`),
    takeoverAfterMs: root.duration("takeover_after", brokerConfigDefaults.takeoverAfter),
    heartbeatSilenceMs: root.duration("heartbeat_silence", brokerConfigDefaults.heartbeatSilence),
    retentionMs,
    logLevel: root.oneOf("log_level", ["trace", "debug", "info", "warn", "error", "silent"] as const, brokerConfigDefaults.logLevel),
  };
  root.done();
  return config;
}

/** Reads, parses and validates a broker config file. */
export async function loadBrokerConfig(path: string): Promise<BrokerConfig> {
  return parseBrokerConfig(await readConfigFile(path));
}

async function vaultToken(address: string, auth: VaultAuth): Promise<string> {
  if (auth.kind === "token") return auth.token;
  let response: Response;
  try {
    response = await fetch(`${address}/v1/auth/${auth.mount}/login`, { method: "POST", body: JSON.stringify({ role_id: auth.roleId, secret_id: auth.secretId }) });
  } catch (error) {
    throw new AirlockError(Code.Unavailable, `Vault at ${address} is unreachable for the AppRole login`, { cause: error });
  }
  if (!response.ok) throw new AirlockError(Code.Unauthenticated, `Vault refused the broker's AppRole login (status ${response.status})`);
  const body = (await response.json()) as { auth?: { client_token?: string } };
  const token = body.auth?.client_token;
  if (typeof token !== "string") throw new AirlockError(Code.Internal, "Vault's AppRole login returned no token");
  return token;
}

/** A running broker replica. */
export interface RunningBroker {
  readonly broker: Broker;
  /** The port of /metrics, health, the reviewers' API and the console. */
  readonly httpPort: number;
  /** `http://host:port` of the same. */
  readonly httpUrl: string;
  /** `host:port` of the reviewers' gRPC API, when configured. */
  readonly reviewerGrpcAddress?: string;
  close(): Promise<void>;
}

/** Reads an Ed25519 private key (PKCS#8 PEM); errors name the config field. */
async function readSigningKey(file: string, field: string): Promise<KeyObject> {
  let pem: string;
  try {
    pem = await readFile(file, "utf8");
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `cannot read the signing key ${file}`, { cause: error, details: { field } });
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(pem);
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `${file} is not a PEM private key`, { cause: error, details: { field } });
  }
  if (key.asymmetricKeyType !== "ed25519") throw new AirlockError(Code.InvalidArgument, "the signing key must be an Ed25519 private key", { details: { field } });
  return key;
}

/** Options of {@link startBroker}. */
export interface StartBrokerOptions {
  /** @default a logger named `broker` at the config's `log_level` */
  readonly log?: Logger;
  /**
   * Requests whose approval needs a step-up: chat (the Teams bot) offers them only
   * "Review and approve" and refuses an approval from chat with `step_up_required`.
   * @default no request (break-glass is always treated so)
   */
  readonly requiresStepUp?: StepUpPredicate;
}

/** Starts a broker replica from a validated config: NATS, Vault, signing keys, consumers, health endpoints. */
export async function startBroker(config: BrokerConfig, options: StartBrokerOptions = {}): Promise<RunningBroker> {
  const log = options.log ?? createLogger({ name: "broker", level: config.logLevel });
  const privateKey = await readSigningKey(config.signingKey.file, "signing_key.file");
  const auditSigner = config.audit.signingKey === undefined ? { keyId: config.signingKey.keyId, privateKey } : { keyId: config.audit.signingKey.keyId, privateKey: await readSigningKey(config.audit.signingKey.file, "audit.signing_key.file") };
  const auditKeys = config.audit.keyringFile === undefined ? AuditKeyRing.ofSigner(auditSigner) : await AuditKeyRing.load(config.audit.keyringFile);
  if (!auditKeys.keyIds().includes(auditSigner.keyId)) {
    throw new AirlockError(Code.InvalidArgument, `the audit key ring ${config.audit.keyringFile ?? ""} does not hold this replica's audit key ${JSON.stringify(auditSigner.keyId)}`, { details: { field: "audit.keyring" } });
  }
  const checkpointSettings = config.audit.checkpoints;
  if (checkpointSettings === undefined) log.warn("no audit.checkpoints: the trail is signed, but nothing outside NATS can show it was truncated or replaced");
  const token = await vaultToken(config.vault.address, config.vault.auth);
  const vault = createVaultClient({ address: config.vault.address, token });
  const tokenRole = config.vault.tokenRole;
  if (tokenRole?.configure === true) {
    await configureTokenRole(vault, tokenRole).catch((error: unknown) => {
      throw new AirlockError(Code.FailedPrecondition, `cannot write the token role ${tokenRole.name} (vault.token_role.configure)`, { cause: error, details: { field: "vault.token_role" } });
    });
    log.info({ role: tokenRole.name }, "per-action token role written");
  }
  // Built before anything starts, so a bad auth config leaves nothing running.
  const auth = config.reviewers === undefined ? undefined : new ReviewerAuthenticator(config.reviewers.auth);
  if (auth?.devMode === true) log.warn("reviewer API in DEV MODE: fixed reviewer tokens from the config are accepted; never run this in production");
  const sessionSettings = config.reviewers?.sessions;
  const sessions =
    sessionSettings === undefined
      ? undefined
      : {
          sealer: new Sealer([
            await readSessionKey(sessionSettings.keyFile, "reviewers.sessions.key_file"),
            ...(await Promise.all(sessionSettings.previousKeyFiles.map((file) => readSessionKey(file, "reviewers.sessions.previous_key_files")))),
          ]),
          maxAgeMs: sessionSettings.maxAgeMs,
        };
  const sso = config.reviewers?.sso === undefined ? undefined : new SsoClient(config.reviewers.sso);
  // noAsyncTraces: nats.js would otherwise build an Error (a stack capture) for every request and
  // publish in case it fails; that was the broker's largest single CPU cost per action.
  const nc = await connectNats(config.nats, {
    role: { kind: "broker" },
    name: `airlock-broker-${config.replicaId}`,
    extra: { maxReconnectAttempts: -1, reconnectTimeWait: 250, noAsyncTraces: true },
  });
  let watcher: PolicyWatcher;
  try {
    watcher = await PolicyWatcher.start(config.policyFile, {
      onReload: () => log.info({ policy: config.policyFile }, "policy reloaded"),
      onError: (error) => log.error({ policy: config.policyFile, reason: error.rawMessage }, "policy change refused; keeping the last good policy"),
    });
  } catch (error) {
    await nc.close();
    throw error;
  }
  // Where the bot's Slack messages and Teams cards are, in KV: the replica that decides a request
  // updates the messages whichever replica posted them.
  const notifications = config.notifications;
  let positions: KvChatPositions | undefined;
  if (notifications.slack?.transport.kind === "web_api" || notifications.teams?.bot?.sending !== undefined) {
    try {
      positions = await KvChatPositions.open(nc, { ensure: { replicas: config.natsReplicas, log }, log });
    } catch (error) {
      await watcher.close();
      await nc.close();
      throw error;
    }
  }
  let connected = true;
  // Notifications hang off the approval path but never slow it: each notify call only enqueues.
  // Chat may not approve what needs a step-up: the broker's own rule (`approve.step_up`) or the configured risk floor.
  const stepUpSettings = config.reviewers?.stepUp;
  const requiresStepUp: StepUpPredicate | undefined =
    options.requiresStepUp ?? (stepUpSettings === undefined ? undefined : (record) => record.request !== undefined && stepUpNeed(record.request, { approve: true }, stepUpSettings.minRisk).required);
  // A message posted while another replica decided its request is updated by its poster, from the stored record.
  const started: { broker?: Broker } = {};
  const notifier = new ReviewNotifier({
    config: notifications,
    log,
    currentRecord: async (requestId) => started.broker?.latest(requestId),
    ...(positions === undefined ? {} : { positions }),
    ...(requiresStepUp === undefined ? {} : { requiresStepUp }),
  });
  const broker = await Broker.start({
    onEvents: (events, record) => {
      for (const event of events) notifier.notifyEvent(record, event);
    },
    nc,
    replicas: config.natsReplicas,
    issuer: new CredentialIssuer({ vault, logger: log, ...(tokenRole === undefined ? {} : { tokenRole: tokenRole.name }) }),
    signingKey: { keyId: config.signingKey.keyId, privateKey },
    auditSigner,
    auditKeys,
    ...(checkpointSettings === undefined
      ? {}
      : { checkpoints: { sink: new DirectoryCheckpointSink(checkpointSettings.sink.dir, checkpointSettings.sink.periodMs), everyEvents: checkpointSettings.everyEvents, intervalMs: checkpointSettings.intervalMs } }),
    approvals: config.approvals,
    ...(config.reviewers?.stepUp?.minRisk === undefined ? {} : { stepUpMinRisk: config.reviewers.stepUp.minRisk }),
    policy: () => watcher.current(),
    replicaId: config.replicaId,
    orphanAfterMs: config.takeoverAfterMs,
    heartbeatSilenceMs: config.heartbeatSilenceMs,
    retentionMs: config.retentionMs,
    log,
  }).catch(async (error: unknown) => {
    await notifier.close();
    await watcher.close();
    await nc.close();
    throw error;
  });
  started.broker = broker;
  void (async () => {
    for await (const status of nc.status()) {
      if (status.type === "disconnect") connected = false;
      if (status.type === "reconnect") {
        connected = true;
        broker.metrics.natsReconnects.inc();
      }
    }
  })();
  const ready = { nats: () => connected && !nc.isClosed() };

  let grpc: RunningReviewerGrpc | undefined;
  let app;
  try {
    const stepUpConfig = config.reviewers?.stepUp;
    const stepUp = stepUpConfig === undefined ? undefined : await StepUpService.open(nc, stepUpConfig, auth, { replicas: config.natsReplicas, log });
    const slack = notifier.slack;
    // Deny-reason modals are bound to their request and user in KV, so any replica takes the submission.
    const slackTickets = slack === undefined ? undefined : await KvSlackModalTickets.open(nc, { ensure: { replicas: config.natsReplicas, log } });
    const teams = notifier.teams;
    app = await createBrokerHttpApp({
      broker,
      nc,
      approvals: config.approvals,
      log,
      registry: broker.metrics.registry,
      ready,
      ...(auth === undefined ? {} : { auth, ratePerMinute: config.reviewers?.ratePerMinute ?? brokerConfigDefaults.ratePerMinute }),
      ...(slack === undefined ? {} : { slack: (rawBody, headers, decide) => slack.handleInteraction(rawBody, headers, decide, slackTickets === undefined ? {} : { tickets: slackTickets }) }),
      ...(teams === undefined ? {} : { teams: (activity, headers, target) => teams.handleActivity(activity, headers, target) }),
      ...(config.reviewers?.publicOrigin === undefined ? {} : { publicOrigin: config.reviewers.publicOrigin }),
      ...(stepUp === undefined ? {} : { stepUp }),
      ...(sessions === undefined ? {} : { sessions }),
      ...(sso === undefined ? {} : { sso }),
    });
    await app.listen({ host: config.http.host, port: config.http.port });
    if (auth !== undefined && config.reviewers?.grpc !== undefined) {
      const { host, port } = config.reviewers.grpc;
      grpc = await startReviewerGrpc({ broker, nc, approvals: config.approvals, auth, log, listen: `${host}:${port}`, ratePerMinute: config.reviewers.ratePerMinute });
    }
  } catch (error) {
    await app?.close();
    await broker.close();
    await notifier.close();
    await watcher.close();
    await nc.close();
    const where = app?.server.listening === true && config.reviewers?.grpc !== undefined ? `the reviewers' gRPC API on ${config.reviewers.grpc.host}:${config.reviewers.grpc.port}` : `the broker's HTTP API on ${config.http.host}:${config.http.port}`;
    throw new AirlockError(Code.Unavailable, `cannot serve ${where}`, { cause: error });
  }
  const address = app.server.address();
  const httpPort = typeof address === "object" && address !== null ? address.port : config.http.port;
  const httpUrl = `http://${config.http.host.includes(":") ? `[${config.http.host}]` : config.http.host}:${httpPort}`;
  log.info({ replica: config.replicaId, http: httpUrl, console: `${httpUrl}/console/`, reviewerGrpc: grpc?.address }, "broker running");
  const httpApp = app;
  return {
    broker,
    httpPort,
    httpUrl,
    ...(grpc === undefined ? {} : { reviewerGrpcAddress: grpc.address }),
    async close() {
      await grpc?.close();
      await httpApp.close();
      await broker.close();
      await notifier.close();
      await watcher.close();
      await nc.close();
    },
  };
}

