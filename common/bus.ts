import { auditStream, chatBucket, historyStream, hostPattern, passkeyBucket, requestBucket, stateBucket, stepUpBucket, streams, subjects } from "./subjects.js";

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

/**
 * One subject an untrusted role's account shares with the Airlock account:
 * a `service` it may send to (a request, a publish into a stream, a read),
 * whose answers come back to its own account only; or a `stream` of messages
 * the Airlock account sends it. `responses: "stream"` for a service that answers
 * with several messages (a batched direct get).
 */
export interface BusLink {
  readonly kind: "service" | "stream";
  readonly subject: string;
  readonly responses?: "stream";
}

/** The account the streams, the state bucket, the broker and operators live in. */
export const airlockAccount = "AIRLOCK";

const api = "$JS.API";

/**
 * The account a role's users belong to. Brokers and operators share the
 * Airlock account, which holds JetStream. Each sidecar host and the audit
 * reader have an account of their own, joined to the Airlock account only by
 * {@link busLinks}: NATS answers a request to whatever reply subject it names,
 * inside the requester's account, so an untrusted role in the Airlock account
 * could have the server write into any stream (a PubAck into the audit trail,
 * an API answer over a state record). In an account of its own it can reach
 * nothing but its own subjects.
 */
export function busAccount(role: BusRole): string {
  if (role.kind === "sidecar") {
    if (!hostPattern.test(role.host)) throw new Error(`not a host name: ${role.host}`);
    return `HOST_${role.host}`;
  }
  return role.kind === "audit" ? "AIRLOCK_AUDIT" : airlockAccount;
}

/**
 * What an untrusted role's account shares with the Airlock account (empty for
 * the broker and admin, who are in it). The server config exports each link
 * from the Airlock account to that account alone and imports it there.
 */
export function busLinks(role: BusRole): readonly BusLink[] {
  switch (role.kind) {
    case "sidecar": {
      const host = role.host;
      busAccount(role);
      return [
        // Publishing into the streams, with their acknowledgements coming back.
        { kind: "service", subject: `airlock.request.${host}.>` },
        { kind: "service", subject: `airlock.completion.${host}.>` },
        { kind: "service", subject: `airlock.security.${host}` },
        // Heartbeats of its running actions: core NATS, no stream, to every broker replica.
        { kind: "service", subject: `airlock.heartbeat.${host}` },
        // Reading back its own requests and decisions, for resume and catch-up: direct get by subject.
        { kind: "service", subject: `${api}.DIRECT.GET.${streams.requests.name}.airlock.request.${host}.>` },
        { kind: "service", subject: `${api}.DIRECT.GET.${streams.decisions.name}.airlock.decision.${host}.>` },
        // Its decisions as the broker publishes them.
        { kind: "stream", subject: `airlock.decision.${host}.>` },
      ];
    }
    case "audit":
      // Direct gets only: JetStream answers an API request that crossed an import (stream info,
      // consumers) in the importer's account, which has no JetStream. The trail's last event
      // by subject, then batches from a sequence or a time.
      return [
        { kind: "service", subject: `${api}.DIRECT.GET.${auditStream.name}.${auditStream.subject}` },
        { kind: "service", subject: `${api}.DIRECT.GET.${auditStream.name}`, responses: "stream" },
      ];
    default:
      return [];
  }
}

/**
 * The prefix of a role's reply inboxes. Each role subscribes only under its own
 * prefix, so no one can read the replies (JetStream acks, fetched messages)
 * another party of its account asked for.
 */
export function busInboxPrefix(role: BusRole): string {
  return role.kind === "sidecar" ? `_INBOX_airlock.sidecar.${role.host}` : `_INBOX_airlock.${role.kind}`;
}

/**
 * The rights of a role's user inside its account. Anything not listed is
 * refused by the server, in particular every stream or consumer deletion,
 * purge and update, and, for the untrusted roles, everything but their links
 * (no consumer creation at all: a consumer's `deliver_subject` is not checked
 * against the creator's rights).
 */
export function busPermissions(role: BusRole): BusPermissions {
  const inbox = `${busInboxPrefix(role)}.>`;
  switch (role.kind) {
    case "sidecar":
    case "audit": {
      const links = busLinks(role);
      return {
        publish: { allow: links.filter((link) => link.kind === "service").map((link) => link.subject) },
        subscribe: { allow: [...links.filter((link) => link.kind === "stream").map((link) => link.subject), inbox] },
      };
    }
    case "broker": {
      const kvStream = `KV_${stateBucket}`;
      // Each record's request, stored once apart from the record.
      const requestStream = `KV_${requestBucket}`;
      // The step-up buckets (passkeys, single-use challenges) and the chat positions are the broker's alone too.
      const sideBucketStreams = [passkeyBucket, stepUpBucket, chatBucket].map((bucket) => `KV_${bucket}`);
      const owned = [...Object.values(streams).map((s) => s.name), auditStream.name, historyStream.name, kvStream, requestStream, ...sideBucketStreams];
      return {
        publish: {
          allow: [
            "airlock.decision.>",
            auditStream.subject,
            historyStream.subjects,
            `$KV.${stateBucket}.>`,
            `$KV.${requestBucket}.>`,
            `$KV.${passkeyBucket}.>`,
            `$KV.${stepUpBucket}.>`,
            `$KV.${chatBucket}.>`,
            `${api}.INFO`,
            // Creating is idempotent; updating, deleting and purging are not granted.
            ...owned.map((name) => `${api}.STREAM.CREATE.${name}`),
            ...owned.flatMap((name) => [
              `${api}.STREAM.INFO.${name}`,
              `${api}.STREAM.MSG.GET.${name}`,
              `${api}.DIRECT.GET.${name}`,
              `${api}.DIRECT.GET.${name}.>`,
              `${api}.CONSUMER.CREATE.${name}.>`,
              `${api}.CONSUMER.DURABLE.CREATE.${name}.*`,
              `${api}.CONSUMER.INFO.${name}.*`,
              `${api}.CONSUMER.MSG.NEXT.${name}.*`,
              `$JS.ACK.${name}.>`,
              `$JS.FC.${name}.>`,
            ]),
            // A record retired from the state bucket leaves a purge marker, which the retiring replica then
            // deletes; its request (or one stored without a record) is deleted as a message, leaving no marker.
            `${api}.STREAM.MSG.DELETE.${kvStream}`,
            `${api}.STREAM.MSG.DELETE.${requestStream}`,
            // The KV watchers (and key listings) are ordered consumers, which delete their own consumer when done.
            ...[kvStream, requestStream, ...sideBucketStreams].map((name) => `${api}.CONSUMER.DELETE.${name}.*`),
          ],
        },
        subscribe: { allow: [inbox, subjects.heartbeats] },
      };
    }
    case "admin":
      return { publish: { allow: [">"] }, subscribe: { allow: [">"] } };
  }
}
