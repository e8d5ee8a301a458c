import { readFile } from "node:fs/promises";
import type { Server } from "node:http";
import { createPrivateKey } from "node:crypto";
import { hostname } from "node:os";
import { connect } from "@nats-io/transport-node";
import { type ConfigReader, readConfigFile } from "../common/config.js";
import { AirlockError, Code } from "../common/errors.js";
import { startHealthServer } from "../common/health.js";
import { createLogger, type Logger } from "../common/logger.js";
import { createVaultClient } from "../common/vault.js";
import { CredentialIssuer } from "./credentials.js";
import { type ApprovalConfig, parseApprovalConfig } from "./rules.js";
import { Broker } from "./service.js";

/** How the broker authenticates to Vault: a union keyed by `kind`. */
export type VaultAuth = { readonly kind: "token"; readonly token: string } | { readonly kind: "approle"; readonly roleId: string; readonly secretId: string; readonly mount: string };

/** The broker's whole configuration, validated. */
export interface BrokerConfig {
  readonly nats: { readonly url: string; readonly token?: string };
  readonly vault: { readonly address: string; readonly auth: VaultAuth };
  /** The Ed25519 private key (PKCS#8 PEM file) decisions are signed with, and its key id. */
  readonly signingKey: { readonly keyId: string; readonly file: string };
  readonly approvals: ApprovalConfig;
  /** Where /metrics, /healthz and /readyz are served. @default 127.0.0.1:9465 */
  readonly http: { readonly host: string; readonly port: number };
  /** @default the machine's host name and the process id */
  readonly replicaId: string;
  /** @default info */
  readonly logLevel: string;
}

/** Defaults of {@link BrokerConfig}. */
export const brokerConfigDefaults = { http: "127.0.0.1:9465", logLevel: "info", approleMount: "approle" } as const;

function vaultAuth(reader: ConfigReader): VaultAuth {
  const kind = reader.oneOf("kind", ["token", "approle"] as const);
  const auth: VaultAuth =
    kind === "token"
      ? { kind, token: reader.string("token") }
      : { kind, roleId: reader.string("role_id"), secretId: reader.string("secret_id"), mount: reader.string("mount", brokerConfigDefaults.approleMount) };
  reader.done();
  return auth;
}

/** Validates a parsed broker config; every error names the field. */
export function parseBrokerConfig(root: ConfigReader): BrokerConfig {
  const nats = root.object("nats");
  const natsConfig = { url: nats.string("url"), ...(nats.has("token") ? { token: nats.string("token") } : {}) };
  nats.done();
  const vault = root.object("vault");
  const vaultConfig = { address: vault.string("address"), auth: vaultAuth(vault.object("auth")) };
  vault.done();
  const signing = root.object("signing_key");
  const signingKey = { keyId: signing.string("key_id"), file: signing.file("file") };
  signing.done();
  const approvals = parseApprovalConfig(root.object("approvals"));
  const http = root.address("http", brokerConfigDefaults.http);
  const config: BrokerConfig = {
    nats: natsConfig,
    vault: vaultConfig,
    signingKey,
    approvals,
    http: { host: http.host, port: http.port },
    replicaId: root.string("replica_id", `${hostname()}-${process.pid}`),
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
  readonly httpPort: number;
  close(): Promise<void>;
}

/** Starts a broker replica from a validated config: NATS, Vault, signing key, consumers, health endpoints. */
export async function startBroker(config: BrokerConfig, options: { log?: Logger } = {}): Promise<RunningBroker> {
  const log = options.log ?? createLogger({ name: "broker", level: config.logLevel });
  let signingPem: string;
  try {
    signingPem = await readFile(config.signingKey.file, "utf8");
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `cannot read the signing key ${config.signingKey.file}`, { cause: error, details: { field: "signing_key.file" } });
  }
  const privateKey = createPrivateKey(signingPem);
  if (privateKey.asymmetricKeyType !== "ed25519") throw new AirlockError(Code.InvalidArgument, "the signing key must be an Ed25519 private key", { details: { field: "signing_key.file" } });
  const token = await vaultToken(config.vault.address, config.vault.auth);
  let nc;
  try {
    nc = await connect({ servers: config.nats.url, maxReconnectAttempts: -1, reconnectTimeWait: 250, name: `airlock-broker-${config.replicaId}`, ...(config.nats.token === undefined ? {} : { token: config.nats.token }) });
  } catch (error) {
    throw new AirlockError(Code.Unavailable, `cannot connect to NATS at ${config.nats.url}`, { cause: error });
  }
  let connected = true;
  const broker = await Broker.start({
    nc,
    issuer: new CredentialIssuer({ vault: createVaultClient({ address: config.vault.address, token }), logger: log }),
    signingKey: { keyId: config.signingKey.keyId, privateKey },
    approvals: config.approvals,
    replicaId: config.replicaId,
    log,
  }).catch(async (error: unknown) => {
    await nc.close();
    throw error;
  });
  void (async () => {
    for await (const status of nc.status()) {
      if (status.type === "disconnect") connected = false;
      if (status.type === "reconnect") {
        connected = true;
        broker.metrics.natsReconnects.inc();
      }
    }
  })();
  const health: { server: Server; port: number } = await startHealthServer(broker.metrics.registry, { nats: () => connected && !nc.isClosed() }, config.http.host, config.http.port);
  log.info({ replica: config.replicaId, http: `${config.http.host}:${health.port}` }, "broker running");
  return {
    broker,
    httpPort: health.port,
    async close() {
      await new Promise<void>((resolve) => {
        health.server.close(() => resolve());
        health.server.closeAllConnections();
      });
      await broker.close();
      await nc.close();
    },
  };
}

