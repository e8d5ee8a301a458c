/**
 * The NATS topology of `npm run chaos`, behind one function so the run does not
 * care how many nodes there are: the production shape, a 3-node JetStream
 * cluster ({@link startNatsCluster}) with every stream and bucket ×3; the
 * `nats_restart` fault restarts the node every client names first.
 * @module
 */
import type { ConnectionOptions, NatsConnection } from "@nats-io/transport-node";
import type { BusRole } from "../common/bus.js";
import type { NatsConnectionConfig } from "../common/nats.js";
import { startNatsCluster } from "../harness/index.js";

/** The bus the chaos run drives: where it is, each role's credential, one node to restart, and its end. */
export interface ChaosBus {
  /** What the run prints about the topology, e.g. `nats-server 2.15.3, 3 nodes, streams ×3`. */
  readonly description: string;
  /** Replicas of every stream and bucket: the brokers' `nats.replicas`. */
  readonly replicas: number;
  /** The connection config of a role (every node's URL, its own credential, the CA). */
  credentials(role: BusRole): Promise<NatsConnectionConfig>;
  /** Connects as `role`. */
  connect(role: BusRole, extra?: Partial<ConnectionOptions>): Promise<NatsConnection>;
  /** Stops one NATS node and starts it again on the same port and store: the `nats_restart` fault. */
  restartOneNode(): Promise<void>;
  /** Stops every node and removes its store. */
  stop(): Promise<void>;
}

/** Starts the chaos run's NATS: a 3-node JetStream cluster on loopback. */
export async function startChaosBus(): Promise<ChaosBus> {
  const cluster = await startNatsCluster({ nodes: 3 });
  const first = cluster.nodes[0];
  if (first === undefined) throw new Error("the cluster has no node");
  return {
    description: `nats-server ${cluster.version}, ${cluster.nodes.length} nodes, streams ×3`,
    replicas: 3,
    credentials: (role) => cluster.credentials(role),
    connect: (role, extra) => cluster.connect(role, extra),
    restartOneNode: () => first.restart(),
    stop: () => cluster.stop(),
  };
}
