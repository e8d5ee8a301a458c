/**
 * Calls the sidecar decided without the broker (denied by policy, refused,
 * timed out, or allowed by a rule with `audit: true`) reported to the audit
 * trail. Reports are aggregated and sent in batches on the host's own security
 * subject, so neither a busy allow path nor an agent hammering a denied method
 * turns into one NATS message (or one audit event) per call.
 * @module
 */
import { randomUUID } from "node:crypto";
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { subjects } from "../common/subjects.js";

/** What happened to a call the sidecar decided alone. */
export type CallOutcome = "denied" | "refused" | "timed_out" | "allowed";

/** One call to report. */
export interface CallReport {
  readonly outcome: CallOutcome;
  /** `/package.Service/Method`. */
  readonly method: string;
  /** The rule that decided, `default`, or empty when no rule was reached (a refused credential). */
  readonly rule: string;
  /** The authenticated agent; empty when there was none. */
  readonly agent: string;
  readonly onBehalfOf: string;
  /** A stable reason: `policy_deny`, `unauthenticated`, `reason_missing`, `deadline_exceeded`, `allowed`... */
  readonly reason: string;
  /** The approval request, for a held call that timed out. */
  readonly requestId?: string;
}

/** One line of a batch: identical reports within a batch are counted, not repeated. */
export interface ReportedCalls extends CallReport {
  readonly count: number;
  readonly firstAt: string;
  readonly lastAt: string;
}

/** The message a batch travels in on `airlock.security.<host>`. */
export interface CallReportBatch {
  readonly kind: "calls";
  readonly calls: readonly ReportedCalls[];
  /**
   * Calls left out: the batch already held {@link callReporterDefaults.maxDistinct}
   * distinct reports, or an older batch was given up while JetStream did not store it.
   */
  readonly dropped: number;
}

/** Defaults of {@link CallReporter}. */
export const callReporterDefaults = {
  /** How long reports gather before a batch goes, in ms. */
  flushIntervalMs: 500,
  /** Distinct reports one batch holds; past it, reports are only counted as dropped. */
  maxDistinct: 200,
  /** Batches kept for another try while JetStream does not store them (NATS down). */
  maxUnsent: 50,
} as const;

/**
 * Gathers call reports and publishes them in batches to JetStream, waiting for
 * the stream's acknowledgement; a batch that is not stored is sent again with
 * the next one (up to {@link callReporterDefaults.maxUnsent} batches).
 */
export class CallReporter {
  private readonly nc: NatsConnection;
  private readonly js: JetStreamClient;
  /** Batches not yet stored, each with the message id that lets JetStream drop a second copy. */
  private unsent: Array<{ readonly id: string; readonly batch: CallReportBatch }> = [];
  /** The send in progress, if any: one at a time, so an outage does not pile up a send per flush. */
  private sending: Promise<void> | undefined;
  private readonly subject: string;
  private readonly now: () => Date;
  private pending = new Map<string, { report: CallReport; count: number; firstAt: string; lastAt: string }>();
  private dropped = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(options: { nc: NatsConnection; host: string; now?: () => Date; flushIntervalMs?: number }) {
    this.nc = options.nc;
    this.js = jetstream(options.nc);
    this.subject = subjects.security(options.host);
    this.now = options.now ?? (() => new Date());
    this.timer = setInterval(() => void this.flush(), options.flushIntervalMs ?? callReporterDefaults.flushIntervalMs);
    this.timer.unref();
  }

  /** Counts a call in the next batch. Never throws, never waits. */
  report(report: CallReport): void {
    const key = `${report.outcome}\u0000${report.method}\u0000${report.rule}\u0000${report.agent}\u0000${report.onBehalfOf}\u0000${report.reason}\u0000${report.requestId ?? ""}`;
    const at = this.now().toISOString();
    const entry = this.pending.get(key);
    if (entry !== undefined) {
      entry.count++;
      entry.lastAt = at;
      return;
    }
    if (this.pending.size >= callReporterDefaults.maxDistinct) {
      this.dropped++;
      return;
    }
    this.pending.set(key, { report, count: 1, firstAt: at, lastAt: at });
  }

  /** Publishes what has gathered, and any batch not yet stored; resolves once they are stored or kept for later. */
  flush(): Promise<void> {
    if (this.pending.size > 0 || this.dropped > 0) {
      this.unsent.push({
        id: randomUUID(),
        batch: { kind: "calls", calls: [...this.pending.values()].map(({ report, count, firstAt, lastAt }) => ({ ...report, count, firstAt, lastAt })), dropped: this.dropped },
      });
      this.pending = new Map();
      this.dropped = 0;
      if (this.unsent.length > callReporterDefaults.maxUnsent) {
        // The oldest batch is given up, but not silently: its calls are counted as dropped in the next one.
        const lost = (this.unsent.shift() as { batch: CallReportBatch }).batch;
        this.dropped += lost.calls.reduce((calls, line) => calls + line.count, 0) + lost.dropped;
      }
    }
    // A send in progress takes what was just queued too (it sends until nothing is left).
    this.sending ??= this.send().finally(() => {
      this.sending = undefined;
    });
    return this.sending;
  }

  private async send(): Promise<void> {
    while (this.unsent.length > 0 && !this.nc.isClosed()) {
      const { id, batch } = this.unsent[0] as { id: string; batch: CallReportBatch };
      try {
        // A publish that timed out while disconnected is still sent on reconnect; the id makes the retry a duplicate JetStream drops.
        await this.js.publish(this.subject, JSON.stringify(batch), { timeout: 2000, msgID: id });
      } catch {
        return; // Kept, and tried again with the next flush.
      }
      this.unsent.shift();
    }
  }

  /** Sends the last batch and stops. */
  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.flush();
  }
}
