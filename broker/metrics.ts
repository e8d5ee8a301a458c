import { Counter, Gauge, Histogram, Registry } from "prom-client";

/** The broker's Prometheus metrics, on a registry of its own. */
export interface BrokerMetrics {
  readonly registry: Registry;
  /** Requests by how they ended at decision time: approved, denied, expired, cancelled, refused. */
  readonly requests: Counter<"outcome">;
  readonly pendingDepth: Gauge;
  readonly oldestPendingSeconds: Gauge;
  readonly timeToDecision: Histogram;
  readonly expiries: Counter;
  readonly vaultLatency: Histogram<"operation">;
  readonly vaultErrors: Counter<"operation">;
  readonly leasesOutstanding: Gauge;
  /** Seconds from a completion's arrival to its lease's revocation. */
  readonly revokeLag: Histogram;
  readonly natsReconnects: Counter;
  /** Messages refused or terminated, by reason (`RefusalReason`): each one is also a flagged audit event. */
  readonly refusals: Counter<"reason">;
  /** Audit checkpoints by outcome: `written`, `failed`, or why the trail contradicts the last one (`trail_replaced`, `trail_truncated`, `trail_edited`). */
  readonly auditCheckpoints: Counter<"outcome">;
}

/** Creates the metrics on a fresh registry. */
export function createBrokerMetrics(): BrokerMetrics {
  const registry = new Registry();
  const registers = [registry];
  return {
    registry,
    requests: new Counter({ name: "airlock_broker_requests_total", help: "Requests by outcome", labelNames: ["outcome"], registers }),
    pendingDepth: new Gauge({ name: "airlock_broker_pending_requests", help: "Requests waiting for a decision", registers }),
    oldestPendingSeconds: new Gauge({ name: "airlock_broker_oldest_pending_age_seconds", help: "Age of the oldest pending request", registers }),
    timeToDecision: new Histogram({ name: "airlock_broker_time_to_decision_seconds", help: "From request to decision", buckets: [0.1, 1, 5, 30, 60, 300, 900, 3600], registers }),
    expiries: new Counter({ name: "airlock_broker_expired_total", help: "Requests that expired undecided", registers }),
    vaultLatency: new Histogram({
      name: "airlock_broker_vault_seconds",
      help: "Vault issue and revoke latency",
      labelNames: ["operation"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    }),
    vaultErrors: new Counter({ name: "airlock_broker_vault_errors_total", help: "Failed Vault issue and revoke calls", labelNames: ["operation"], registers }),
    leasesOutstanding: new Gauge({ name: "airlock_broker_leases_outstanding", help: "Issued credentials not revoked yet", registers }),
    revokeLag: new Histogram({ name: "airlock_broker_revoke_lag_seconds", help: "From completion to revocation", buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 5, 30], registers }),
    natsReconnects: new Counter({ name: "airlock_broker_nats_reconnects_total", help: "NATS reconnects", registers }),
    refusals: new Counter({ name: "airlock_broker_refusals_total", help: "Messages from sidecars refused or terminated, by reason", labelNames: ["reason"], registers }),
    auditCheckpoints: new Counter({ name: "airlock_broker_audit_checkpoints_total", help: "Audit checkpoints by outcome; anything but written needs an operator", labelNames: ["outcome"], registers }),
  };
}
