import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { copyFile, mkdir, readFile, rename } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createVaultClient } from "../common/vault.js";
import { acquireLock, defaultCacheDir, goBinary, onPath } from "./gobuild.js";
import { freePort, ManagedProcess, makeTempDir, waitUntil } from "./resources.js";

const wrapperDir = join(dirname(fileURLToPath(import.meta.url)), "vault-build");
const wrapperFiles = ["go.mod", "go.sum", "main.go"] as const;

/** Where a Vault binary came from. */
export type VaultBinarySource = "VAULT_BIN" | "PATH" | "cache" | "built";

/** A Vault-API server binary and where it was found. */
export interface VaultBinary {
  readonly path: string;
  readonly source: VaultBinarySource;
}

/** Options of {@link resolveVaultBinary}. */
export interface ResolveVaultOptions {
  /** Where built binaries are cached, outside any clone. @default process.env.AIRLOCK_CACHE_DIR ?? ~/.cache/airlock */
  readonly cacheDir?: string;
  /** Receives progress lines while Vault builds. @default writes to standard error */
  readonly onProgress?: (line: string) => void;
}

async function wrapperKey(): Promise<{ key: string; version: string }> {
  const hash = createHash("sha256");
  for (const file of wrapperFiles) hash.update(await readFile(join(wrapperDir, file)));
  const goMod = await readFile(join(wrapperDir, "go.mod"), "utf8");
  const version = goMod.match(/github\.com\/hashicorp\/vault (v\S+)/)?.[1] ?? "unknown";
  return { key: hash.digest("hex").slice(0, 16), version };
}

/**
 * Builds HashiCorp Vault from the Go module proxy into the cache, once per
 * machine: a pinned wrapper module (harness/vault-build) whose main calls
 * Vault's `command.Run`. Parallel callers wait on a lock instead of building twice.
 */
export async function buildVault(options: ResolveVaultOptions = {}): Promise<VaultBinary> {
  const progress = options.onProgress ?? ((line: string) => process.stderr.write(`${line}\n`));
  const { key, version } = await wrapperKey();
  const root = join(options.cacheDir ?? defaultCacheDir(), "vault", key);
  const binary = join(root, "vault");
  if (existsSync(binary)) return { path: binary, source: "cache" };
  const go = goBinary();
  if (go === undefined) {
    throw new Error("Vault not found: set VAULT_BIN, put vault or bao on PATH, or install Go (https://go.dev/dl) so the harness can build Vault");
  }
  await mkdir(dirname(root), { recursive: true });
  const release = await acquireLock(`${root}.lock`, () => progress(`vault: another process is building Vault ${version}; waiting for it`));
  try {
    if (existsSync(binary)) return { path: binary, source: "cache" };
    const src = join(root, "src");
    await mkdir(src, { recursive: true });
    for (const file of wrapperFiles) await copyFile(join(wrapperDir, file), join(src, file));
    progress(`vault: building HashiCorp Vault ${version} from the Go module proxy into ${root} (once per machine; several minutes on 2 cores)`);
    const started = Date.now();
    const build = new ManagedProcess("go build vault", go, ["build", "-trimpath", "-ldflags=-s -w", "-o", `${binary}.tmp`, "."], {
      cwd: src,
      env: { ...process.env, CGO_ENABLED: "0", GOFLAGS: "-mod=readonly" },
    });
    let reported = 0;
    build.child.stderr?.on("data", (chunk: Buffer) => {
      for (const line of chunk.toString("utf8").split("\n")) if (line.trim() !== "") reported++;
    });
    const heartbeat = setInterval(() => {
      const seconds = Math.round((Date.now() - started) / 1000);
      progress(`vault: still building (${seconds}s elapsed, ${reported} module downloads and messages so far)`);
    }, 20_000);
    const code = await build.exited.finally(() => clearInterval(heartbeat));
    await build.stop();
    if (code !== 0) throw new Error(`building Vault failed (exit ${code}):\n${build.recentOutput}`);
    await rename(`${binary}.tmp`, binary);
    progress(`vault: built in ${Math.round((Date.now() - started) / 1000)}s: ${binary}`);
    return { path: binary, source: "built" };
  } finally {
    await release();
  }
}

/**
 * Finds a Vault-API server binary: `$VAULT_BIN`; else `vault` or `bao` on PATH;
 * else the cached build, building it first if needed ({@link buildVault}).
 */
export async function resolveVaultBinary(options: ResolveVaultOptions = {}): Promise<VaultBinary> {
  const fromEnv = process.env.VAULT_BIN;
  if (fromEnv !== undefined && fromEnv !== "") {
    if (!existsSync(fromEnv)) throw new Error(`VAULT_BIN is set to ${fromEnv}, which does not exist`);
    return { path: fromEnv, source: "VAULT_BIN" };
  }
  const found = onPath("vault") ?? onPath("bao");
  if (found !== undefined) return { path: found, source: "PATH" };
  return buildVault(options);
}

/** Options of {@link startVault}. */
export interface VaultServerOptions extends ResolveVaultOptions {
  /** How long to wait for `sys/health`, in ms. @default 30000 */
  readonly readyTimeoutMs?: number;
}

/** A Vault-API dev server the harness started on a loopback port. */
export interface VaultServer {
  /** `http://127.0.0.1:<port>` */
  readonly address: string;
  /** The dev server's root token. A test secret, never a production one. */
  readonly rootToken: string;
  readonly version: string;
  readonly binary: VaultBinary;
  /** The server's process id (benchmarks read its CPU time). */
  readonly pid: number;
  /** Stops the server; its in-memory state is gone. */
  stop(): Promise<void>;
  /**
   * Stalls the server (SIGSTOP): connections stay open and requests hang, as in a Vault that
   * stops answering, until {@link VaultServer.thaw}. Its state is kept.
   */
  freeze(): void;
  /** Lets a frozen server go on (SIGCONT): the requests it held are answered. */
  thaw(): void;
}

/** Defaults of {@link VaultServerOptions}. */
export const vaultServerDefaults = { readyTimeoutMs: 30_000 } as const;

/** Starts `vault server -dev` on a free loopback port and waits until `sys/health` says it is unsealed. */
export async function startVault(options: VaultServerOptions = {}): Promise<VaultServer> {
  const binary = await resolveVaultBinary(options);
  const readyTimeoutMs = options.readyTimeoutMs ?? vaultServerDefaults.readyTimeoutMs;
  const rootToken = `airlock-dev-${createHash("sha256").update(String(Math.random())).digest("hex").slice(0, 24)}`;
  // The dev server writes a token helper file under HOME: give it a throwaway one.
  const home = await makeTempDir("vault-home");
  const port = await freePort();
  const address = `http://127.0.0.1:${port}`;
  const server = new ManagedProcess(
    "vault server -dev",
    binary.path,
    ["server", "-dev", `-dev-root-token-id=${rootToken}`, `-dev-listen-address=127.0.0.1:${port}`, "-dev-no-store-token"],
    { env: { PATH: process.env.PATH ?? "", HOME: home.path, VAULT_LOG_LEVEL: "warn", SKIP_SETCAP: "1" } },
  );
  const vault = createVaultClient({ address, token: rootToken, timeoutMs: 1000 });
  let version = "";
  try {
    const ready = await waitUntil(async () => {
      if (server.hasExited) return true;
      const health = await vault.health();
      version = health.version;
      return health.initialized && !health.sealed;
    }, readyTimeoutMs);
    if (server.hasExited) throw new Error(`Vault (${binary.path}) exited at start:\n${server.recentOutput}`);
    if (!ready) throw new Error(`Vault (${binary.path}) did not become healthy within ${readyTimeoutMs} ms:\n${server.recentOutput}`);
  } catch (error) {
    await server.stop();
    await home.remove();
    throw error;
  }
  return {
    address,
    rootToken,
    version,
    binary,
    pid: server.child.pid ?? 0,
    async stop() {
      // A frozen process would hold its SIGTERM until it runs again.
      if (!server.hasExited) server.child.kill("SIGCONT");
      await server.stop();
      await home.remove();
    },
    freeze() {
      server.child.kill("SIGSTOP");
    },
    thaw() {
      server.child.kill("SIGCONT");
    },
  };
}
