/**
 * The demo's proof that the bus boundary holds: with the demo sidecar's own
 * credential (what an agent on that host can read), it really tries what an
 * attacker there would, and reports what the NATS server answered.
 */
import { randomUUID } from "node:crypto";
import { jetstream } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { connectNats, type NatsConnectionConfig, natsRefusal } from "../common/nats.js";
import { auditStream, stateBucket, subjects } from "../common/subjects.js";

/** What the server answered each attempt: `refused` by its permissions or authentication, else `ALLOWED`. */
export interface BusCheck {
  readonly anonymous: "refused" | "ALLOWED";
  readonly foreignHost: "refused" | "ALLOWED";
  readonly stateWrite: "refused" | "ALLOWED";
  readonly auditWrite: "refused" | "ALLOWED";
}

/** The one line the demo prints: `bus ok anonymous=refused foreign_host=refused state_write=refused audit_write=refused`. */
export function busCheckLine(check: BusCheck): string {
  const ok = Object.values(check).every((answer) => answer === "refused");
  return `bus ${ok ? "ok" : "BROKEN"} anonymous=${check.anonymous} foreign_host=${check.foreignHost} state_write=${check.stateWrite} audit_write=${check.auditWrite}`;
}

async function attempt(nc: NatsConnection, subject: string): Promise<"refused" | "ALLOWED"> {
  try {
    // Were the boundary broken, the stream's last-sequence check still keeps this out of a stream with anything in it.
    await jetstream(nc).publish(subject, new Uint8Array(0), { timeout: 3000, expect: { lastSequence: 0 } });
    return "ALLOWED";
  } catch (error) {
    return natsRefusal(error) === "permissions" ? "refused" : "ALLOWED";
  }
}

/**
 * Tries, as host `host`'s sidecar: an anonymous connection; a request
 * published for another host; a write to the state bucket; an event appended
 * to the audit stream. Each counts as refused only when the server said so
 * (an authorization or permissions violation), never on a timeout.
 */
export async function checkBusBoundary(config: NatsConnectionConfig, host: string): Promise<BusCheck> {
  let anonymous: BusCheck["anonymous"] = "ALLOWED";
  try {
    const nc = await connect({ servers: [...config.servers], tls: config.tls?.caFile === undefined ? {} : { caFile: config.tls.caFile }, reconnect: false, timeout: 3000 });
    await nc.close();
  } catch (error) {
    if (natsRefusal(error) === "authorization") anonymous = "refused";
  }
  const nc = await connectNats(config, { role: { kind: "sidecar", host }, name: `airlock-bus-check-${host}`, extra: { reconnect: false } });
  try {
    const foreign = host === "elsewhere" ? "elsewhere-2" : "elsewhere";
    return {
      anonymous,
      foreignHost: await attempt(nc, subjects.request(foreign, randomUUID())),
      stateWrite: await attempt(nc, `$KV.${stateBucket}.${randomUUID()}`),
      auditWrite: await attempt(nc, auditStream.subject),
    };
  } finally {
    await nc.close();
  }
}
