import { auditStream, hostPattern, stateBucket, streams } from "./subjects.js";

/**
 * Who is on the bus. Each role gets only the NATS rights it needs, and the
 * NATS server enforces them: a sidecar's credential is good for its own host's
 * subjects only, so an agent that reads its sidecar's files can do no more than
 * that sidecar.
 */
export type BusRole =
  /** The sidecar of one host. */
  | { readonly kind: "sidecar"; readonly host: string }
  /** A broker replica (all replicas share one role). */
  | { readonly kind: "broker" }
  /** `airlock audit verify | export`: reads the audit trail, nothing else. */
  | { readonly kind: "audit" }
  /** An operator: every right, for provisioning and repair. Never given to a running part. */
  | { readonly kind: "admin" };

/** NATS publish and subscribe rights, as the server's `permissions` block takes them. */
export interface BusPermissions {
  readonly publish: { readonly allow: readonly string[] };
  readonly subscribe: { readonly allow: readonly string[] };
}

const api = "$JS.API";

/**
 * The prefix of a role's reply inboxes. Each role subscribes only under its own
 * prefix, so no one can read the replies (JetStream acks, fetched messages,
 * pushed decisions) another party asked for.
 */
export function busInboxPrefix(role: BusRole): string {
  return role.kind === "sidecar" ? `_INBOX_airlock.sidecar.${role.host}` : `_INBOX_airlock.${role.kind}`;
}

function readStream(stream: string): string[] {
  return [`${api}.STREAM.INFO.${stream}`, `${api}.CONSUMER.INFO.${stream}.*`, `${api}.CONSUMER.MSG.NEXT.${stream}.*`, `${api}.DIRECT.GET.${stream}`, `${api}.DIRECT.GET.${stream}.>`, `${api}.STREAM.MSG.GET.${stream}`];
}

/**
 * The rights of a role. Anything not listed is refused by the server, in
 * particular every stream or consumer deletion, purge and update, and for a
 * sidecar every subject of another host.
 */
export function busPermissions(role: BusRole): BusPermissions {
  const inbox = `${busInboxPrefix(role)}.>`;
  switch (role.kind) {
    case "sidecar": {
      const host = role.host;
      if (!hostPattern.test(host)) throw new Error(`not a host name: ${host}`);
      return {
        publish: {
          allow: [
            `airlock.request.${host}.>`,
            `airlock.completion.${host}.>`,
            `airlock.security.${host}`,
            `${api}.INFO`,
            // Consumers on this host's decisions only: the server checks that the filter subject in
            // the request's subject is the one in its body. Delivery goes to this host's inboxes.
            `${api}.CONSUMER.CREATE.${streams.decisions.name}.*.airlock.decision.${host}.>`,
            `$JS.FC.${streams.decisions.name}.>`,
            // Reading back its own requests and decisions, for resume: direct get by subject.
            `${api}.DIRECT.GET.${streams.requests.name}.airlock.request.${host}.>`,
            `${api}.DIRECT.GET.${streams.decisions.name}.airlock.decision.${host}.>`,
          ],
        },
        subscribe: { allow: [inbox] },
      };
    }
    case "broker": {
      const kvStream = `KV_${stateBucket}`;
      const owned = [...Object.values(streams).map((s) => s.name), auditStream.name, kvStream];
      return {
        publish: {
          allow: [
            "airlock.decision.>",
            auditStream.subject,
            `$KV.${stateBucket}.>`,
            `${api}.INFO`,
            // Creating is idempotent; updating, deleting and purging are not granted.
            ...owned.map((name) => `${api}.STREAM.CREATE.${name}`),
            ...owned.flatMap(readStream),
            ...owned.map((name) => `${api}.CONSUMER.CREATE.${name}.>`),
            ...owned.map((name) => `${api}.CONSUMER.DURABLE.CREATE.${name}.*`),
            // The KV watchers and audit readers are ordered consumers, which delete their own consumer when done.
            `${api}.CONSUMER.DELETE.${kvStream}.*`,
            `${api}.CONSUMER.DELETE.${auditStream.name}.*`,
            ...owned.map((name) => `$JS.ACK.${name}.>`),
            ...owned.map((name) => `$JS.FC.${name}.>`),
          ],
        },
        subscribe: { allow: [inbox] },
      };
    }
    case "audit":
      return {
        publish: { allow: [`${api}.INFO`, ...readStream(auditStream.name), `${api}.CONSUMER.CREATE.${auditStream.name}.>`, `${api}.CONSUMER.DELETE.${auditStream.name}.*`, `$JS.FC.${auditStream.name}.>`] },
        subscribe: { allow: [inbox] },
      };
    case "admin":
      return { publish: { allow: [">"] }, subscribe: { allow: [">"] } };
  }
}
