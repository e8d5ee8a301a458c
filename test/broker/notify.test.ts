import { createHmac } from "node:crypto";
import { once } from "node:events";
import { createServer, type IncomingHttpHeaders, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { Writable } from "node:stream";
import { create, fromJson, type JsonValue } from "@bufbuild/protobuf";
import { timestampFromDate, ValueSchema } from "@bufbuild/protobuf/wkt";
import t, { type Test } from "tap";
import { parse as parseYaml } from "yaml";
import {
  type NotificationsConfig,
  noNotifications,
  notificationsConfigDefaults,
  parseNotificationsConfig,
  parseSlackInteraction,
  ReviewNotifier,
  type SlackBallot,
  signWebhookBody,
  slackRecordMessage,
  slackRequestMessage,
  verifySlackSignature,
  verifyWebhookSignature,
} from "../../broker/notify/index.js";
import { ConfigReader } from "../../common/config.js";
import { AirlockError, Code } from "../../common/errors.js";
import { createLogger, type Logger } from "../../common/logger.js";
import { useInfra } from "../../harness/index.js";
import { type RequestRecord, RequestRecordSchema, RequestState, ReviewerVoteSchema, Risk } from "../../proto/index.js";

// No servers needed: this gives the file its leak check (sockets and servers left open fail it).
await useInfra(t, {});

// ---------------------------------------------------------------------------------------------
// Fixtures

const botToken = "xoxb-111-222-SECRETBOTTOKEN";
const signingSecret = "slack-signing-SECRET-0123456789";
const webhookSecret = "webhook-hmac-SECRET-0123456789";
const deadline = new Date("2030-01-01T12:00:00Z");

function record(id = "req-1", changes: { state?: RequestState; votes?: Array<{ reviewer: string; group: string; approve: boolean; reason: string }> } = {}): RequestRecord {
  return create(RequestRecordSchema, {
    request: {
      id,
      identity: { agent: "sql-agent@agents.corp", onBehalfOf: "alice@corp", chain: ["alice@corp", "sql-agent@agents.corp"], authenticatedBy: "jwt" },
      host: "db-host-1",
      service: "demo.v1.OpsService",
      method: "ExportTable",
      // An agent-controlled reason trying to ping everyone and plant a link: it must arrive inert.
      reason: "monthly export <!channel> <https://evil.example|click here> & more",
      risk: Risk.HIGH,
      ruleId: "export-customers",
      reviewers: { allOf: [{ group: "security", minApprovals: 1 }, { group: "data-owners", minApprovals: 2 }], escalationGroup: "oncall" },
      request: fromJson(ValueSchema, { table: "customers", limit: 10 }),
      createdAt: timestampFromDate(new Date("2030-01-01T11:00:00Z")),
      deadline: timestampFromDate(deadline),
    },
    state: changes.state ?? RequestState.PENDING,
    outstanding: [
      { group: "security", minApprovals: 1 },
      { group: "data-owners", minApprovals: 2 },
    ],
    votes: changes.votes ?? [],
  });
}

/** A logger whose lines are kept, to check what was logged and that no secret was. */
function capturedLogger(): { log: Logger; text: () => string; lines: () => Array<Record<string, unknown>> } {
  const chunks: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      chunks.push(chunk.toString("utf8"));
      done();
    },
  });
  const text = (): string => chunks.join("");
  return {
    log: createLogger({ name: "broker", level: "debug", destination: stream }),
    text,
    lines: () =>
      text()
        .split("\n")
        .filter((line) => line !== "")
        .map((line) => JSON.parse(line) as Record<string, unknown>),
  };
}

interface Received {
  readonly method: string;
  readonly path: string;
  readonly headers: IncomingHttpHeaders;
  readonly body: string;
  readonly at: number;
}

type Answer = { readonly status?: number; readonly body?: unknown; readonly headers?: Record<string, string> } | "hang";

/** A real HTTP server on 127.0.0.1 that records every request and answers as `answer` says. */
interface Receiver {
  readonly url: string;
  readonly requests: Received[];
  /** Resolves with the requests once `predicate` holds for them; fails the wait after `timeoutMs`. */
  waitFor(predicate: (requests: readonly Received[]) => boolean, timeoutMs?: number): Promise<Received[]>;
  close(): Promise<void>;
}

async function startReceiver(t: Test, answer: (request: Received, index: number) => Answer = () => ({})): Promise<Receiver> {
  const requests: Received[] = [];
  const waiters = new Set<() => void>();
  const server = createServer((req, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("end", () => {
      const received: Received = { method: req.method ?? "", path: req.url ?? "", headers: req.headers, body: Buffer.concat(chunks).toString("utf8"), at: Date.now() };
      requests.push(received);
      for (const wake of waiters) wake();
      const reply = answer(received, requests.length - 1);
      if (reply === "hang") return;
      const body = reply.body ?? { ok: true };
      res.writeHead(reply.status ?? 200, { "content-type": typeof body === "string" ? "text/plain" : "application/json", ...reply.headers });
      res.end(typeof body === "string" ? body : JSON.stringify(body));
    });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  const receiver: Receiver = {
    url: `http://127.0.0.1:${port}`,
    requests,
    waitFor(predicate, timeoutMs = 5000) {
      return new Promise((resolve, reject) => {
        const check = (): void => {
          if (!predicate(requests)) return;
          clearTimeout(timer);
          waiters.delete(check);
          resolve([...requests]);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`the receiver did not see what was expected in ${timeoutMs} ms; it saw ${requests.map((r) => r.path).join(", ")}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      await closed;
    },
  };
  t.teardown(() => receiver.close());
  return receiver;
}

function notifierFor(t: Test, config: Partial<NotificationsConfig>, log: Logger, extra: { closeGraceMs?: number; concurrency?: number; requiresStepUp?: (record: RequestRecord) => boolean } = {}): ReviewNotifier {
  const notifier = new ReviewNotifier({ config: { ...noNotifications, consoleUrl: "https://airlock.corp/console/", retry: { attempts: 5, baseDelayMs: 20, maxDelayMs: 1000 }, ...config }, log, ...extra });
  t.teardown(() => notifier.close());
  return notifier;
}

function json(received: Received | undefined): Record<string, unknown> {
  return JSON.parse(received?.body ?? "null") as Record<string, unknown>;
}

function slackSign(body: string, timestamp: number, secret = signingSecret): Record<string, string> {
  return {
    "content-type": "application/x-www-form-urlencoded",
    "x-slack-request-timestamp": String(timestamp),
    "x-slack-signature": `v0=${createHmac("sha256", secret).update(`v0:${timestamp}:${body}`).digest("hex")}`,
  };
}

function interactionBody(options: { user?: string; actionId?: string; requestId?: string; responseUrl: string; channel?: string; ts?: string }): string {
  const payload = {
    type: "block_actions",
    user: { id: options.user ?? "U0BOB", username: "bob" },
    team: { id: "T01" },
    container: { type: "message", message_ts: options.ts ?? "1700000000.000100", channel_id: options.channel ?? "C0SEC" },
    channel: { id: options.channel ?? "C0SEC", name: "security" },
    response_url: options.responseUrl,
    actions: [{ type: "button", action_id: options.actionId ?? "airlock_approve", block_id: "airlock:req-1", value: options.requestId ?? "req-1", action_ts: "1700000001.0002" }],
  };
  return `payload=${encodeURIComponent(JSON.stringify(payload))}`;
}

const nowSeconds = (): number => Math.floor(Date.now() / 1000);

// ---------------------------------------------------------------------------------------------
// Configuration

await t.test("the notifications section parses, with defaults for what is left out", async (t) => {
  const yaml = `
notifications:
  console_url: http://127.0.0.1:9465/console
  slack:
    bot_token: xoxb-1-2-abc
    api_url: https://slack.com/api/
    signing_secret: ${signingSecret}
    channels: { security: C01, data-owners: C02 }
    users: { U1ALICE: alice@corp, W2BOB: Bob@Corp }
  teams: { webhook_url: "https://corp.webhook.office.com/webhookb2/abc" }
  webhooks:
    - { url: "https://hooks.corp/airlock", secret: ${webhookSecret} }
  retry: { attempts: 3, base_delay_ms: 50 }
`;
  const root = new ConfigReader(parseYaml(yaml), "", "broker.yaml");
  const config = parseNotificationsConfig(root.object("notifications"));
  t.equal(config.consoleUrl, "http://127.0.0.1:9465/console/", "the console URL ends with / so links append cleanly");
  t.same(config.slack?.transport, { kind: "web_api", botToken: "xoxb-1-2-abc", apiUrl: "https://slack.com/api", channels: new Map([["security", "C01"], ["data-owners", "C02"]]) });
  t.equal(config.slack?.signingSecret, signingSecret);
  t.same([...(config.slack?.users ?? [])], [["U1ALICE", "alice@corp"], ["W2BOB", "Bob@Corp"]]);
  t.equal(config.teams?.webhookUrl, "https://corp.webhook.office.com/webhookb2/abc");
  t.same(config.webhooks, [{ url: "https://hooks.corp/airlock", secret: webhookSecret }]);
  t.same(config.retry, { attempts: 3, baseDelayMs: 50, maxDelayMs: notificationsConfigDefaults.retry.maxDelayMs });
  t.equal(config.timeoutMs, notificationsConfigDefaults.timeoutMs);
  t.equal(config.queueSize, notificationsConfigDefaults.queueSize);

  const empty = parseNotificationsConfig(new ConfigReader({}, "notifications", "broker.yaml"));
  t.same(empty, noNotifications, "every section is optional");
  const webhookOnly = parseNotificationsConfig(new ConfigReader({ slack: { incoming_webhook_url: "https://hooks.slack.com/services/T/B/X" } }, "notifications", "broker.yaml"));
  t.same(webhookOnly.slack, { transport: { kind: "incoming_webhook", url: "https://hooks.slack.com/services/T/B/X" }, users: new Map() });
});

await t.test("the Teams bot section parses: app id, OpenID metadata URL (default Bot Framework), users by object id", async (t) => {
  const appId = "6F1C2B9E-3D4A-4E8B-9C1D-2A3B4C5D6E7F";
  const section = {
    teams: {
      webhook_url: "https://corp.webhook.office.com/webhookb2/abc",
      bot: { app_id: appId, users: { "0D7A1C2E-1111-4A2B-8C3D-000000000D4A": " dana@corp " }, tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47" },
    },
  };
  const config = parseNotificationsConfig(new ConfigReader(section, "notifications", "broker.yaml"));
  t.same(config.teams?.bot, {
    appId: appId.toLowerCase(),
    openIdMetadataUrl: notificationsConfigDefaults.teamsOpenIdMetadataUrl,
    users: new Map([["0d7a1c2e-1111-4a2b-8c3d-000000000d4a", "dana@corp"]]),
    tenantId: "72f988bf-86f1-41af-91ab-2d7cd011db47",
  });
  t.equal(notificationsConfigDefaults.teamsOpenIdMetadataUrl, "https://login.botframework.com/v1/.well-known/openidconfiguration");
  const local = parseNotificationsConfig(
    new ConfigReader({ teams: { webhook_url: "http://127.0.0.1:1/w", bot: { app_id: appId, openid_metadata_url: "http://127.0.0.1:2/meta" } } }, "notifications", "broker.yaml"),
  );
  t.equal(local.teams?.bot?.openIdMetadataUrl, "http://127.0.0.1:2/meta", "a loopback metadata URL may be plain http (tests, a local mirror)");
  t.same(local.teams?.bot?.users, new Map());
  const sender = parseNotificationsConfig(
    new ConfigReader(
      {
        teams: {
          bot: {
            app_id: appId,
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47",
            app_password: "an-app-password-of-enough-length",
            service_url: "https://smba.trafficmanager.net/emea",
            conversations: { security: "19:sec@thread.tacv2" },
          },
        },
      },
      "notifications",
      "broker.yaml",
    ),
  );
  t.equal(sender.teams?.webhookUrl, undefined, "a bot that sends its own cards needs no webhook");
  t.same(sender.teams?.bot?.sending, {
    appPassword: "an-app-password-of-enough-length",
    tokenUrl: "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token",
    serviceUrl: "https://smba.trafficmanager.net/emea/",
    conversations: new Map([["security", "19:sec@thread.tacv2"]]),
  });
});

await t.test("every bad field is named", async (t) => {
  const cases: Array<[string, Record<string, unknown>, string]> = [
    ["unknown key", { slack: { bot_token: "xoxb-1", chanels: {} } }, "notifications.slack.chanels"],
    ["no transport", { slack: { channels: { security: "C01" } } }, "notifications.slack.bot_token"],
    ["two transports", { slack: { bot_token: "xoxb-1", incoming_webhook_url: "https://hooks.slack.com/x" } }, "notifications.slack.incoming_webhook_url"],
    ["not a Slack token", { slack: { bot_token: "hunter2" } }, "notifications.slack.bot_token"],
    ["plain http to a remote Slack", { slack: { bot_token: "xoxb-1", api_url: "http://slack.example.com/api" } }, "notifications.slack.api_url"],
    ["channels with a webhook", { slack: { incoming_webhook_url: "https://hooks.slack.com/x", channels: { a: "C1" } } }, "notifications.slack.channels"],
    ["blank channel", { slack: { bot_token: "xoxb-1", channels: { security: "" } } }, "notifications.slack.channels.security"],
    ["bad Slack user id", { slack: { bot_token: "xoxb-1", users: { "alice@corp": "alice@corp" } } }, "notifications.slack.users.alice@corp"],
    ["one reviewer twice", { slack: { bot_token: "xoxb-1", users: { U1: "alice@corp", U2: " Alice@corp" } } }, "notifications.slack.users.U2"],
    ["short signing secret", { slack: { bot_token: "xoxb-1", signing_secret: "short" } }, "notifications.slack.signing_secret"],
    ["teams without URL", { teams: {} }, "notifications.teams.webhook_url"],
    ["teams URL not a URL", { teams: { webhook_url: "not a url" } }, "notifications.teams.webhook_url"],
    ["bot without app id", { teams: { webhook_url: "https://t.example/w", bot: {} } }, "notifications.teams.bot.app_id"],
    ["bot app id not a GUID", { teams: { webhook_url: "https://t.example/w", bot: { app_id: "airlock-bot" } } }, "notifications.teams.bot.app_id"],
    ["bot metadata over plain http", { teams: { webhook_url: "https://t.example/w", bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", openid_metadata_url: "http://login.example/meta" } } }, "notifications.teams.bot.openid_metadata_url"],
    ["bot user not an object id", { teams: { webhook_url: "https://t.example/w", bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", users: { "dana@corp": "dana@corp" } } } }, "notifications.teams.bot.users.dana@corp"],
    [
      "bot user twice",
      { teams: { webhook_url: "https://t.example/w", bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", users: { "0d7a1c2e-1111-4a2b-8c3d-000000000d4a": "a@corp", "0D7A1C2E-1111-4A2B-8C3D-000000000D4A": "b@corp" } } } },
      "notifications.teams.bot.users.0D7A1C2E-1111-4A2B-8C3D-000000000D4A",
    ],
    ["bot tenant not a GUID", { teams: { webhook_url: "https://t.example/w", bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", tenant_id: "contoso" } } }, "notifications.teams.bot.tenant_id"],
    ["bot without webhook or sending", { teams: { bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f" } } }, "notifications.teams.webhook_url"],
    ["bot sending without conversations", { teams: { bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", app_password: "an-app-password-of-enough-length", service_url: "https://smba.trafficmanager.net/emea/" } } }, "notifications.teams.bot.conversations"],
    ["bot sending without service URL", { teams: { bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", app_password: "an-app-password-of-enough-length", default_conversation: "19:a" } } }, "notifications.teams.bot.service_url"],
    ["bot short app password", { teams: { bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", app_password: "short" } } }, "notifications.teams.bot.app_password"],
    ["bot service URL over plain http", { teams: { bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", app_password: "an-app-password-of-enough-length", service_url: "http://smba.example/", default_conversation: "19:a" } } }, "notifications.teams.bot.service_url"],
    ["bot conversations without app password", { teams: { webhook_url: "https://t.example/w", bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", conversations: { a: "19:a" } } } }, "notifications.teams.bot.conversations"],
    ["bot unknown key", { teams: { webhook_url: "https://t.example/w", bot: { app_id: "6f1c2b9e-3d4a-4e8b-9c1d-2a3b4c5d6e7f", client_secret: "x" } } }, "notifications.teams.bot.client_secret"],
    ["webhook secret too short", { webhooks: [{ url: "https://hooks.corp/a", secret: "abc" }] }, "notifications.webhooks[0].secret"],
    ["webhook without secret", { webhooks: [{ url: "https://hooks.corp/a", secret: webhookSecret }, { url: "https://hooks.corp/b" }] }, "notifications.webhooks[1].secret"],
    ["webhook URL with credentials", { webhooks: [{ url: "https://user:pw@hooks.corp/a", secret: webhookSecret }] }, "notifications.webhooks[0].url"],
    ["zero attempts", { retry: { attempts: 0 } }, "notifications.retry.attempts"],
    ["max below base", { retry: { base_delay_ms: 500, max_delay_ms: 100 } }, "notifications.retry.max_delay_ms"],
    ["queue size", { queue_size: -1 }, "notifications.queue_size"],
    ["console URL", { console_url: "ftp://x/" }, "notifications.console_url"],
  ];
  for (const [name, section, field] of cases) {
    t.throws(
      () => parseNotificationsConfig(new ConfigReader(section, "notifications", "broker.yaml")),
      { name: "AirlockError", code: Code.InvalidArgument, details: { field }, rawMessage: `broker.yaml: ${field} ` },
      `${name}: names ${field}`,
    );
  }
});

// ---------------------------------------------------------------------------------------------
// Slack

await t.test("Slack Web API: Block Kit per group channel, then chat.update and a DM when decided", async (t) => {
  let ts = 0;
  const slack = await startReceiver(t, (request) => {
    const body = json(request);
    if (request.path === "/api/chat.postMessage") return { body: { ok: true, channel: body.channel, ts: `1700000000.00010${ts++}` } };
    return { body: { ok: true } };
  });
  const captured = capturedLogger();
  const notifier = notifierFor(
    t,
    {
      slack: {
        transport: { kind: "web_api", botToken, apiUrl: `${slack.url}/api`, channels: new Map([["security", "C0SEC"], ["data-owners", "C0DATA"]]) },
        signingSecret,
        users: new Map([["U0ALICE", "alice@corp"], ["U0SAM", "sam@corp"]]),
      },
    },
    captured.log,
  );
  const pending = record();
  notifier.notifyEvent(pending, {
    kind: "awaiting_review",
    requestId: "req-1",
    at: new Date(),
    outstanding: [
      { group: "security", remaining: 1 },
      { group: "data-owners", remaining: 2 },
    ],
    notify: ["sam@corp", "dora@corp"],
  });
  const posts = await slack.waitFor((requests) => requests.length >= 2);
  t.same(posts.map((p) => p.path).sort(), ["/api/chat.postMessage", "/api/chat.postMessage"]);
  t.same(posts.map((p) => json(p).channel).sort(), ["C0DATA", "C0SEC"], "one message per reviewer group, in the group's channel");
  for (const post of posts) t.equal(post.headers.authorization, `Bearer ${botToken}`, "the bot token travels in the authorization header");

  const message = json(posts[0]);
  const blocks = message.blocks as Array<Record<string, unknown>>;
  t.match(blocks[0], { type: "header", text: { type: "plain_text", text: /Approval needed: ExportTable/ } });
  const text = JSON.stringify(blocks);
  for (const expected of ["sql-agent@agents.corp", "alice@corp", "db-host-1", "demo.v1.OpsService/ExportTable", "HIGH", "export-customers", "security: 1 more approval", "data-owners: 2 more approvals"]) {
    t.ok(text.includes(expected), `the message shows ${expected}`);
  }
  t.ok(text.includes(`<!date^${Math.floor(deadline.getTime() / 1000)}^`), "the expiry is shown in each reader's time zone");
  t.ok(text.includes("<@U0SAM>") && text.includes("dora@corp"), "reviewers are mentioned (mapped ones as Slack users)");
  t.ok(text.includes("&lt;!channel&gt;") && text.includes("&lt;https://evil.example|click here&gt; &amp; more"), "the agent's reason is escaped: no @channel, no planted link");
  t.notOk(text.includes("<!channel>"), "no raw <!channel>");
  const actions = blocks.find((block) => block.type === "actions") as { block_id: string; elements: Array<Record<string, unknown>> } | undefined;
  t.equal(actions?.block_id, "airlock:req-1");
  t.match(actions?.elements[0], { type: "button", action_id: "airlock_approve", value: "req-1", style: "primary" }, "Approve carries the request id");
  t.match(actions?.elements[1], { type: "button", action_id: "airlock_deny", value: "req-1", style: "danger" }, "Deny carries the request id");
  t.equal(actions?.elements[1]?.confirm, undefined, "with a bot token Deny opens the reason modal, which is the confirmation: no confirm dialog");
  t.match(actions?.elements[2], { type: "button", action_id: "airlock_open", url: "https://airlock.corp/console/#/requests/req-1" }, "a link to the console");
  t.equal(typeof message.text, "string", "a notification text for clients that cannot show blocks");
  await notifier.idle();
  t.same(
    (await notifier.slack?.trackedMessages("req-1"))?.map((ref) => ref.channel).sort(),
    ["C0DATA", "C0SEC"],
    "the (channel, ts) of each posted message is kept",
  );

  const approved = record("req-1", { state: RequestState.APPROVED, votes: [{ reviewer: "sam@corp", group: "security", approve: true, reason: "looks fine" }] });
  notifier.notifyEvent(approved, { kind: "approved", requestId: "req-1", at: new Date(), cause: "votes", by: ["sam@corp"], reason: "looks fine" });
  const all = await slack.waitFor((requests) => requests.length >= 5);
  const updates = all.filter((r) => r.path === "/api/chat.update");
  t.equal(updates.length, 2, "both messages are updated");
  t.same(updates.map((u) => `${String(json(u).channel)}/${String(json(u).ts)}`).sort(), posts.map((p) => `${String(json(p).channel)}/1700000000.00010${posts.indexOf(p)}`).sort(), "chat.update targets the posted (channel, ts)");
  const updated = JSON.stringify(json(updates[0]).blocks);
  t.ok(updated.includes("Approved") && updated.includes("sam@corp") && updated.includes("looks fine"), "the update shows the outcome, who and why");
  t.notOk(updated.includes("airlock_approve"), "no vote buttons on a decided request");
  const dm = all.find((r) => r.path === "/api/chat.postMessage" && json(r).channel === "U0ALICE");
  t.ok(dm, "the requester (on behalf of) gets a DM at their Slack user id");
  t.match(json(dm).text, /was \*approved\* by sam@corp/);

  await notifier.idle();
  t.notOk(captured.text().includes("SECRETBOTTOKEN"), "the bot token is never logged");
});

await t.test("Slack Web API: escalation goes to the escalation group's channel; break-glass is flagged without buttons", async (t) => {
  const slack = await startReceiver(t, (request) => ({ body: { ok: true, channel: json(request).channel, ts: "1.2" } }));
  const notifier = notifierFor(
    t,
    { slack: { transport: { kind: "web_api", botToken, apiUrl: `${slack.url}/api`, channels: new Map([["oncall", "C0ONCALL"]]), defaultChannel: "C0ALL" }, signingSecret, users: new Map() } },
    capturedLogger().log,
  );
  notifier.notifyEscalated(record("req-2"), { group: "oncall", reviewers: ["omar@corp"] });
  const [escalation] = await slack.waitFor((requests) => requests.length >= 1);
  t.equal(json(escalation).channel, "C0ONCALL");
  t.ok(JSON.stringify(json(escalation).blocks).includes("Escalated"), "says it was escalated");
  t.ok(JSON.stringify(json(escalation).blocks).includes("airlock_approve"), "the escalation group can vote from the message");

  notifier.notifyBreakGlass(record("req-3"), { reviewer: "lead@corp", reason: "prod is down", reviewers: ["sam@corp", "dora@corp"] });
  const all = await slack.waitFor((requests) => requests.length >= 3);
  const flagged = all.slice(1);
  t.same(flagged.map((r) => json(r).channel).sort(), ["C0ALL", "C0ONCALL"], "every group of the requirement is told (groups without a channel use default_channel, once)");
  const text = JSON.stringify(json(flagged[0]).blocks);
  t.ok(text.includes("BREAK-GLASS") && text.includes("Flagged for security review") && text.includes("lead@corp") && text.includes("prod is down"));
  t.notOk(text.includes("airlock_approve"), "nothing left to vote on");
});

await t.test("Slack incoming webhook: one message per event, the outcome as a new message", async (t) => {
  const hook = await startReceiver(t, () => ({ body: "ok" }));
  const captured = capturedLogger();
  const url = `${hook.url}/services/T000/B000/SECRETPATHxyz`;
  const notifier = notifierFor(t, { slack: { transport: { kind: "incoming_webhook", url }, users: new Map() } }, captured.log);
  notifier.notifyReviewRequested(record("req-4"), { reviewers: [] });
  notifier.notifyDecided(record("req-4", { state: RequestState.DENIED }), { outcome: "denied", by: ["sue@corp"], reason: "not this month" });
  const [request, decided] = await hook.waitFor((requests) => requests.length >= 2);
  t.equal(request?.path, "/services/T000/B000/SECRETPATHxyz");
  const first = json(request);
  t.notOk("channel" in first, "a webhook posts to its own channel");
  t.notOk(JSON.stringify(first.blocks).includes("airlock_approve"), "no buttons without a signing secret to verify clicks");
  t.ok(JSON.stringify(first.blocks).includes("airlock_open"), "still a link to the console");
  t.ok(JSON.stringify(json(decided).blocks).includes("Denied"), "the outcome follows in order");
  await notifier.idle();

  // A failing webhook is logged without its secret path.
  await hook.close();
  const failing = notifierFor(t, { slack: { transport: { kind: "incoming_webhook", url }, users: new Map() }, retry: { attempts: 1, baseDelayMs: 1, maxDelayMs: 1 } }, captured.log);
  failing.notifyReviewRequested(record("req-5"), { reviewers: [] });
  await failing.idle();
  t.ok(captured.lines().some((line) => line.msg === "notification delivery failed; giving up"), "the failure is logged");
  t.notOk(captured.text().includes("SECRETPATH"), "the webhook URL's secret path is never logged");
});

// ---------------------------------------------------------------------------------------------
// Teams and generic webhooks

await t.test("Teams: an Adaptive Card 1.4 with the context and a link to the console", async (t) => {
  const teams = await startReceiver(t, () => ({ body: "1" }));
  const notifier = notifierFor(t, { teams: { webhookUrl: `${teams.url}/webhookb2/SECRET` } }, capturedLogger().log);
  notifier.notifyReviewRequested(record("req-6"), { reviewers: ["sam@corp"] });
  const [received] = await teams.waitFor((requests) => requests.length >= 1);
  t.equal(received?.headers["content-type"], "application/json; charset=utf-8");
  const message = json(received);
  t.equal(message.type, "message");
  const attachments = message.attachments as Array<Record<string, unknown>>;
  t.equal(attachments.length, 1);
  t.equal(attachments[0]?.contentType, "application/vnd.microsoft.card.adaptive");
  const card = attachments[0]?.content as { type: string; version: string; body: Array<Record<string, unknown>>; actions: Array<Record<string, unknown>> };
  t.equal(card.type, "AdaptiveCard");
  t.equal(card.version, "1.4");
  t.match(card.body[0], { type: "TextBlock", text: "Approval needed: ExportTable" });
  const facts = (card.body.find((element) => element.type === "FactSet") as { facts: Array<{ title: string; value: string }> }).facts;
  t.same(
    facts.map((fact) => fact.title),
    ["Agent", "On behalf of", "Host", "Call", "Risk", "Rule", "Still needed", "Expires", "Request"],
  );
  t.match(facts.find((fact) => fact.title === "Still needed")?.value, "security: 1 more approval; data-owners: 2 more approvals");
  t.same(card.actions, [{ type: "Action.OpenUrl", title: "Open in console", url: "https://airlock.corp/console/#/requests/req-6" }]);
  t.ok(JSON.stringify(card.body).includes("\\\\<https://evil.example|click here\\\\>"), "Markdown in the reason is escaped");
});

await t.test("webhooks: signed JSON with the RequestRecord; verifyWebhookSignature checks it", async (t) => {
  const hook = await startReceiver(t);
  const notifier = notifierFor(t, { webhooks: [{ url: `${hook.url}/airlock`, secret: webhookSecret }] }, capturedLogger().log);
  const at = new Date("2030-01-01T11:30:00Z");
  notifier.notifyBreakGlass(record("req-7"), { reviewer: "lead@corp", reason: "prod is down", reviewers: ["sam@corp"], at });
  const [received] = await hook.waitFor((requests) => requests.length >= 1);
  if (received === undefined) return;
  t.equal(received.headers["x-airlock-event"], "break_glass");
  t.match(received.headers["x-airlock-delivery"], /^[0-9a-f-]{36}$/);
  t.match(received.headers["x-airlock-signature"], /^sha256=[0-9a-f]{64}$/);
  const timestamp = String(received.headers["x-airlock-timestamp"]);
  t.equal(received.headers["x-airlock-signature"], signWebhookBody(webhookSecret, timestamp, received.body), "HMAC-SHA256(secret, timestamp + '.' + body)");
  t.doesNotThrow(() => verifyWebhookSignature(webhookSecret, received.body, received.headers), "verifies with the secret");
  const refusal = { name: "AirlockError", code: Code.Unauthenticated };
  t.throws(() => verifyWebhookSignature("another-secret-0123456789", received.body, received.headers), refusal, "a wrong secret is refused");
  t.throws(() => verifyWebhookSignature(webhookSecret, received.body.replace("prod is down", "all fine"), received.headers), refusal, "an altered body is refused");
  t.throws(() => verifyWebhookSignature(webhookSecret, received.body, received.headers, { now: new Date(Date.now() + 6 * 60_000) }), refusal, "an old delivery is refused");
  t.throws(() => verifyWebhookSignature(webhookSecret, received.body, { ...received.headers, "x-airlock-signature": undefined }), refusal, "an unsigned one too");

  const payload = json(received);
  t.equal(payload.event, "break_glass");
  t.equal(payload.at, at.toISOString());
  t.equal(payload.flagged, true);
  t.same(payload.details, { reviewer: "lead@corp", reason: "prod is down", groups: ["security", "data-owners", "oncall"], reviewers: ["sam@corp"] });
  t.match(payload.request, { request: { id: "req-7", risk: "RISK_HIGH", identity: { onBehalfOf: "alice@corp" } }, state: "REQUEST_STATE_PENDING" }, "the RequestRecord in protobuf JSON");
  const decoded = fromJson(RequestRecordSchema, payload.request as JsonValue);
  t.equal(decoded.request?.method, "ExportTable", "it decodes with fromJson(RequestRecordSchema, …)");
});

// ---------------------------------------------------------------------------------------------
// Delivery: retries, never blocking, bounded, closing

await t.test("a failed delivery is retried with backoff until it succeeds", async (t) => {
  const hook = await startReceiver(t, (_request, index) => (index < 2 ? { status: 503, body: "try later" } : {}));
  const captured = capturedLogger();
  const notifier = notifierFor(t, { webhooks: [{ url: `${hook.url}/airlock`, secret: webhookSecret }], retry: { attempts: 5, baseDelayMs: 40, maxDelayMs: 1000 } }, captured.log);
  notifier.notifyDecided(record("req-8", { state: RequestState.EXPIRED }), { outcome: "expired" });
  const requests = await hook.waitFor((seen) => seen.length >= 3);
  await notifier.idle();
  t.equal(hook.requests.length, 3, "failed twice, delivered on the third attempt, then stopped");
  t.equal(requests[0]?.headers["x-airlock-delivery"], requests[2]?.headers["x-airlock-delivery"], "one delivery id across attempts");
  const gaps = [requests[1]!.at - requests[0]!.at, requests[2]!.at - requests[1]!.at];
  t.ok(gaps[0]! >= 30, `waited before the 2nd attempt (${gaps[0]} ms)`);
  t.ok(gaps[1]! >= 65, `waited about twice as long before the 3rd (${gaps[1]} ms)`);
  for (const received of requests) t.doesNotThrow(() => verifyWebhookSignature(webhookSecret, received.body, received.headers), "each attempt is signed afresh");
  const retries = captured.lines().filter((line) => line.msg === "notification delivery failed; will retry");
  t.equal(retries.length, 2, "each failure is logged");
  t.match(retries[0], { level: 40, delivery: /^webhook\[0\] http:\/\/127\.0\.0\.1:\d+ \(decided req-8\)$/, attempt: 1, error: /HTTP 503/ });
  t.ok(captured.lines().some((line) => line.msg === "notification delivered after retrying"));
  t.notOk(captured.text().includes(webhookSecret), "the webhook secret is never logged");
});

await t.test("a permanent failure (4xx) is not retried; a 429's Retry-After is honoured", async (t) => {
  const hook = await startReceiver(t, (request, index) => {
    if (request.path === "/gone") return { status: 404, body: "no such hook" };
    return index === 1 ? { status: 429, headers: { "retry-after": "1" } } : {};
  });
  const captured = capturedLogger();
  const notifier = notifierFor(t, { teams: { webhookUrl: `${hook.url}/gone` } }, captured.log);
  notifier.notifyReviewRequested(record("req-9"), { reviewers: [] });
  await notifier.idle();
  t.equal(hook.requests.length, 1, "one attempt only");
  t.ok(captured.lines().some((line) => line.msg === "notification delivery failed; giving up" && String(line.error).includes("HTTP 404")));

  const limited = notifierFor(t, { teams: { webhookUrl: `${hook.url}/limited` }, retry: { attempts: 3, baseDelayMs: 10, maxDelayMs: 5000 } }, captured.log);
  limited.notifyReviewRequested(record("req-10"), { reviewers: [] });
  await limited.idle();
  const [, throttled, retried] = hook.requests;
  t.equal(hook.requests.length, 3);
  t.ok(retried!.at - throttled!.at >= 900, `waited for Retry-After: 1 (${retried!.at - throttled!.at} ms)`);
});

await t.test("notify returns at once even when the receiver hangs; close() aborts and leaves nothing behind", async (t) => {
  const timersBefore = process.getActiveResourcesInfo().filter((kind) => kind === "Timeout").length;
  const hook = await startReceiver(t, () => "hang");
  const captured = capturedLogger();
  const notifier = new ReviewNotifier({
    config: { ...noNotifications, webhooks: [{ url: `${hook.url}/slow`, secret: webhookSecret }], teams: { webhookUrl: `${hook.url}/slow-teams` }, timeoutMs: 60_000 },
    log: captured.log,
    closeGraceMs: 100,
  });
  t.teardown(() => notifier.close());
  const started = performance.now();
  for (let i = 0; i < 50; i++) notifier.notifyReviewRequested(record(`req-h${i}`), { reviewers: ["sam@corp"] });
  const elapsed = performance.now() - started;
  t.ok(elapsed < 50, `50 notifications queued in ${elapsed.toFixed(1)} ms`);
  t.equal(notifier.pending, 100, "both channels' deliveries are queued");
  await hook.waitFor((requests) => requests.length >= 4);
  t.equal(hook.requests.length, 4, "at most `concurrency` (4) deliveries in flight");

  const closing = performance.now();
  await notifier.close();
  t.ok(performance.now() - closing < 2000, "close() aborts hanging deliveries after the grace period");
  t.equal(notifier.pending, 0);
  t.ok(captured.lines().some((line) => line.msg === "notifier closing: deliveries not sent"), "abandoned deliveries are logged");
  notifier.notifyReviewRequested(record("late"), { reviewers: [] });
  t.equal(notifier.pending, 0, "nothing is queued after close");
  await hook.close();
  const timersAfter = process.getActiveResourcesInfo().filter((kind) => kind === "Timeout").length;
  t.ok(timersAfter <= timersBefore, `no timer left behind (${timersBefore} before, ${timersAfter} after)`);
});

await t.test("the queue is bounded: the oldest waiting delivery is dropped with a warning", async (t) => {
  const hook = await startReceiver(t, () => "hang");
  const captured = capturedLogger();
  const notifier = notifierFor(t, { webhooks: [{ url: `${hook.url}/slow`, secret: webhookSecret }], queueSize: 3 }, captured.log, { concurrency: 1, closeGraceMs: 10 });
  for (let i = 0; i < 6; i++) notifier.notifyReviewRequested(record(`req-q${i}`), { reviewers: [] });
  t.equal(notifier.pending, 3, "never more than queue_size waiting");
  const drops = captured.lines().filter((line) => line.msg === "notification queue full: dropped the oldest waiting delivery");
  t.same(
    drops.map((line) => line.delivery),
    [0, 1, 2].map((i) => `webhook[0] ${hook.url} (review_requested req-q${i})`),
    "the oldest are dropped, and each drop is logged",
  );
  await hook.waitFor((requests) => requests.length >= 1);
  t.match(json(hook.requests[0]).request, { request: { id: "req-q3" } }, "the newest survive");
});

// ---------------------------------------------------------------------------------------------
// Slack interactions

await t.test("Slack signature verification", async (t) => {
  const body = interactionBody({ responseUrl: "https://hooks.slack.com/actions/x" });
  const now = new Date();
  const fresh = slackSign(body, nowSeconds());
  t.doesNotThrow(() => verifySlackSignature(signingSecret, body, fresh, now));
  t.doesNotThrow(() => verifySlackSignature(signingSecret, Buffer.from(body), fresh, now), "raw bytes work too");
  const refused = (pattern: RegExp) => ({ name: "AirlockError", code: Code.Unauthenticated, rawMessage: pattern });
  t.throws(() => verifySlackSignature(signingSecret, body, slackSign(body, nowSeconds(), "another-secret-0123456789"), now), refused(/does not match/));
  t.throws(() => verifySlackSignature(signingSecret, `${body}x`, fresh, now), refused(/does not match/), "an altered body");
  t.throws(() => verifySlackSignature(signingSecret, body, slackSign(body, Math.floor(now.getTime() / 1000) - 360), now), refused(/360 s old/), "6 minutes old");
  t.throws(() => verifySlackSignature(signingSecret, body, slackSign(body, nowSeconds() + 360), now), refused(/in the future/));
  t.throws(() => verifySlackSignature(signingSecret, body, { "x-slack-request-timestamp": String(nowSeconds()) }, now), refused(/not signed/));
  t.throws(() => verifySlackSignature(signingSecret, body, { ...fresh, "x-slack-signature": "v1=abc" }, now), refused(/not a v0 signature/));
  t.throws(() => verifySlackSignature(signingSecret, body, { ...fresh, "x-slack-signature": [String(fresh["x-slack-signature"]), "v0=00"] }, now), refused(/not signed/), "a repeated header");

  const users = new Map([["U0BOB", "bob@corp"]]);
  t.same(parseSlackInteraction(body, users), {
    slackUserId: "U0BOB",
    reviewer: "bob@corp",
    requestId: "req-1",
    approve: true,
    responseUrl: "https://hooks.slack.com/actions/x",
    channel: "C0SEC",
    messageTs: "1700000000.000100",
  });
  t.equal(parseSlackInteraction(interactionBody({ responseUrl: "https://x/", actionId: "airlock_deny" }), users)?.approve, false);
  t.equal(parseSlackInteraction(interactionBody({ responseUrl: "https://x/", actionId: "airlock_open" }), users), undefined, "the console link is not a vote");
  t.throws(() => parseSlackInteraction(interactionBody({ responseUrl: "https://x/", user: "U0EVE" }), users), { name: "AirlockError", code: Code.PermissionDenied, rawMessage: /U0EVE is not mapped/ });
  t.throws(() => parseSlackInteraction("payload=%7Bnot-json", users), { name: "AirlockError", code: Code.InvalidArgument });
});

await t.test("Slack interactions: a verified click votes as the mapped reviewer and the message shows the outcome", async (t) => {
  const slack = await startReceiver(t, (request) => (request.path.startsWith("/api/") ? { body: { ok: true } } : { body: "ok" }));
  const captured = capturedLogger();
  const notifier = notifierFor(
    t,
    {
      slack: {
        transport: { kind: "web_api", botToken, apiUrl: `${slack.url}/api`, channels: new Map([["security", "C0SEC"]]) },
        signingSecret,
        users: new Map([["U0BOB", "bob@corp"], ["U0ALICE", "alice@corp"]]),
      },
    },
    captured.log,
  );
  const integration = notifier.slack;
  if (integration === undefined) throw new Error("no Slack integration");
  const responseUrl = `${slack.url}/response/abc`;
  const calls: Array<[string, SlackBallot]> = [];
  let answer: (id: string) => Promise<RequestRecord> = async (id) =>
    record(id, { state: RequestState.APPROVED, votes: [{ reviewer: "bob@corp", group: "security", approve: true, reason: "approved in Slack by bob@corp" }] });
  const decide = async (id: string, ballot: SlackBallot): Promise<RequestRecord> => {
    calls.push([id, ballot]);
    return answer(id);
  };

  await t.test("a valid click is decided and the message updated with chat.update", async (t) => {
    const body = interactionBody({ responseUrl });
    const reply = await integration.handleInteraction(body, slackSign(body, nowSeconds()), decide);
    t.same(reply, { status: 200, body: {} });
    t.same(calls, [["req-1", { reviewer: "bob@corp", approve: true, reason: "approved in Slack by bob@corp" }]], "decide gets the mapped reviewer");
    const [update] = await slack.waitFor((requests) => requests.some((r) => r.path === "/api/chat.update"));
    t.equal(update?.path, "/api/chat.update");
    t.equal(update?.headers.authorization, `Bearer ${botToken}`);
    const message = json(update);
    t.equal(message.channel, "C0SEC");
    t.equal(message.ts, "1700000000.000100", "the clicked message is the one updated");
    const blocks = JSON.stringify(message.blocks);
    t.ok(blocks.includes("Approved") && blocks.includes("bob@corp"), "it shows the outcome");
    t.notOk(blocks.includes("airlock_approve"), "and no more buttons");
  });

  await t.test("a deny click carries the fixed reason; a still pending request keeps its buttons", async (t) => {
    calls.length = 0;
    slack.requests.length = 0;
    answer = async (id) => record(id, { votes: [{ reviewer: "bob@corp", group: "security", approve: false, reason: "denied in Slack by bob@corp" }] });
    const body = interactionBody({ responseUrl, actionId: "airlock_deny", requestId: "req-11" });
    const reply = await integration.handleInteraction(body, slackSign(body, nowSeconds()), decide);
    t.equal(reply.status, 200);
    t.same(calls, [["req-11", { reviewer: "bob@corp", approve: false, reason: "denied in Slack by bob@corp" }]]);
    const [update] = await slack.waitFor((requests) => requests.length >= 1);
    const blocks = JSON.stringify(json(update).blocks);
    t.ok(blocks.includes("denied in Slack by bob@corp"), "the vote is shown");
    t.ok(blocks.includes("airlock_approve"), "others can still vote");
    t.same(await integration.trackedMessages("req-11"), [], "a click adds no position: only messages the broker posted are kept");
  });

  await t.test("a bad signature is 401 and decides nothing", async (t) => {
    calls.length = 0;
    const body = interactionBody({ responseUrl });
    const reply = await integration.handleInteraction(body, slackSign(body, nowSeconds(), "another-secret-0123456789"), decide);
    t.equal(reply.status, 401);
    t.match(reply.body, { code: "unauthenticated", message: /does not match/ });
    const forged = await integration.handleInteraction(interactionBody({ responseUrl, user: "U0ALICE" }), slackSign(body, nowSeconds()), decide);
    t.equal(forged.status, 401, "a valid signature of another body does not carry over");
    t.same(calls, [], "decide was not called");
  });

  await t.test("a stale timestamp (6 minutes old) is 401", async (t) => {
    calls.length = 0;
    const body = interactionBody({ responseUrl });
    const reply = await integration.handleInteraction(body, slackSign(body, nowSeconds() - 360), decide);
    t.equal(reply.status, 401);
    t.match(reply.body, { code: "unauthenticated", message: /old/ });
    const now = new Date(Date.now() + 6 * 60_000);
    const later = await integration.handleInteraction(body, slackSign(body, nowSeconds()), decide, { now });
    t.equal(later.status, 401, "the same request replayed 6 minutes later");
    t.same(calls, []);
  });

  await t.test("an unknown Slack user is refused with an ephemeral message", async (t) => {
    calls.length = 0;
    slack.requests.length = 0;
    const body = interactionBody({ responseUrl, user: "U0EVE" });
    const reply = await integration.handleInteraction(body, slackSign(body, nowSeconds()), decide);
    t.equal(reply.status, 200);
    t.match(reply.body, { response_type: "ephemeral", replace_original: false, text: /not linked to an Airlock reviewer/ });
    t.same(calls, [], "decide was not called");
    const [told] = await slack.waitFor((requests) => requests.length >= 1);
    t.equal(told?.path, "/response/abc", "the clicker is told through the response_url");
    t.match(json(told), { response_type: "ephemeral", text: /not linked/ });
  });

  await t.test("refusals from the broker reach the clicker alone", async (t) => {
    const refusals: Array<[AirlockError, RegExp]> = [
      [new AirlockError(Code.FailedPrecondition, "request req-1: is approved, not pending", { details: { state: "approved" } }), /already approved/],
      [new AirlockError(Code.PermissionDenied, "request req-1: alice@corp is in the request's identity chain and may not vote on it"), /You may not vote on this request: .*identity chain/],
      [new AirlockError(Code.AlreadyExists, "request req-1: bob@corp already voted"), /already voted/],
    ];
    for (const [error, text] of refusals) {
      slack.requests.length = 0;
      answer = async () => {
        throw error;
      };
      const body = interactionBody({ responseUrl, user: "U0ALICE" });
      const reply = await integration.handleInteraction(body, slackSign(body, nowSeconds()), decide);
      t.equal(reply.status, 200, `${error.rawMessage}: 200`);
      t.match(reply.body, { response_type: "ephemeral", text });
      const [told] = await slack.waitFor((requests) => requests.length >= 1);
      t.match(json(told), { response_type: "ephemeral", replace_original: false, text }, "posted to the response_url, the message stays for the others");
    }
  });

  await t.test("a malformed payload is 400; other interactions are acknowledged and ignored", async (t) => {
    calls.length = 0;
    const bad = "payload=%7Bnope";
    t.equal((await integration.handleInteraction(bad, slackSign(bad, nowSeconds()), decide)).status, 400);
    const link = interactionBody({ responseUrl, actionId: "airlock_open" });
    t.same(await integration.handleInteraction(link, slackSign(link, nowSeconds()), decide), { status: 200, body: {} });
    t.same(calls, []);
  });

  await notifier.idle();
  t.notOk(captured.text().includes(signingSecret), "the signing secret is never logged");
  t.notOk(captured.text().includes("SECRETBOTTOKEN"), "nor the bot token");
});

await t.test("without a signing secret there are no buttons and interactions are refused", async (t) => {
  const slack = await startReceiver(t, () => ({ body: { ok: true, ts: "1.1" } }));
  const notifier = notifierFor(t, { slack: { transport: { kind: "web_api", botToken, apiUrl: `${slack.url}/api`, channels: new Map([["security", "C0SEC"]]) }, users: new Map([["U0BOB", "bob@corp"]]) } }, capturedLogger().log);
  notifier.notifyReviewRequested(record("req-12"), { reviewers: [], groups: ["security"] });
  const [post] = await slack.waitFor((requests) => requests.length >= 1);
  t.notOk(JSON.stringify(json(post).blocks).includes("airlock_approve"));
  const body = interactionBody({ responseUrl: `${slack.url}/response` });
  let called = false;
  const reply = await notifier.slack?.handleInteraction(body, slackSign(body, nowSeconds()), async () => {
    called = true;
    return record();
  });
  t.equal(reply?.status, 401);
  t.notOk(called);
});

await t.test("a channel that fails permanently does not stop the others", async (t) => {
  const slack = await startReceiver(t, (request) => (request.path === "/api/chat.postMessage" && json(request).channel === "C0GONE" ? { body: { ok: false, error: "channel_not_found" } } : { body: { ok: true, ts: "9.9", channel: json(request).channel } }));
  const hook = await startReceiver(t);
  const captured = capturedLogger();
  const notifier = notifierFor(
    t,
    {
      slack: { transport: { kind: "web_api", botToken, apiUrl: `${slack.url}/api`, channels: new Map([["security", "C0GONE"], ["data-owners", "C0DATA"]]) }, signingSecret, users: new Map() },
      webhooks: [{ url: `${hook.url}/a`, secret: webhookSecret }],
    },
    captured.log,
  );
  notifier.notifyReviewRequested(record("req-13"), { reviewers: [] });
  await notifier.idle();
  t.equal(slack.requests.length, 2, "channel_not_found is not retried");
  t.equal(hook.requests.length, 1, "the webhook got its delivery");
  t.same(await notifier.slack?.trackedMessages("req-13"), [{ channel: "C0DATA", ts: "9.9" }]);
  t.ok(captured.lines().some((line) => line.msg === "notification delivery failed; giving up" && String(line.error).includes("channel_not_found")));
});

await t.test("notifyEvent routes the rules' events; an auto rule's decision reaches webhooks only", async (t) => {
  const hook = await startReceiver(t);
  const teams = await startReceiver(t);
  const notifier = notifierFor(t, { webhooks: [{ url: `${hook.url}/a`, secret: webhookSecret }], teams: { webhookUrl: `${teams.url}/t` } }, capturedLogger().log);
  const at = new Date("2030-01-01T11:10:00Z");
  const pending = record("req-14");
  notifier.notifyEvent(pending, { kind: "awaiting_review", requestId: "req-14", at, outstanding: [{ group: "security", remaining: 1 }, { group: "data-owners", remaining: 0 }], notify: ["sam@corp"] });
  notifier.notifyEvent(pending, { kind: "voted", requestId: "req-14", at, reviewer: "sam@corp", approve: true, group: "security", reason: "", breakGlass: false });
  notifier.notifyEvent(pending, { kind: "escalated", requestId: "req-14", at, group: "oncall", notify: ["omar@corp"] });
  notifier.notifyEvent(record("req-14", { state: RequestState.EXPIRED }), { kind: "expired", requestId: "req-14", at, deadline });
  notifier.notifyEvent(record("req-15", { state: RequestState.APPROVED }), { kind: "approved", requestId: "req-15", at, cause: "auto_rule", by: [], reason: "low risk in office hours", autoRule: "office-hours" });
  await notifier.idle();
  const events = hook.requests.map((request) => json(request));
  const of = (id: string) => events.filter((event) => (event.request as { request: { id: string } }).request.id === id);
  t.same(
    of("req-14").map((event) => event.event),
    ["review_requested", "escalated", "decided"],
    "one request's events arrive in order; votes are not news for reviewers' channels",
  );
  t.same(of("req-14")[0]?.details, { groups: ["security"], reviewers: ["sam@corp"] }, "only groups that still need approvals");
  t.match(of("req-14")[2]?.details, { outcome: "expired", by: [], reason: /deadline 2030-01-01T12:00:00.000Z/ });
  t.same(of("req-15").map((event) => event.details), [{ outcome: "approved", by: [], reason: "low risk in office hours", autoRule: "office-hours" }]);
  t.equal(teams.requests.length, 3, "Teams heard of req-14 only: nobody was asked about the auto-approved req-15");
});

await t.test("Slack: a request whose approval needs a step-up has Review and approve (a console link), no Approve button", async (t) => {
  const slack = await startReceiver(t, (request) => (request.path === "/api/chat.postMessage" ? { body: { ok: true, channel: json(request).channel, ts: "1700000000.000900" } } : { body: { ok: true } }));
  const notifier = notifierFor(
    t,
    { slack: { transport: { kind: "web_api", botToken, apiUrl: `${slack.url}/api`, channels: new Map([["security", "C0SEC"]]) }, signingSecret, users: new Map([["U0SAM", "sam@corp"]]) } },
    capturedLogger().log,
    { requiresStepUp: (candidate) => candidate.request?.id === "req-stepup" },
  );
  for (const id of ["req-stepup", "req-plain"]) {
    notifier.notifyEvent(record(id), { kind: "awaiting_review", requestId: id, at: new Date(), outstanding: [{ group: "security", remaining: 1 }], notify: ["sam@corp"] });
  }
  const posts = await slack.waitFor((requests) => requests.length >= 2);
  const actionsOf = (id: string) => {
    const post = posts.find((p) => JSON.stringify(json(p)).includes(`airlock:${id}`));
    return ((json(post).blocks as Array<Record<string, unknown>>).find((block) => block.type === "actions") as { elements: Array<Record<string, unknown>> } | undefined)?.elements ?? [];
  };
  const stepUp = actionsOf("req-stepup");
  t.notOk(JSON.stringify(stepUp).includes("airlock_approve"), "no Approve button for the step-up request");
  t.match(stepUp[0], { type: "button", text: { text: "Review and approve" }, url: "https://airlock.corp/console/#/requests/req-stepup" }, "a deep link to decide in the console");
  t.match(stepUp[1], { action_id: "airlock_deny" }, "Deny stays: a denial needs no step-up");
  t.match(actionsOf("req-plain")[0], { action_id: "airlock_approve" }, "a request without step-up keeps its Approve button");
  await notifier.idle();
});

await t.test("Slack messages stay within Block Kit's limits whatever the agent sends", async (t) => {
  const huge = record("req-16");
  if (huge.request === undefined) throw new Error("fixture has no request");
  huge.request.reason = "<&>".repeat(5000);
  huge.request.host = "h&".repeat(400);
  huge.request.request = fromJson(ValueSchema, { blob: "<>&".repeat(2000) });
  huge.votes = Array.from({ length: 60 }, (_, i) => create(ReviewerVoteSchema, { reviewer: `r${i}@corp`, group: "security", approve: false, reason: "&".repeat(300) }));
  const messages = [
    slackRequestMessage({ kind: "review_requested", record: huge, at: new Date(), groups: [], reviewers: Array.from({ length: 500 }, (_, i) => `reviewer-${i}@corp`) }, { consoleUrl: "https://x/", buttons: true, mentions: Array.from({ length: 500 }, () => "<@U0123456789>") }),
    slackRequestMessage({ kind: "break_glass", flagged: true, record: huge, at: new Date(), reviewer: "lead@corp", reason: "<".repeat(5000), groups: [], reviewers: [] }, { consoleUrl: "https://x/", buttons: true }),
    slackRecordMessage(huge, { consoleUrl: "https://x/", buttons: true }, { outcome: "denied", by: ["a@corp"], reason: ">".repeat(5000) }),
  ];
  for (const message of messages) {
    for (const block of message.blocks) {
      if (block.type === "header") t.ok(block.text.text.length <= 150, "header ≤ 150");
      if (block.type === "section" && block.text !== undefined) t.ok(block.text.text.length <= 3000, `section text ≤ 3000 (${block.text.text.length})`);
      if (block.type === "section") for (const field of block.fields ?? []) t.ok(field.text.length <= 2000, "field ≤ 2000");
      if (block.type === "context") for (const element of block.elements) t.ok(element.text.length <= 2000, "context ≤ 2000");
      if (block.type === "actions") for (const button of block.elements) if (button.confirm !== undefined) t.ok(button.confirm.text.text.length <= 300, "confirm text ≤ 300");
    }
    const text = JSON.stringify(message.blocks);
    t.notOk(/&(?:a|am|amp|l|lt|g|gt)?…/.test(text), "no entity cut in half");
  }
});
