import { execFile } from "node:child_process";
import { copyFile, rm, writeFile } from "node:fs/promises";
import { connect as netConnect } from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";
import type { ConnectionOptions, NatsConnection } from "@nats-io/transport-node";
import type { BusRole } from "../common/bus.js";
import { addBusHost, busMaterialFiles, busSeedFile, initBusMaterial, renderServerConfig, revokeBusHost } from "../common/bus-material.js";
import { connectNats, type NatsConnectionConfig } from "../common/nats.js";
import { goInstall } from "./gobuild.js";
import { freePort, ManagedProcess, makeTempDir, type TempDir, waitUntil } from "./resources.js";

const run = promisify(execFile);

/** The nats-server release the project pins for tests, the demo, CI and compose. */
export const natsServerRelease = { pkg: "github.com/nats-io/nats-server/v2", version: "v2.15.3" } as const;

/** Options of {@link startNats}. */
export interface NatsServerOptions {
  /** The nats-server binary. @default process.env.NATS_SERVER_BIN, else the pinned release built once from the Go module proxy */
  readonly binary?: string;
  /** How long to wait for the server to accept connections, in ms. @default 15000 */
  readonly readyTimeoutMs?: number;
}

/**
 * What a single server and a cluster share: the deployment's security material
 * (one CA, one `auth.conf` for every node) and each role's credential and
 * connection. Code that only connects takes this, so it runs on either.
 */
export interface NatsBus {
  /** Every client URL, `tls://127.0.0.1:<port>` (one per node); clients are given all of them. */
  readonly urls: readonly string[];
  /** The material directory (`airlock nats init` layout): CA, server certificate, seeds, `auth.conf`. */
  readonly securityDir: string;
  /** The CA the servers' certificate chains to. */
  readonly caFile: string;
  /** The servers' version, e.g. `2.15.3`. */
  readonly version: string;
  /**
   * The connection config of a role: its seed file, the CA and every URL. A
   * sidecar host gets a credential of its own on first use (every node is reloaded).
   */
  credentials(role: BusRole): Promise<NatsConnectionConfig>;
  /** Connects as `role` with its own credential, over TLS. */
  connect(role: BusRole, extra?: Partial<ConnectionOptions>): Promise<NatsConnection>;
  /** Revokes a host's credential and reloads every node; resolves once the servers refuse it. */
  revokeHost(host: string): Promise<void>;
  /** Stops the server(s) and removes their stores and the material dir. */
  stop(): Promise<void>;
}

/**
 * A `nats-server` with JetStream the harness started on a loopback port, with
 * its own store dir, TLS from a throwaway CA, and the project's own security
 * material: every client is an nkey user with its role's rights.
 */
export interface NatsServer extends NatsBus {
  /** `tls://127.0.0.1:<port>` */
  readonly url: string;
  readonly port: number;
  /** The JetStream store directory (kept across {@link NatsServer.restart}). */
  readonly storeDir: string;
  /** The running server's process id (benchmarks read its CPU time); 0 while paused. */
  readonly pid: number;
  /** Stops the server but keeps its port and store, for fault tests. */
  pause(): Promise<void>;
  /** Starts the server again on the same port and store after {@link NatsServer.pause}. */
  resume(): Promise<void>;
  /** Stops and starts the server on the same port and store. */
  restart(): Promise<void>;
}

/** One node of a {@link NatsCluster}. */
export interface NatsClusterNode {
  /** The node's server name (`n1`, `n2`, …). */
  readonly name: string;
  /** Its client URL, `tls://127.0.0.1:<port>`. */
  readonly url: string;
  /** Its JetStream store directory (kept across stop, kill and restart). */
  readonly storeDir: string;
  /** Its process id; 0 while stopped. */
  readonly pid: number;
  /** Stops the node gracefully (SIGTERM), keeping its ports and store. */
  stop(): Promise<void>;
  /** Kills the node (SIGKILL), as a crash would, keeping its ports and store. */
  kill(): Promise<void>;
  /** Starts a stopped or killed node again (or stops and starts a running one) and waits until the cluster has a JetStream meta leader it knows. */
  restart(): Promise<void>;
}

/**
 * A JetStream cluster of nats-server nodes on loopback ports: the same pinned
 * server, TLS material and `auth.conf` as {@link startNats}, routes between the
 * nodes over mutually verified TLS, and a store dir per node.
 */
export interface NatsCluster extends NatsBus {
  readonly nodes: readonly NatsClusterNode[];
}

/** Options of {@link startNatsCluster}. */
export interface NatsClusterOptions extends NatsServerOptions {
  /** How many nodes. @default 3 */
  readonly nodes?: number;
  /** How long to wait for the cluster to elect a JetStream meta leader, in ms. @default 30000 */
  readonly leaderTimeoutMs?: number;
}

/** Defaults of {@link NatsServerOptions}. */
export const natsServerDefaults = { readyTimeoutMs: 15_000 } as const;

/** The nats-server binary: `$NATS_SERVER_BIN`, else the pinned release from the cache (built on first use). */
export async function resolveNatsServer(): Promise<string> {
  const fromEnv = process.env.NATS_SERVER_BIN;
  if (fromEnv !== undefined && fromEnv !== "") return fromEnv;
  return goInstall({ name: "nats-server", pkg: natsServerRelease.pkg, version: natsServerRelease.version, binary: "nats-server" });
}

/** The version `nats-server --version` prints. */
export async function natsServerVersion(binary?: string): Promise<string> {
  const path = binary ?? (await resolveNatsServer());
  try {
    const { stdout } = await run(path, ["--version"]);
    return stdout.trim().replace(/^nats-server:\s*v?/, "");
  } catch (error) {
    throw new Error(`nats-server (${path}) does not run: set NATS_SERVER_BIN, or let the harness build ${natsServerRelease.version} (needs Go)`, { cause: error });
  }
}

function acceptsConnections(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = netConnect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** One nats-server process the harness (re)launches on fixed ports and a kept store. */
class ServerProcess {
  private process: ManagedProcess | undefined;

  constructor(
    private readonly spec: {
      readonly label: string;
      readonly binary: string;
      readonly configFile: string;
      readonly readyTimeoutMs: number;
      /** The config to write before each launch (ports may change between attempts). */
      readonly render: () => string;
      readonly port: () => number;
    },
  ) {}

  get pid(): number {
    return this.process?.child.pid ?? 0;
  }

  get running(): boolean {
    return this.process !== undefined;
  }

  async launch(): Promise<void> {
    await writeFile(this.spec.configFile, this.spec.render());
    const child = new ManagedProcess(this.spec.label, this.spec.binary, ["-c", this.spec.configFile]);
    this.process = child;
    try {
      await child.waitForOutput(/Server is ready/, this.spec.readyTimeoutMs);
      // A cluster node can say ready a moment before its client port takes connections (seen under
      // load in a 3-node cluster): asked again until the ready timeout, not once.
      if (!(await waitUntil(() => acceptsConnections(this.spec.port()), this.spec.readyTimeoutMs, 100))) {
        throw new Error(`${this.spec.label} on port ${this.spec.port()} says ready but refuses connections`);
      }
    } catch (error) {
      await this.stop();
      throw error;
    }
  }

  /** Sends SIGHUP (reload the config and `auth.conf`). */
  hangUp(): void {
    this.process?.child.kill("SIGHUP");
  }

  async stop(): Promise<void> {
    await this.process?.stop();
    this.process = undefined;
  }

  async kill(): Promise<void> {
    const child = this.process;
    if (child === undefined) return;
    child.child.kill("SIGKILL");
    await child.stop();
    this.process = undefined;
  }
}

/** The `config_load_time` a server's monitoring endpoint reports (it changes on every reload). */
async function configLoadTime(monitorPort: number): Promise<string> {
  const varz = (await (await fetch(`http://127.0.0.1:${monitorPort}/varz`)).json()) as { config_load_time?: string };
  return varz.config_load_time ?? "";
}

/**
 * The part of a {@link NatsBus} that does not depend on how many servers run:
 * role credentials over every URL, and credential changes applied by reloading
 * every running server.
 */
function busAccess(
  security: TempDir,
  urls: () => readonly string[],
  servers: () => readonly { readonly process: ServerProcess; readonly monitorPort: number }[],
): Pick<NatsBus, "credentials" | "connect" | "revokeHost" | "caFile" | "securityDir"> {
  const caFile = join(security.path, busMaterialFiles.caCert);
  const configOf = (role: BusRole): NatsConnectionConfig => ({ servers: [...urls()], auth: { kind: "nkey", seedFile: busSeedFile(security.path, role) }, tls: { caFile } });
  /** Whether the servers accept a connection with `config` now (each URL is asked alone: every running server must agree). */
  const connects = async (config: NatsConnectionConfig, role: BusRole): Promise<boolean> => {
    const answers = await Promise.all(
      servers()
        .map((server, index) => ({ server, url: urls()[index] }))
        .filter(({ server, url }) => server.process.running && url !== undefined)
        .map(async ({ url }) => {
          try {
            const nc = await connectNats({ ...config, servers: [url as string] }, { role, name: "harness-probe", extra: { reconnect: false, timeout: 2000 } });
            await nc.close();
            return true;
          } catch {
            return false;
          }
        }),
    );
    return answers.length > 0 && answers.every((accepted) => accepted);
  };
  const refuses = async (config: NatsConnectionConfig, role: BusRole): Promise<boolean> => {
    for (const [index, server] of servers().entries()) {
      const url = urls()[index];
      if (!server.process.running || url === undefined) continue;
      try {
        const nc = await connectNats({ ...config, servers: [url] }, { role, name: "harness-probe", extra: { reconnect: false, timeout: 2000 } });
        await nc.close();
        return false;
      } catch {
        // refused here: ask the next one
      }
    }
    return true;
  };
  const reload = async () => {
    await Promise.all(
      servers()
        .filter((server) => server.process.running)
        .map(async ({ process, monitorPort }) => {
          const before = await configLoadTime(monitorPort);
          process.hangUp();
          if (!(await waitUntil(async () => (await configLoadTime(monitorPort)) !== before, 10_000, 25))) throw new Error("nats-server did not reload its configuration");
        }),
    );
  };
  // nats-server 2.15.3 wires a service import of an account that a reload adds only on the
  // next reload (measured: "no responders" after one SIGHUP, PubAcks after two): reload twice.
  const reloadUntil = async (probe: () => Promise<boolean>, what: string) => {
    await reload();
    await reload();
    if (!(await waitUntil(probe, 10_000, 25))) throw new Error(`nats-server did not apply ${what} after a reload`);
  };
  const access: Pick<NatsBus, "credentials" | "connect" | "revokeHost" | "caFile" | "securityDir"> = {
    caFile,
    securityDir: security.path,
    async credentials(role) {
      if (role.kind === "sidecar" && (await addBusHost(security.path, role.host)).created) {
        await reloadUntil(() => connects(configOf(role), role), `host ${role.host}'s new credential`);
      }
      return configOf(role);
    },
    async connect(role, extra = {}) {
      return connectNats(await access.credentials(role), { role, name: `harness-${role.kind}`, extra });
    },
    async revokeHost(host) {
      const role: BusRole = { kind: "sidecar", host };
      // Kept aside to prove the servers now refuse it (revoking deletes the seed file).
      const probeSeed = join(security.path, `revoked-${host}.nk`);
      await copyFile(busSeedFile(security.path, role), probeSeed);
      try {
        await revokeBusHost(security.path, host);
        await reloadUntil(() => refuses({ ...configOf(role), auth: { kind: "nkey", seedFile: probeSeed } }, role), `the revocation of host ${host}`);
      } finally {
        await rm(probeSeed, { force: true });
      }
    },
  };
  return access;
}

/** Starts nats-server with JetStream, TLS and the project's nkey users on a free loopback port, and waits until it is ready. */
export async function startNats(options: NatsServerOptions = {}): Promise<NatsServer> {
  const binary = options.binary ?? (await resolveNatsServer());
  const readyTimeoutMs = options.readyTimeoutMs ?? natsServerDefaults.readyTimeoutMs;
  const version = await natsServerVersion(binary);
  const store: TempDir = await makeTempDir("nats");
  const security: TempDir = await makeTempDir("nats-security");
  let port = await freePort();
  const monitorPort = await freePort();
  const server = new ServerProcess({
    label: "nats-server",
    binary,
    configFile: join(security.path, busMaterialFiles.serverConf),
    readyTimeoutMs,
    render: () => renderServerConfig({ dir: security.path, listen: `127.0.0.1:${port}`, storeDir: store.path, monitor: `127.0.0.1:${monitorPort}` }),
    port: () => port,
  });

  try {
    await initBusMaterial(security.path);
    // A free port can be taken between the probe and the bind: try a few.
    for (let attempt = 1; ; attempt++) {
      try {
        await server.launch();
        break;
      } catch (error) {
        if (attempt >= 3 || !String(error).includes("address already in use")) throw error;
        port = await freePort();
      }
    }
  } catch (error) {
    await store.remove();
    await security.remove();
    throw error;
  }

  const url = `tls://127.0.0.1:${port}`;
  const access = busAccess(security, () => [url], () => [{ process: server, monitorPort }]);
  return {
    ...access,
    url,
    urls: [url],
    port,
    storeDir: store.path,
    version,
    get pid() {
      return server.pid;
    },
    pause: () => server.stop(),
    async resume() {
      if (!server.running) await server.launch();
    },
    async restart() {
      await server.stop();
      await server.launch();
    },
    async stop() {
      await server.stop();
      await store.remove();
      await security.remove();
    },
  };
}

/** Defaults of {@link NatsClusterOptions}. */
export const natsClusterDefaults = { nodes: 3, leaderTimeoutMs: 30_000 } as const;

/** The JetStream meta leader a node's `/jsz` reports, or undefined while there is none (or the node is down). */
async function metaLeader(monitorPort: number): Promise<string | undefined> {
  try {
    const jsz = (await (await fetch(`http://127.0.0.1:${monitorPort}/jsz`)).json()) as { meta_cluster?: { leader?: string } };
    const leader = jsz.meta_cluster?.leader;
    return leader === undefined || leader === "" ? undefined : leader;
  } catch {
    return undefined;
  }
}

/**
 * Starts a JetStream cluster of `nodes` nats-servers on loopback, sharing one
 * security material dir (TLS from its CA, one `auth.conf`), and resolves once
 * every node sees the same JetStream meta leader.
 */
export async function startNatsCluster(options: NatsClusterOptions = {}): Promise<NatsCluster> {
  const binary = options.binary ?? (await resolveNatsServer());
  const readyTimeoutMs = options.readyTimeoutMs ?? natsServerDefaults.readyTimeoutMs;
  const leaderTimeoutMs = options.leaderTimeoutMs ?? natsClusterDefaults.leaderTimeoutMs;
  const count = options.nodes ?? natsClusterDefaults.nodes;
  if (!Number.isInteger(count) || count < 1) throw new Error(`a cluster needs at least one node, not ${count}`);
  const version = await natsServerVersion(binary);
  const security: TempDir = await makeTempDir("nats-security");
  const stores: TempDir[] = [];
  const specs: { name: string; port: number; clusterPort: number; monitorPort: number; store: TempDir }[] = [];
  for (let index = 0; index < count; index++) {
    const store = await makeTempDir(`nats-n${index + 1}`);
    stores.push(store);
    specs.push({ name: `n${index + 1}`, port: await freePort(), clusterPort: await freePort(), monitorPort: await freePort(), store });
  }
  const servers = specs.map(
    (spec) =>
      new ServerProcess({
        label: `nats-server ${spec.name}`,
        binary,
        configFile: join(security.path, `nats-server-${spec.name}.conf`),
        readyTimeoutMs,
        render: () =>
          renderServerConfig({
            dir: security.path,
            listen: `127.0.0.1:${spec.port}`,
            storeDir: spec.store.path,
            monitor: `127.0.0.1:${spec.monitorPort}`,
            cluster: {
              name: "airlock",
              serverName: spec.name,
              listen: `127.0.0.1:${spec.clusterPort}`,
              routes: specs.filter((other) => other !== spec).map((other) => `127.0.0.1:${other.clusterPort}`),
            },
          }),
        port: () => spec.port,
      }),
  );
  const removeAll = async () => {
    await Promise.all(servers.map((server) => server.stop()));
    for (const store of stores) await store.remove();
    await security.remove();
  };
  /** Every running node names the same meta leader, itself running. */
  const hasLeader = async (): Promise<boolean> => {
    const running = specs.filter((_, index) => servers[index]?.running === true);
    const leaders = await Promise.all(running.map((spec) => metaLeader(spec.monitorPort)));
    const first = leaders[0];
    return first !== undefined && leaders.every((leader) => leader === first) && running.some((spec) => spec.name === first);
  };
  const awaitLeader = async () => {
    if (!(await waitUntil(hasLeader, leaderTimeoutMs, 100))) throw new Error(`the NATS cluster elected no JetStream meta leader within ${leaderTimeoutMs} ms`);
  };
  try {
    await initBusMaterial(security.path);
    // Launched together: a node waits for its routes' quorum before JetStream is ready.
    await Promise.all(servers.map((server) => server.launch()));
    await awaitLeader();
  } catch (error) {
    await removeAll();
    throw error;
  }
  const urls = specs.map((spec) => `tls://127.0.0.1:${spec.port}`);
  const access = busAccess(
    security,
    () => urls,
    () => specs.map((spec, index) => ({ process: servers[index] as ServerProcess, monitorPort: spec.monitorPort })),
  );
  const nodes = specs.map((spec, index): NatsClusterNode => {
    const server = servers[index] as ServerProcess;
    return {
      name: spec.name,
      url: urls[index] as string,
      storeDir: spec.store.path,
      get pid() {
        return server.pid;
      },
      stop: () => server.stop(),
      kill: () => server.kill(),
      async restart() {
        await server.stop();
        await server.launch();
        await awaitLeader();
      },
    };
  });
  return { ...access, urls, version, nodes, stop: removeAll };
}
