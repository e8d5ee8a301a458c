import { readFileSync } from "node:fs";
import { connect, type ConnectionOptions, errors as natsErrors, type NatsConnection, nkeyAuthenticator } from "@nats-io/transport-node";
import { type BusRole, busInboxPrefix } from "./bus.js";
import type { ConfigReader } from "./config.js";
import { AirlockError, Code } from "./errors.js";
import { ensureDefaults, natsReplicaChoices } from "./subjects.js";

/**
 * How a part reaches NATS: the server URLs, the part's own credential (an nkey
 * seed in a file, so it appears in no command line, environment or log), and
 * the CA that the server's TLS certificate must chain to.
 */
export interface NatsConnectionConfig {
  /** `tls://host:port` (or `nats://`, upgraded to TLS when the server requires it). */
  readonly servers: readonly string[];
  /** The credential, picked by `kind`. Nothing connects anonymously. */
  readonly auth: { readonly kind: "nkey"; readonly seedFile: string };
  /** The CA (PEM file) the server certificate is checked against; a client certificate is optional. Absent: the system's CAs. */
  readonly tls?: { readonly caFile?: string; readonly certFile?: string; readonly keyFile?: string };
}

/** Parses a config's `nats` section: `url` (or `urls`), `auth: { kind: nkey, seed_file }`, optional `tls: { ca_file, cert_file, key_file }`. */
export function parseNatsConfig(reader: ConfigReader): NatsConnectionConfig {
  const servers = reader.has("urls") ? reader.strings("urls") : [reader.string("url")];
  if (servers.length === 0) throw reader.fail(`${reader.path}.urls`, "must name at least one server");
  for (const [index, server] of servers.entries()) {
    if (!/^(nats|tls):\/\/[^\s/]+$/.test(server)) throw reader.fail(reader.has("urls") ? `${reader.path}.urls[${index}]` : `${reader.path}.url`, "must be tls://host:port or nats://host:port, without credentials or a path");
    if (server.includes("@")) throw reader.fail(`${reader.path}.url`, "must not carry credentials: use auth.seed_file");
  }
  const auth = reader.object("auth");
  auth.oneOf("kind", ["nkey"] as const);
  const seedFile = auth.file("seed_file");
  auth.done();
  const tlsReader = reader.optionalObject("tls");
  let tls: NatsConnectionConfig["tls"];
  if (tlsReader !== undefined) {
    const caFile = tlsReader.optionalFile("ca_file");
    const certFile = tlsReader.optionalFile("cert_file");
    const keyFile = tlsReader.optionalFile("key_file");
    if ((certFile === undefined) !== (keyFile === undefined)) throw tlsReader.fail(`${tlsReader.path}.cert_file`, "cert_file and key_file go together");
    tls = { ...(caFile === undefined ? {} : { caFile }), ...(certFile === undefined ? {} : { certFile }), ...(keyFile === undefined ? {} : { keyFile }) };
    tlsReader.done();
  }
  reader.done();
  return { servers, auth: { kind: "nkey", seedFile }, ...(tls === undefined ? {} : { tls }) };
}

/**
 * The `replicas` of a config's `nats` section (read before {@link parseNatsConfig}, by the
 * parts that create streams and buckets): how many copies a JetStream cluster keeps of each,
 * 1 (the default, a single server), 3 or 5. An even count buys no extra fault tolerance.
 */
export function parseNatsReplicas(reader: ConfigReader): number {
  const replicas = reader.integer("replicas", ensureDefaults.replicas, 1, 5);
  if (!(natsReplicaChoices as readonly number[]).includes(replicas)) throw reader.fail(`${reader.path}.replicas`, `must be one of ${natsReplicaChoices.join(", ")}`);
  return replicas;
}

/**
 * How the NATS server refused something, found anywhere in an error's cause chain (nats.js
 * wraps the server's answer): `permissions` for a publish or subscribe outside the
 * credential's rights, `authorization` for a refused credential; undefined when it was not
 * a refusal (a timeout, a closed connection).
 */
export function natsRefusal(error: unknown): "permissions" | "authorization" | undefined {
  for (let cause: unknown = error; cause instanceof Error; cause = cause.cause) {
    if (cause instanceof natsErrors.PermissionViolationError) return "permissions";
    if (cause instanceof natsErrors.AuthorizationError) return "authorization";
  }
  return undefined;
}

/** The `nats` section of a config file for a connection config: the inverse of {@link parseNatsConfig}. */
export function natsConfigSection(config: NatsConnectionConfig): Record<string, unknown> {
  const tls = config.tls;
  return {
    ...(config.servers.length === 1 ? { url: config.servers[0] } : { urls: [...config.servers] }),
    auth: { kind: config.auth.kind, seed_file: config.auth.seedFile },
    ...(tls === undefined ? {} : { tls: { ...(tls.caFile === undefined ? {} : { ca_file: tls.caFile }), ...(tls.certFile === undefined ? {} : { cert_file: tls.certFile, key_file: tls.keyFile }) } }),
  };
}

/** Options of {@link connectNats}. */
export interface ConnectNatsOptions {
  /** The role the credential is for: it picks the reply-inbox prefix the server lets this role read. */
  readonly role: BusRole;
  /** The connection's name on the server (monitoring). */
  readonly name: string;
  /** Extra nats.js options (reconnect policy, timeouts). */
  readonly extra?: Partial<ConnectionOptions>;
}

function readSeed(file: string): Uint8Array {
  try {
    return new TextEncoder().encode(readFileSync(file, "utf8").trim());
  } catch (error) {
    throw new AirlockError(Code.FailedPrecondition, `cannot read the NATS credential ${file}`, { cause: error, details: { field: "nats.auth.seed_file" } });
  }
}

/**
 * Connects with the part's own credential over TLS. The seed is read from its
 * file at every (re)connect, so a replaced file takes effect on the next one.
 * A refused credential is UNAUTHENTICATED, anything else UNAVAILABLE; neither
 * message carries the seed.
 */
export async function connectNats(config: NatsConnectionConfig, options: ConnectNatsOptions): Promise<NatsConnection> {
  const seedFile = config.auth.seedFile;
  readSeed(seedFile); // a missing or unreadable file fails here, naming the field, not deep in a reconnect
  const tls = config.tls;
  try {
    return await connect({
      servers: [...config.servers],
      name: options.name,
      inboxPrefix: busInboxPrefix(options.role),
      authenticator: nkeyAuthenticator(() => readSeed(seedFile)),
      tls: { ...(tls?.caFile === undefined ? {} : { caFile: tls.caFile }), ...(tls?.certFile === undefined ? {} : { certFile: tls.certFile }), ...(tls?.keyFile === undefined ? {} : { keyFile: tls.keyFile }) },
      ...options.extra,
    });
  } catch (error) {
    const where = config.servers.join(", ");
    if (natsRefusal(error) === "authorization") {
      throw new AirlockError(Code.Unauthenticated, `NATS at ${where} refused this credential (${seedFile}): revoked, or not one of the server's users`, { cause: error });
    }
    throw new AirlockError(Code.Unavailable, `cannot connect to NATS at ${where}`, { cause: error });
  }
}
