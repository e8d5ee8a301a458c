import { once } from "node:events";
import { type FSWatcher, watch } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { AirlockError, Code } from "../../common/errors.js";
import { Policy } from "./engine.js";
import { policyDefaults } from "./types.js";

/** Options of {@link PolicyWatcher.start}. */
export interface PolicyWatcherOptions {
  /** Called with each new policy after a change was loaded. */
  readonly onReload?: (policy: Policy) => void;
  /** Called when a changed file cannot be read or is invalid; the last good policy stays in force. */
  readonly onError?: (error: AirlockError) => void;
  /** Quiet time after the last file event before reloading, in ms. @default 100 */
  readonly debounceMs?: number;
}

async function readPolicyText(path: string): Promise<string> {
  try {
    return await readFile(path, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new AirlockError(code === "ENOENT" ? Code.NotFound : Code.Unavailable, `cannot read policy ${path}: ${(error as Error).message}`, {
      cause: error,
      details: { source: path },
    });
  }
}

/**
 * Keeps a policy file loaded: reloads it when it changes, keeps the last good
 * policy when a change is invalid, and reports why.
 *
 * It watches the file's directory rather than the file: editors and config
 * managers replace a file by renaming a new one over it (and Kubernetes swaps a
 * symlinked directory), which ends a watch on the old file's inode. Any event in
 * the directory triggers a re-read, and a reload only happens when the content
 * changed, so unrelated files and repeated events cost a read, not a reload.
 */
export class PolicyWatcher {
  readonly #path: string;
  readonly #onReload: ((policy: Policy) => void) | undefined;
  readonly #onError: ((error: AirlockError) => void) | undefined;
  readonly #debounceMs: number;
  #policy: Policy | undefined;
  #text = "";
  #rejectedText: string | undefined;
  #fsWatcher: FSWatcher | undefined;
  #timer: NodeJS.Timeout | undefined;
  #reloading: Promise<void> | undefined;
  #reloadAgain = false;
  #missingOnce = false;
  #closed = false;

  private constructor(path: string, options: PolicyWatcherOptions) {
    this.#path = path;
    this.#onReload = options.onReload;
    this.#onError = options.onError;
    this.#debounceMs = options.debounceMs ?? policyDefaults.watchDebounceMs;
  }

  /**
   * Loads the policy at `path` and starts watching it.
   * @throws AirlockError: `Code.NotFound` when the file is missing, `Code.InvalidArgument`
   * (from {@link Policy.parse}) when it is invalid, `Code.Unavailable` when it cannot be read
   * or watched. Nothing is left open when it throws.
   */
  static async start(path: string, options: PolicyWatcherOptions = {}): Promise<PolicyWatcher> {
    const watcher = new PolicyWatcher(resolve(path), options);
    try {
      // Watch before the first read, so a change between the two is not missed.
      watcher.#watch();
      const text = await readPolicyText(watcher.#path);
      watcher.#policy = Policy.parse(text, watcher.#path);
      watcher.#text = text;
    } catch (error) {
      await watcher.close();
      throw AirlockError.from(error, Code.Unavailable);
    }
    return watcher;
  }

  /** The policy in force: the last one that loaded successfully. */
  current(): Policy {
    if (this.#policy === undefined) throw new AirlockError(Code.FailedPrecondition, "the policy watcher has not loaded a policy");
    return this.#policy;
  }

  /** Stops watching and waits for a reload in progress; no timer or file handle stays open. */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const fsWatcher = this.#fsWatcher;
    this.#fsWatcher = undefined;
    if (fsWatcher !== undefined) {
      const closed = once(fsWatcher, "close");
      fsWatcher.close();
      await closed;
      // libuv frees the handle in a later phase of the loop than the "close" event;
      // leak checks (process.getActiveResourcesInfo) would still see it without this wait.
      await sleep(0);
    }
    await this.#reloading;
  }

  #watch(): void {
    const directory = dirname(this.#path);
    try {
      this.#fsWatcher = watch(directory, { persistent: true }, () => this.#schedule());
    } catch (error) {
      throw new AirlockError(Code.Unavailable, `cannot watch ${directory}: ${(error as Error).message}`, { cause: error, details: { source: this.#path } });
    }
    this.#fsWatcher.on("error", (error) => {
      this.#report(new AirlockError(Code.Unavailable, `watching ${directory} failed; policy reloads stopped: ${error.message}`, { cause: error, details: { source: this.#path } }));
    });
  }

  #schedule(): void {
    if (this.#closed) return;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      void this.#reload();
    }, this.#debounceMs);
  }

  async #reload(): Promise<void> {
    // One reload at a time; events during one cause another pass, so the last write wins.
    if (this.#reloading !== undefined) {
      this.#reloadAgain = true;
      return;
    }
    this.#reloading = (async () => {
      do {
        this.#reloadAgain = false;
        await this.#reloadOnce();
      } while (this.#reloadAgain && !this.#closed);
    })().finally(() => {
      this.#reloading = undefined;
    });
    await this.#reloading;
  }

  async #reloadOnce(): Promise<void> {
    let text: string;
    try {
      text = await readPolicyText(this.#path);
    } catch (error) {
      if (this.#closed) return;
      // Some editors delete and re-create the file; report it missing only if it stays missing.
      if (error instanceof AirlockError && error.code === Code.NotFound && !this.#missingOnce) {
        this.#missingOnce = true;
        this.#schedule();
        return;
      }
      this.#missingOnce = false;
      this.#report(AirlockError.from(error, Code.Unavailable));
      return;
    }
    this.#missingOnce = false;
    if (this.#closed || text === this.#text || text === this.#rejectedText) return;
    let policy: Policy;
    try {
      policy = Policy.parse(text, this.#path);
    } catch (error) {
      this.#rejectedText = text;
      this.#report(AirlockError.from(error, Code.InvalidArgument));
      return;
    }
    this.#policy = policy;
    this.#text = text;
    this.#rejectedText = undefined;
    try {
      this.#onReload?.(policy);
    } catch (error) {
      this.#report(new AirlockError(Code.Internal, `onReload failed: ${error instanceof Error ? error.message : String(error)}`, { cause: error }));
    }
  }

  #report(error: AirlockError): void {
    if (this.#closed || this.#onError === undefined) return;
    try {
      this.#onError(error);
    } catch {
      // A failing error callback must not stop the watcher; there is nowhere left to report to.
    }
  }
}
