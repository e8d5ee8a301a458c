import { existsSync } from "node:fs";
import { mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { delimiter, dirname, join } from "node:path";
import { delay, ManagedProcess } from "./resources.js";

/** The cache dir for built binaries: `$AIRLOCK_CACHE_DIR`, else `~/.cache/airlock`. */
export function defaultCacheDir(): string {
  return process.env.AIRLOCK_CACHE_DIR ?? join(homedir(), ".cache", "airlock");
}

/** The path of `name` in a directory of `$PATH`, if any. */
export function onPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    const candidate = join(dir, name);
    if (dir !== "" && existsSync(candidate)) return candidate;
  }
  return undefined;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Takes a cross-process lock (an atomically created directory holding the
 * owner's pid). A lock whose owner died is broken. Returns the release function.
 */
export async function acquireLock(lockDir: string, onWait: () => void): Promise<() => Promise<void>> {
  let waited = false;
  for (;;) {
    try {
      await mkdir(lockDir);
      await writeFile(join(lockDir, "pid"), String(process.pid));
      return () => rm(lockDir, { recursive: true, force: true });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
      const owner = Number.parseInt(await readFile(join(lockDir, "pid"), "utf8").catch(() => ""), 10);
      if (Number.isInteger(owner) && !processAlive(owner)) {
        await rm(lockDir, { recursive: true, force: true });
        continue;
      }
      if (!waited) onWait();
      waited = true;
      await delay(500);
    }
  }
}

/** The Go toolchain: `go` on PATH or Go's default install location. */
export function goBinary(): string | undefined {
  return onPath("go") ?? (existsSync("/usr/local/go/bin/go") ? "/usr/local/go/bin/go" : undefined);
}

/** What {@link goInstall} builds. */
export interface GoInstallSpec {
  /** Short name for progress lines and the cache folder, e.g. `nats-server`. */
  readonly name: string;
  /** The package to install, e.g. `github.com/nats-io/nats-server/v2`. */
  readonly pkg: string;
  /** The exact module version, e.g. `v2.12.3`. */
  readonly version: string;
  /** The binary `go install` writes (the package path's last element). */
  readonly binary: string;
  /** @default {@link defaultCacheDir} */
  readonly cacheDir?: string;
  /** @default writes to standard error */
  readonly onProgress?: (line: string) => void;
}

/**
 * `go install pkg@version` from the Go module proxy into the cache, once per
 * machine and version (the module's own go.mod and go.sum pin its dependencies,
 * checked against the checksum database). Parallel callers wait on a lock.
 * Returns the binary's path.
 */
export async function goInstall(spec: GoInstallSpec): Promise<string> {
  const progress = spec.onProgress ?? ((line: string) => process.stderr.write(`${line}\n`));
  const root = join(spec.cacheDir ?? defaultCacheDir(), spec.name, spec.version);
  const binary = join(root, spec.binary);
  if (existsSync(binary)) return binary;
  const go = goBinary();
  if (go === undefined) throw new Error(`${spec.name} ${spec.version} is not built yet and there is no Go toolchain to build it: install Go (Debian: apt-get install golang-go)`);
  await mkdir(dirname(root), { recursive: true });
  const release = await acquireLock(`${root}.lock`, () => progress(`${spec.name}: another process is building ${spec.version}; waiting for it`));
  try {
    if (existsSync(binary)) return binary;
    const staging = `${root}.tmp`;
    await rm(staging, { recursive: true, force: true });
    progress(`${spec.name}: building ${spec.pkg}@${spec.version} from the Go module proxy into ${root} (once per machine)`);
    const started = Date.now();
    const build = new ManagedProcess(`go install ${spec.name}`, go, ["install", "-trimpath", "-ldflags=-s -w", `${spec.pkg}@${spec.version}`], {
      env: { ...process.env, CGO_ENABLED: "0", GOBIN: staging, GOFLAGS: "-mod=readonly" },
    });
    const heartbeat = setInterval(() => progress(`${spec.name}: still building (${Math.round((Date.now() - started) / 1000)}s elapsed)`), 20_000);
    const code = await build.exited.finally(() => clearInterval(heartbeat));
    await build.stop();
    if (code !== 0) throw new Error(`building ${spec.name} ${spec.version} failed (exit ${code}):\n${build.recentOutput}`);
    await rm(root, { recursive: true, force: true });
    await rename(staging, root);
    progress(`${spec.name}: built in ${Math.round((Date.now() - started) / 1000)}s: ${binary}`);
    return binary;
  } finally {
    await release();
  }
}
