import { AirlockError, Code } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import type { RetryConfig } from "./config.js";
import { isRetryable } from "./http.js";

/** One notification to deliver, e.g. one Slack post or one webhook call. */
export interface Delivery {
  /** What it is, for logs, e.g. `slack chat.postMessage C01 for req-1`. Never a secret or a URL path. */
  readonly description: string;
  /**
   * Deliveries with the same key run one at a time, in the order they were queued
   * (a retrying one keeps its place): a Slack message must be posted before it can be
   * updated. Deliveries without a key run in any order.
   */
  readonly key?: string;
  /**
   * One attempt. Throw a retryable AirlockError (`unavailable`, `resource_exhausted`
   * with `details.retryAfterMs`, `deadline_exceeded`) to be retried; anything else
   * ends the delivery. `signal` aborts at the attempt's time limit and at close.
   */
  readonly run: (signal: AbortSignal) => Promise<void>;
}

/** Options of {@link DeliveryQueue}. */
export interface DeliveryQueueOptions {
  readonly log: Logger;
  readonly retry: RetryConfig;
  /** Time limit of one attempt, in ms. */
  readonly timeoutMs: number;
  /** Deliveries waiting at most (not counting running ones); past it the oldest is dropped. */
  readonly queueSize: number;
  /** Attempts running at once. @default 4 */
  readonly concurrency?: number;
  /** How long {@link DeliveryQueue.close} lets running attempts finish before aborting them, in ms. @default 2000 */
  readonly closeGraceMs?: number;
}

/** Defaults of {@link DeliveryQueueOptions}. */
export const deliveryQueueDefaults = { concurrency: 4, closeGraceMs: 2000 } as const;

interface Job {
  readonly delivery: Delivery;
  /** Attempts started so far. */
  attempts: number;
  /** Not before this time (ms since the epoch): the backoff of a retry. */
  readyAt: number;
}

/**
 * Runs deliveries in the background so that whoever queues one never waits for a
 * receiver: {@link enqueue} only records the job. Failed attempts are retried with
 * exponential backoff (a waiting retry holds no worker), the queue is bounded (the
 * oldest waiting delivery is dropped with a warning), failures are logged by
 * description only, and {@link close} leaves no timer and no request behind.
 */
export class DeliveryQueue {
  private readonly options: DeliveryQueueOptions;
  private readonly concurrency: number;
  private pending: Job[] = [];
  private readonly running = new Map<Job, { readonly done: Promise<void>; readonly abort: AbortController }>();
  private timer: NodeJS.Timeout | undefined;
  private timerAt = Number.POSITIVE_INFINITY;
  private immediate: NodeJS.Immediate | undefined;
  private idleWaiters: Array<() => void> = [];
  private closed = false;

  constructor(options: DeliveryQueueOptions) {
    this.options = options;
    this.concurrency = Math.max(1, options.concurrency ?? deliveryQueueDefaults.concurrency);
  }

  /** Deliveries waiting (retries included) plus running. */
  get size(): number {
    return this.pending.length + this.running.size;
  }

  /**
   * Queues a delivery and returns at once; the attempt starts on a later turn of the
   * event loop, so not even building the payload happens on the caller's time.
   * Returns false (and logs) when the queue is closed.
   */
  enqueue(delivery: Delivery): boolean {
    if (this.closed) {
      this.options.log.debug({ delivery: delivery.description }, "notification not sent: the notifier is closed");
      return false;
    }
    this.pending.push({ delivery, attempts: 0, readyAt: 0 });
    while (this.pending.length > this.options.queueSize) {
      const dropped = this.pending.shift();
      this.options.log.warn({ delivery: dropped?.delivery.description, queueSize: this.options.queueSize }, "notification queue full: dropped the oldest waiting delivery");
    }
    this.immediate ??= setImmediate(() => {
      this.immediate = undefined;
      this.pump();
    });
    return true;
  }

  /** Resolves once nothing waits and nothing runs (retries included), or when the queue closes. */
  idle(): Promise<void> {
    if (this.size === 0 || this.closed) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Stops: deliveries that have not started (and retries waiting for their turn) are
   * abandoned with a warning, running attempts get `closeGraceMs` to finish and are
   * then aborted. Resolves when every attempt has settled; no timer is left.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.immediate !== undefined) clearImmediate(this.immediate);
    this.immediate = undefined;
    if (this.pending.length > 0) {
      this.options.log.warn({ abandoned: this.pending.map((job) => job.delivery.description) }, "notifier closing: deliveries not sent");
      this.pending = [];
    }
    const running = [...this.running.values()];
    if (running.length > 0) {
      const grace = setTimeout(() => {
        for (const { abort } of running) abort.abort();
      }, this.options.closeGraceMs ?? deliveryQueueDefaults.closeGraceMs);
      await Promise.all(running.map(({ done }) => done));
      clearTimeout(grace);
    }
    this.settleIdle();
  }

  /** Starts every job that may run now and arms one timer for the earliest retry. */
  private pump(): void {
    if (this.closed) return;
    const now = Date.now();
    // Keys of running jobs, then of every waiting job passed over: later jobs with the key wait for it.
    const busy = new Set<string>();
    for (const job of this.running.keys()) if (job.delivery.key !== undefined) busy.add(job.delivery.key);
    let nextAt = Number.POSITIVE_INFINITY;
    for (let index = 0; index < this.pending.length && this.running.size < this.concurrency; ) {
      const job = this.pending[index];
      if (job === undefined) break;
      const key = job.delivery.key;
      if (key !== undefined && busy.has(key)) {
        index++;
        continue;
      }
      if (key !== undefined) busy.add(key);
      if (job.readyAt > now) {
        nextAt = Math.min(nextAt, job.readyAt);
        index++;
        continue;
      }
      this.pending.splice(index, 1);
      this.start(job);
    }
    if (nextAt !== this.timerAt) {
      clearTimeout(this.timer);
      this.timer = undefined;
      this.timerAt = nextAt;
      if (Number.isFinite(nextAt)) {
        this.timer = setTimeout(() => {
          this.timer = undefined;
          this.timerAt = Number.POSITIVE_INFINITY;
          this.pump();
        }, nextAt - now);
      }
    }
    if (this.size === 0) this.settleIdle();
  }

  private start(job: Job): void {
    job.attempts++;
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), this.options.timeoutMs);
    const done = this.attempt(job, abort.signal).finally(() => {
      clearTimeout(timeout);
      this.running.delete(job);
      this.pump();
    });
    this.running.set(job, { done, abort });
  }

  private async attempt(job: Job, signal: AbortSignal): Promise<void> {
    const { log, retry } = this.options;
    const description = job.delivery.description;
    try {
      await job.delivery.run(signal);
      if (job.attempts > 1) log.info({ delivery: description, attempts: job.attempts }, "notification delivered after retrying");
    } catch (thrown) {
      // Errors are logged by message only: a cause (an HTTP library error) could carry a URL or header.
      const error = signal.aborted && !(thrown instanceof AirlockError) ? new AirlockError(Code.DeadlineExceeded, `${description}: no answer in time`) : AirlockError.from(thrown, Code.Internal);
      if (this.closed) {
        log.warn({ delivery: description, attempts: job.attempts, error: error.message }, "notification not delivered: the notifier closed");
        return;
      }
      if (!isRetryable(error) || job.attempts >= retry.attempts) {
        log.error({ delivery: description, attempts: job.attempts, error: error.message }, "notification delivery failed; giving up");
        return;
      }
      const backoff = retry.baseDelayMs * 2 ** (job.attempts - 1);
      // Jitter keeps replicas that failed together from retrying in lockstep.
      const jittered = backoff * (0.9 + Math.random() * 0.2);
      const asked = typeof error.details.retryAfterMs === "number" ? error.details.retryAfterMs : 0;
      const delay = Math.round(Math.min(retry.maxDelayMs, Math.max(jittered, asked)));
      log.warn({ delivery: description, attempt: job.attempts, retryInMs: delay, error: error.message }, "notification delivery failed; will retry");
      job.readyAt = Date.now() + delay;
      // Back at the front: it is the oldest, and later deliveries with its key must keep waiting for it.
      this.pending.unshift(job);
    }
  }

  private settleIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const resolve of waiters) resolve();
  }
}
