import { type ChildProcess, type SpawnOptions, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

/**
 * Everything the harness starts is registered here until it is released, so a
 * teardown check can tell exactly what a test leaked, and an exiting test
 * process kills what is left rather than orphaning it.
 */
interface Tracked {
  readonly kind: "process" | "temp dir" | "database" | "connection" | "server";
  readonly label: string;
  isReleased(): boolean;
}

const tracked = new Set<Tracked>();
const liveChildren = new Set<ChildProcess>();

process.once("exit", () => {
  for (const child of liveChildren) child.kill("SIGKILL");
});

/** Registers something a test must release; returns a function that unregisters it. */
export function track(kind: Tracked["kind"], label: string, isReleased: () => boolean): () => void {
  const entry: Tracked = { kind, label, isReleased };
  tracked.add(entry);
  return () => tracked.delete(entry);
}

/** What is registered and not yet released: `"process nats-server (pid 42)"` and so on. */
export function unreleased(): string[] {
  return [...tracked].filter((entry) => !entry.isReleased()).map((entry) => `${entry.kind} ${entry.label}`);
}

/** A loopback port that was free a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** A temporary directory, tracked until {@link TempDir.remove} is called. */
export interface TempDir {
  readonly path: string;
  remove(): Promise<void>;
}

/** Makes a tracked temporary directory under the OS temp dir. */
export async function makeTempDir(prefix: string): Promise<TempDir> {
  const path = await mkdtemp(join(tmpdir(), `airlock-${prefix}-`));
  const untrack = track("temp dir", path, () => !existsSync(path));
  return {
    path,
    async remove() {
      await rm(path, { recursive: true, force: true });
      untrack();
    },
  };
}

/** A child process the harness started, with its recent output kept for error messages. */
export class ManagedProcess {
  readonly child: ChildProcess;
  readonly label: string;
  readonly exited: Promise<number | null>;
  private output = "";
  private readonly untrack: () => void;
  private exitCode: number | null | undefined;

  constructor(label: string, command: string, args: readonly string[], options: SpawnOptions = {}) {
    this.label = label;
    this.child = spawn(command, args, { ...options, stdio: ["ignore", "pipe", "pipe"] });
    liveChildren.add(this.child);
    const keep = (chunk: Buffer) => {
      this.output = (this.output + chunk.toString("utf8")).slice(-8192);
    };
    this.child.stdout?.on("data", keep);
    this.child.stderr?.on("data", keep);
    this.exited = new Promise((resolve) => {
      this.child.once("error", (error) => {
        this.output += `\n${error.message}`;
        this.exitCode = null;
        liveChildren.delete(this.child);
        resolve(null);
      });
      this.child.once("exit", (code) => {
        this.exitCode = code;
        liveChildren.delete(this.child);
        resolve(code);
      });
    });
    this.untrack = track("process", `${label} (pid ${this.child.pid ?? "?"})`, () => this.exitCode !== undefined);
  }

  /** Whether the process has exited. */
  get hasExited(): boolean {
    return this.exitCode !== undefined;
  }

  /** The last 8 KiB the process wrote to stdout and stderr. */
  get recentOutput(): string {
    return this.output;
  }

  /** Resolves once `predicate` matches the output so far; rejects if the process exits first or time runs out. */
  async waitForOutput(predicate: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const match = this.output.match(predicate);
      if (match !== null) return match;
      if (this.hasExited) throw new Error(`${this.label} exited before it was ready:\n${this.output}`);
      if (Date.now() > deadline) throw new Error(`${this.label} was not ready within ${timeoutMs} ms:\n${this.output}`);
      await delay(25);
    }
  }

  /** Stops the process: SIGTERM, then SIGKILL after `graceMs`. Resolves when it has exited. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.hasExited) {
      this.child.kill("SIGTERM");
      const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
      await this.exited;
      clearTimeout(timer);
    }
    this.child.stdout?.destroy();
    this.child.stderr?.destroy();
    this.untrack();
  }
}

/** Resolves after `ms` milliseconds. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `probe` until it resolves true or `timeoutMs` passes; returns whether it did. */
export async function waitUntil(probe: () => Promise<boolean>, timeoutMs: number, intervalMs = 50): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await probe().catch(() => false)) return true;
    if (Date.now() > deadline) return false;
    await delay(intervalMs);
  }
}
