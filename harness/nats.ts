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
 * A `nats-server` with JetStream the harness started on a loopback port, with
 * its own store dir, TLS from a throwaway CA, and the project's own security
 * material: every client is an nkey user with its role's rights.
 */
export interface NatsServer {
  /** `tls://127.0.0.1:<port>` */
  readonly url: string;
  readonly port: number;
  /** The JetStream store directory (kept across {@link NatsServer.restart}). */
  readonly storeDir: string;
  /** The material directory (`airlock nats init` layout): CA, server certificate, seeds, `auth.conf`. */
  readonly securityDir: string;
  /** The CA the server's certificate chains to. */
  readonly caFile: string;
  /** The server's version, e.g. `2.15.3`. */
  readonly version: string;
  /** The running server's process id (benchmarks read its CPU time); 0 while paused. */
  readonly pid: number;
  /**
   * The connection config of a role: its seed file and the CA. A sidecar host
   * gets a credential of its own on first use (the server is reloaded).
   */
  credentials(role: BusRole): Promise<NatsConnectionConfig>;
  /** Connects as `role` with its own credential, over TLS. */
  connect(role: BusRole, extra?: Partial<ConnectionOptions>): Promise<NatsConnection>;
  /** Revokes a host's credential and reloads the server; resolves once the server refuses it. */
  revokeHost(host: string): Promise<void>;
  /** Stops the server but keeps its port and store, for fault tests. */
  pause(): Promise<void>;
  /** Starts the server again on the same port and store after {@link NatsServer.pause}. */
  resume(): Promise<void>;
  /** Stops and starts the server on the same port and store. */
  restart(): Promise<void>;
  /** Stops the server and removes its store and material dirs. */
  stop(): Promise<void>;
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

/** Starts nats-server with JetStream, TLS and the project's nkey users on a free loopback port, and waits until it is ready. */
export async function startNats(options: NatsServerOptions = {}): Promise<NatsServer> {
  const binary = options.binary ?? (await resolveNatsServer());
  const readyTimeoutMs = options.readyTimeoutMs ?? natsServerDefaults.readyTimeoutMs;
  const version = await natsServerVersion(binary);
  const store: TempDir = await makeTempDir("nats");
  const security: TempDir = await makeTempDir("nats-security");
  let port = await freePort();
  const monitorPort = await freePort();
  let server: ManagedProcess | undefined;
  const configFile = join(security.path, busMaterialFiles.serverConf);

  const launch = async (): Promise<void> => {
    await writeFile(configFile, renderServerConfig({ dir: security.path, listen: `127.0.0.1:${port}`, storeDir: store.path, monitor: `127.0.0.1:${monitorPort}` }));
    const process = new ManagedProcess("nats-server", binary, ["-c", configFile]);
    server = process;
    try {
      await process.waitForOutput(/Server is ready/, readyTimeoutMs);
      if (!(await acceptsConnections(port))) throw new Error(`nats-server on port ${port} says ready but refuses connections`);
    } catch (error) {
      await process.stop();
      throw error;
    }
  };

  try {
    await initBusMaterial(security.path);
    // A free port can be taken between the probe and the bind: try a few.
    for (let attempt = 1; ; attempt++) {
      try {
        await launch();
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
  const caFile = join(security.path, busMaterialFiles.caCert);
  const configOf = (role: BusRole): NatsConnectionConfig => ({ servers: [url], auth: { kind: "nkey", seedFile: busSeedFile(security.path, role) }, tls: { caFile } });
  /** Whether the server accepts a connection with `config` now. */
  const connects = async (config: NatsConnectionConfig, role: BusRole): Promise<boolean> => {
    try {
      const nc = await connectNats(config, { role, name: "harness-probe", extra: { reconnect: false, timeout: 2000 } });
      await nc.close();
      return true;
    } catch {
      return false;
    }
  };
  const configLoadTime = async (): Promise<string> => {
    const varz = (await (await fetch(`http://127.0.0.1:${monitorPort}/varz`)).json()) as { config_load_time?: string };
    return varz.config_load_time ?? "";
  };
  const reload = async () => {
    const before = await configLoadTime();
    server?.child.kill("SIGHUP");
    if (!(await waitUntil(async () => (await configLoadTime()) !== before, 10_000, 25))) throw new Error("nats-server did not reload its configuration");
  };
  // nats-server 2.15.3 wires a service import of an account that a reload adds only on the
  // next reload (measured: "no responders" after one SIGHUP, PubAcks after two): reload twice.
  const reloadUntil = async (probe: () => Promise<boolean>, what: string) => {
    await reload();
    await reload();
    if (!(await waitUntil(probe, 10_000, 25))) throw new Error(`nats-server did not apply ${what} after a reload`);
  };
  const stopProcess = async () => {
    await server?.stop();
    server = undefined;
  };
  const nats: NatsServer = {
    url,
    port,
    storeDir: store.path,
    securityDir: security.path,
    caFile,
    version,
    get pid() {
      return server?.child.pid ?? 0;
    },
    async credentials(role) {
      if (role.kind === "sidecar" && (await addBusHost(security.path, role.host)).created) {
        await reloadUntil(() => connects(configOf(role), role), `host ${role.host}'s new credential`);
      }
      return configOf(role);
    },
    async connect(role, extra = {}) {
      return connectNats(await nats.credentials(role), { role, name: `harness-${role.kind}`, extra });
    },
    async revokeHost(host) {
      const role: BusRole = { kind: "sidecar", host };
      // Kept aside to prove the server now refuses it (revoking deletes the seed file).
      const probeSeed = join(security.path, `revoked-${host}.nk`);
      await copyFile(busSeedFile(security.path, role), probeSeed);
      try {
        await revokeBusHost(security.path, host);
        await reloadUntil(async () => !(await connects({ ...configOf(role), auth: { kind: "nkey", seedFile: probeSeed } }, role)), `the revocation of host ${host}`);
      } finally {
        await rm(probeSeed, { force: true });
      }
    },
    pause: stopProcess,
    async resume() {
      if (server === undefined) await launch();
    },
    async restart() {
      await stopProcess();
      await launch();
    },
    async stop() {
      await stopProcess();
      await store.remove();
      await security.remove();
    },
  };
  return nats;
}
