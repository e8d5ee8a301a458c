/**
 * The bus boundary, attacked as an agent on host A would: with host A's sidecar
 * credential (which an agent there can read), every attempt to reach beyond A's
 * own subjects is refused by the NATS server itself, and changes nothing.
 */
import { randomUUID } from "node:crypto";
import { readFile, rm, writeFile } from "node:fs/promises";
import { connect as netConnect } from "node:net";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { ensureAuditStream } from "../../broker/audit/index.js";
import { ensureStreams } from "../../common/subjects.js";
import { auditStream, requestBucket, stateBucket, streams, subjects } from "../../common/subjects.js";
import { connectNats, natsRefusal } from "../../common/nats.js";
import { Code } from "../../common/errors.js";
import { useInfra } from "../../harness/index.js";

const { nats } = await useInfra(t, { nats: true });

// What an operator and a broker set up before any sidecar runs.
const admin = await nats.connect({ kind: "admin" });
t.teardown(() => admin.close());
const adminJsm = await jetstreamManager(admin);
await ensureStreams(adminJsm);
const broker = await nats.connect({ kind: "broker" });
t.teardown(() => broker.close());
const kv = await new Kvm(broker).create(stateBucket, { history: 10 });
await kv.put("existing", "the broker's record");
const requestKv = await new Kvm(broker).create(requestBucket, { history: 1 });
await requestKv.put("existing", "the record's request");
await ensureAuditStream(adminJsm);
await jetstream(broker).publish(auditStream.subject, "a real event");

const hostA = await nats.connect({ kind: "sidecar", host: "host-a" });
t.teardown(() => hostA.close());
await nats.credentials({ kind: "sidecar", host: "host-b" });

/** Every stream's message count, to show an attempt changed nothing. */
async function snapshot(): Promise<Record<string, number>> {
  const counts: Record<string, number> = {};
  for (const name of [...Object.values(streams).map((s) => s.name), auditStream.name, `KV_${stateBucket}`, `KV_${requestBucket}`]) counts[name] = (await adminJsm.streams.info(name)).state.messages;
  return counts;
}

function refusedByPermissions(error: unknown): boolean {
  return natsRefusal(error) === "permissions";
}

/** Runs `attempt` and checks the server refused it with a permissions violation and that no stream changed. */
async function refused(t: Test, what: string, attempt: () => Promise<unknown>): Promise<void> {
  const before = await snapshot();
  const error = await attempt().then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(refusedByPermissions(error), `${what}: refused by the server (${String(error)})`);
  t.same(await snapshot(), before, `${what}: nothing changed`);
}

const jsA = jetstream(hostA, { timeout: 3000 });
const jsmA = await jetstreamManager(hostA, { checkAPI: false, timeout: 3000 });

await t.test("host A's sidecar may do its own work", async (t) => {
  const id = randomUUID();
  const ack = await jsA.publish(subjects.request("host-a", id), "a request", { msgID: id });
  t.ok(ack.seq > 0, "publish its own request");
  t.equal((await jsmA.direct.getMessage(streams.requests.name, { last_by_subj: subjects.request("host-a", id) }))?.string(), "a request", "read it back for resume");
  const decisions = hostA.subscribe(subjects.decisionsFor("host-a"));
  await hostA.flush();
  const first = (async () => {
    for await (const message of decisions) return message.subject;
    return undefined;
  })();
  await jetstream(broker).publish(subjects.decision("host-b", id), "B's decision");
  await jetstream(broker).publish(subjects.decision("host-a", id), "A's decision");
  t.equal(await first, subjects.decision("host-a", id), "follow its own decisions, and only those");
  t.equal((await jsmA.direct.getMessage(streams.decisions.name, { last_by_subj: subjects.decision("host-a", id) }))?.string(), "A's decision", "and read them back after a reconnect");
});

await t.test("the state bucket: no get, put or delete", async (t) => {
  await refused(t, "KV get", () => jsmA.direct.getMessage(`KV_${stateBucket}`, { last_by_subj: `$KV.${stateBucket}.existing` }));
  await refused(t, "KV put", () => jsA.publish(`$KV.${stateBucket}.existing`, "APPROVED, trust me"));
  const del = headers();
  del.set("KV-Operation", "DEL");
  await refused(t, "KV delete", () => jsA.publish(`$KV.${stateBucket}.existing`, "", { headers: del }));
  await refused(t, "KV open", () => new Kvm(hostA).open(stateBucket).then((bucket) => bucket.get("existing")));
  t.equal((await kv.get("existing"))?.string(), "the broker's record", "the record is untouched");
  // The requests bucket, which records are joined with, no less.
  await refused(t, "requests bucket get", () => jsmA.direct.getMessage(`KV_${requestBucket}`, { last_by_subj: `$KV.${requestBucket}.existing` }));
  await refused(t, "requests bucket put", () => jsA.publish(`$KV.${requestBucket}.existing`, "a request nobody vetted"));
  await refused(t, "requests bucket delete", () => jsA.publish(`$KV.${requestBucket}.existing`, "", { headers: del }));
  t.equal((await requestKv.get("existing"))?.string(), "the record's request", "the request is untouched");
});

await t.test("the audit subject: no appends", async (t) => {
  await refused(t, "publish to airlock.audit", () => jsA.publish(auditStream.subject, "{not json"));
});

await t.test("another host's subjects: no requests, completions or security events for B, and nothing of B's to read", async (t) => {
  const id = randomUUID();
  await refused(t, "a request for host B", () => jsA.publish(subjects.request("host-b", id), "forged"));
  await refused(t, "a completion for host B", () => jsA.publish(subjects.completion("host-b", id), "forged"));
  await refused(t, "a security event for host B", () => jsA.publish(subjects.security("host-b"), "forged"));
  await refused(t, "read back B's request", () => jsmA.direct.getMessage(streams.requests.name, { last_by_subj: subjects.request("host-b", id) }));
  await refused(t, "read B's decision", () => jsmA.direct.getMessage(streams.decisions.name, { last_by_subj: subjects.decision("host-b", id) }));
  await refused(t, "a consumer on B's decisions", () => jsA.consumers.getPushConsumer(streams.decisions.name, { filter_subjects: subjects.decisionsFor("host-b") }));
  await refused(t, "a consumer on every decision", () => jsA.consumers.getPushConsumer(streams.decisions.name, { filter_subjects: "airlock.decision.>" }));
  await refused(t, "a consumer on its own decisions that delivers into the audit stream", () =>
    hostA.request(
      `$JS.API.CONSUMER.CREATE.${streams.decisions.name}.x1.airlock.decision.host-a.>`,
      JSON.stringify({ stream_name: streams.decisions.name, config: { name: "x1", filter_subject: "airlock.decision.host-a.>", deliver_subject: auditStream.subject, idle_heartbeat: 500_000_000 } }),
      { timeout: 3000 },
    ),
  );
  await refused(t, "a consumer on the requests", () =>
    hostA.request(`$JS.API.CONSUMER.CREATE.${streams.requests.name}.spy.airlock.request.host-b.>`, JSON.stringify({ stream_name: streams.requests.name, config: { name: "spy", filter_subject: "airlock.request.host-b.>" } }), { timeout: 3000 }),
  );
  await refused(t, "the generic message get on the requests", () => jsmA.streams.getMessage(streams.requests.name, { last_by_subj: subjects.request("host-b", id) }));
  for (const subject of ["airlock.request.host-b.>", "airlock.decision.>", "_INBOX.>", "_INBOX_airlock.broker.>"]) {
    const violation = (async () => {
      for await (const status of hostA.status()) if (status.type === "error" && refusedByPermissions(status.error)) return status.error.message;
      return "";
    })();
    hostA.subscribe(subject);
    t.match(await violation, /Permissions Violation for Subscription/, `subscribing to ${subject} is refused`);
  }
});

await t.test("the server's answers cannot be aimed at the broker's streams: a host's account reaches only its own subjects", async (t) => {
  // NATS answers a request to whatever reply subject it names. In the Airlock account a PubAck or
  // an API answer aimed at airlock.audit or a state record would be stored there; a host's
  // account has none of those subjects.
  const before = await snapshot();
  const id = randomUUID();
  hostA.publish(subjects.request("host-a", id), "a request", { reply: auditStream.subject });
  hostA.publish(subjects.request("host-a", randomUUID()), "a request", { reply: `$KV.${stateBucket}.existing` });
  hostA.publish(subjects.request("host-a", randomUUID()), "a request", { reply: subjects.request("host-b", randomUUID()) });
  hostA.publish(`$JS.API.DIRECT.GET.${streams.requests.name}.${subjects.request("host-a", id)}`, "", { reply: auditStream.subject });
  await hostA.flush();
  await jetstream(broker).publish(subjects.decision("host-a", randomUUID()), "a marker after the attempts");
  const after = await snapshot();
  t.equal(after[auditStream.name], before[auditStream.name], "nothing reached the audit stream");
  t.equal(after[`KV_${stateBucket}`], before[`KV_${stateBucket}`], "nothing reached the state bucket");
  t.equal(after[streams.requests.name], (before[streams.requests.name] ?? 0) + 3, "only host A's own three requests were stored");
  t.equal((await kv.get("existing"))?.string(), "the broker's record", "the record is untouched");
});

await t.test("stream and bucket management: no create, update, delete or purge", async (t) => {
  const requests = await adminJsm.streams.info(streams.requests.name);
  await refused(t, "create a stream", () => jsmA.streams.add({ name: "EVIL", subjects: ["evil.>"] }));
  await refused(t, "update the requests stream", () => hostA.request(`$JS.API.STREAM.UPDATE.${streams.requests.name}`, JSON.stringify({ ...requests.config, max_msgs: 1 }), { timeout: 3000 }));
  await refused(t, "delete the requests stream", () => jsmA.streams.delete(streams.requests.name));
  await refused(t, "purge the decisions stream", () => jsmA.streams.purge(streams.decisions.name));
  await refused(t, "delete the state bucket", () => jsmA.streams.delete(`KV_${stateBucket}`));
  await refused(t, "delete the audit stream", () => jsmA.streams.delete(auditStream.name));
  await refused(t, "list streams", () => jsmA.streams.names().next());
  await refused(t, "delete a broker consumer", () => jsmA.consumers.delete(streams.requests.name, "airlock-broker-intake"));
});

await t.test("the broker role cannot rewrite history either: no stream update, delete or purge", async (t) => {
  const jsm = await jetstreamManager(broker, { timeout: 3000 });
  const audit = await jsm.streams.info(auditStream.name);
  await refused(t, "the broker updates the audit stream", () => jsm.streams.update(auditStream.name, { ...audit.config, max_msgs: 1 }));
  await refused(t, "the broker deletes the audit stream", () => jsm.streams.delete(auditStream.name));
  await refused(t, "the broker purges the requests", () => jsm.streams.purge(streams.requests.name));
});

await t.test("the audit reader reads the trail and writes nothing", async (t) => {
  const reader = await nats.connect({ kind: "audit" });
  t.teardown(() => reader.close());
  const jsm = await jetstreamManager(reader, { checkAPI: false, timeout: 3000 });
  t.equal((await jsm.direct.getMessage(auditStream.name, { last_by_subj: auditStream.subject }))?.string(), "a real event", "reads the audit trail");
  const js = jetstream(reader, { timeout: 3000 });
  const before = await snapshot();
  reader.publish(`$JS.API.DIRECT.GET.${auditStream.name}`, JSON.stringify({ seq: 1 }), { reply: auditStream.subject });
  await reader.flush();
  await jetstream(broker).publish(subjects.decision("host-a", randomUUID()), "a marker");
  t.equal((await snapshot())[auditStream.name], before[auditStream.name], "an answer aimed at the audit stream does not reach it");
  await refused(t, "the audit reader creates a consumer", () => reader.request(`$JS.API.CONSUMER.CREATE.${auditStream.name}.spy`, JSON.stringify({ stream_name: auditStream.name, config: { name: "spy", deliver_subject: auditStream.subject } }), { timeout: 3000 }));
  await refused(t, "the audit reader appends", () => js.publish(auditStream.subject, "forged"));
  await refused(t, "the audit reader reads the state", () => jsm.direct.getMessage(`KV_${stateBucket}`, { last_by_subj: `$KV.${stateBucket}.existing` }));
  await refused(t, "the audit reader publishes a decision", () => js.publish(subjects.decision("host-a", randomUUID()), "forged"));
});

await t.test("nothing is anonymous, and a revoked host is cut off alone", async (t) => {
  // The one unauthenticated connection of the suite: it proves the server refuses it.
  const anonymous = await connect({ servers: nats.url, tls: { caFile: nats.caFile }, reconnect: false, timeout: 3000 }).then(
    async (nc: NatsConnection) => {
      await nc.close();
      return undefined;
    },
    (e: unknown) => e,
  );
  t.equal(natsRefusal(anonymous), "authorization", `anonymous refused (${String(anonymous)})`);
  // A client that will not do TLS: the server says TLS is required and answers a plaintext CONNECT with an error.
  const plaintext = await new Promise<string>((resolve) => {
    let seen = "";
    const socket = netConnect({ host: "127.0.0.1", port: nats.port }, () => socket.write('CONNECT {"verbose":false}\r\nPING\r\n'));
    socket.on("data", (chunk: Buffer) => (seen += chunk.toString("latin1")));
    socket.on("error", () => undefined);
    socket.on("close", () => resolve(seen));
  });
  t.match(plaintext, /"tls_required":true/, "the server requires TLS");
  t.notMatch(plaintext, /PONG/, "and never serves a plaintext client");

  const victim = await nats.connect({ kind: "sidecar", host: "host-lost" }, { maxReconnectAttempts: -1, reconnectTimeWait: 100 });
  const seed = (await nats.credentials({ kind: "sidecar", host: "host-lost" })).auth.seedFile;
  const stolen = await readFile(seed, "utf8");
  const cutOff = (async () => {
    for await (const status of victim.status()) if (status.type === "disconnect") return true;
    return false;
  })();
  await nats.revokeHost("host-lost");
  t.ok(await cutOff, "the revoked host's live connection is closed by the reload");
  await victim.close().catch(() => undefined);
  const copy = `${nats.securityDir}/stolen.nk`;
  await writeFile(copy, stolen, { mode: 0o600 });
  t.teardown(() => rm(copy, { force: true }));
  const withStolen = await connectNats({ servers: [nats.url], auth: { kind: "nkey", seedFile: copy }, tls: { caFile: nats.caFile } }, { role: { kind: "sidecar", host: "host-lost" }, name: "stolen", extra: { reconnect: false, timeout: 3000 } }).then(
    async (nc) => {
      await nc.close();
      return undefined;
    },
    (e: unknown) => e,
  );
  t.match(withStolen, { code: Code.Unauthenticated }, "a copy of the revoked seed is refused");
  t.ok(!hostA.isClosed(), "host A keeps its connection");
  t.ok((await jsA.publish(subjects.request("host-a", randomUUID()), "still working")).seq > 0, "and its rights");
});
