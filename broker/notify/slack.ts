import { createHmac, timingSafeEqual } from "node:crypto";
import { AirlockError, Code, codeName } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import type { RequestRecord } from "../../proto/index.js";
import { principalKey } from "../rules/people.js";
import type { SlackConfig } from "./config.js";
import type { Notification } from "./events.js";
import { type HeaderMap, headerValue, originOf, postJson } from "./http.js";
import type { DeliveryQueue } from "./queue.js";
import { type SlackMessage, type SlackMessageOptions, escapeMrkdwn, slackActions, slackRecordMessage, slackRequestMessage, slackResultMessage } from "./slack-blocks.js";
import { destinationsFor, outcomeOfState } from "./summary.js";
import type { StepUpPredicate } from "./teams.js";
import { isRecord, stringAt as anyStringAt } from "./json.js";

/** How far `x-slack-request-timestamp` may be from now, either way, in seconds (Slack's own recommendation). */
export const slackSignatureMaxSkewSeconds = 300;

function unauthenticated(message: string): AirlockError {
  return new AirlockError(Code.Unauthenticated, message);
}

/**
 * Verifies Slack's v0 request signature: `x-slack-signature` must be
 * `v0=<hex HMAC-SHA256(signingSecret, "v0:" + x-slack-request-timestamp + ":" + rawBody)>`
 * (compared in constant time), and the timestamp at most
 * {@link slackSignatureMaxSkewSeconds} from `now` either way, so a captured request
 * cannot be replayed later. `rawBody` must be the body exactly as received.
 * @throws AirlockError `unauthenticated` saying what is wrong.
 */
export function verifySlackSignature(signingSecret: string, rawBody: string | Uint8Array, headers: HeaderMap, now: Date = new Date()): void {
  const signature = headerValue(headers, "x-slack-signature");
  const timestamp = headerValue(headers, "x-slack-request-timestamp");
  if (signature === undefined || timestamp === undefined) throw unauthenticated("the request is not signed by Slack (x-slack-signature and x-slack-request-timestamp are required)");
  if (!/^\d{1,12}$/.test(timestamp)) throw unauthenticated("x-slack-request-timestamp is not a Unix time in seconds");
  const skew = Math.floor(now.getTime() / 1000) - Number(timestamp);
  if (Math.abs(skew) > slackSignatureMaxSkewSeconds) {
    throw unauthenticated(
      `x-slack-request-timestamp is ${Math.abs(skew)} s ${skew > 0 ? "old" : "in the future"} (at most ${slackSignatureMaxSkewSeconds} s allowed): a replayed request or a wrong clock`,
    );
  }
  const match = /^v0=([0-9a-fA-F]{64})$/.exec(signature);
  if (match?.[1] === undefined) throw unauthenticated("x-slack-signature is not a v0 signature");
  const body = typeof rawBody === "string" ? Buffer.from(rawBody, "utf8") : rawBody;
  const expected = createHmac("sha256", signingSecret).update(`v0:${timestamp}:`).update(body).digest();
  if (!timingSafeEqual(expected, Buffer.from(match[1], "hex"))) throw unauthenticated("x-slack-signature does not match the request (wrong signing secret or altered body)");
}

/** A click on an Airlock vote button, from a verified interaction payload. */
export interface SlackInteraction {
  /** Who clicked. */
  readonly slackUserId: string;
  /** The Airlock reviewer that Slack user is, from `notifications.slack.users`. */
  readonly reviewer: string;
  readonly requestId: string;
  /** Approve (true) or Deny (false). */
  readonly approve: boolean;
  /** Where to reply to the interaction (update the message or say something to the clicker). */
  readonly responseUrl: string;
  /** The channel of the message clicked, when Slack says. */
  readonly channel?: string;
  /** The `ts` of the message clicked, when Slack says. */
  readonly messageTs?: string;
}

/** A vote click before its user is mapped to a reviewer. */
type SlackAction = Omit<SlackInteraction, "reviewer">;

/** A non-empty string at `path`: Slack sends empty strings for fields it has no value for. */
function stringAt(value: unknown, ...path: string[]): string | undefined {
  const text = anyStringAt(value, ...path);
  return text === "" ? undefined : text;
}

function badPayload(message: string): AirlockError {
  return new AirlockError(Code.InvalidArgument, `Slack interaction: ${message}`, { details: { field: "payload" } });
}

/** Reads the vote click out of a form-encoded `payload=` body; undefined when it is not an Airlock vote. */
function readSlackAction(rawBody: string): SlackAction | undefined {
  const text = new URLSearchParams(rawBody).get("payload");
  if (text === null) throw badPayload("the body has no payload field");
  let payload: unknown;
  try {
    payload = JSON.parse(text);
  } catch {
    throw badPayload("payload is not JSON");
  }
  if (!isRecord(payload)) throw badPayload("payload is not an object");
  // Other interaction types (shortcuts, modals) are not Airlock's: acknowledged and ignored.
  if (payload.type !== "block_actions") return undefined;
  const action: unknown = Array.isArray(payload.actions) ? payload.actions[0] : undefined;
  const actionId = stringAt(action, "action_id");
  // The console link button also sends an interaction; only the vote buttons mean anything.
  if (actionId !== slackActions.approve && actionId !== slackActions.deny) return undefined;
  const requestId = stringAt(action, "value");
  if (requestId === undefined || requestId.length > 255) throw badPayload("the button carries no request id");
  const slackUserId = stringAt(payload, "user", "id");
  if (slackUserId === undefined) throw badPayload("payload.user.id is missing");
  const responseUrl = stringAt(payload, "response_url");
  if (responseUrl === undefined || !/^https?:\/\//.test(responseUrl)) throw badPayload("payload.response_url is missing");
  const channel = stringAt(payload, "channel", "id") ?? stringAt(payload, "container", "channel_id");
  const messageTs = stringAt(payload, "container", "message_ts") ?? stringAt(payload, "message", "ts");
  return {
    slackUserId,
    requestId,
    approve: actionId === slackActions.approve,
    responseUrl,
    ...(channel === undefined ? {} : { channel }),
    ...(messageTs === undefined ? {} : { messageTs }),
  };
}

function unknownUser(slackUserId: string): AirlockError {
  return new AirlockError(Code.PermissionDenied, `Slack user ${slackUserId} is not mapped to an Airlock reviewer (notifications.slack.users)`, { details: { slackUserId } });
}

/**
 * Parses the form-encoded body of a Slack interaction (`payload=<JSON>`, type
 * `block_actions`) into the vote it carries, mapping the Slack user to a reviewer
 * with `users` (Slack user id → reviewer id). Verify the signature first
 * ({@link verifySlackSignature}): this function trusts what it reads.
 * @returns undefined when the interaction is not an Airlock vote (another payload type, the console link button).
 * @throws AirlockError `invalid_argument` for a malformed payload, `permission_denied` for a Slack user with no reviewer.
 */
export function parseSlackInteraction(rawBody: string, users: ReadonlyMap<string, string>): SlackInteraction | undefined {
  const action = readSlackAction(rawBody);
  if (action === undefined) return undefined;
  const reviewer = users.get(action.slackUserId);
  if (reviewer === undefined) throw unknownUser(action.slackUserId);
  return { ...action, reviewer };
}

/** What the `/slack/interactions` route answers: the status and a JSON body. */
export interface SlackInteractionReply {
  /** 200 (handled, or refused with an ephemeral text), 400 (malformed) or 401 (bad, stale or missing signature). */
  readonly status: number;
  readonly body: unknown;
}

/** The ballot {@link SlackIntegration.handleInteraction} casts; assignable to the broker's `Ballot`. */
export interface SlackBallot {
  readonly reviewer: string;
  readonly approve: boolean;
  /** `approved in Slack by <reviewer>` / `denied in Slack by <reviewer>`: a button has no text box, and a denial needs a reason. */
  readonly reason: string;
}

/** Casts a ballot and returns the record after it (the broker's `decide`). */
export type DecideFunction = (requestId: string, ballot: SlackBallot) => Promise<RequestRecord>;

/** Options of {@link SlackIntegration}. */
export interface SlackIntegrationOptions {
  /** Runs every Slack call in the background, with retries. */
  readonly queue: DeliveryQueue;
  readonly log: Logger;
  /** The console base URL (ends with `/`). */
  readonly consoleUrl: string;
  /** Requests whose message positions are remembered at most; the oldest are forgotten first. @default 10000 */
  readonly maxTrackedRequests?: number;
  /** Requests whose approval needs a step-up: their messages link to the console instead of carrying Approve. @default none */
  readonly requiresStepUp?: StepUpPredicate;
}

/** Defaults of {@link SlackIntegrationOptions}. */
export const slackIntegrationDefaults = { maxTrackedRequests: 10_000 } as const;

/** A posted message. */
interface MessageRef {
  readonly channel: string;
  readonly ts: string;
}

/** Slack Web API errors worth another attempt; every other `ok: false` is permanent. */
const transientSlackErrors = new Set(["ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"]);

function ephemeral(text: string): Record<string, unknown> {
  return { response_type: "ephemeral", replace_original: false, text };
}

/** What a refused vote tells the reviewer who clicked. */
function refusalText(error: AirlockError): string {
  const state = typeof error.details.state === "string" ? error.details.state : undefined;
  switch (error.code) {
    case Code.FailedPrecondition:
      return state === undefined ? `Your vote was not recorded: ${error.rawMessage}` : `This request is already ${state}: your vote was not recorded.`;
    case Code.AlreadyExists:
      return "You already voted on this request; each reviewer counts once.";
    case Code.PermissionDenied:
      return `You may not vote on this request: ${error.rawMessage}`;
    case Code.NotFound:
      return "This request no longer exists.";
    default:
      return `Your vote could not be recorded (${codeName(error.code)}): ${error.rawMessage}. Try again, or use the console.`;
  }
}

/**
 * Slack: posts review requests to each reviewer group's channel (Web API) or to an
 * incoming webhook, remembers where each request's messages are so they can be
 * updated with `chat.update` when the request is decided, tells the requester the
 * result in a DM, and handles the Approve / Deny buttons
 * ({@link handleInteraction}). Every Slack call goes through the delivery queue:
 * nothing here makes the caller wait for Slack.
 */
export class SlackIntegration {
  private readonly config: SlackConfig;
  private readonly options: SlackIntegrationOptions;
  private readonly log: Logger;
  /** Reviewer key (principalKey) → Slack user id, for mentions and DMs. */
  private readonly slackUserOf = new Map<string, string>();
  /** Request id → its messages (Web API only). Insertion order is age, for the bound. */
  private readonly messages = new Map<string, MessageRef[]>();
  private readonly maxTracked: number;

  constructor(config: SlackConfig, options: SlackIntegrationOptions) {
    this.config = config;
    this.options = options;
    this.log = options.log;
    this.maxTracked = options.maxTrackedRequests ?? slackIntegrationDefaults.maxTrackedRequests;
    for (const [slackUser, reviewer] of config.users) this.slackUserOf.set(principalKey(reviewer), slackUser);
  }

  /** The Slack user id of a reviewer, from `users`. */
  slackUserFor(reviewer: string): string | undefined {
    return this.slackUserOf.get(principalKey(reviewer));
  }

  /** The messages posted for a request and still remembered (Web API only). */
  trackedMessages(requestId: string): ReadonlyArray<{ readonly channel: string; readonly ts: string }> {
    return [...(this.messages.get(requestId) ?? [])];
  }

  /** Queues what Slack should show for a notification. Returns at once. */
  deliver(notification: Notification): void {
    const requestId = notification.record.request?.id ?? "";
    const options: SlackMessageOptions = { consoleUrl: this.options.consoleUrl, buttons: this.config.signingSecret !== undefined, stepUp: this.options.requiresStepUp?.(notification.record) === true };
    if (notification.kind === "decided") {
      this.deliverDecision(notification, requestId, options);
      return;
    }
    const mentions = notification.reviewers.map((reviewer) => {
      const slackUser = this.slackUserFor(reviewer);
      return slackUser === undefined ? escapeMrkdwn(reviewer) : `<@${slackUser}>`;
    });
    const messageOptions = { ...options, mentions };
    const transport = this.config.transport;
    if (transport.kind === "incoming_webhook") {
      // One webhook, one channel: one message per event, whatever the groups.
      this.enqueueWebhook(requestId, notification.kind, () => slackRequestMessage(notification, messageOptions));
      return;
    }
    const channels = destinationsFor(notification, transport.channels, transport.defaultChannel, (group) =>
      this.log.warn({ requestId, group }, "no Slack channel for this reviewer group (notifications.slack.channels); it gets no Slack message"),
    );
    for (const channel of channels) {
      this.options.queue.enqueue({
        description: `slack chat.postMessage ${channel} (${notification.kind} ${requestId})`,
        key: this.key(requestId),
        run: async (signal) => {
          const message = slackRequestMessage(notification, messageOptions);
          const posted = await this.callWebApi("chat.postMessage", { channel, ...message, unfurl_links: false, unfurl_media: false }, signal);
          // Break-glass messages have no buttons and need no update.
          if (notification.kind !== "break_glass" && typeof posted.ts === "string") this.track(requestId, { channel: typeof posted.channel === "string" ? posted.channel : channel, ts: posted.ts });
        },
      });
    }
  }

  private deliverDecision(notification: Extract<Notification, { kind: "decided" }>, requestId: string, options: SlackMessageOptions): void {
    const decision = { outcome: notification.outcome, by: notification.by, reason: notification.reason };
    const transport = this.config.transport;
    if (transport.kind === "incoming_webhook") {
      // A webhook cannot update what it posted: the outcome is a new message.
      this.enqueueWebhook(requestId, "decided", () => slackRecordMessage(notification.record, options, decision));
      return;
    }
    // Runs after every earlier delivery of the request (same key), so every posted message is known by then.
    const updated = new Set<string>();
    this.options.queue.enqueue({
      description: `slack chat.update (decided ${requestId})`,
      key: this.key(requestId),
      run: async (signal) => {
        const message = slackRecordMessage(notification.record, options, decision);
        for (const ref of this.messages.get(requestId) ?? []) {
          const id = `${ref.channel}/${ref.ts}`;
          if (updated.has(id)) continue; // done by an earlier attempt
          try {
            await this.callWebApi("chat.update", { channel: ref.channel, ts: ref.ts, ...message }, signal);
          } catch (error) {
            const failure = AirlockError.from(error);
            // A deleted message or a lost channel must not hold the others back; transient errors retry.
            if (failure.code !== Code.FailedPrecondition) throw failure;
            this.log.warn({ requestId, channel: ref.channel, error: failure.message }, "could not update a Slack message with the outcome");
          }
          updated.add(id);
        }
        this.messages.delete(requestId);
      },
    });
    const requester = notification.record.request?.identity?.onBehalfOf ?? "";
    const slackUser = requester === "" ? undefined : this.slackUserFor(requester);
    if (slackUser === undefined) {
      if (requester !== "") this.log.debug({ requestId }, "the requester has no Slack user (notifications.slack.users): no result DM");
      return;
    }
    this.options.queue.enqueue({
      description: `slack chat.postMessage DM ${slackUser} (result of ${requestId})`,
      key: this.key(requestId),
      run: async (signal) => {
        await this.callWebApi("chat.postMessage", { channel: slackUser, ...slackResultMessage(notification, this.options.consoleUrl), unfurl_links: false }, signal);
      },
    });
  }

  /**
   * Handles a POST to `/slack/interactions`: verifies Slack's signature over the raw
   * body, reads the vote (mapping the Slack user to a reviewer), casts it through
   * `decide` (a denial with the reason `denied in Slack by <reviewer>`), and queues
   * the update of the clicked message with the result (`chat.update`, or the
   * interaction's `response_url` when there is no bot token or the update fails).
   * A refused vote (already decided, self-approval, unknown user, …) is told to the
   * clicker alone, as an ephemeral message. Never throws.
   * @param rawBody - the body exactly as received (form-encoded), before any parsing.
   * @param now - the clock the timestamp is checked against. @default new Date()
   * @returns 401 for a missing, bad or stale signature (decide not called), 400 for a
   *   malformed payload, else 200 (with an ephemeral text when the vote was refused).
   */
  async handleInteraction(rawBody: string, headers: HeaderMap, decide: DecideFunction, now: Date = new Date()): Promise<SlackInteractionReply> {
    try {
      if (this.config.signingSecret === undefined) throw unauthenticated("Slack interactions are disabled: notifications.slack.signing_secret is not configured");
      verifySlackSignature(this.config.signingSecret, rawBody, headers, now);
    } catch (error) {
      const refused = AirlockError.from(error, Code.Unauthenticated);
      this.log.warn({ reason: refused.rawMessage }, "Slack interaction refused");
      return { status: 401, body: refused.toJSON() };
    }
    let action: SlackAction | undefined;
    try {
      action = readSlackAction(rawBody);
    } catch (error) {
      const bad = AirlockError.from(error, Code.InvalidArgument);
      this.log.warn({ reason: bad.rawMessage }, "malformed Slack interaction");
      return { status: 400, body: bad.toJSON() };
    }
    if (action === undefined) return { status: 200, body: {} };
    const reviewer = this.config.users.get(action.slackUserId);
    if (reviewer === undefined) {
      const refused = unknownUser(action.slackUserId);
      this.log.warn({ slackUserId: action.slackUserId, requestId: action.requestId }, "Slack vote from a user with no reviewer mapping refused");
      return this.refuse(action, `Your Slack account is not linked to an Airlock reviewer, so your vote was not recorded. (${refused.rawMessage})`);
    }
    const ballot: SlackBallot = { reviewer, approve: action.approve, reason: `${action.approve ? "approved" : "denied"} in Slack by ${reviewer}` };
    let record: RequestRecord;
    try {
      record = await decide(action.requestId, ballot);
    } catch (error) {
      const refused = AirlockError.from(error);
      this.log.info({ requestId: action.requestId, reviewer, code: codeName(refused.code), reason: refused.rawMessage }, "Slack vote refused");
      return this.refuse(action, refusalText(refused));
    }
    this.log.info({ requestId: action.requestId, reviewer, approve: action.approve }, "Slack vote recorded");
    this.updateClicked(action, record);
    return { status: 200, body: {} };
  }

  /** Tells only the clicker, through the interaction's response_url, and answers the route the same way. */
  private refuse(action: SlackAction, text: string): SlackInteractionReply {
    this.options.queue.enqueue({
      description: `slack response_url (refusal for ${action.requestId})`,
      run: async (signal) => {
        await postJson(action.responseUrl, ephemeral(text), { what: "slack response_url", signal });
      },
    });
    return { status: 200, body: ephemeral(text) };
  }

  private updateClicked(action: SlackAction, record: RequestRecord): void {
    const requestId = action.requestId;
    const options: SlackMessageOptions = { consoleUrl: this.options.consoleUrl, buttons: true, stepUp: this.options.requiresStepUp?.(record) === true };
    const decided = outcomeOfState(record.state) !== undefined;
    const transport = this.config.transport;
    const ref = action.channel !== undefined && action.messageTs !== undefined ? { channel: action.channel, ts: action.messageTs } : undefined;
    // A message another replica posted is this replica's to update from now on.
    if (transport.kind === "web_api" && ref !== undefined && !decided) this.track(requestId, ref);
    this.options.queue.enqueue({
      description: `slack ${transport.kind === "web_api" && ref !== undefined ? "chat.update" : "response_url"} (vote on ${requestId})`,
      key: this.key(requestId),
      run: async (signal) => {
        const message = slackRecordMessage(record, options);
        if (transport.kind === "web_api" && ref !== undefined) {
          try {
            await this.callWebApi("chat.update", { channel: ref.channel, ts: ref.ts, ...message }, signal);
            return;
          } catch (error) {
            const failure = AirlockError.from(error);
            if (failure.code !== Code.FailedPrecondition) throw failure;
            this.log.warn({ requestId, error: failure.message }, "chat.update failed; replying through the interaction's response_url");
          }
        }
        await postJson(action.responseUrl, { replace_original: true, ...message }, { what: "slack response_url", signal });
      },
    });
  }

  private key(requestId: string): string {
    return `slack:${requestId}`;
  }

  private track(requestId: string, ref: MessageRef): void {
    const refs = this.messages.get(requestId) ?? [];
    if (!refs.some((known) => known.channel === ref.channel && known.ts === ref.ts)) refs.push(ref);
    this.messages.set(requestId, refs);
    while (this.messages.size > this.maxTracked) {
      const oldest = this.messages.keys().next();
      if (oldest.done === true) break;
      this.messages.delete(oldest.value);
    }
  }

  private enqueueWebhook(requestId: string, kind: string, build: () => SlackMessage): void {
    const transport = this.config.transport;
    if (transport.kind !== "incoming_webhook") return;
    this.options.queue.enqueue({
      description: `slack incoming webhook ${originOf(transport.url)} (${kind} ${requestId})`,
      key: this.key(requestId),
      run: async (signal) => {
        await postJson(transport.url, build(), { what: "slack incoming webhook", signal });
      },
    });
  }

  /**
   * One Slack Web API call with the bot token. Slack answers most errors with HTTP
   * 200 and `ok: false`: transient ones are `unavailable` (retried), the rest
   * `failed_precondition`. The token is only ever in the authorization header.
   */
  private async callWebApi(method: "chat.postMessage" | "chat.update", body: Record<string, unknown>, signal: AbortSignal): Promise<Record<string, unknown>> {
    const transport = this.config.transport;
    if (transport.kind !== "web_api") throw new AirlockError(Code.FailedPrecondition, `slack ${method} needs a bot token`);
    const reply = await postJson(`${transport.apiUrl}/${method}`, body, { what: `slack ${method}`, signal, headers: { authorization: `Bearer ${transport.botToken}` } });
    let answer: unknown;
    try {
      answer = JSON.parse(reply.text);
    } catch {
      throw new AirlockError(Code.Unavailable, `slack ${method}: the answer is not JSON`);
    }
    if (!isRecord(answer)) throw new AirlockError(Code.Unavailable, `slack ${method}: the answer is not an object`);
    if (answer.ok !== true) {
      const error = typeof answer.error === "string" ? answer.error : "unknown_error";
      throw new AirlockError(transientSlackErrors.has(error) ? Code.Unavailable : Code.FailedPrecondition, `slack ${method}: ${error}`, { details: { slackError: error } });
    }
    return answer;
  }
}
