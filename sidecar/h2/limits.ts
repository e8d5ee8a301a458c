/**
 * Every limit the sidecar's data plane enforces against hostile agents, in
 * one place: the defaults, the `limits` section of sidecar.yaml that sets
 * them, and the names they are counted under when hit
 * (`airlock_sidecar_limit_hits_total{limit}`).
 * @module
 */
import type { ConfigReader } from "../../common/config.js";
import { parseDuration } from "../../common/duration.js";

/** The data plane's limits. */
export interface SidecarLimits {
  /** Largest request message accepted, in bytes (RESOURCE_EXHAUSTED). `max_message_bytes`. @default 4 MiB */
  readonly maxMessageBytes: number;
  /** Most client messages a held call may buffer while waiting for its decision. `max_buffered_messages`. @default 1000 */
  readonly maxBufferedMessages: number;
  /** Most request bytes one held call may buffer while waiting (RESOURCE_EXHAUSTED). `max_held_bytes`. @default 8 MiB */
  readonly maxHeldBytes: number;
  /** Most request bytes all held calls of one agent connection may buffer together (RESOURCE_EXHAUSTED). `max_held_bytes_per_connection`. @default 32 MiB */
  readonly maxHeldBytesPerConnection: number;
  /** Agent connections open at once; more are closed at accept. `max_connections`. @default 4096 */
  readonly maxConnections: number;
  /** Agent connections open at once from one peer address. `max_connections_per_peer`. @default 256 */
  readonly maxConnectionsPerPeer: number;
  /** Time from accept to the client preface and first SETTINGS (TLS handshake included); later, closed. `handshake_timeout`. @default 10 s */
  readonly handshakeTimeoutMs: number;
  /** Time a connection may have no open stream before it is sent GOAWAY and closed. `idle_timeout`. @default 5 min */
  readonly idleTimeoutMs: number;
  /** SETTINGS frames a connection may send per second before GOAWAY ENHANCE_YOUR_CALM. `max_settings_per_second`. @default 50 */
  readonly maxSettingsPerSecond: number;
  /** PING frames a connection may send per second before GOAWAY ENHANCE_YOUR_CALM. `max_pings_per_second`. @default 50 */
  readonly maxPingsPerSecond: number;
  /** Stream resets per second and connection, sent by the peer or made us send (refused streams count). `max_resets_per_second`. @default 1000 */
  readonly maxResetsPerSecond: number;
  /** Approval requests one agent may have outstanding (held, or made with `x-airlock-wait: false` and not yet expired). `max_outstanding_approvals_per_agent`. @default 16 */
  readonly maxOutstandingApprovalsPerAgent: number;
  /**
   * Upstream connections per upstream: each agent gets its own, so the resets
   * one agent causes (and an upstream's reset budget they spend) cost only its
   * own calls; past this many agents the least recently opened connection is
   * retired. `max_upstream_connections`. @default 256
   */
  readonly maxUpstreamConnections: number;
}

/** Defaults of {@link SidecarLimits}. */
export const sidecarLimitDefaults: SidecarLimits = Object.freeze({
  maxMessageBytes: 4 * 1024 * 1024,
  maxBufferedMessages: 1000,
  maxHeldBytes: 8 * 1024 * 1024,
  maxHeldBytesPerConnection: 32 * 1024 * 1024,
  maxConnections: 4096,
  maxConnectionsPerPeer: 256,
  handshakeTimeoutMs: 10_000,
  idleTimeoutMs: 300_000,
  maxSettingsPerSecond: 50,
  maxPingsPerSecond: 50,
  maxResetsPerSecond: 1000,
  maxOutstandingApprovalsPerAgent: 16,
  maxUpstreamConnections: 256,
});

/** The `limit` label of `airlock_sidecar_limit_hits_total`. */
export type LimitName =
  | "connections"
  | "connections_per_peer"
  | "handshake_timeout"
  | "idle_timeout"
  | "settings_flood"
  | "ping_flood"
  | "reset_flood"
  | "held_bytes"
  | "held_bytes_per_connection"
  | "outstanding_approvals"
  | "upstream_connections";

/** Reads the `limits` section (every key optional), naming the bad field. */
export function readLimits(limits: ConfigReader | undefined): SidecarLimits {
  const d = sidecarLimitDefaults;
  if (limits === undefined) return d;
  const ms = (key: string, fallback: number): number => {
    if (!limits.has(key)) return fallback;
    const value = parseDuration(limits.string(key));
    if (value === undefined || value <= 0) throw limits.fail(limits.path === "" ? key : `${limits.path}.${key}`, "must be a positive duration such as 500ms, 10s or 1m");
    return value;
  };
  const result: SidecarLimits = {
    maxMessageBytes: limits.integer("max_message_bytes", d.maxMessageBytes, 1, 64 * 1024 * 1024),
    maxBufferedMessages: limits.integer("max_buffered_messages", d.maxBufferedMessages, 1, 100_000),
    maxHeldBytes: limits.integer("max_held_bytes", d.maxHeldBytes, 1, 1024 * 1024 * 1024),
    maxHeldBytesPerConnection: limits.integer("max_held_bytes_per_connection", d.maxHeldBytesPerConnection, 1, 16 * 1024 * 1024 * 1024),
    maxConnections: limits.integer("max_connections", d.maxConnections, 1, 1_000_000),
    maxConnectionsPerPeer: limits.integer("max_connections_per_peer", d.maxConnectionsPerPeer, 1, 1_000_000),
    handshakeTimeoutMs: ms("handshake_timeout", d.handshakeTimeoutMs),
    idleTimeoutMs: ms("idle_timeout", d.idleTimeoutMs),
    maxSettingsPerSecond: limits.integer("max_settings_per_second", d.maxSettingsPerSecond, 1, 1_000_000),
    maxPingsPerSecond: limits.integer("max_pings_per_second", d.maxPingsPerSecond, 1, 1_000_000),
    maxResetsPerSecond: limits.integer("max_resets_per_second", d.maxResetsPerSecond, 1, 1_000_000),
    maxOutstandingApprovalsPerAgent: limits.integer("max_outstanding_approvals_per_agent", d.maxOutstandingApprovalsPerAgent, 1, 1_000_000),
    maxUpstreamConnections: limits.integer("max_upstream_connections", d.maxUpstreamConnections, 1, 100_000),
  };
  limits.done();
  return result;
}
