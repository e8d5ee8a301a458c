import { execFile } from "node:child_process";
import { connect as netConnect } from "node:net";
import { promisify } from "node:util";
import { freePort, ManagedProcess, makeTempDir, type TempDir } from "./resources.js";

const run = promisify(execFile);

/** Options of {@link startNats}. */
export interface NatsServerOptions {
  /** The nats-server binary. @default process.env.NATS_SERVER_BIN ?? "nats-server" */
  readonly binary?: string;
  /** How long to wait for the server to accept connections, in ms. @default 15000 */
  readonly readyTimeoutMs?: number;
}

/** A `nats-server -js` the harness started on a loopback port with its own store dir. */
export interface NatsServer {
  /** `nats://127.0.0.1:<port>` */
  readonly url: string;
  readonly port: number;
  /** The JetStream store directory (kept across {@link NatsServer.restart}). */
  readonly storeDir: string;
  /** The server's version, e.g. `2.9.10`. */
  readonly version: string;
  /** The running server's process id (benchmarks read its CPU time); 0 while paused. */
  readonly pid: number;
  /** Stops the server but keeps its port and store, for fault tests. */
  pause(): Promise<void>;
  /** Starts the server again on the same port and store after {@link NatsServer.pause}. */
  resume(): Promise<void>;
  /** Stops and starts the server on the same port and store. */
  restart(): Promise<void>;
  /** Stops the server and removes its store dir. */
  stop(): Promise<void>;
}

/** Defaults of {@link NatsServerOptions}. */
export const natsServerDefaults = { binary: "nats-server", readyTimeoutMs: 15_000 } as const;

/** The version `nats-server --version` prints, or an error that says how to install it. */
export async function natsServerVersion(binary: string = process.env.NATS_SERVER_BIN ?? natsServerDefaults.binary): Promise<string> {
  try {
    const { stdout } = await run(binary, ["--version"]);
    return stdout.trim().replace(/^nats-server:\s*v?/, "");
  } catch (error) {
    throw new Error(`nats-server not found (${binary}): install it with 'apt-get install nats-server', or set NATS_SERVER_BIN`, { cause: error });
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

/** Starts `nats-server -js` on a free loopback port with a temporary store dir and waits until it is ready. */
export async function startNats(options: NatsServerOptions = {}): Promise<NatsServer> {
  const binary = options.binary ?? process.env.NATS_SERVER_BIN ?? natsServerDefaults.binary;
  const readyTimeoutMs = options.readyTimeoutMs ?? natsServerDefaults.readyTimeoutMs;
  const version = await natsServerVersion(binary);
  const store: TempDir = await makeTempDir("nats");
  let port = await freePort();
  let server: ManagedProcess | undefined;

  const launch = async (): Promise<void> => {
    const process = new ManagedProcess("nats-server", binary, ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", store.path]);
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
    throw error;
  }

  const stopProcess = async () => {
    await server?.stop();
    server = undefined;
  };
  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    storeDir: store.path,
    version,
    get pid() {
      return server?.child.pid ?? 0;
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
    },
  };
}
