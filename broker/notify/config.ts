import type { ConfigReader } from "../../common/config.js";
import { principalKey } from "../rules/people.js";

/**
 * How Slack messages are sent: through the Web API with a bot token (messages can be
 * updated when the request is decided and requesters get a DM), or through one
 * incoming webhook (post only: no updates, no DMs, one fixed channel).
 */
export type SlackTransport =
  | {
      readonly kind: "web_api";
      /** The bot token (`xoxb-…`). A secret: never logged. */
      readonly botToken: string;
      /** Base URL of the Web API, without a trailing slash. @default "https://slack.com/api" */
      readonly apiUrl: string;
      /** Reviewer group → Slack channel id the group's review requests are posted to. @default empty */
      readonly channels: ReadonlyMap<string, string>;
      /** Channel for groups that have none in `channels`; without it such groups get no Slack message. */
      readonly defaultChannel?: string;
    }
  | {
      readonly kind: "incoming_webhook";
      /** The incoming webhook URL. Its path is the secret: never logged. */
      readonly url: string;
    };

/** The Slack section of {@link NotificationsConfig}. */
export interface SlackConfig {
  readonly transport: SlackTransport;
  /**
   * The app's signing secret, which verifies interactions (button clicks). A secret:
   * never logged. Without it messages carry no Approve / Deny buttons, because a click
   * could not be verified.
   */
  readonly signingSecret?: string;
  /** Slack user id (`U…`/`W…`) → Airlock reviewer id (e.g. an email). @default empty */
  readonly users: ReadonlyMap<string, string>;
}

/**
 * The Teams bot (`notifications.teams.bot`): Approve / Deny on the card through
 * `Action.Execute`, which Teams sends to the broker's bot endpoint
 * (`POST /api/teams/messages`) as an `adaptiveCard/action` invoke, signed by the Bot
 * Framework. Nothing here is a secret: the endpoint only verifies tokens.
 */
export interface TeamsBotConfig {
  /** The bot's Microsoft App ID (Entra application id, a GUID): the audience of the Bot Framework's tokens. */
  readonly appId: string;
  /**
   * Where the Bot Framework's OpenID metadata is (its `jwks_uri` names the signing keys).
   * @default "https://login.botframework.com/v1/.well-known/openidconfiguration"
   */
  readonly openIdMetadataUrl: string;
  /** Entra object id (`from.aadObjectId`, lower-case) → Airlock reviewer id. @default empty */
  readonly users: ReadonlyMap<string, string>;
  /** When set, invokes from any other Entra tenant (`conversation.tenantId`) are refused. */
  readonly tenantId?: string;
  /** Cards sent as the bot through the Bot Connector API (Teams routes `Action.Execute` to a card's sender); absent: cards go through `webhookUrl`. */
  readonly sending?: TeamsBotSending;
}

/** How the bot sends cards itself: the Bot Connector API with the app's client credentials. */
export interface TeamsBotSending {
  /** The app's client secret. A secret: never logged. */
  readonly appPassword: string;
  /** Where the app's token comes from (client credentials, scope `https://api.botframework.com/.default`). @default the tenant's token URL with `tenant_id`, else the botframework.com one */
  readonly tokenUrl: string;
  /** The Teams service URL of the region (`https://smba.trafficmanager.net/emea/`); always ends with `/`. */
  readonly serviceUrl: string;
  /** Reviewer group → Teams conversation id (a channel's `19:…@thread.tacv2`). */
  readonly conversations: ReadonlyMap<string, string>;
  /** The conversation of groups not in `conversations`; without it such groups get no card from the bot. */
  readonly defaultConversation?: string;
}

/** The Microsoft Teams section of {@link NotificationsConfig}. */
export interface TeamsConfig {
  /** The incoming webhook (or Workflows) URL. Its path is the secret: never logged. Optional when the bot sends the cards. */
  readonly webhookUrl?: string;
  /** The bot that takes Approve / Deny from the card; without it cards only link to the console. */
  readonly bot?: TeamsBotConfig;
}

/** One generic webhook receiver. */
export interface WebhookConfig {
  /** Where events are POSTed. Never logged beyond its origin (the path may be a secret). */
  readonly url: string;
  /** Key of the `x-airlock-signature` HMAC-SHA256. A secret: never logged. At least 16 characters. */
  readonly secret: string;
}

/** How failed deliveries are retried: exponential backoff from `baseDelayMs`, capped at `maxDelayMs`. */
export interface RetryConfig {
  /** Attempts per delivery, the first one included. @default 5 */
  readonly attempts: number;
  /** Delay before the second attempt; doubled for each further one. @default 200 */
  readonly baseDelayMs: number;
  /** Longest delay between two attempts (a receiver's `Retry-After` is honoured up to this). @default 30000 */
  readonly maxDelayMs: number;
}

/** The broker's reviewer notifications, validated. Every channel is optional. */
export interface NotificationsConfig {
  /**
   * The approver console's base URL; links to a request are `<consoleUrl>#/requests/<id>`.
   * Always ends with `/`. @default "http://127.0.0.1:9465/console/"
   */
  readonly consoleUrl: string;
  readonly slack?: SlackConfig;
  readonly teams?: TeamsConfig;
  /** @default [] */
  readonly webhooks: readonly WebhookConfig[];
  readonly retry: RetryConfig;
  /** Time limit of one HTTP attempt, in ms. @default 10000 */
  readonly timeoutMs: number;
  /** Deliveries waiting at most; past it the oldest is dropped with a warning. @default 1000 */
  readonly queueSize: number;
}

/** Defaults of {@link NotificationsConfig}. */
export const notificationsConfigDefaults = {
  /** @default "http://127.0.0.1:9465/console/" (the broker's default HTTP address) */
  consoleUrl: "http://127.0.0.1:9465/console/",
  /** @default "https://slack.com/api" */
  slackApiUrl: "https://slack.com/api",
  /** @default "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token" (a multi-tenant bot; with `tenant_id`, that tenant's) */
  teamsTokenUrl: "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token",
  /** @default "https://login.botframework.com/v1/.well-known/openidconfiguration" (the Bot Framework's public cloud) */
  teamsOpenIdMetadataUrl: "https://login.botframework.com/v1/.well-known/openidconfiguration",
  /** @default { attempts: 5, baseDelayMs: 200, maxDelayMs: 30000 } */
  retry: { attempts: 5, baseDelayMs: 200, maxDelayMs: 30_000 } satisfies RetryConfig,
  /** @default 10000 */
  timeoutMs: 10_000,
  /** @default 1000 */
  queueSize: 1000,
} as const;

/** The configuration that notifies nobody: what a broker without a `notifications` section uses. */
export const noNotifications: NotificationsConfig = {
  consoleUrl: notificationsConfigDefaults.consoleUrl,
  webhooks: [],
  retry: notificationsConfigDefaults.retry,
  timeoutMs: notificationsConfigDefaults.timeoutMs,
  queueSize: notificationsConfigDefaults.queueSize,
};

const minimumSecretLength = 16;

function fieldOf(reader: ConfigReader, key: string): string {
  return reader.path === "" ? key : `${reader.path}.${key}`;
}

function isLoopback(hostname: string): boolean {
  return hostname === "localhost" || hostname === "[::1]" || /^127(?:\.\d{1,3}){3}$/.test(hostname);
}

/**
 * An absolute http(s) URL. Where the request carries a secret (a token header, a
 * signed body, a secret path), plain http is allowed only to a loopback host: on any
 * other network the secret would travel in clear.
 */
function url(reader: ConfigReader, key: string, carriesSecret: boolean, fallback?: string): string {
  const text = fallback === undefined ? reader.string(key) : reader.string(key, fallback);
  let parsed: URL;
  try {
    parsed = new URL(text);
  } catch {
    throw reader.fail(fieldOf(reader, key), "must be an absolute http(s) URL");
  }
  if (parsed.protocol !== "https:" && parsed.protocol !== "http:") throw reader.fail(fieldOf(reader, key), "must be an absolute http(s) URL");
  if (carriesSecret && parsed.protocol === "http:" && !isLoopback(parsed.hostname)) {
    throw reader.fail(fieldOf(reader, key), "must use https (plain http is allowed only to a loopback host)");
  }
  if (parsed.username !== "" || parsed.password !== "") throw reader.fail(fieldOf(reader, key), "must not carry credentials");
  return text;
}

function secret(reader: ConfigReader, key: string): string {
  const value = reader.string(key);
  if (value.length < minimumSecretLength) throw reader.fail(fieldOf(reader, key), `must be at least ${minimumSecretLength} characters`);
  return value;
}

function readUsers(reader: ConfigReader): Map<string, string> {
  const users = new Map<string, string>();
  const slackUserOf = new Map<string, string>();
  for (const slackUser of reader.keys()) {
    if (!/^[UW][A-Z0-9]+$/.test(slackUser)) throw reader.fail(fieldOf(reader, slackUser), "is not a Slack user id (U… or W…)");
    const reviewer = reader.string(slackUser).trim();
    if (reviewer === "") throw reader.fail(fieldOf(reader, slackUser), "must not be blank");
    // The reverse mapping finds a requester's Slack user for the result DM: it must be unambiguous.
    const earlier = slackUserOf.get(principalKey(reviewer));
    if (earlier !== undefined) throw reader.fail(fieldOf(reader, slackUser), `maps ${JSON.stringify(reviewer)} again (also ${fieldOf(reader, earlier)})`);
    slackUserOf.set(principalKey(reviewer), slackUser);
    users.set(slackUser, reviewer);
  }
  reader.done();
  return users;
}

function readSlack(reader: ConfigReader): SlackConfig {
  const hasToken = reader.has("bot_token");
  const hasWebhook = reader.has("incoming_webhook_url");
  if (hasToken && hasWebhook) throw reader.fail(fieldOf(reader, "incoming_webhook_url"), "cannot be used together with bot_token (choose one)");
  if (!hasToken && !hasWebhook) throw reader.fail(fieldOf(reader, "bot_token"), "is required (or incoming_webhook_url)");
  let transport: SlackTransport;
  if (hasToken) {
    const botToken = reader.string("bot_token");
    if (!botToken.startsWith("xox")) throw reader.fail(fieldOf(reader, "bot_token"), "must be a Slack token (xoxb-…)");
    const apiUrl = url(reader, "api_url", true, notificationsConfigDefaults.slackApiUrl).replace(/\/+$/, "");
    const channels = new Map<string, string>();
    const channelsReader = reader.optionalObject("channels");
    if (channelsReader !== undefined) {
      for (const group of channelsReader.keys()) {
        if (group.trim() === "") throw channelsReader.fail(fieldOf(channelsReader, group), "group names must not be blank");
        channels.set(group, channelsReader.string(group));
      }
      channelsReader.done();
    }
    const defaultChannel = reader.optionalString("default_channel");
    transport = { kind: "web_api", botToken, apiUrl, channels, ...(defaultChannel === undefined ? {} : { defaultChannel }) };
  } else {
    // A webhook posts to the one channel it was made for: per-group channels cannot apply.
    for (const key of ["api_url", "channels", "default_channel"]) {
      if (reader.has(key)) throw reader.fail(fieldOf(reader, key), "applies only with bot_token (an incoming webhook posts to its own channel)");
    }
    transport = { kind: "incoming_webhook", url: url(reader, "incoming_webhook_url", true) };
  }
  const signingSecret = reader.has("signing_secret") ? secret(reader, "signing_secret") : (reader.optionalString("signing_secret"), undefined);
  const usersReader = reader.optionalObject("users");
  const users = usersReader === undefined ? new Map<string, string>() : readUsers(usersReader);
  reader.done();
  return { transport, users, ...(signingSecret === undefined ? {} : { signingSecret }) };
}

const guidPattern = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function guid(reader: ConfigReader, key: string, what: string): string {
  const value = reader.string(key).trim().toLowerCase();
  if (!guidPattern.test(value)) throw reader.fail(fieldOf(reader, key), `is not ${what} (a GUID such as 00000000-0000-0000-0000-000000000000)`);
  return value;
}

function readTeamsUsers(reader: ConfigReader): Map<string, string> {
  const users = new Map<string, string>();
  for (const objectId of reader.keys()) {
    const key = objectId.trim().toLowerCase();
    if (!guidPattern.test(key)) throw reader.fail(fieldOf(reader, objectId), "is not an Entra object id (a GUID)");
    if (users.has(key)) throw reader.fail(fieldOf(reader, objectId), "repeats an object id (they are compared without case)");
    const reviewer = reader.string(objectId).trim();
    if (reviewer === "") throw reader.fail(fieldOf(reader, objectId), "must not be blank");
    users.set(key, reviewer);
  }
  reader.done();
  return users;
}

function readTeamsBot(reader: ConfigReader): TeamsBotConfig {
  const appId = guid(reader, "app_id", "a Microsoft App ID");
  // The keys that sign votes come from here: it must not be reachable in clear over a network.
  const openIdMetadataUrl = url(reader, "openid_metadata_url", true, notificationsConfigDefaults.teamsOpenIdMetadataUrl);
  const usersReader = reader.optionalObject("users");
  const users = usersReader === undefined ? new Map<string, string>() : readTeamsUsers(usersReader);
  const tenantId = reader.has("tenant_id") ? guid(reader, "tenant_id", "an Entra tenant id") : undefined;
  const sending = reader.has("app_password") ? readSending(reader, tenantId) : undefined;
  if (sending === undefined) {
    for (const key of ["service_url", "conversations", "default_conversation", "token_url"]) {
      if (reader.has(key)) throw reader.fail(fieldOf(reader, key), "applies only with app_password (the bot sends cards itself)");
    }
  }
  reader.done();
  return { appId, openIdMetadataUrl, users, ...(tenantId === undefined ? {} : { tenantId }), ...(sending === undefined ? {} : { sending }) };
}

function readSending(reader: ConfigReader, tenantId: string | undefined): TeamsBotSending {
  const appPassword = secret(reader, "app_password");
  const fallbackTokenUrl = tenantId === undefined ? notificationsConfigDefaults.teamsTokenUrl : `https://login.microsoftonline.com/${tenantId}/oauth2/v2.0/token`;
  const tokenUrl = url(reader, "token_url", true, fallbackTokenUrl);
  const serviceUrl = url(reader, "service_url", true).replace(/\/*$/, "/");
  const conversations = new Map<string, string>();
  const conversationsReader = reader.optionalObject("conversations");
  if (conversationsReader !== undefined) {
    for (const group of conversationsReader.keys()) {
      if (group.trim() === "") throw conversationsReader.fail(fieldOf(conversationsReader, group), "group names must not be blank");
      const id = conversationsReader.string(group).trim();
      if (id === "") throw conversationsReader.fail(fieldOf(conversationsReader, group), "must not be blank");
      conversations.set(group, id);
    }
    conversationsReader.done();
  }
  const defaultConversation = reader.optionalString("default_conversation")?.trim();
  if (conversations.size === 0 && (defaultConversation === undefined || defaultConversation === "")) {
    throw reader.fail(fieldOf(reader, "conversations"), "is required with app_password (or default_conversation): where should the bot post?");
  }
  return { appPassword, tokenUrl, serviceUrl, conversations, ...(defaultConversation === undefined || defaultConversation === "" ? {} : { defaultConversation }) };
}

function readTeams(reader: ConfigReader): TeamsConfig {
  const botReader = reader.optionalObject("bot");
  const bot = botReader === undefined ? undefined : readTeamsBot(botReader);
  // A bot that sends its own cards needs no webhook; otherwise the webhook is how cards get there.
  const webhookUrl = bot?.sending !== undefined && !reader.has("webhook_url") ? undefined : url(reader, "webhook_url", true);
  reader.done();
  return { ...(webhookUrl === undefined ? {} : { webhookUrl }), ...(bot === undefined ? {} : { bot }) };
}

function readRetry(reader: ConfigReader): RetryConfig {
  const defaults = notificationsConfigDefaults.retry;
  const attempts = reader.integer("attempts", defaults.attempts, 1, 100);
  const baseDelayMs = reader.integer("base_delay_ms", defaults.baseDelayMs, 1, 3_600_000);
  const maxDelayMs = reader.integer("max_delay_ms", Math.max(defaults.maxDelayMs, baseDelayMs), 1, 3_600_000);
  if (maxDelayMs < baseDelayMs) throw reader.fail(fieldOf(reader, "max_delay_ms"), "must not be less than base_delay_ms");
  reader.done();
  return { attempts, baseDelayMs, maxDelayMs };
}

/**
 * Validates the broker's `notifications` section (pass the reader of that section:
 * `parseNotificationsConfig(root.object("notifications"))`). Every part is optional;
 * unknown keys are refused, and every error is an `invalid_argument` AirlockError
 * naming the exact field (`notifications.webhooks[0].secret`).
 *
 * ```yaml
 * console_url: https://airlock.corp/console/   # default http://127.0.0.1:9465/console/
 * slack:
 *   bot_token: xoxb-…                           # or incoming_webhook_url: https://hooks.slack.com/…
 *   api_url: https://slack.com/api              # default; bot_token only
 *   signing_secret: …                           # needed for the Approve / Deny buttons
 *   channels: { security: C01, data-owners: C02 }   # bot_token only
 *   default_channel: C03                        # optional; bot_token only
 *   users: { U1: alice@corp }                   # Slack user → reviewer id
 * teams:
 *   webhook_url: https://…                      # where cards are posted (optional when the bot sends them)
 *   bot:                                        # optional: Approve / Deny on the card (Action.Execute)
 *     app_id: 00000000-0000-0000-0000-000000000000   # the bot's Microsoft App ID (token audience)
 *     openid_metadata_url: https://login.botframework.com/v1/.well-known/openidconfiguration   # default
 *     tenant_id: 00000000-0000-0000-0000-000000000000 # optional: only this Entra tenant
 *     users: { <Entra object id>: alice@corp }  # from.aadObjectId → reviewer id
 *     app_password: …                           # optional: the bot sends the cards itself (Bot Connector API)
 *     service_url: https://smba.trafficmanager.net/emea/   # with app_password
 *     conversations: { security: "19:…@thread.tacv2" }       # with app_password; or default_conversation
 *     token_url: https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token   # default from tenant_id
 * webhooks: [ { url: https://…, secret: … } ]   # secret ≥ 16 characters
 * retry: { attempts: 5, base_delay_ms: 200, max_delay_ms: 30000 }
 * timeout_ms: 10000
 * queue_size: 1000
 * ```
 */
export function parseNotificationsConfig(reader: ConfigReader): NotificationsConfig {
  const consoleText = url(reader, "console_url", false, notificationsConfigDefaults.consoleUrl);
  const consoleUrl = consoleText.replace(/#.*$/, "").replace(/\/*$/, "/");
  const slackReader = reader.optionalObject("slack");
  const slack = slackReader === undefined ? undefined : readSlack(slackReader);
  const teamsReader = reader.optionalObject("teams");
  const teams = teamsReader === undefined ? undefined : readTeams(teamsReader);
  const webhooks = reader.list("webhooks", false).map((entry): WebhookConfig => {
    const webhook = { url: url(entry, "url", true), secret: secret(entry, "secret") };
    entry.done();
    return webhook;
  });
  const retryReader = reader.optionalObject("retry");
  const retry = retryReader === undefined ? notificationsConfigDefaults.retry : readRetry(retryReader);
  const timeoutMs = reader.integer("timeout_ms", notificationsConfigDefaults.timeoutMs, 100, 300_000);
  const queueSize = reader.integer("queue_size", notificationsConfigDefaults.queueSize, 1, 1_000_000);
  reader.done();
  return { consoleUrl, webhooks, retry, timeoutMs, queueSize, ...(slack === undefined ? {} : { slack }), ...(teams === undefined ? {} : { teams }) };
}
