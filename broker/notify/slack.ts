import { createHmac, timingSafeEqual } from "node:crypto";
import { AirlockError, Code, codeName } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import type { RequestRecord } from "../../proto/index.js";
import { principalKey } from "../rules/people.js";
import type { SlackConfig } from "./config.js";
import type { Notification } from "./events.js";
import { type HeaderMap, headerValue, originOf, postJson } from "./http.js";
import type { DeliveryQueue } from "./queue.js";
import {
  escapeMrkdwn,
  type SlackMessage,
  type SlackMessageOptions,
  slackActions,
  slackDenyModal,
  slackDenyReasonModal,
  slackRecordMessage,
  slackRequestMessage,
  slackResultMessage,
} from "./slack-blocks.js";
import { destinationsFor } from "./summary.js";
import type { StepUpPredicate } from "./teams.js";
import { isRecord, stringAt as anyStringAt } from "./json.js";
import type { SlackModalTickets } from "./slack-modal.js";
import { type ChatPositions, type DecidedSince, MemoryChatPositions, pendingUntilMs, type SlackPosition } from "./positions.js";

/** How far `x-slack-request-timestamp` may be from now, either way, in seconds (Slack's own recommendation). */
export const slackSignatureMaxSkewSeconds = 300;

/** The stable reasons (`details.reason`) a Slack request's signature is refused with. */
export type SlackSignatureRefusal = "slack_unsigned" | "slack_stale_timestamp" | "slack_bad_signature" | "slack_interactions_disabled";

function unauthenticated(reason: SlackSignatureRefusal, message: string): AirlockError {
  return new AirlockError(Code.Unauthenticated, message, { details: { reason } });
}

/**
 * Verifies Slack's v0 request signature: `x-slack-signature` must be
 * `v0=<hex HMAC-SHA256(signingSecret, "v0:" + x-slack-request-timestamp + ":" + rawBody)>`
 * (compared in constant time), and the timestamp at most
 * {@link slackSignatureMaxSkewSeconds} from `now` either way, so a captured request
 * cannot be replayed later. `rawBody` must be the body exactly as received.
 * @throws AirlockError `unauthenticated` saying what is wrong, with a {@link SlackSignatureRefusal} as `details.reason`.
 */
export function verifySlackSignature(signingSecret: string, rawBody: string | Uint8Array, headers: HeaderMap, now: Date = new Date()): void {
  const signature = headerValue(headers, "x-slack-signature");
  const timestamp = headerValue(headers, "x-slack-request-timestamp");
  if (signature === undefined || timestamp === undefined) throw unauthenticated("slack_unsigned", "the request is not signed by Slack (x-slack-signature and x-slack-request-timestamp are required)");
  if (!/^\d{1,12}$/.test(timestamp)) throw unauthenticated("slack_stale_timestamp", "x-slack-request-timestamp is not a Unix time in seconds");
  const skew = Math.floor(now.getTime() / 1000) - Number(timestamp);
  if (Math.abs(skew) > slackSignatureMaxSkewSeconds) {
    throw unauthenticated(
      "slack_stale_timestamp",
      `x-slack-request-timestamp is ${Math.abs(skew)} s ${skew > 0 ? "old" : "in the future"} (at most ${slackSignatureMaxSkewSeconds} s allowed): a replayed request or a wrong clock`,
    );
  }
  const match = /^v0=([0-9a-fA-F]{64})$/.exec(signature);
  if (match?.[1] === undefined) throw unauthenticated("slack_bad_signature", "x-slack-signature is not a v0 signature");
  const body = typeof rawBody === "string" ? Buffer.from(rawBody, "utf8") : rawBody;
  const expected = createHmac("sha256", signingSecret).update(`v0:${timestamp}:`).update(body).digest();
  if (!timingSafeEqual(expected, Buffer.from(match[1], "hex"))) throw unauthenticated("slack_bad_signature", "x-slack-signature does not match the request (wrong signing secret or altered body)");
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

/** A vote click before its user is mapped to a reviewer, with the click's `trigger_id` (valid 3 s, for opening a modal). */
type SlackAction = Omit<SlackInteraction, "reviewer"> & { readonly triggerId?: string };

/** A non-empty string at `path`: Slack sends empty strings for fields it has no value for. */
function stringAt(value: unknown, ...path: string[]): string | undefined {
  const text = anyStringAt(value, ...path);
  return text === "" ? undefined : text;
}

function badPayload(message: string): AirlockError {
  return new AirlockError(Code.InvalidArgument, `Slack interaction: ${message}`, { details: { field: "payload" } });
}

/** The JSON object in a form-encoded `payload=` body (what Slack posts for every interaction). */
function readPayload(rawBody: string): Record<string, unknown> {
  const text = new URLSearchParams(rawBody).get("payload");
  if (text === null) throw badPayload("the body has no payload field");
  let payload: unknown;
  try {
    payload = JSON.parse(text);
  } catch {
    throw badPayload("payload is not JSON");
  }
  if (!isRecord(payload)) throw badPayload("payload is not an object");
  return payload;
}

/** Reads the vote click out of a form-encoded `payload=` body; undefined when it is not an Airlock vote. */
function readSlackAction(rawBody: string): SlackAction | undefined {
  return actionOf(readPayload(rawBody));
}

function actionOf(payload: Record<string, unknown>): SlackAction | undefined {
  // Other interaction types (shortcuts, other apps' modals) are not Airlock's: acknowledged and ignored.
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
  const triggerId = stringAt(payload, "trigger_id");
  return {
    slackUserId,
    requestId,
    approve: actionId === slackActions.approve,
    responseUrl,
    ...(channel === undefined ? {} : { channel }),
    ...(messageTs === undefined ? {} : { messageTs }),
    ...(triggerId === undefined ? {} : { triggerId }),
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
  const { triggerId: _trigger, ...click } = action;
  return { ...click, reviewer };
}

/** What the `/slack/interactions` route answers: the status and a JSON body. */
export interface SlackInteractionReply {
  /** 200 (handled, or refused with an ephemeral text), 400 (malformed) or 401 (bad, stale or missing signature). */
  readonly status: number;
  readonly body: unknown;
  /** Extra headers: `x-airlock-reason`, the stable reason of a refusal, so callers need not read texts. */
  readonly headers?: Readonly<Record<string, string>>;
}

/** Options of {@link SlackIntegration.handleInteraction}. */
export interface SlackInteractionOptions {
  /** The clock the signature's timestamp is checked against. @default new Date() */
  readonly now?: Date;
  /**
   * Where deny-reason modals are bound to their request and user. With it (and a bot
   * token), Deny opens a modal asking for the reason; without it, Deny votes at once
   * with a fixed reason.
   */
  readonly tickets?: SlackModalTickets;
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
  /**
   * Where the posted messages' (channel, ts) are kept for the `chat.update` at decision. The
   * broker gives the `AIRLOCK_CHAT` bucket (`KvChatPositions`), so the replica that
   * decides updates messages another replica posted. @default this process's memory
   */
  readonly positions?: ChatPositions;
  /** Requests whose approval needs a step-up: their messages link to the console instead of carrying Approve. @default none */
  readonly requiresStepUp?: StepUpPredicate;
  /** Read after a message is posted and its position stored: a request decided meanwhile has its message updated by the poster. @default never */
  readonly decidedSince?: DecidedSince;
}

/** Slack Web API errors worth another attempt; every other `ok: false` is permanent. */
const transientSlackErrors = new Set(["ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"]);

function ephemeral(text: string): Record<string, unknown> {
  return { response_type: "ephemeral", replace_original: false, text };
}

/** `x-airlock-reason`: the refusal's stable reason (`details.reason`), else its code's name. */
function reasonHeader(error: AirlockError): Record<string, string> {
  const reason = error.details.reason;
  return { "x-airlock-reason": typeof reason === "string" ? reason : codeName(error.code) };
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
 * incoming webhook, remembers where each request's messages are ({@link ChatPositions})
 * so they can be updated with `chat.update` when the request is decided, tells the requester the
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
  private readonly positions: ChatPositions;

  constructor(config: SlackConfig, options: SlackIntegrationOptions) {
    this.config = config;
    this.options = options;
    this.log = options.log;
    this.positions = options.positions ?? new MemoryChatPositions();
    for (const [slackUser, reviewer] of config.users) this.slackUserOf.set(principalKey(reviewer), slackUser);
  }

  /** The Slack user id of a reviewer, from `users`. */
  slackUserFor(reviewer: string): string | undefined {
    return this.slackUserOf.get(principalKey(reviewer));
  }

  /** The messages posted for a request and still remembered (Web API only), by any replica sharing the positions. */
  async trackedMessages(requestId: string): Promise<ReadonlyArray<{ readonly channel: string; readonly ts: string }>> {
    return (await this.positions.recall(requestId, "slack")).map(({ channel, ts }) => ({ channel, ts }));
  }

  /** Queues what Slack should show for a notification. Returns at once. */
  deliver(notification: Notification): void {
    const requestId = notification.record.request?.id ?? "";
    const options: SlackMessageOptions = { consoleUrl: this.options.consoleUrl, buttons: this.config.signingSecret !== undefined, stepUp: this.options.requiresStepUp?.(notification.record) === true, denyModal: this.config.transport.kind === "web_api" };
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
          if (notification.kind !== "break_glass" && typeof posted.ts === "string") {
            const position = { kind: "slack", channel: typeof posted.channel === "string" ? posted.channel : channel, ts: posted.ts } as const;
            await this.remember(notification.record, position);
            const decided = await this.options.decidedSince?.(requestId);
            if (decided !== undefined) {
              // Decided (on another replica) while this message was being posted: nobody else knew where it is.
              await this.callWebApi("chat.update", { channel: position.channel, ts: position.ts, ...slackRecordMessage(decided, options) }, signal).catch((error: unknown) => {
                this.log.warn({ requestId, channel: position.channel, error: AirlockError.from(error).message }, "could not update a Slack message decided while it was posted");
              });
            }
          }
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
    // Runs after every earlier delivery of the request on this replica (same key), so what it posted is
    // stored by then; what other replicas posted is read from the shared positions. Updating a message
    // twice (a retry, or two replicas) shows the same outcome twice: harmless.
    const updated = new Set<string>();
    this.options.queue.enqueue({
      description: `slack chat.update (decided ${requestId})`,
      key: this.key(requestId),
      run: async (signal) => {
        const message = slackRecordMessage(notification.record, options, decision);
        // A read that fails is retried by the queue (unavailable), and logged.
        for (const ref of await this.positions.recall(requestId, "slack")) {
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
   * `decide`, and queues the update of the clicked message with the result
   * (`chat.update`, or the interaction's `response_url` when there is no bot token or
   * the update fails). With `options.tickets` and a bot token, Deny opens a modal
   * (`views.open` with the click's `trigger_id`) asking for the reason, and the
   * modal's `view_submission` casts the denial with it, once, and only for the request
   * and Slack user the modal was opened for; without, Deny votes at once with the
   * reason `denied in Slack by <reviewer>`. A refused vote (already decided,
   * self-approval, unknown user, …) is told to the clicker alone, as an ephemeral
   * message or as an error in the modal. Never throws.
   * @param rawBody - the body exactly as received (form-encoded), before any parsing.
   * @returns 401 for a missing, bad or stale signature (decide not called), 400 for a
   *   malformed payload, else 200 (with an ephemeral text, or the modal's errors, when
   *   the vote was refused). A refusal carries its stable reason in `headers`.
   */
  async handleInteraction(rawBody: string, headers: HeaderMap, decide: DecideFunction, options: SlackInteractionOptions | Date = {}): Promise<SlackInteractionReply> {
    const { now = new Date(), tickets } = options instanceof Date ? { now: options } : options;
    try {
      if (this.config.signingSecret === undefined) throw unauthenticated("slack_interactions_disabled", "Slack interactions are disabled: notifications.slack.signing_secret is not configured");
      verifySlackSignature(this.config.signingSecret, rawBody, headers, now);
    } catch (error) {
      const refused = AirlockError.from(error, Code.Unauthenticated);
      this.log.warn({ reason: refused.rawMessage }, "Slack interaction refused");
      return { status: 401, body: refused.toJSON(), headers: reasonHeader(refused) };
    }
    let payload: Record<string, unknown>;
    let action: SlackAction | undefined;
    try {
      payload = readPayload(rawBody);
      if (payload.type === "view_submission") return await this.handleDenySubmission(payload, decide, tickets);
      action = actionOf(payload);
    } catch (error) {
      const bad = AirlockError.from(error, Code.InvalidArgument);
      this.log.warn({ reason: bad.rawMessage }, "malformed Slack interaction");
      return { status: 400, body: bad.toJSON(), headers: reasonHeader(bad) };
    }
    if (action === undefined) return { status: 200, body: {} };
    const reviewer = this.config.users.get(action.slackUserId);
    if (reviewer === undefined) {
      const refused = unknownUser(action.slackUserId);
      this.log.warn({ slackUserId: action.slackUserId, requestId: action.requestId }, "Slack vote from a user with no reviewer mapping refused");
      return this.refuse(action, `Your Slack account is not linked to an Airlock reviewer, so your vote was not recorded. (${refused.rawMessage})`);
    }
    if (!action.approve && this.modalsFor(tickets) !== undefined) return this.openDenyModal(action, reviewer, this.modalsFor(tickets) as SlackModalTickets);
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

  /** The ticket store when Deny can open a modal: a bot token is needed for `views.open`. */
  private modalsFor(tickets: SlackModalTickets | undefined): SlackModalTickets | undefined {
    return this.config.transport.kind === "web_api" ? tickets : undefined;
  }

  /**
   * A Deny click: stores what the modal is for (request, Slack user, reviewer, the
   * clicked message) as a single-use ticket every replica can read, then opens the
   * modal with the click's trigger_id. Slack gives 3 s for that, so it is not retried.
   */
  private async openDenyModal(action: SlackAction, reviewer: string, tickets: SlackModalTickets): Promise<SlackInteractionReply> {
    if (action.triggerId === undefined) {
      const bad = badPayload("a Deny click without trigger_id cannot open the reason form");
      return { status: 400, body: bad.toJSON() };
    }
    let ticket: string;
    try {
      ticket = await tickets.issue({
        requestId: action.requestId,
        slackUserId: action.slackUserId,
        reviewer,
        responseUrl: action.responseUrl,
        ...(action.channel === undefined ? {} : { channel: action.channel }),
        ...(action.messageTs === undefined ? {} : { messageTs: action.messageTs }),
      });
    } catch (error) {
      const failure = AirlockError.from(error, Code.Unavailable);
      this.log.warn({ requestId: action.requestId, error: failure.message }, "cannot store a Slack deny form");
      return this.refuse(action, refusalText(failure));
    }
    const view = slackDenyReasonModal(action.requestId, JSON.stringify({ request: action.requestId, ticket }));
    const triggerId = action.triggerId;
    try {
      await this.callWebApi("views.open", { trigger_id: triggerId, view }, AbortSignal.timeout(2500));
    } catch (error) {
      return this.denyModalFailed(action, ticket, tickets, AirlockError.from(error));
    }
    this.log.info({ requestId: action.requestId, reviewer }, "Slack deny form opened");
    return { status: 200, body: {} };
  }

  /**
   * `views.open` failed (`ok: false` such as `expired_trigger_id`, an HTTP error, no answer in
   * time): nothing was voted, and the ticket is withdrawn, since Slack may have opened the form
   * after all (a lost answer) and the reviewer is told it did not open. The clicker is told to
   * click Deny again or use the console; the route's answer carries `slack_modal_unavailable`.
   */
  private async denyModalFailed(action: SlackAction, ticket: string, tickets: SlackModalTickets, failure: AirlockError): Promise<SlackInteractionReply> {
    const requestId = action.requestId;
    let spent = false;
    try {
      spent = !(await tickets.withdraw(ticket));
    } catch (error) {
      // Harmless if it stays: its id went only to Slack, in the form that did not open, and it expires.
      this.log.warn({ requestId, error: AirlockError.from(error, Code.Unavailable).message }, "could not withdraw the ticket of a deny form that did not open");
    }
    if (spent) {
      // Slack opened the form after all and the reviewer submitted it first: that denial stands.
      this.log.info({ requestId, error: failure.message }, "Slack views.open reported a failure, but its form was submitted");
      return { status: 200, body: {} };
    }
    this.log.warn({ requestId, error: failure.message }, "Slack views.open failed: the deny form is withdrawn and nothing was voted");
    const slackError = typeof failure.details.slackError === "string" ? failure.details.slackError : undefined;
    const why = slackError === "expired_trigger_id" ? "Slack took too long to open the reason form" : `The reason form could not be opened (${failure.rawMessage})`;
    const refusal = new AirlockError(failure.code === Code.FailedPrecondition ? Code.FailedPrecondition : Code.Unavailable, why, { details: { reason: "slack_modal_unavailable" } });
    return this.refuse(action, `${why}, so nothing was recorded. Click Deny again, or deny in the console.`, refusal);
  }

  /**
   * The deny-reason modal's submission: the ticket named in `private_metadata` must
   * exist, be unspent and unexpired, and be for this request and this Slack user; it is
   * spent, then the denial is cast with the typed reason. A refusal is shown in the
   * modal (`response_action: errors`) and carries its reason in `x-airlock-reason`.
   */
  private async handleDenySubmission(payload: Record<string, unknown>, decide: DecideFunction, tickets: SlackModalTickets | undefined): Promise<SlackInteractionReply> {
    if (stringAt(payload, "view", "callback_id") !== slackDenyModal.callbackId) return { status: 200, body: {} };
    const slackUserId = stringAt(payload, "user", "id");
    if (slackUserId === undefined) throw badPayload("payload.user.id is missing");
    let metadata: unknown;
    try {
      metadata = JSON.parse(stringAt(payload, "view", "private_metadata") ?? "");
    } catch {
      metadata = undefined;
    }
    const requestId = stringAt(metadata, "request");
    const ticketId = stringAt(metadata, "ticket");
    if (requestId === undefined || ticketId === undefined) throw badPayload("view.private_metadata does not name the request and the form");
    const reason = (stringAt(payload, "view", "state", "values", slackDenyModal.blockId, slackDenyModal.actionId, "value") ?? "").trim();
    const inForm = (text: string, error: AirlockError): SlackInteractionReply => ({
      status: 200,
      body: { response_action: "errors", errors: { [slackDenyModal.blockId]: text.slice(0, 300) } },
      headers: reasonHeader(error),
    });
    if (reason === "" || reason.length > slackDenyModal.maxReason) {
      return inForm(`Give a reason of 1 to ${slackDenyModal.maxReason} characters.`, new AirlockError(Code.InvalidArgument, "reason", { details: { reason: "slack_reason_missing" } }));
    }
    const modals = this.modalsFor(tickets);
    if (modals === undefined) {
      return inForm("Deny forms are not enabled on this broker.", new AirlockError(Code.FailedPrecondition, "no ticket store", { details: { reason: "slack_modal_unknown" } }));
    }
    let ticket;
    try {
      ticket = await modals.spend(ticketId, requestId, slackUserId);
      if (this.config.users.get(slackUserId) !== ticket.reviewer) throw new AirlockError(Code.PermissionDenied, "your Slack account is no longer linked to the reviewer who opened this form", { details: { reason: "slack_modal_mismatch" } });
    } catch (error) {
      const refused = AirlockError.from(error, Code.Unavailable);
      this.log.warn({ requestId, slackUserId, code: codeName(refused.code), reason: refused.details.reason }, "Slack deny form refused");
      return inForm(`Your denial was not recorded: ${refused.rawMessage}.`, refused);
    }
    const action: SlackAction = {
      slackUserId,
      requestId: ticket.requestId,
      approve: false,
      responseUrl: ticket.responseUrl,
      ...(ticket.channel === undefined ? {} : { channel: ticket.channel }),
      ...(ticket.messageTs === undefined ? {} : { messageTs: ticket.messageTs }),
    };
    let record: RequestRecord;
    try {
      record = await decide(ticket.requestId, { reviewer: ticket.reviewer, approve: false, reason });
    } catch (error) {
      const refused = AirlockError.from(error);
      this.log.info({ requestId, reviewer: ticket.reviewer, code: codeName(refused.code), reason: refused.rawMessage }, "Slack denial refused");
      return inForm(refusalText(refused), refused);
    }
    this.log.info({ requestId, reviewer: ticket.reviewer }, "Slack denial with a reason recorded");
    this.updateClicked(action, record);
    return { status: 200, body: {} };
  }

  /**
   * Tells only the clicker, through the interaction's response_url, and answers the route the
   * same way (with the refusal's stable reason in `x-airlock-reason` when `refusal` is given).
   */
  private refuse(action: SlackAction, text: string, refusal?: AirlockError): SlackInteractionReply {
    this.options.queue.enqueue({
      description: `slack response_url (refusal for ${action.requestId})`,
      run: async (signal) => {
        await postJson(action.responseUrl, ephemeral(text), { what: "slack response_url", signal });
      },
    });
    return { status: 200, body: ephemeral(text), ...(refusal === undefined ? {} : { headers: reasonHeader(refusal) }) };
  }

  private updateClicked(action: SlackAction, record: RequestRecord): void {
    const requestId = action.requestId;
    const options: SlackMessageOptions = { consoleUrl: this.options.consoleUrl, buttons: true, stepUp: this.options.requiresStepUp?.(record) === true, denyModal: this.config.transport.kind === "web_api" };
    const transport = this.config.transport;
    // The clicked message is updated now; the final update at decision finds every message in the shared positions.
    const ref = action.channel !== undefined && action.messageTs !== undefined ? { channel: action.channel, ts: action.messageTs } : undefined;
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

  /**
   * Stores where a posted message is. A failure is logged and swallowed: retrying the delivery
   * would post the message again, and a lost position only leaves that message un-updated.
   */
  private async remember(record: RequestRecord, position: SlackPosition): Promise<void> {
    const requestId = record.request?.id ?? "";
    try {
      await this.positions.remember(requestId, position, pendingUntilMs(record));
    } catch (error) {
      const failure = AirlockError.from(error, Code.Unavailable);
      this.log.warn({ requestId, channel: position.channel, error: failure.message }, "could not store where a Slack message is; it will not be updated with the outcome");
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
  private async callWebApi(method: "chat.postMessage" | "chat.update" | "views.open", body: Record<string, unknown>, signal: AbortSignal): Promise<Record<string, unknown>> {
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
