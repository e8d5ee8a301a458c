/**
 * The NATS topology of `npm run chaos`, behind one function so the run does not
 * care how many nodes there are. Today: the harness's single node
 * ({@link startNats}); its one restartable node is that server. When the
 * harness's 3-node cluster lands (`startNatsCluster({ nodes: 3 })` in
 * harness/nats.ts), {@link startChaosBus} is the one place to switch: return
 * the cluster's `urls`, `credentials`, `connect` and `stop`, and restart
 * `nodes[0]` (or any one node) in `restartOneNode`.
 * @module
 */
import type { ConnectionOptions, NatsConnection } from "@nats-io/transport-node";
import type { BusRole } from "../common/bus.js";
import type { NatsConnectionConfig } from "../common/nats.js";
import { startNats } from "../harness/index.js";

/** The bus the chaos run drives: where it is, each role's credential, one node to restart, and its end. */
export interface ChaosBus {
  /** What the run prints about the topology, e.g. `nats-server 2.15.3, 1 node`. */
  readonly description: string;
  /** The connection config of a role (every node's URL, its own credential, the CA). */
  credentials(role: BusRole): Promise<NatsConnectionConfig>;
  /** Connects as `role`. */
  connect(role: BusRole, extra?: Partial<ConnectionOptions>): Promise<NatsConnection>;
  /** Stops one NATS node and starts it again on the same port and store: the `nats_restart` fault. */
  restartOneNode(): Promise<void>;
  /** Stops every node and removes its store. */
  stop(): Promise<void>;
}

/** Starts the chaos run's NATS: one JetStream node today (see the module comment for the cluster). */
export async function startChaosBus(): Promise<ChaosBus> {
  const nats = await startNats();
  return {
    description: `nats-server ${nats.version}, 1 node (single-node harness; the 3-node cluster is not in this branch yet)`,
    credentials: (role) => nats.credentials(role),
    connect: (role, extra) => nats.connect(role, extra),
    restartOneNode: () => nats.restart(),
    stop: () => nats.stop(),
  };
}
