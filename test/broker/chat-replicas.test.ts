/**
 * Chat message positions shared by broker replicas, against real NATS and a real stack: two
 * replicas of one config, each calling "Slack" and "the Bot Connector" at its own path prefix
 * (`/a`, `/b`) of one local receiver, so the receiver tells which replica made each call. The
 * replica that posts a request's Slack message and Teams card is whichever took the request;
 * the decision is cast through the *other* replica's reviewers' API, and that replica must update
 * the message (`chat.update` for the posted channel and ts) and the card (`PUT` of the posted
 * activity), which it can only know from the shared `AIRLOCK_CHAT` bucket. Then the bucket's
 * promises are attacked: request ids that are not ids, oversized values (refused by the broker
 * and by the server), entries the broker did not write, repeated writes and updates, expiry.
 */
import { once } from "node:events";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { JetStreamApiError, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import t from "tap";
import { chatPositionKey, chatPositionLimits, KvChatPositions, parseNotificationsConfig, ReviewNotifier } from "../../broker/notify/index.js";
import { ConfigReader } from "../../common/config.js";
import { Code, createLogger } from "../../common/index.js";
import { bucketStream, chatBucket } from "../../common/subjects.js";
import { waitUntil } from "../../harness/index.js";
import { RequestRecordSchema, RequestState } from "../../proto/index.js";
import { startStack } from "../helpers/stack.js";

/** One call a replica (or the test's own notifier, `c`) made to the chat receiver. */
interface Call {
  readonly replica: string;
  readonly method: string;
  /** The path after the replica's prefix. */
  readonly path: string;
  readonly body: Record<string, unknown>;
  /** What the receiver answered with (the posted ts or activity id). */
  readonly answer: Record<string, unknown>;
}
const calls: Call[] = [];
let serial = 0;
/** Posts whose body contains this text are held unanswered (and listed in `heldPosts`) until `releasePosts`. */
let holdPostsWith: string | undefined;
const heldPosts: Array<{ readonly replica: string; readonly path: string; readonly body: string }> = [];
let releasePosts: () => void = () => undefined;
let postsReleased = Promise.resolve();
const receiver = createServer((request: IncomingMessage, response: ServerResponse) => {
  let text = "";
  request.on("data", (chunk: Buffer) => (text += chunk.toString()));
  request.on("end", () => {
    const held = holdPostsWith !== undefined && request.method === "POST" && text.includes(holdPostsWith);
    if (held) heldPosts.push({ replica: /^\/([abc])\//.exec(request.url ?? "")?.[1] ?? "?", path: request.url ?? "", body: text });
    void (held ? postsReleased : Promise.resolve()).then(() => answer(request, response, text));
  });
});
/** Records a call and answers it as Slack, the Bot Connector or the token endpoint would. */
function answer(request: IncomingMessage, response: ServerResponse, text: string): void {
  const match = /^\/([abc])(\/.*)$/.exec(request.url ?? "");
  const replica = match?.[1] ?? "?";
  const path = match?.[2] ?? request.url ?? "";
  const body = text === "" ? {} : text.startsWith("{") ? (JSON.parse(text) as Record<string, unknown>) : Object.fromEntries(new URLSearchParams(text));
  serial++;
  let answered: Record<string, unknown> = { ok: true };
  if (path === "/token") answered = { token_type: "Bearer", expires_in: 3599, access_token: `connector-token-${replica}` };
  else if (path === "/api/chat.postMessage") answered = { ok: true, channel: body.channel, ts: `17000${String(serial).padStart(5, "0")}.000100` };
  else if (request.method === "POST" && path.startsWith("/teams/v3/conversations/")) answered = { id: `1:activity-${replica}-${serial}` };
  calls.push({ replica, method: request.method ?? "", path, body, answer: answered });
  response.writeHead(200, { "content-type": "application/json" });
  response.end(JSON.stringify(answered));
}
receiver.listen(0, "127.0.0.1");
await once(receiver, "listening");
t.teardown(() => new Promise<void>((resolve) => receiver.close(() => resolve())));
const receiverUrl = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}`;

const conversationId = "19:data-owners@thread.tacv2";
/** The `notifications` section of a replica calling the receiver under `/<replica>`. */
function notificationsFor(replica: string): Record<string, unknown> {
  return {
    console_url: "https://airlock.example.com/console/",
    retry: { attempts: 3, base_delay_ms: 50, max_delay_ms: 500 },
    slack: {
      bot_token: "xoxb-replicas-bot-token-0000",
      api_url: `${receiverUrl}/${replica}/api`,
      signing_secret: "slack-signing-secret-for-the-replica-test",
      channels: { "data-owners": "C0DATA" },
      users: { U0DANA: "dana@example.com", U0ALICE: "alice@example.com" },
    },
    teams: {
      bot: {
        app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f",
        app_password: "bot-app-password-for-the-replica-test",
        token_url: `${receiverUrl}/${replica}/token`,
        service_url: `${receiverUrl}/${replica}/teams/`,
        conversations: { "data-owners": conversationId },
      },
    },
  };
}

const stack = await startStack(t, {
  brokerConfig: { notifications: notificationsFor("a") },
  secondReplica: true,
  secondReplicaConfig: { notifications: notificationsFor("b") },
});
const replicaUrl: Record<string, string> = { a: stack.brokerUrl, b: stack.secondBrokerUrl ?? "" };

const nc = await stack.nats.connect({ kind: "broker" });
t.teardown(() => nc.close());
const kv = await new Kvm(nc).open(chatBucket);
const jsm = await jetstreamManager(nc);

/** Waits (15 s at most) for a call matching `predicate`. */
async function callWhere(what: string, predicate: (call: Call) => boolean): Promise<Call> {
  let found: Call | undefined;
  const seen = await waitUntil(async () => (found = calls.find(predicate)) !== undefined, 15_000);
  if (!seen || found === undefined) throw new Error(`the receiver saw no ${what}; it saw ${calls.map((c) => `${c.replica} ${c.method} ${c.path}`).join(", ")}`);
  return found;
}

const activitiesPath = `/teams/v3/conversations/${encodeURIComponent(conversationId)}/activities`;

/** Holds an export, and returns who posted its Slack message and Teams card, and where. */
async function heldAndPosted(reason: string): Promise<{ call: ReturnType<typeof stack.callExportTable>; requestId: string; poster: string; ts: string; activityId: string }> {
  const call = stack.callExportTable(reason);
  const message = await callWhere("Slack message", (c) => c.path === "/api/chat.postMessage" && c.body.channel === "C0DATA" && JSON.stringify(c.body.blocks).includes(reason));
  const requestId = /"value":"([0-9a-f-]{36})"/.exec(JSON.stringify(message.body.blocks))?.[1] ?? "";
  const card = await callWhere("Teams card", (c) => c.method === "POST" && c.path === activitiesPath && JSON.stringify(c.body).includes(reason));
  return { call, requestId, poster: message.replica, ts: String(message.answer.ts), activityId: String(card.answer.id) };
}

await t.test("a message posted by one replica is updated by the replica that decides: Slack chat.update and the Teams card, from the shared bucket", async (t) => {
  const { call, requestId, poster, ts, activityId } = await heldAndPosted("shared positions across replicas");
  t.ok(requestId !== "", "the message names its request");
  const teamsPoster = calls.find((c) => c.method === "POST" && c.path === activitiesPath && c.answer.id === activityId)?.replica;
  t.equal(teamsPoster, poster, `the replica that took the request (${poster}) posted both`);
  const decider = poster === "a" ? "b" : "a";

  // Both positions are in the bucket, under keys made of hashes of the request id and the position.
  const slackKey = chatPositionKey(requestId, { kind: "slack", channel: "C0DATA", ts });
  const teamsKey = chatPositionKey(requestId, { kind: "teams", conversationId, activityId });
  t.match(slackKey, /^slack\.[0-9a-f]{32}\.[0-9a-f]{32}$/);
  t.notOk(slackKey.includes(requestId), "the key is not the request id itself");
  t.ok(await waitUntil(async () => (await kv.get(slackKey))?.operation === "PUT" && (await kv.get(teamsKey))?.operation === "PUT", 10_000), "the poster stored both positions");
  t.same((await kv.get(slackKey))?.json(), { kind: "slack", channel: "C0DATA", ts });
  t.same((await kv.get(teamsKey))?.json(), { kind: "teams", conversationId, activityId });
  const stored = await jsm.streams.getMessage(bucketStream(chatBucket), { last_by_subj: `$KV.${chatBucket}.${slackKey}` });
  const ttl = Number(/^(\d+)s$/.exec(stored?.header.get("Nats-TTL") ?? "")?.[1]);
  const marginSeconds = chatPositionLimits.marginMs / 1000;
  t.ok(ttl > marginSeconds && ttl <= marginSeconds + 60, `the entry lives until the request's deadline (60 s) plus the margin: Nats-TTL ${ttl}s`);

  // Entries that are not positions the broker wrote, under this request's prefix: never used.
  const prefix = slackKey.slice(0, slackKey.lastIndexOf("."));
  await kv.put(`${prefix}.${"0".repeat(32)}`, JSON.stringify({ kind: "slack", channel: "C0EVIL", ts: "1.1" }));
  await kv.put(`${prefix}.${"1".repeat(32)}`, "not json");

  const decided = await fetch(`${replicaUrl[decider]}/api/v1/requests/${requestId}/decision`, {
    method: "POST",
    headers: { authorization: `Bearer ${stack.tokens.dana}`, "content-type": "application/json" },
    body: JSON.stringify({ approve: true, reason: "decided on the other replica" }),
  });
  t.equal(decided.status, 200, `approved through replica ${decider}`);
  t.equal((await call).code, 0, "the agent's export ran");

  const update = await callWhere(`chat.update by replica ${decider}`, (c) => c.replica === decider && c.path === "/api/chat.update" && c.body.ts === ts);
  t.equal(update.body.channel, "C0DATA", "the replica that decided updated the message the other one posted, at its channel and ts");
  t.match(JSON.stringify(update.body.blocks), /dana@example\.com/, "with the outcome");
  const put = await callWhere(`card update by replica ${decider}`, (c) => c.replica === decider && c.method === "PUT" && c.path === `${activitiesPath}/${encodeURIComponent(activityId)}`);
  t.match(JSON.stringify(put.body), /Approved: ExportTable/, "and the card the other one posted, in place");
  t.same(
    calls.filter((c) => c.path === "/api/chat.update" && c.replica === poster),
    [],
    `replica ${poster}, which posted, updated nothing: the update came from the position replica ${decider} read`,
  );
  t.same(
    calls.filter((c) => c.path === "/api/chat.update" && c.body.channel !== "C0DATA"),
    [],
    "the forged and malformed entries were skipped: no update went anywhere else",
  );

  // A second replica updating the same messages (a retry, a race) changes nothing but the message, again.
  const again = new ReviewNotifier({ config: parseNotificationsConfig(new ConfigReader(notificationsFor("c"), "notifications", "broker.yaml")), log: createLogger({ name: "c", level: "silent" }), positions: await KvChatPositions.open(nc) });
  t.teardown(() => again.close());
  const record = create(RequestRecordSchema, { request: { id: requestId, method: "ExportTable", service: "demo.v1.OpsService", deadline: timestampFromMs(Date.now() + 60_000) }, state: RequestState.APPROVED });
  again.notifyDecided(record, { outcome: "approved", by: ["dana@example.com"] });
  await again.idle();
  t.same(
    calls.filter((c) => c.replica === "c" && c.path === "/api/chat.update").map((c) => `${String(c.body.channel)}/${String(c.body.ts)}`),
    [`C0DATA/${ts}`],
    "the same message updated once more, harmlessly: positions outlive the first update",
  );
  t.equal(calls.filter((c) => c.replica === "c" && c.method === "PUT").length, 1, "and the card once more");
});

await t.test("a message posted while the other replica decides is updated by its poster: it reads the record once the position is stored", async (t) => {
  const reason = "decided while its message was being posted";
  postsReleased = new Promise<void>((resolve) => (releasePosts = resolve));
  holdPostsWith = reason;
  const call = stack.callExportTable(reason);
  t.ok(await waitUntil(async () => heldPosts.length === 2, 15_000), "the Slack message and the Teams card are being posted, their answers held");
  const poster = heldPosts[0]?.replica ?? "";
  const requestId = /([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/.exec(heldPosts.find((p) => p.path.endsWith("/api/chat.postMessage"))?.body ?? "")?.[1] ?? "";
  t.ok(requestId !== "", "the message names its request");
  const decider = poster === "a" ? "b" : "a";

  const decided = await fetch(`${replicaUrl[decider]}/api/v1/requests/${requestId}/decision`, {
    method: "POST",
    headers: { authorization: `Bearer ${stack.tokens.dana}`, "content-type": "application/json" },
    body: JSON.stringify({ approve: true, reason: "decided while the other replica was posting" }),
  });
  t.equal(decided.status, 200, `approved through replica ${decider}`);
  // The decider's update runs before its result DM (one queue per request): once the DM is sent, it has looked and found no position.
  await callWhere(`result DM by replica ${decider}`, (c) => c.replica === decider && c.path === "/api/chat.postMessage" && c.body.channel === "U0ALICE" && JSON.stringify(c.body).includes(requestId));
  t.same(
    calls.filter((c) => c.path === "/api/chat.update" && JSON.stringify(c.body).includes(requestId)),
    [],
    "the decider had nothing to update: the poster had not stored where its message is",
  );
  holdPostsWith = undefined;
  releasePosts();

  const posted = await callWhere("the held Slack message", (c) => c.replica === poster && c.path === "/api/chat.postMessage" && c.body.channel === "C0DATA" && JSON.stringify(c.body).includes(reason));
  const update = await callWhere(`chat.update by the poster, replica ${poster}`, (c) => c.replica === poster && c.path === "/api/chat.update" && c.body.ts === posted.answer.ts);
  t.match(JSON.stringify(update.body.blocks), /Approved/, "the poster put the outcome on the message it posted");
  t.notMatch(JSON.stringify(update.body.blocks), /airlock_approve/, "and took its Approve button away");
  const card = await callWhere("the held Teams card", (c) => c.replica === poster && c.method === "POST" && c.path === activitiesPath && JSON.stringify(c.body).includes(reason));
  const put = await callWhere(`card update by the poster, replica ${poster}`, (c) => c.replica === poster && c.method === "PUT" && c.path === `${activitiesPath}/${encodeURIComponent(String(card.answer.id))}`);
  t.match(JSON.stringify(put.body), /Approved: ExportTable/, "and on the card, in place");
  t.equal((await call).code, 0, "the agent's export ran");
});

await t.test("the bucket's bounds: no key from a non-id, no oversized value (broker and server refuse), one key per position, entries expire", async (t) => {
  const positions = await KvChatPositions.open(nc);
  const until = Date.now() + 60_000;
  for (const id of ["", "a b", "x*", "a.>", ".leading", "x".repeat(257)]) {
    await t.rejects(positions.remember(id, { kind: "slack", channel: "C0", ts: "1.1" }, until), { code: Code.InvalidArgument }, `remember refuses the id ${JSON.stringify(id.slice(0, 20))}`);
    await t.rejects(positions.recall(id, "slack"), { code: Code.InvalidArgument }, `recall too`);
  }
  await t.rejects(positions.remember("req-big", { kind: "teams", conversationId: "c".repeat(chatPositionLimits.maxFieldLength + 1), activityId: "1" }, until), { code: Code.InvalidArgument, details: { field: "conversationId" } }, "an overlong field is refused");
  await t.rejects(positions.remember("req-big", { kind: "slack", channel: "", ts: "1" }, until), { code: Code.InvalidArgument, details: { field: "channel" } }, "an empty one too");
  t.same(await positions.recall("req-big", "teams"), [], "nothing was stored");
  const bigKey = `slack.${"2".repeat(32)}.${"3".repeat(32)}`;
  const oversized = await kv.put(bigKey, "x".repeat(chatPositionLimits.maxValueBytes + 1)).then(
    () => undefined,
    (error: unknown) => error,
  );
  t.ok(oversized instanceof JetStreamApiError, `the server refuses a value over the bucket's max_msg_size, whoever writes it (${String(oversized)})`);
  t.equal(await kv.get(bigKey), null, "and keeps nothing");

  // Two writers of one position (two replicas, or a retried delivery): one key, one position.
  const other = await KvChatPositions.open(nc);
  await Promise.all([positions.remember("req-twice", { kind: "slack", channel: "C0", ts: "2.2" }, until), other.remember("req-twice", { kind: "slack", channel: "C0", ts: "2.2" }, until)]);
  await positions.remember("req-twice", { kind: "slack", channel: "C0", ts: "2.2" }, until);
  t.same(await other.recall("req-twice", "slack"), [{ kind: "slack", channel: "C0", ts: "2.2" }], "stored once");
  t.same(await other.recall("req-twice", "teams"), [], "a Slack position is not a Teams one");

  // Entries go by themselves: a margin of one second past a deadline that has passed.
  const brief = await KvChatPositions.open(nc, { marginMs: 1000 });
  await brief.remember("req-brief", { kind: "slack", channel: "C0", ts: "3.3" }, Date.now() - 1000);
  t.equal((await brief.recall("req-brief", "slack")).length, 1, "stored");
  t.ok(await waitUntil(async () => (await brief.recall("req-brief", "slack")).length === 0, 15_000), "and gone once its time to live passed (the server removed it)");
});

await t.test("the bucket is replicated and bounded as configured, and only the broker's role reaches it", async (t) => {
  const config = (await jsm.streams.info(bucketStream(chatBucket))).config;
  t.equal(config.allow_msg_ttl, true, "per-entry time to live is on");
  t.equal(config.max_msgs_per_subject, 1, "one revision per key");
  t.equal(config.max_msg_size, chatPositionLimits.maxValueBytes, "values are bounded by the server");
  const sidecar = await stack.nats.connect({ kind: "sidecar", host: stack.host });
  t.teardown(() => sidecar.close());
  const key = chatPositionKey("req-sidecar", { kind: "slack", channel: "C0EVIL", ts: "9.9" });
  const fromSidecar = await new Kvm(sidecar).open(chatBucket).then(
    async (bucket) => {
      await bucket.put(key, JSON.stringify({ kind: "slack", channel: "C0EVIL", ts: "9.9" }));
      return "written";
    },
    () => "refused",
  ).catch(() => "refused");
  t.equal(fromSidecar, "refused", "a sidecar's credential cannot write a position");
  t.equal(await kv.get(key), null, "nothing reached the bucket");
});
