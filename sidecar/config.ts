import { AirlockError, Code } from "../common/errors.js";
import { type ConfigReader, parseAddress, readConfigFile } from "../common/config.js";
import { type NatsConnectionConfig, parseNatsConfig } from "../common/nats.js";
import { hostPattern } from "../common/subjects.js";
import type { AgentAuthOptions } from "./identity.js";
import { readLimits, type SidecarLimits, sidecarLimitDefaults } from "./h2/limits.js";

/**
 * How the sidecar reaches an upstream that receives injected credentials:
 * TLS (optionally with a client certificate), or plaintext only over loopback,
 * a unix socket, or with an explicit `insecure: true` (warned about at start).
 */
export type UpstreamTransport =
  | { readonly kind: "tls"; readonly ca?: string; readonly cert?: string; readonly key?: string; readonly serverName?: string }
  | { readonly kind: "plaintext"; readonly why: "loopback" | "unix" | "insecure" };

/** One upstream service the sidecar fronts. */
export interface UpstreamConfig {
  readonly name: string;
  /** `host:port`, or `unix:/path/to.sock`. */
  readonly address: string;
  readonly transport: UpstreamTransport;
  readonly descriptorSets: readonly string[];
  readonly services?: readonly string[];
}

/** The sidecar's whole configuration, validated. */
export interface SidecarConfig {
  /** Where agents connect. @default 127.0.0.1:7443 */
  readonly listen: { readonly host: string; readonly port: number };
  /** TLS for agents; with `clientCa`, client certificates are required and verified (mTLS). */
  readonly tls?: { readonly cert: string; readonly key: string; readonly clientCa?: string };
  readonly upstreams: readonly UpstreamConfig[];
  /** NATS, with this host's own credential. */
  readonly nats: NatsConnectionConfig;
  readonly vault: { readonly address: string };
  /** Broker public keys (PEM file paths) by key id. */
  readonly brokerKeys: Readonly<Record<string, string>>;
  /** This host's name: one NATS subject token. */
  readonly host: string;
  readonly policyFile: string;
  readonly agentAuth: readonly AgentAuthOptions[];
  /** Every data-plane limit (`sidecar/h2/limits.ts`). */
  readonly limits: SidecarLimits;
  /** Where /metrics, /healthz and /readyz are served. @default 127.0.0.1:9464 */
  readonly metrics: { readonly host: string; readonly port: number };
  /** How often running approved actions are reported alive to the brokers, in ms (`heartbeat_interval`). @default 5000 */
  readonly heartbeatIntervalMs: number;
  /** @default info */
  readonly logLevel: string;
}

/** Defaults of {@link SidecarConfig}. */
export const sidecarConfigDefaults = {
  listen: "127.0.0.1:7443",
  metrics: "127.0.0.1:9464",
  maxMessageBytes: sidecarLimitDefaults.maxMessageBytes,
  maxBufferedMessages: sidecarLimitDefaults.maxBufferedMessages,
  logLevel: "info",
  heartbeatInterval: "5s",
} as const;

function agentAuth(entry: ConfigReader): AgentAuthOptions {
  const kind = entry.oneOf("kind", ["jwt", "mtls"] as const);
  if (kind === "mtls") {
    const prefix = entry.optionalString("on_behalf_of_prefix");
    entry.done();
    return prefix === undefined ? { kind } : { kind, onBehalfOfPrefix: prefix };
  }
  const keys = entry.object("keys");
  const keysKind = keys.oneOf("kind", ["jwks_url", "static"] as const);
  const keySource = keysKind === "jwks_url" ? { kind: keysKind, url: keys.string("url") } : { kind: keysKind, publicKeys: keys.strings("public_keys") };
  keys.done();
  const options: AgentAuthOptions = {
    kind,
    issuer: entry.string("issuer"),
    audience: entry.string("audience"),
    keys: keySource,
    ...(entry.has("delegation") ? { delegation: entry.oneOf("delegation", ["claim", "token_exchange"] as const) } : {}),
    ...(entry.has("unattended") ? { unattended: entry.boolean("unattended", false) } : {}),
    ...(entry.has("human_claim") ? { humanClaim: entry.string("human_claim") } : {}),
    ...(entry.has("clock_tolerance_sec") ? { clockToleranceSec: entry.integer("clock_tolerance_sec", 30, 0, 3600) } : {}),
    ...(entry.has("algorithms") ? { algorithms: entry.strings("algorithms") } : {}),
  };
  entry.done();
  return options;
}

/** Loopback hosts: plaintext to them never leaves the machine. */
function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** An upstream's address and transport: `tls`, or plaintext to loopback / a unix socket / with `insecure: true`. */
function upstreamTransport(entry: ConfigReader): { address: string; transport: UpstreamTransport } {
  const text = entry.string("address");
  const field = (key: string) => (entry.path === "" ? key : `${entry.path}.${key}`);
  const unix = text.startsWith("unix:") ? text.slice("unix:".length) : undefined;
  const address = unix === undefined ? entry.address("address").text : text;
  if (unix !== undefined && !unix.startsWith("/")) throw entry.fail(field("address"), "a unix socket address is unix:/absolute/path");
  const tlsReader = entry.optionalObject("tls");
  const insecure = entry.boolean("insecure", false);
  if (tlsReader !== undefined) {
    if (insecure) throw entry.fail(field("insecure"), "cannot be set together with tls");
    if (unix !== undefined) throw entry.fail(field("tls"), "is not used over a unix socket");
    const ca = tlsReader.optionalFile("ca");
    const cert = tlsReader.optionalFile("cert");
    const key = tlsReader.optionalFile("key");
    const serverName = tlsReader.optionalString("server_name");
    if ((cert === undefined) !== (key === undefined)) throw entry.fail(field("tls"), "a client certificate needs both cert and key");
    tlsReader.done();
    return {
      address,
      transport: { kind: "tls", ...(ca === undefined ? {} : { ca }), ...(cert === undefined ? {} : { cert }), ...(key === undefined ? {} : { key }), ...(serverName === undefined ? {} : { serverName }) },
    };
  }
  if (unix !== undefined) return { address, transport: { kind: "plaintext", why: "unix" } };
  if (isLoopback(parseAddress(address)?.host ?? "")) return { address, transport: { kind: "plaintext", why: "loopback" } };
  if (!insecure) {
    throw entry.fail(
      field("address"),
      `${address} is not loopback: the injected credentials would cross the network in cleartext. Configure tls (ca, and cert/key for a client certificate), or set insecure: true to accept that`,
    );
  }
  return { address, transport: { kind: "plaintext", why: "insecure" } };
}

/** Validates a parsed sidecar config; every error names the field. */
export function parseSidecarConfig(root: ConfigReader): SidecarConfig {
  const listen = root.address("listen", sidecarConfigDefaults.listen);
  const tlsReader = root.optionalObject("tls");
  let tls: SidecarConfig["tls"];
  if (tlsReader !== undefined) {
    const clientCa = tlsReader.optionalFile("client_ca");
    tls = { cert: tlsReader.file("cert"), key: tlsReader.file("key"), ...(clientCa === undefined ? {} : { clientCa }) };
    tlsReader.done();
  }
  const names = new Set<string>();
  const upstreams = root.list("upstreams").map((entry) => {
    const name = entry.string("name");
    if (names.has(name)) throw entry.fail(`${entry.path}.name`, `repeats the upstream name ${name}`);
    names.add(name);
    const services = entry.has("services") ? entry.strings("services") : undefined;
    const { address, transport } = upstreamTransport(entry);
    const upstream: UpstreamConfig = {
      name,
      address,
      transport,
      descriptorSets: entry.files("descriptor_sets"),
      ...(services === undefined ? {} : { services }),
    };
    entry.done();
    return upstream;
  });
  const natsConfig = parseNatsConfig(root.object("nats"));
  const vault = root.object("vault");
  const vaultConfig = { address: vault.string("address") };
  vault.done();
  const keys = root.object("broker_keys");
  const brokerKeys: Record<string, string> = {};
  for (const keyId of keys.keys()) brokerKeys[keyId] = keys.file(keyId);
  if (Object.keys(brokerKeys).length === 0) throw root.fail("broker_keys", "must name at least one broker public key");
  keys.done();
  const host = root.string("host");
  if (!hostPattern.test(host)) throw root.fail("host", "must be letters, digits, '-' or '_' (it is a NATS subject token)");
  const limitsConfig = readLimits(root.optionalObject("limits"));
  const metrics = root.optionalObject("metrics");
  const metricsListen = metrics?.address("listen", sidecarConfigDefaults.metrics) ?? parseAddress(sidecarConfigDefaults.metrics);
  if (metricsListen === undefined) throw root.fail("metrics.listen", "must be host:port");
  metrics?.done();
  const config: SidecarConfig = {
    listen: { host: listen.host, port: listen.port },
    ...(tls === undefined ? {} : { tls }),
    upstreams,
    nats: natsConfig,
    vault: vaultConfig,
    brokerKeys,
    host,
    policyFile: root.file("policy"),
    agentAuth: root.list("agent_auth", false).map(agentAuth),
    limits: limitsConfig,
    metrics: { host: metricsListen.host, port: metricsListen.port },
    heartbeatIntervalMs: root.duration("heartbeat_interval", sidecarConfigDefaults.heartbeatInterval),
    logLevel: root.oneOf("log_level", ["trace", "debug", "info", "warn", "error"] as const, sidecarConfigDefaults.logLevel),
  };
  root.done();
  return config;
}

/** Reads, parses and validates a sidecar config file. */
export async function loadSidecarConfig(path: string): Promise<SidecarConfig> {
  const root = await readConfigFile(path);
  try {
    return parseSidecarConfig(root);
  } catch (error) {
    throw AirlockError.from(error, Code.InvalidArgument);
  }
}
