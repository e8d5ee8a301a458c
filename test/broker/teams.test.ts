/**
 * The Teams bot end to end: a real broker on real NATS posts its cards to a local
 * receiver (standing in for the Teams webhook), and the test plays the Bot Framework:
 * a local OpenID metadata + JWKS server with a key generated here, and invoke
 * activities shaped as Teams sends them for an `Action.Execute`, signed with that key
 * and POSTed to the broker's `/api/teams/messages`.
 */
import { once } from "node:events";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type CryptoKey, exportJWK, generateKeyPair, type JWK, SignJWT } from "jose";
import t from "tap";
import { Writable } from "node:stream";
import { TeamsBot, teamsMessage, teamsRecordCard } from "../../broker/notify/index.js";
import { Code, createLogger } from "../../common/index.js";
import { ApprovalRequestSchema, RequestRecordSchema, RequestState, ReviewerVoteSchema } from "../../proto/index.js";
import { startStack } from "../helpers/stack.js";

const appId = "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f";
const oid = { dana: "0d7a1c2e-1111-4a2b-8c3d-000000000d4a", alice: "0a11ce00-2222-4a2b-8c3d-0000000a11ce", stranger: "57a4e600-3333-4a2b-8c3d-000000057a4e" };
const serviceUrl = "https://smba.trafficmanager.net/emea/";
const issuer = "https://api.botframework.com";

// The Bot Framework's side: OpenID metadata and its JWKS, with a key made for this test.
const botKeys = await generateKeyPair("RS256", { extractable: true });
const otherKeys = await generateKeyPair("RS256", { extractable: true });
const kid = "bf-test-key-1";
const jwk: JWK & { endorsements: string[] } = { ...(await exportJWK(botKeys.publicKey)), kid, alg: "RS256", use: "sig", endorsements: ["msteams", "webchat"] };
let metadataFetches = 0;
const botFramework = createServer((request: IncomingMessage, response: ServerResponse) => {
  const base = `http://127.0.0.1:${(botFramework.address() as AddressInfo).port}`;
  response.writeHead(200, { "content-type": "application/json" });
  if (request.url === "/v1/.well-known/openidconfiguration") {
    metadataFetches++;
    response.end(JSON.stringify({ issuer, authorization_endpoint: `${base}/authorize`, jwks_uri: `${base}/v1/.well-known/keys`, id_token_signing_alg_values_supported: ["RS256"] }));
  } else {
    response.end(JSON.stringify({ keys: [jwk] }));
  }
});
botFramework.listen(0, "127.0.0.1");
await once(botFramework, "listening");
t.teardown(() => new Promise<void>((resolve) => botFramework.close(() => resolve())));
const metadataUrl = `http://127.0.0.1:${(botFramework.address() as AddressInfo).port}/v1/.well-known/openidconfiguration`;

// The Teams webhook's side: records every card the broker posts.
interface Card {
  body: Array<Record<string, unknown>>;
  actions: Array<Record<string, unknown>>;
}
const cards: Card[] = [];
const teamsWebhook = createServer((request: IncomingMessage, response: ServerResponse) => {
  let text = "";
  request.on("data", (chunk: Buffer) => (text += chunk.toString()));
  request.on("end", () => {
    const message = JSON.parse(text) as { attachments: Array<{ content: Card }> };
    const content = message.attachments[0]?.content;
    if (content !== undefined) cards.push(content);
    response.writeHead(200, { "content-type": "text/plain" });
    response.end("1");
  });
});
teamsWebhook.listen(0, "127.0.0.1");
await once(teamsWebhook, "listening");
t.teardown(() => new Promise<void>((resolve) => teamsWebhook.close(() => resolve())));
const webhookUrl = `http://127.0.0.1:${(teamsWebhook.address() as AddressInfo).port}/webhookb2/SECRET`;

// Microsoft's side of sending as the bot: the token endpoint and the Bot Connector API.
interface ConnectorCall {
  method: string;
  path: string;
  authorization: string;
  body: string;
}
const connectorCalls: ConnectorCall[] = [];
const connector = createServer((request: IncomingMessage, response: ServerResponse) => {
  let text = "";
  request.on("data", (chunk: Buffer) => (text += chunk.toString()));
  request.on("end", () => {
    connectorCalls.push({ method: request.method ?? "", path: request.url ?? "", authorization: request.headers.authorization ?? "", body: text });
    response.writeHead(200, { "content-type": "application/json" });
    if (request.url === "/tenant/oauth2/v2.0/token") response.end(JSON.stringify({ token_type: "Bearer", expires_in: 3599, access_token: "bot-connector-access-token" }));
    else response.end(JSON.stringify({ id: `1:activity-${connectorCalls.length}` }));
  });
});
connector.listen(0, "127.0.0.1");
await once(connector, "listening");
t.teardown(() => new Promise<void>((resolve) => connector.close(() => resolve())));
const connectorUrl = `http://127.0.0.1:${(connector.address() as AddressInfo).port}`;
const appPassword = "bot-app-password-for-the-test-0001";
const conversationId = "19:data-owners@thread.tacv2";

const stack = await startStack(t, {
  brokerConfig: {
    notifications: {
      console_url: "https://airlock.example.com/console/",
      teams: {
        webhook_url: webhookUrl,
        bot: {
          app_id: appId,
          openid_metadata_url: metadataUrl,
          users: { [oid.dana]: "dana@example.com", [oid.alice.toUpperCase()]: "alice@example.com" },
          app_password: appPassword,
          token_url: `${connectorUrl}/tenant/oauth2/v2.0/token`,
          service_url: `${connectorUrl}/teams`,
          conversations: { "data-owners": conversationId },
        },
      },
    },
  },
  // Stands in for the step-up rules being built: a request whose reason asks for it.
  requiresStepUp: (record) => record.request?.reason.includes("needs step-up") === true,
});

interface TokenClaims {
  iss?: string;
  aud?: string;
  serviceurl?: string;
  expiresIn?: number;
  key?: CryptoKey;
  kid?: string;
}

async function botToken(claims: TokenClaims = {}): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  const exp = now + (claims.expiresIn ?? 3600);
  return new SignJWT({ serviceurl: claims.serviceurl ?? serviceUrl })
    .setProtectedHeader({ alg: "RS256", kid: claims.kid ?? kid, typ: "JWT" })
    .setIssuer(claims.iss ?? issuer)
    .setAudience(claims.aud ?? appId)
    .setIssuedAt(exp - 3600)
    .setNotBefore(exp - 3600)
    .setExpirationTime(exp)
    .sign(claims.key ?? botKeys.privateKey);
}

/** An `adaptiveCard/action` invoke as Teams sends it: the card's inputs merged into the action's data. */
function invoke(from: string, verb: string, requestId: string, reason?: string): Record<string, unknown> {
  return {
    type: "invoke",
    name: "adaptiveCard/action",
    id: `f:${Math.random().toString(36).slice(2)}`,
    timestamp: new Date().toISOString(),
    localTimestamp: new Date().toISOString(),
    serviceUrl,
    channelId: "msteams",
    from: { id: `29:1${from.slice(0, 8)}`, name: "Someone", aadObjectId: from },
    conversation: { isGroup: true, conversationType: "channel", tenantId: "72f988bf-86f1-41af-91ab-2d7cd011db47", id: "19:abc@thread.tacv2;messageid=1" },
    recipient: { id: `28:${appId}`, name: "Airlock" },
    entities: [{ locale: "en-GB", country: "GB", platform: "Web", timezone: "Europe/London", type: "clientInfo" }],
    channelData: { tenant: { id: "72f988bf-86f1-41af-91ab-2d7cd011db47" }, source: { name: "message" }, legacy: { replyToId: "1:abc" } },
    replyToId: "1700000000000",
    value: { action: { type: "Action.Execute", title: verb, verb, data: { requestId, ...(reason === undefined ? {} : { reason }) } }, trigger: "manual" },
    locale: "en-GB",
  };
}

interface Answer {
  status: number;
  body: { statusCode?: number; type?: string; value?: Card; code?: string; details?: { reason?: string } };
}

async function post(activity: unknown, authorization?: string): Promise<Answer> {
  const response = await fetch(`${stack.brokerUrl}/api/teams/messages`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(authorization === undefined ? {} : { authorization }) },
    body: JSON.stringify(activity),
  });
  return { status: response.status, body: (await response.json()) as Answer["body"] };
}

async function send(activity: unknown, claims: TokenClaims = {}): Promise<Answer> {
  return post(activity, `Bearer ${await botToken(claims)}`);
}

function notice(answer: Answer): string {
  const block = answer.body.value?.body.find((element) => element.id === "airlock-notice");
  return typeof block?.text === "string" ? block.text : "";
}

function verbs(card: Card | undefined): string[] {
  return (card?.actions ?? []).filter((action) => action.type === "Action.Execute").map((action) => String(action.verb));
}

async function cardFor(reason: string): Promise<{ card: Card; requestId: string }> {
  for (let i = 0; i < 400; i++) {
    const card = cards.find((c) => JSON.stringify(c.body).includes(reason));
    if (card !== undefined) {
      const requestId = /"title":"Request","value":"([0-9a-f-]{36})"/.exec(JSON.stringify(card.body))?.[1] ?? "";
      return { card, requestId };
    }
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error(`no card for ${reason} reached the Teams webhook`);
}

async function stateOf(requestId: string): Promise<string> {
  const response = await fetch(`${stack.brokerUrl}/api/v1/requests/${requestId}`, { headers: { authorization: `Bearer ${stack.tokens.sam}` } });
  return ((await response.json()) as { record: { state: string } }).record.state;
}

interface AuditJson {
  type: string;
  actor: string;
  requestId: string;
  details?: Record<string, unknown>;
}

async function auditOf(requestId: string, type: string): Promise<AuditJson> {
  for (let i = 0; i < 200; i++) {
    const response = await fetch(`${stack.brokerUrl}/api/v1/audit?limit=200`, { headers: { authorization: `Bearer ${stack.tokens.sam}` } });
    const events = ((await response.json()) as { events: AuditJson[] }).events;
    const event = events.find((e) => e.requestId === requestId && e.type === type);
    if (event !== undefined) return event;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error(`no ${type} audit event for ${requestId}`);
}

await t.test("the card carries Approve and Deny (Action.Execute) with the request id, a reason box and the console link", async (t) => {
  const call = stack.callExportTable("teams card shape");
  const { card, requestId } = await cardFor("teams card shape");
  t.ok(requestId !== "", "the card names the request");
  t.same(verbs(card), ["approve", "deny"]);
  for (const action of card.actions.filter((a) => a.type === "Action.Execute")) t.same(action.data, { requestId }, `${String(action.verb)} carries the request id`);
  t.ok(
    card.body.some((element) => element.type === "Input.Text" && element.id === "reason"),
    "a reason box for the denial",
  );
  t.ok(card.actions.some((action) => action.type === "Action.OpenUrl" && action.url === `https://airlock.example.com/console/#/requests/${requestId}`));
  const denied = await send(invoke(oid.dana, "deny", requestId, "cleaning up the card test"));
  t.match(notice(denied), /denial was recorded/);
  t.equal((await call).code, Code.PermissionDenied);
});

await t.test("every bad token is refused with 401 and a stable reason, and changes nothing", async (t) => {
  const call = stack.callExportTable("teams bad tokens");
  const { requestId } = await cardFor("teams bad tokens");
  const approve = invoke(oid.dana, "approve", requestId);
  const cases: Array<[string, () => Promise<Answer>, string]> = [
    ["no Authorization header", () => post(approve), "missing_token"],
    ["not a bearer token", () => post(approve, "Basic ZGFuYTpwdw=="), "missing_token"],
    ["garbage", () => post(approve, "Bearer not.a.jwt"), "malformed_token"],
    ["signed by another key under the Bot Framework's kid", () => send(approve, { key: otherKeys.privateKey }), "bad_signature"],
    ["a key the Bot Framework does not publish", () => send(approve, { key: otherKeys.privateKey, kid: "unknown-kid" }), "no_matching_key"],
    ["for another bot", () => send(approve, { aud: "11111111-2222-3333-4444-555555555555" }), "wrong_audience"],
    ["from another issuer", () => send(approve, { iss: "https://sts.windows.net/evil/" }), "wrong_issuer"],
    ["expired 6 minutes ago (past the 5 min skew)", () => send(approve, { expiresIn: -360 }), "token_expired"],
    ["issued for another serviceUrl", () => send(approve, { serviceurl: "https://attacker.example.com/" }), "service_url_mismatch"],
    ["for a channel the key is not endorsed for", () => send({ ...approve, channelId: "slack" }), "not_endorsed"],
  ];
  for (const [what, attempt, reason] of cases) {
    const answer = await attempt();
    t.equal(answer.status, 401, `${what}: 401`);
    t.equal(answer.body.code, "unauthenticated", what);
    t.equal(answer.body.details?.reason, reason, `${what}: ${reason}`);
  }
  const skewed = await send(invoke(oid.stranger, "approve", requestId), { expiresIn: -120 });
  t.equal(skewed.status, 200, "a token expired 2 minutes ago is within the 5 min skew");
  t.equal(await stateOf(requestId), "REQUEST_STATE_PENDING", "nothing refused changed the request");
  t.equal(metadataFetches, 1, "the OpenID metadata was fetched once and kept");
  const denied = await send(invoke(oid.dana, "deny", requestId, "cleaning up the token test"));
  t.equal(denied.status, 200);
  t.equal((await call).code, Code.PermissionDenied);
});

await t.test("a mapped reviewer approves from the card: the request is approved, the audit names them and teams, the card refreshes", async (t) => {
  const call = stack.callExportTable("teams approval");
  const { requestId } = await cardFor("teams approval");
  const answer = await send(invoke(oid.dana, "approve", requestId));
  t.equal(answer.status, 200);
  t.equal(answer.body.statusCode, 200);
  t.equal(answer.body.type, "application/vnd.microsoft.card.adaptive", "the invoke is answered with a card");
  const card = answer.body.value;
  t.match(notice(answer), /Your approval was recorded, dana@example\.com/);
  t.match(String(card?.body[0]?.text), /^Approved: ExportTable/, "the refreshed card shows the outcome");
  const vote = card?.body.find((element) => typeof element.text === "string" && element.text.includes("**dana@example.com** approved"));
  t.match(String(vote?.text), /\{\{DATE\(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, SHORT\)\}\} \{\{TIME\(.*\)\}\} \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)/, "who decided and when, with the zone");
  t.same(verbs(card), [], "a decided request's card has no vote buttons");
  const outcome = await call;
  t.equal(outcome.code, 0, "the agent's export ran: the Teams approval counted");
  t.equal(outcome.rows, 2);
  t.match(await stateOf(requestId), /^REQUEST_STATE_(APPROVED|EXECUTING|COMPLETED)$/, "the request is approved");
  const voted = await auditOf(requestId, "AUDIT_EVENT_TYPE_VOTE_RECORDED");
  t.equal(voted.actor, "dana@example.com", "the audit names the reviewer");
  t.match(voted.details, { channel: "teams", reviewer: "dana@example.com", approve: true }, "and Teams as the channel");
  const again = await send(invoke(oid.dana, "deny", requestId, "changed my mind"));
  t.match(notice(again), /\(already_decided\)/, "a vote on a decided request is refused with a stable code");
});

await t.test("a denial needs a reason; with one it denies, audited as a Teams vote", async (t) => {
  const call = stack.callExportTable("teams denial");
  const { requestId } = await cardFor("teams denial");
  const bare = await send(invoke(oid.dana, "deny", requestId, "   "));
  t.equal(bare.status, 200);
  t.match(notice(bare), /\(reason_required\)/);
  t.same(verbs(bare.body.value), ["approve", "deny"], "the card keeps its buttons for another try");
  t.equal(await stateOf(requestId), "REQUEST_STATE_PENDING");
  const denied = await send(invoke(oid.dana, "deny", requestId, "not during the freeze"));
  t.match(notice(denied), /Your denial was recorded/);
  t.match(String(denied.body.value?.body[0]?.text), /^Denied: ExportTable/);
  t.ok(denied.body.value?.body.some((element) => typeof element.text === "string" && element.text.includes("**dana@example.com** denied") && element.text.includes("not during the freeze")));
  t.equal((await call).code, Code.PermissionDenied, "the denial reaches the agent");
  t.equal(await stateOf(requestId), "REQUEST_STATE_DENIED");
  const decided = await auditOf(requestId, "AUDIT_EVENT_TYPE_DECIDED");
  t.equal(decided.actor, "dana@example.com");
  t.match(decided.details, { channel: "teams", reason: "not during the freeze" });
});

await t.test("self-approval and unknown users are refused with stable codes and change nothing", async (t) => {
  const call = stack.callExportTable("teams refusals");
  const { requestId } = await cardFor("teams refusals");
  const self = await send(invoke(oid.alice, "approve", requestId));
  t.equal(self.status, 200, "Teams gets a card, not an error page");
  t.match(notice(self), /\(permission_denied\).*identity chain/, "the requester's own human may not approve (object ids compared without case)");
  const stranger = await send(invoke(oid.stranger, "approve", requestId));
  t.match(notice(stranger), /\(unknown_user\)/, "an object id with no reviewer is refused");
  t.same(verbs(stranger.body.value), ["approve", "deny"], "the card stays as it was");
  const odd = await send({ ...invoke(oid.dana, "delete", requestId) });
  t.match(notice(odd), /\(bad_action\)/, "an unknown verb is no vote");
  const missing = await send(invoke(oid.dana, "approve", "00000000-0000-0000-0000-000000000000"));
  t.match(notice(missing), /\(not_found\)/);
  const message = await send({ ...invoke(oid.dana, "approve", requestId), type: "message", name: undefined, text: "approve" });
  t.same([message.status, message.body], [200, {}], "other activities are acknowledged and ignored");
  t.equal(await stateOf(requestId), "REQUEST_STATE_PENDING", "none of it changed the request");
  const denied = await send(invoke(oid.dana, "deny", requestId, "cleaning up the refusal test"));
  t.match(notice(denied), /denial was recorded/);
  t.equal((await call).code, Code.PermissionDenied);
  const twice = await send(invoke(oid.dana, "deny", requestId, "again"));
  t.match(notice(twice), /\(already_decided\)|\(already_voted\)/);
});

await t.test("a request that needs step-up has no Approve on its card, and an approve from Teams is refused with step_up_required", async (t) => {
  const call = stack.callExportTable("teams export that needs step-up");
  const { card, requestId } = await cardFor("teams export that needs step-up");
  t.same(verbs(card), [], "no Action.Execute at all");
  t.same(
    card.actions.map((action) => [action.type, action.title]),
    [["Action.OpenUrl", "Review and approve"]],
  );
  t.equal(card.actions[0]?.url, `https://airlock.example.com/console/#/requests/${requestId}`);
  const forced = await send(invoke(oid.dana, "approve", requestId));
  t.match(notice(forced), /\(step_up_required\)/, "an approve verb sent anyway is refused");
  t.same(verbs(forced.body.value), []);
  t.equal(await stateOf(requestId), "REQUEST_STATE_PENDING");
  const denied = await send(invoke(oid.dana, "deny", requestId, "no step-up today"));
  t.match(notice(denied), /denial was recorded/, "a denial needs no step-up");
  t.equal((await call).code, Code.PermissionDenied);
});

await t.test("break-glass: its card and any card of a request it touched carry no Approve", async (t) => {
  const request = create(ApprovalRequestSchema, { id: "bg-1", service: "demo.v1.OpsService", method: "ExportTable", reason: "outage", ruleId: "export" });
  const approved = create(RequestRecordSchema, {
    request,
    state: RequestState.APPROVED,
    votes: [create(ReviewerVoteSchema, { reviewer: "sam@example.com", approve: true, reason: "outage", breakGlass: true, at: timestampFromDate(new Date("2026-03-03T14:05:09Z")) })],
  });
  const options = { consoleUrl: "https://airlock.example.com/console/", bot: true };
  const flagged = teamsMessage({ kind: "break_glass", flagged: true, record: approved, at: new Date(), reviewer: "sam@example.com", reason: "outage", groups: ["data-owners"], reviewers: [] }, options).attachments[0].content;
  t.same(verbs(flagged as unknown as Card), []);
  const pendingTouched = create(RequestRecordSchema, { request, state: RequestState.PENDING, votes: approved.votes });
  const refreshed = teamsRecordCard(pendingTouched, options);
  t.same(verbs(refreshed as unknown as Card), [], "a request a break-glass vote touched is approved in the console only");
  t.same(
    refreshed.actions.map((action) => action.title),
    ["Review and approve"],
  );
  const line = refreshed.body.find((element) => typeof element.text === "string" && element.text.includes("broke glass"));
  t.match(String(line?.text), /\(2026-03-03 14:05:09 UTC\)/);
  const plain = teamsRecordCard(create(RequestRecordSchema, { request, state: RequestState.PENDING }), options);
  t.same(verbs(plain as unknown as Card), ["approve", "deny"], "without break-glass or step-up the card votes");
});

await t.test("no token reaches the log, whether the activity is refused or taken", async (t) => {
  const chunks: string[] = [];
  const log = createLogger({
    name: "broker",
    level: "debug",
    destination: new Writable({
      write(chunk: Buffer, _encoding, done) {
        chunks.push(chunk.toString("utf8"));
        done();
      },
    }),
  });
  const bot = new TeamsBot({ appId, openIdMetadataUrl: metadataUrl, users: new Map([[oid.dana, "dana@example.com"]]) }, { log, consoleUrl: "https://airlock.example.com/console/" });
  const broker = stack.broker.broker;
  const target = { get: (id: string) => broker.get(id), decide: (id: string, ballot: { reviewer: string; approve: boolean; reason: string }) => broker.decide(id, ballot, { channel: "teams" }) };
  const call = stack.callExportTable("teams logging");
  const { requestId } = await cardFor("teams logging");
  const forged = await botToken({ key: otherKeys.privateKey });
  const refused = await bot.handleActivity(invoke(oid.dana, "approve", requestId), { authorization: `Bearer ${forged}` }, target);
  t.equal(refused.status, 401);
  const good = await botToken();
  const taken = await bot.handleActivity(invoke(oid.dana, "deny", requestId, "logging test"), { authorization: `Bearer ${good}` }, target);
  t.equal(taken.status, 200);
  const text = chunks.join("");
  t.match(text, /Teams activity refused/);
  t.match(text, /Teams vote recorded/);
  for (const token of [forged, good]) t.notOk(text.includes(token.split(".")[2] ?? "x"), "no token signature in the log");
  t.equal((await call).code, Code.PermissionDenied);
});

await t.test("with app_password the bot sends the card itself and updates it in place when decided", async (t) => {
  const call = stack.callExportTable("teams sent as the bot");
  const { requestId } = await cardFor("teams sent as the bot");
  const postPath = `/teams/v3/conversations/${encodeURIComponent(conversationId)}/activities`;
  let post: ConnectorCall | undefined;
  for (let i = 0; i < 400 && post === undefined; i++) {
    post = connectorCalls.find((c) => c.method === "POST" && c.path === postPath && c.body.includes("teams sent as the bot"));
    if (post === undefined) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  t.ok(post !== undefined, "the card was posted to the data-owners conversation through the Bot Connector API");
  t.equal(post?.authorization, "Bearer bot-connector-access-token", "with the app token");
  const tokenCall = connectorCalls.find((c) => c.path === "/tenant/oauth2/v2.0/token");
  const form = new URLSearchParams(tokenCall?.body ?? "");
  t.same([form.get("grant_type"), form.get("client_id"), form.get("client_secret"), form.get("scope")], ["client_credentials", appId, appPassword, "https://api.botframework.com/.default"]);
  const sent = JSON.parse(post?.body ?? "{}") as { type: string; attachments: Array<{ contentType: string; content: Card }> };
  t.equal(sent.type, "message");
  t.same(verbs(sent.attachments[0]?.content), ["approve", "deny"], "the bot's card carries Approve and Deny");
  const activityId = /^1:activity-\d+$/;
  const answer = await send(invoke(oid.dana, "approve", requestId));
  t.match(notice(answer), /approval was recorded/);
  t.equal((await call).code, 0);
  let put: ConnectorCall | undefined;
  for (let i = 0; i < 400 && put === undefined; i++) {
    put = connectorCalls.find((c) => c.method === "PUT" && c.path.startsWith(`${postPath}/`) && c.body.includes(requestId));
    if (put === undefined) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  t.ok(put !== undefined, "the posted card is updated when the request is decided");
  t.match(decodeURIComponent(put?.path.slice(postPath.length + 1) ?? ""), activityId, "the activity the bot posted");
  const updated = JSON.parse(put?.body ?? "{}") as { attachments: Array<{ content: Card }> };
  t.match(String(updated.attachments[0]?.content.body[0]?.text), /^Approved: ExportTable/);
  t.same(verbs(updated.attachments[0]?.content), [], "no buttons left on a decided card");
  t.ok(connectorCalls.filter((c) => c.path.endsWith("/token")).length === 1, "the app token is fetched once and reused");
});
