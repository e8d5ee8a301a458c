import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { access, chmod, mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { createUser } from "@nats-io/nkeys";
import { airlockAccount, busAccount, busLinks, type BusRole, busPermissions } from "./bus.js";
import { AirlockError, Code } from "./errors.js";
import { hostPattern } from "./subjects.js";

const run = promisify(execFile);

/**
 * A deployment's NATS security material, in one directory an operator keeps:
 *
 * - `ca.pem` / `ca.key`: the throwaway CA the server certificate is issued by (clients trust `ca.pem`);
 * - `server.pem` / `server.key`: the server's TLS certificate;
 * - `users/broker.nk`, `users/audit.nk`, `users/admin.nk`: the seeds of the fixed roles;
 * - `hosts/<host>.nk`: one seed per sidecar host, each revocable alone;
 * - `registry.json`: every role's and host's public key, and the revoked ones;
 * - `auth.conf`: the server's users and their permissions, generated from the registry
 *   (the server reads it through `include`; a reload applies a change).
 *
 * Seeds and keys are written mode 0600 and never printed.
 */
export interface BusRegistry {
  readonly roles: { readonly broker: string; readonly audit: string; readonly admin: string };
  readonly hosts: Readonly<Record<string, string>>;
  readonly revoked: readonly { readonly host: string; readonly publicKey: string; readonly at: string }[];
}

/** File names inside a material directory. */
export const busMaterialFiles = {
  caCert: "ca.pem",
  caKey: "ca.key",
  serverCert: "server.pem",
  serverKey: "server.key",
  registry: "registry.json",
  authConf: "auth.conf",
  serverConf: "nats-server.conf",
} as const;

/** The seed file of a role in a material directory. */
export function busSeedFile(dir: string, role: BusRole): string {
  return role.kind === "sidecar" ? join(dir, "hosts", `${role.host}.nk`) : join(dir, "users", `${role.kind}.nk`);
}

/** Options of {@link initBusMaterial}. */
export interface InitBusMaterialOptions {
  /** Extra DNS names or IP addresses the server certificate is valid for. @default [] (localhost, 127.0.0.1 and ::1 are always in) */
  readonly serverNames?: readonly string[];
  /** How long the CA and server certificate are valid, in days. @default 825 */
  readonly days?: number;
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

async function writeSecret(path: string, text: string): Promise<void> {
  await writeFile(`${path}.tmp`, text, { mode: 0o600 });
  await chmod(`${path}.tmp`, 0o600);
  await rename(`${path}.tmp`, path);
}

async function openssl(cwd: string, args: readonly string[]): Promise<void> {
  try {
    await run("openssl", args, { cwd });
  } catch (error) {
    throw new AirlockError(Code.FailedPrecondition, "openssl failed while making the NATS TLS certificates (is the openssl command installed?)", { cause: error });
  }
}

function newSeed(): { seed: string; publicKey: string } {
  const pair = createUser();
  return { seed: new TextDecoder().decode(pair.getSeed()), publicKey: pair.getPublicKey() };
}

async function readRegistry(dir: string): Promise<BusRegistry> {
  let text: string;
  try {
    text = await readFile(join(dir, busMaterialFiles.registry), "utf8");
  } catch (error) {
    throw new AirlockError(Code.FailedPrecondition, `${dir} holds no NATS security material: run 'airlock nats init --dir ${dir}' first`, { cause: error, details: { dir } });
  }
  return JSON.parse(text) as BusRegistry;
}

async function writeRegistry(dir: string, registry: BusRegistry): Promise<void> {
  await writeFile(join(dir, `${busMaterialFiles.registry}.tmp`), `${JSON.stringify(registry, null, 2)}\n`);
  await rename(join(dir, `${busMaterialFiles.registry}.tmp`), join(dir, busMaterialFiles.registry));
  await writeFile(join(dir, `${busMaterialFiles.authConf}.tmp`), renderAuthConfig(registry));
  await rename(join(dir, `${busMaterialFiles.authConf}.tmp`), join(dir, busMaterialFiles.authConf));
}

function quoted(values: readonly string[]): string {
  return `[${values.map((value) => JSON.stringify(value)).join(", ")}]`;
}

function userBlock(publicKey: string, role: BusRole): string {
  const permissions = busPermissions(role);
  const label = role.kind === "sidecar" ? `the sidecar of host ${role.host}` : role.kind;
  return [
    `      # ${label}`,
    `      { nkey: ${publicKey}, permissions: {`,
    `          publish: { allow: ${quoted(permissions.publish.allow)} }`,
    `          subscribe: { allow: ${quoted(permissions.subscribe.allow)} }`,
    `      } }`,
  ].join("\n");
}

/** An untrusted role's account: its one user and its imports from the Airlock account. */
function linkedAccount(publicKey: string, role: BusRole): string {
  const imports = busLinks(role).map((link) => `      { ${link.kind}: { account: ${airlockAccount}, subject: ${JSON.stringify(link.subject)} } }`);
  return [`  ${JSON.stringify(busAccount(role))}: {`, "    users: [", userBlock(publicKey, role), "    ]", "    imports: [", ...imports, "    ]", "  }"].join("\n");
}

/**
 * The server's accounts: the Airlock account (JetStream, the broker and admin
 * users) exporting to each untrusted account exactly its links, and one account
 * per sidecar host and for the audit reader, each with one nkey user and its
 * permissions. There is no user without a key and no `no_auth_user`, so
 * nothing connects anonymously.
 */
export function renderAuthConfig(registry: BusRegistry): string {
  const linked: [string, BusRole][] = [
    [registry.roles.audit, { kind: "audit" }],
    ...Object.entries(registry.hosts)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([host, publicKey]): [string, BusRole] => [publicKey, { kind: "sidecar", host }]),
  ];
  const exports = linked.flatMap(([, role]) =>
    busLinks(role).map((link) => `      { ${link.kind}: ${JSON.stringify(link.subject)}, accounts: [${JSON.stringify(busAccount(role))}]${link.responses === undefined ? "" : `, response_type: ${link.responses}`} }`),
  );
  const airlock = [
    `  ${airlockAccount}: {`,
    "    jetstream: enabled",
    "    users: [",
    userBlock(registry.roles.broker, { kind: "broker" }),
    userBlock(registry.roles.admin, { kind: "admin" }),
    "    ]",
    "    exports: [",
    ...exports,
    "    ]",
    "  }",
  ].join("\n");
  return `# Generated by airlock nats (init | add-host | revoke-host) from registry.json. Do not edit.\naccounts {\n${[airlock, ...linked.map(([key, role]) => linkedAccount(key, role))].join("\n")}\n}\n`;
}

/** Options of {@link renderServerConfig}. */
export interface ServerConfigOptions {
  /** The material directory (certificates and `auth.conf`). */
  readonly dir: string;
  /** `host:port` to listen on. */
  readonly listen: string;
  /** JetStream's store directory. */
  readonly storeDir: string;
  /** `host:port` of the monitoring endpoint (`/varz`, `/healthz`); off when absent. */
  readonly monitor?: string;
  /**
   * Makes the server one node of a JetStream cluster. Routes between nodes use TLS
   * with the material's CA both ways (`verify`), so only a holder of the server key
   * joins the cluster.
   */
  readonly cluster?: {
    /** The cluster's name (the same on every node). */
    readonly name: string;
    /** This node's unique name (JetStream places replicas by it). */
    readonly serverName: string;
    /** `host:port` the node listens on for routes from the other nodes. */
    readonly listen: string;
    /** The other nodes' route addresses, `host:port`. */
    readonly routes: readonly string[];
  };
}

/** A complete nats-server config: TLS required, JetStream on, and the users of `auth.conf`. */
export function renderServerConfig(options: ServerConfigOptions): string {
  const file = (name: string) => JSON.stringify(join(options.dir, name));
  const cluster = options.cluster;
  return [
    "# Generated by airlock nats init. TLS is required and every client is an nkey user of auth.conf.",
    `listen: ${JSON.stringify(options.listen)}`,
    ...(cluster === undefined ? [] : [`server_name: ${JSON.stringify(cluster.serverName)}`]),
    `jetstream { store_dir: ${JSON.stringify(options.storeDir)} }`,
    `tls { cert_file: ${file(busMaterialFiles.serverCert)}, key_file: ${file(busMaterialFiles.serverKey)}, timeout: 2 }`,
    ...(cluster === undefined
      ? []
      : [
          "cluster {",
          `  name: ${JSON.stringify(cluster.name)}`,
          `  listen: ${JSON.stringify(cluster.listen)}`,
          `  routes: [${cluster.routes.map((route) => JSON.stringify(`nats-route://${route}`)).join(", ")}]`,
          `  tls { cert_file: ${file(busMaterialFiles.serverCert)}, key_file: ${file(busMaterialFiles.serverKey)}, ca_file: ${file(busMaterialFiles.caCert)}, verify: true, timeout: 2 }`,
          "}",
        ]),
    ...(options.monitor === undefined ? [] : [`http: ${JSON.stringify(options.monitor)}`]),
    `include ${JSON.stringify(busMaterialFiles.authConf)}`,
    "",
  ].join("\n");
}

/**
 * Creates a deployment's NATS security material in `dir` (which must not hold
 * any yet): a CA and server certificate, seeds for the broker, audit-reader and
 * admin roles, the registry and `auth.conf`, and a `nats-server.conf` listening
 * on 127.0.0.1:4222 that an operator adapts. Hosts are added with {@link addBusHost}.
 */
export async function initBusMaterial(dir: string, options: InitBusMaterialOptions = {}): Promise<BusRegistry> {
  if (await exists(join(dir, busMaterialFiles.registry))) throw new AirlockError(Code.AlreadyExists, `${dir} already holds NATS security material`, { details: { dir } });
  await mkdir(join(dir, "users"), { recursive: true, mode: 0o700 });
  await mkdir(join(dir, "hosts"), { recursive: true, mode: 0o700 });
  const days = String(options.days ?? 825);
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  await openssl(dir, ["req", "-x509", ...ec, "-keyout", busMaterialFiles.caKey, "-out", busMaterialFiles.caCert, "-days", days, "-subj", "/CN=Airlock NATS CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
  const names = ["DNS:localhost", "IP:127.0.0.1", "IP:::1", ...(options.serverNames ?? []).map((name) => (/^[\d.]+$|:/.test(name) ? `IP:${name}` : `DNS:${name}`))];
  // clientAuth too: a cluster's nodes present this certificate to each other on their routes.
  await writeFile(join(dir, "server.ext"), `subjectAltName=${names.join(",")}\nextendedKeyUsage=serverAuth,clientAuth\n`);
  await openssl(dir, ["req", "-new", ...ec, "-keyout", busMaterialFiles.serverKey, "-out", "server.csr", "-subj", "/CN=nats"]);
  await openssl(dir, ["x509", "-req", "-in", "server.csr", "-CA", busMaterialFiles.caCert, "-CAkey", busMaterialFiles.caKey, "-set_serial", `0x${randomBytes(8).toString("hex")}`, "-days", days, "-out", busMaterialFiles.serverCert, "-extfile", "server.ext"]);
  await rm(join(dir, "server.csr"));
  await rm(join(dir, "server.ext"));
  await chmod(join(dir, busMaterialFiles.caKey), 0o600);
  await chmod(join(dir, busMaterialFiles.serverKey), 0o600);
  const roles: Record<string, string> = {};
  for (const kind of ["broker", "audit", "admin"] as const) {
    const { seed, publicKey } = newSeed();
    await writeSecret(busSeedFile(dir, { kind }), `${seed}\n`);
    roles[kind] = publicKey;
  }
  const registry: BusRegistry = { roles: { broker: roles.broker ?? "", audit: roles.audit ?? "", admin: roles.admin ?? "" }, hosts: {}, revoked: [] };
  await writeRegistry(dir, registry);
  await writeFile(join(dir, busMaterialFiles.serverConf), renderServerConfig({ dir, listen: "127.0.0.1:4222", storeDir: join(dir, "jetstream") }));
  return registry;
}

function checkHost(host: string): void {
  if (!hostPattern.test(host)) throw new AirlockError(Code.InvalidArgument, `${JSON.stringify(host)} is not a host name: letters, digits, '-' or '_', at most 64`, { details: { field: "host" } });
}

/**
 * Writes `auth.conf` again from `registry.json` with this version's permissions, keeping every
 * key: the upgrade step when a version adds a subject or a bucket to a role's rights. Reload
 * the server to apply it. FAILED_PRECONDITION when `dir` holds no material.
 */
export async function renderBusAuth(dir: string): Promise<BusRegistry> {
  const registry = await readRegistry(dir);
  await writeRegistry(dir, registry);
  return registry;
}

/**
 * Gives `host` a credential of its own: a new nkey seed in `hosts/<host>.nk`
 * (mode 0600) and a user in `auth.conf` with that host's sidecar rights.
 * Reload the server to apply it. A host that already has one keeps it.
 */
export async function addBusHost(dir: string, host: string): Promise<{ readonly seedFile: string; readonly publicKey: string; readonly created: boolean }> {
  checkHost(host);
  const registry = await readRegistry(dir);
  const seedFile = busSeedFile(dir, { kind: "sidecar", host });
  const existing = registry.hosts[host];
  if (existing !== undefined) return { seedFile, publicKey: existing, created: false };
  const { seed, publicKey } = newSeed();
  await writeSecret(seedFile, `${seed}\n`);
  await writeRegistry(dir, { ...registry, hosts: { ...registry.hosts, [host]: publicKey } });
  return { seedFile, publicKey, created: true };
}

/**
 * Cuts `host` off: its user leaves `auth.conf`, its public key is recorded as
 * revoked and its seed file is deleted. Other hosts keep their credentials.
 * Reload the server to apply it; the server then closes the host's connections.
 */
export async function revokeBusHost(dir: string, host: string): Promise<{ readonly publicKey: string }> {
  checkHost(host);
  const registry = await readRegistry(dir);
  const publicKey = registry.hosts[host];
  if (publicKey === undefined) throw new AirlockError(Code.NotFound, `host ${host} has no NATS credential in ${dir}`, { details: { host } });
  const hosts = Object.fromEntries(Object.entries(registry.hosts).filter(([name]) => name !== host));
  await writeRegistry(dir, { ...registry, hosts, revoked: [...registry.revoked, { host, publicKey, at: new Date().toISOString() }] });
  await rm(busSeedFile(dir, { kind: "sidecar", host }), { force: true });
  return { publicKey };
}
