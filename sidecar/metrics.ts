import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";

/** The sidecar's Prometheus metrics, on a registry of its own. */
export interface SidecarMetrics {
  readonly registry: Registry;
  /** Calls by method and policy effect. */
  readonly calls: Counter<"method" | "effect">;
  /** Seconds from the call's arrival to its end, through the proxy. */
  readonly passThrough: Histogram<"method">;
  /** Calls held for approval right now. */
  readonly held: Gauge;
  /** Seconds a held call waited for its decision. */
  readonly approvalWait: Histogram;
  /**
   * Calls the sidecar ended itself, by reason. Outcomes (`policy_deny`,
   * `approval_denied`, `approval_expired`, `held_not_waiting`, `agent_cancelled`,
   * `already_used`, and a call id's `call_in_progress`, `call_id_reused`, `already_ran`,
   * `outcome_unknown`, `ended_by_restart`, `credential_expired`) are told apart from refusals of bad input (`unauthenticated`,
   * `bad_request`, `too_large`, `unknown_method`, …), from what the sidecar could
   * not reach (`unavailable`, `upstream_unavailable`) and from its own faults (`internal`).
   */
  readonly rejections: Counter<"reason">;
  /** Decisions refused (forged, mismatched, expired, replayed) and failed unwraps. */
  readonly securityEvents: Counter<"reason">;
  /** Data-plane limits hit, by name (`LimitName` in sidecar/h2/limits.ts). */
  readonly limitHits: Counter<"limit">;
  /** The allow path's counting for one method (`:path`); see {@link MethodTally}. */
  readonly tally: (method: string) => MethodTally;
}

/**
 * What every forwarded call of one method counts: `calls{effect="allow"}` (on
 * the fast path) and its `passThrough` duration. Kept in plain numbers and
 * handed to prom-client when the metrics are read (and every
 * {@link pendingDurationsMax} durations), so a call does none of prom-client's
 * per-observation label work: that work was most of an allowed call's bookkeeping.
 * Readers see the same values, since prom-client asks `collect` before every read.
 */
export interface MethodTally {
  allowed(): void;
  /** Seconds from the call's arrival to its end. */
  finished(seconds: number): void;
}

/** Durations one method keeps before they are handed to the histogram. */
const pendingDurationsMax = 1024;

class DeferredTally implements MethodTally {
  allowedCount = 0;
  readonly durations = new Float64Array(pendingDurationsMax);
  durationCount = 0;

  constructor(
    readonly method: string,
    private readonly flushDurations: (tally: DeferredTally) => void,
  ) {}

  allowed(): void {
    this.allowedCount++;
  }

  finished(seconds: number): void {
    this.durations[this.durationCount++] = seconds;
    if (this.durationCount === pendingDurationsMax) this.flushDurations(this);
  }
}

/**
 * Creates the metrics on a fresh registry, with prom-client's process and
 * runtime metrics (CPU, resident memory, heap, open file descriptors, GC, and
 * event-loop lag: `nodejs_eventloop_lag_seconds` and its percentiles).
 */
export function createSidecarMetrics(): SidecarMetrics {
  const registry = new Registry();
  // Event-loop lag sampled every 100 ms rather than prom-client's 10: its timer would otherwise wake
  // the sidecar 100 times a second, which shows in the allow path's CPU at a fixed request rate.
  collectDefaultMetrics({ register: registry, eventLoopMonitoringPrecision: 100 });
  const tallies = new Map<string, DeferredTally>();
  const calls = new Counter({
    name: "airlock_sidecar_calls_total",
    help: "Calls by method and policy effect",
    labelNames: ["method", "effect"],
    registers: [registry],
    collect() {
      for (const tally of tallies.values()) {
        if (tally.allowedCount === 0) continue;
        this.labels(tally.method, "allow").inc(tally.allowedCount);
        tally.allowedCount = 0;
      }
    },
  });
  const passThrough = new Histogram({
    name: "airlock_sidecar_call_duration_seconds",
    help: "Time from a call's arrival at the sidecar to its end",
    labelNames: ["method"],
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
    registers: [registry],
    collect() {
      for (const tally of tallies.values()) flushDurations(tally);
    },
  });
  function flushDurations(tally: DeferredTally): void {
    if (tally.durationCount === 0) return;
    const child = passThrough.labels(tally.method);
    for (let index = 0; index < tally.durationCount; index++) child.observe(tally.durations[index]!);
    tally.durationCount = 0;
  }
  return {
    registry,
    calls,
    passThrough,
    tally: (method) => {
      let tally = tallies.get(method);
      if (tally === undefined) {
        tally = new DeferredTally(method, flushDurations);
        tallies.set(method, tally);
      }
      return tally;
    },
    held: new Gauge({ name: "airlock_sidecar_held_calls", help: "Calls held for approval right now", registers: [registry] }),
    approvalWait: new Histogram({
      name: "airlock_sidecar_approval_wait_seconds",
      help: "How long held calls waited for their decision",
      buckets: [0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600],
      registers: [registry],
    }),
    rejections: new Counter({ name: "airlock_sidecar_rejections_total", help: "Calls the sidecar ended itself, by reason", labelNames: ["reason"], registers: [registry] }),
    limitHits: new Counter({ name: "airlock_sidecar_limit_hits_total", help: "Data-plane limits hit (the offender refused), by limit", labelNames: ["limit"], registers: [registry] }),
    securityEvents: new Counter({
      name: "airlock_sidecar_security_events_total",
      help: "Refused decisions and failed credential unwraps, by reason",
      labelNames: ["reason"],
      registers: [registry],
    }),
  };
}

