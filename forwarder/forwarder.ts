import type { NatsConnection } from "@nats-io/transport-node";
import { readAuditEvents } from "../broker/audit/index.js";
import { AirlockError, Code } from "../common/errors.js";
import { createLogger, type Logger } from "../common/logger.js";
import { connectNats } from "../common/nats.js";
import type { AuditEvent } from "../proto/index.js";
import type { ForwarderConfig, SinkConfig } from "./config.js";
import { PositionStore } from "./position.js";
import { createSink, type Sink } from "./sinks.js";

/** Waits `ms`, or less when `signal` aborts (it resolves then, never rejects). */
export type Sleep = (ms: number, signal: AbortSignal) => Promise<void>;

/** The real {@link Sleep}: a timer cleared on abort. */
export const realSleep: Sleep = (ms, signal) =>
  new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });

/** Options of {@link Forwarder.start}. */
export interface ForwarderOptions {
  readonly config: ForwarderConfig;
  /** @default a `forwarder` logger on standard output */
  readonly log?: Logger;
  /** How the forwarder waits between polls and retries: tests pass one that counts the waits or shortens them. @default {@link realSleep} */
  readonly sleep?: Sleep;
  /** The clock webhook signatures are dated by. @default Date.now */
  readonly now?: () => number;
  /**
   * Told when a sink stops on a failure that sending again cannot fix (a refused
   * token, a 4xx): the sink's position stays at its last acknowledged batch.
   */
  readonly onSinkFailed?: (sink: string, error: AirlockError) => void;
}

/** What one sink has done since the forwarder started. */
export interface SinkStats {
  readonly name: string;
  readonly kind: SinkConfig["kind"];
  /** The last sequence the sink acknowledged, durable in the position file. */
  readonly position: bigint;
  /** Events acknowledged by the sink. */
  readonly forwarded: number;
  /**
   * Sequences the position moved past without delivering them: only when the
   * trail itself lacks them (which `airlock audit verify` reports as
   * `event_missing`). The forwarder never skips an event it could read.
   */
  readonly lost: number;
  /** Delivery attempts that failed and were made again. */
  readonly retries: number;
  /** Failures that stopped the sink (0 or 1). */
  readonly failures: number;
  /** Reads of the trail that failed (NATS unreachable) and were made again. */
  readonly readErrors: number;
  readonly state: "running" | "failed" | "stopped";
  /** Why the sink stopped, when it failed. */
  readonly error?: AirlockError;
}

/** The forwarder's mutable view of one sink. */
interface SinkRun {
  readonly sink: Sink;
  forwarded: number;
  lost: number;
  retries: number;
  failures: number;
  readErrors: number;
  state: SinkStats["state"];
  error?: AirlockError;
}

/** One line per sink: `forwarder sink=NAME kind=KIND forwarded=N lost=0 retries=R failures=F position=P state=S`. */
export function sinkStatsLine(stats: SinkStats): string {
  return `forwarder sink=${stats.name} kind=${stats.kind} forwarded=${stats.forwarded} lost=${stats.lost} retries=${stats.retries} failures=${stats.failures} position=${stats.position} state=${stats.state}`;
}

/**
 * Streams the audit trail to SIEM sinks, at least once and in order. Each sink
 * runs on its own: it reads the trail (as the read-only audit role) from the
 * sequence after its durable position, delivers batches of at most
 * `batch_size` events, and moves its position in the position file only after
 * the sink acknowledged the whole batch. A retryable failure (refused
 * connection, 5xx, 429, timeout) is retried with doubling backoff, as long as
 * it lasts, holding that sink's position; a failure sending again cannot fix
 * (401, 403, 400) stops that sink, leaving its position where it was. After a
 * restart each sink resumes from its position, so a batch in flight at a crash
 * is delivered again: every event carries its `sequence`, which tells the
 * duplicate apart. One slow or failed sink never holds up the others.
 */
export class Forwarder {
  private readonly config: ForwarderConfig;
  private readonly nc: NatsConnection;
  private readonly positions: PositionStore;
  private readonly runs: SinkRun[];
  private readonly log: Logger;
  private readonly sleep: Sleep;
  private readonly onSinkFailed: ForwarderOptions["onSinkFailed"];
  private readonly stopping = new AbortController();
  /** Stream sequences of messages that are not audit events, already logged. */
  private readonly undecodable = new Set<number>();
  private readonly loops: Promise<void>[];
  private closed: Promise<void> | undefined;

  private constructor(options: ForwarderOptions, nc: NatsConnection, positions: PositionStore, sinks: Sink[]) {
    this.config = options.config;
    this.nc = nc;
    this.positions = positions;
    this.log = options.log ?? createLogger({ name: "forwarder" });
    this.sleep = options.sleep ?? realSleep;
    this.onSinkFailed = options.onSinkFailed;
    this.runs = sinks.map((sink) => ({ sink, forwarded: 0, lost: 0, retries: 0, failures: 0, readErrors: 0, state: "running" }));
    this.loops = this.runs.map((run) => this.follow(run));
  }

  /**
   * Reads the position file, makes the sinks, connects to NATS as the audit
   * role and starts every sink's loop.
   * @throws AirlockError naming the field for a bad TLS file or position file, or `unavailable` when NATS cannot be reached.
   */
  static async start(options: ForwarderOptions): Promise<Forwarder> {
    const { config } = options;
    const positions = await PositionStore.open(config.positionFile);
    const sinks: Sink[] = [];
    try {
      for (const [index, sinkConfig] of config.sinks.entries()) sinks.push(await createSink(sinkConfig, `sinks[${index}]`, options.now));
      // Reconnecting for ever: a NATS outage only pauses forwarding.
      const nc = await connectNats(config.nats, { role: { kind: "audit" }, name: "airlock-forwarder", extra: { maxReconnectAttempts: -1 } });
      const forwarder = new Forwarder(options, nc, positions, sinks);
      forwarder.log.info({ sinks: config.sinks.map((sink) => ({ name: sink.name, kind: sink.kind, position: positions.get(sink.name).toString() })) }, "forwarding the audit trail");
      return forwarder;
    } catch (error) {
      await Promise.all(sinks.map((sink) => sink.close()));
      throw error;
    }
  }

  /** Each sink's counters and position, in config order. */
  stats(): SinkStats[] {
    return this.runs.map((run) => ({
      name: run.sink.name,
      kind: run.sink.kind,
      position: this.positions.get(run.sink.name),
      forwarded: run.forwarded,
      lost: run.lost,
      retries: run.retries,
      failures: run.failures,
      readErrors: run.readErrors,
      state: run.state,
      ...(run.error === undefined ? {} : { error: run.error }),
    }));
  }

  /** {@link sinkStatsLine} of every sink. */
  summary(): string[] {
    return this.stats().map(sinkStatsLine);
  }

  /** Stops every sink (a batch in flight is abandoned unacknowledged: it is sent again on the next start), closes the sinks and NATS. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      this.stopping.abort();
      await Promise.all(this.loops);
      await Promise.all(this.runs.map((run) => run.sink.close()));
      await this.nc.close();
      for (const line of this.summary()) this.log.info(line);
    })();
    return this.closed;
  }

  private backoff(attempt: number): number {
    return Math.min(this.config.retry.maxMs, this.config.retry.initialMs * 2 ** Math.min(attempt - 1, 30));
  }

  /** Up to `batch_size` events from sequence `from` on, as far as the trail reaches now. */
  private async readBatch(from: bigint): Promise<AuditEvent[]> {
    const events: AuditEvent[] = [];
    // A message that is not an event cannot be forwarded: skipped, so it does not stall every sink; the
    // sequence it held shows as a gap (lost, logged), and airlock audit verify names it.
    const onUndecodable = (streamSequence: number) => {
      // Each sink reads past it, and again after a restart: said once per message, not once per read.
      if (this.undecodable.has(streamSequence) || this.undecodable.size >= 1000) return;
      this.undecodable.add(streamSequence);
      this.log.error({ streamSequence }, "an audit stream message is not an audit event; skipped (run airlock audit verify)");
    };
    for await (const event of readAuditEvents(this.nc, { from: Number(from), onUndecodable })) {
      events.push(event);
      if (events.length >= this.config.batchSize) break;
    }
    return events;
  }

  /** One sink's loop: read from its position, deliver, record, until closed or failed. */
  private async follow(run: SinkRun): Promise<void> {
    const signal = this.stopping.signal;
    const name = run.sink.name;
    let readFailures = 0;
    try {
      while (!signal.aborted) {
        const position = this.positions.get(name);
        let batch: AuditEvent[];
        try {
          batch = (await this.readBatch(position + 1n)).filter((event) => event.sequence > position);
          readFailures = 0;
        } catch (error) {
          if (signal.aborted) break;
          readFailures++;
          run.readErrors++;
          this.log.warn({ sink: name, err: AirlockError.from(error, Code.Unavailable).toJSON(), attempt: readFailures }, "cannot read the audit trail; trying again");
          await this.sleep(this.backoff(readFailures), signal);
          continue;
        }
        if (batch.length === 0) {
          await this.sleep(this.config.pollIntervalMs, signal);
          continue;
        }
        this.countGaps(run, position, batch);
        if (!(await this.deliver(run, batch))) break;
        const last = (batch[batch.length - 1] as AuditEvent).sequence;
        if (!(await this.record(run, last))) break;
        run.forwarded += batch.length;
      }
      if (run.state === "running") run.state = "stopped";
    } catch (error) {
      // Not expected (every step handles its own failures), but a loop must never die silently.
      this.fail(run, AirlockError.from(error, Code.Internal));
    }
  }

  /** Counts sequences missing from the trail itself (never the forwarder's doing) and says which. */
  private countGaps(run: SinkRun, position: bigint, batch: readonly AuditEvent[]): void {
    let expected = position + 1n;
    for (const event of batch) {
      if (event.sequence > expected) {
        run.lost += Number(event.sequence - expected);
        this.log.error({ sink: run.sink.name, from: expected.toString(), to: (event.sequence - 1n).toString() }, "the audit trail has no events in this range (run airlock audit verify)");
      }
      expected = event.sequence + 1n;
    }
  }

  /** Delivers one batch, retrying while the failure is retryable; false when the sink stopped (failed or closing). */
  private async deliver(run: SinkRun, batch: readonly AuditEvent[]): Promise<boolean> {
    const signal = this.stopping.signal;
    for (let attempt = 1; ; attempt++) {
      try {
        await run.sink.deliver(batch, AbortSignal.any([signal, AbortSignal.timeout(this.config.requestTimeoutMs)]));
        if (attempt > 1) this.log.info({ sink: run.sink.name, attempts: attempt }, "delivered after retrying");
        return true;
      } catch (error) {
        if (signal.aborted) return false;
        const failure = AirlockError.from(error);
        if (!failure.retryable) {
          this.fail(run, failure);
          return false;
        }
        run.retries++;
        const first = (batch[0] as AuditEvent).sequence.toString();
        this.log.warn({ sink: run.sink.name, err: failure.toJSON(), attempt, firstSequence: first }, "delivery failed; trying again");
        await this.sleep(this.backoff(attempt), signal);
        if (signal.aborted) return false;
      }
    }
  }

  /** Makes the new position durable, retrying a failed write; false when closing first (the batch is then sent again next start). */
  private async record(run: SinkRun, sequence: bigint): Promise<boolean> {
    const signal = this.stopping.signal;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.positions.set(run.sink.name, sequence);
        return true;
      } catch (error) {
        this.log.error({ sink: run.sink.name, err: AirlockError.from(error).toJSON(), attempt }, "cannot write the position file; trying again");
        await this.sleep(this.backoff(attempt), signal);
        if (signal.aborted) return false;
      }
    }
  }

  private fail(run: SinkRun, error: AirlockError): void {
    run.failures++;
    run.state = "failed";
    run.error = error;
    this.log.error({ sink: run.sink.name, err: error.toJSON(), position: this.positions.get(run.sink.name).toString() }, "sink stopped: sending again cannot fix this; its position is kept");
    this.onSinkFailed?.(run.sink.name, error);
  }
}
