import { randomUUID } from "node:crypto";
import { AirlockError, Code } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import type { RequestRecord } from "../../proto/index.js";
import type { ApprovalEvent } from "../rules/types.js";
import type { NotificationsConfig } from "./config.js";
import type { Notification } from "./events.js";
import { originOf, postJson } from "./http.js";
import { type ChatPositions, type DecidedSince, MemoryChatPositions, pendingUntilMs } from "./positions.js";
import { DeliveryQueue } from "./queue.js";
import { SlackIntegration } from "./slack.js";
import { type DecidedOutcome, destinationsFor, outcomeOfState, requirementGroups } from "./summary.js";
import { noStepUp, type StepUpPredicate, teamsMessage, teamsRecordCard } from "./teams.js";
import { BotConnectorClient } from "./teams-connector.js";
import { TeamsBot } from "./teams-bot.js";
import { signWebhookBody, webhookPayload } from "./webhook.js";

/** Who to tell that a request waits for review. */
export interface ReviewRequestedTarget {
  /** Reviewer ids who may approve now (the `awaiting_review` event's `notify`): mentioned, never messaged one by one. */
  readonly reviewers: readonly string[];
  /** Groups whose channels get the message. @default the groups of `record.outstanding` that still need approvals */
  readonly groups?: readonly string[];
  /** @default now */
  readonly at?: Date;
}

/** Who to tell that a request was escalated. */
export interface EscalatedTarget {
  /** The escalation group, whose channel gets the message. */
  readonly group: string;
  /** Its members who may now vote. */
  readonly reviewers: readonly string[];
  /** @default now */
  readonly at?: Date;
}

/** A break-glass approval to flag. */
export interface BreakGlassTarget {
  /** Who broke glass. */
  readonly reviewer: string;
  /** Their mandatory reason. */
  readonly reason: string;
  /** Every approver of the rule (the `break_glass` event's `notify`). */
  readonly reviewers: readonly string[];
  /** Groups whose channels get the message. @default every group of the request's requirement, escalation group included */
  readonly groups?: readonly string[];
  /** @default now */
  readonly at?: Date;
}

/** How a request was decided. */
export interface DecidedTarget {
  readonly outcome: DecidedOutcome;
  /** Who decided (the approvers, or who denied). @default [] (expiry, an auto rule) */
  readonly by?: readonly string[];
  /** Why. @default "" */
  readonly reason?: string;
  /** The auto rule that decided at intake, if one did: then only generic webhooks are told (nobody was asked in chat). */
  readonly autoRule?: string;
  /** @default now */
  readonly at?: Date;
}

/**
 * What the broker calls to have reviewers (and requesters) told about requests.
 * Every `notify…` method returns at once and never throws: deliveries happen in the
 * background, and a notification failing never touches the approval path.
 */
export interface Notifier {
  /** A request waits for review: a message with Approve / Deny to each group's channel. */
  notifyReviewRequested(record: RequestRecord, target: ReviewRequestedTarget): void;
  /** The escalation group may now vote: a message to its channel. */
  notifyEscalated(record: RequestRecord, target: EscalatedTarget): void;
  /** Someone broke glass: a flagged message to every group of the requirement. */
  notifyBreakGlass(record: RequestRecord, target: BreakGlassTarget): void;
  /** The request left PENDING: its messages are updated and the requester is told. */
  notifyDecided(record: RequestRecord, target: DecidedTarget): void;
  /** Routes one rules event (`broker/rules` {@link ApprovalEvent}) to the method above that fits; other kinds are ignored. */
  notifyEvent(record: RequestRecord, event: ApprovalEvent): void;
  /** Stops retries and waits for deliveries in flight. */
  close(): Promise<void>;
}

/** Options of {@link ReviewNotifier}. */
export interface ReviewNotifierOptions {
  readonly config: NotificationsConfig;
  readonly log: Logger;
  /** Deliveries running at once. @default 4 */
  readonly concurrency?: number;
  /** How long {@link ReviewNotifier.close} lets deliveries in flight finish before aborting them, in ms. @default 2000 */
  readonly closeGraceMs?: number;
  /**
   * Requests whose approval needs a step-up: chat offers them "Review and approve" (a
   * console link) instead of an Approve button, and refuses an approval from chat with
   * `step_up_required`. Break-glass is always treated so. @default {@link noStepUp}
   */
  readonly requiresStepUp?: StepUpPredicate;
  /**
   * Where posted Slack messages and bot-posted Teams cards are remembered until the request is
   * decided. The broker gives `KvChatPositions` (the `AIRLOCK_CHAT` bucket), shared by
   * every replica, so whichever replica notifies the decision updates every message.
   * @default {@link MemoryChatPositions} (this process only)
   */
  readonly positions?: ChatPositions;
  /**
   * The request's record as the last write left it (the broker gives `Broker.latest`, read
   * from the state stream's leader, so another replica's earlier write is seen). Read
   * after a Slack message or Teams card is posted and its position stored: a request another
   * replica decided while the post was in flight found no position to update, so the poster
   * updates the message itself. @default none (such a message keeps its buttons; a vote from
   * it is refused as already decided)
   */
  readonly currentRecord?: (requestId: string) => Promise<RequestRecord | undefined>;
}

/**
 * The broker's {@link Notifier}: Slack (Block Kit with Approve / Deny, per-group
 * channels, message updates, result DMs), Teams (Adaptive Card with a console
 * link) and signed generic webhooks, each as configured. Deliveries run on one
 * bounded background queue with retries and exponential backoff.
 */
export class ReviewNotifier implements Notifier {
  /** The Slack side, for the `/slack/interactions` route ({@link SlackIntegration.handleInteraction}); undefined without Slack. */
  readonly slack: SlackIntegration | undefined;
  /** The Teams bot, for the `/api/teams/messages` route ({@link TeamsBot.handleActivity}); undefined without `notifications.teams.bot`. */
  readonly teams: TeamsBot | undefined;
  private readonly config: NotificationsConfig;
  private readonly log: Logger;
  private readonly queue: DeliveryQueue;
  private readonly enabled: boolean;
  private connector: BotConnectorClient | undefined;
  private readonly positions: ChatPositions;
  private readonly decidedSince: DecidedSince;

  constructor(options: ReviewNotifierOptions) {
    const { config, log } = options;
    this.config = config;
    this.log = log;
    this.queue = new DeliveryQueue({
      log,
      retry: config.retry,
      timeoutMs: config.timeoutMs,
      queueSize: config.queueSize,
      ...(options.concurrency === undefined ? {} : { concurrency: options.concurrency }),
      ...(options.closeGraceMs === undefined ? {} : { closeGraceMs: options.closeGraceMs }),
    });
    this.positions = options.positions ?? new MemoryChatPositions();
    const currentRecord = options.currentRecord;
    this.decidedSince = async (requestId) => {
      if (currentRecord === undefined) return undefined;
      // Position stored first, record read second: a replica deciding meanwhile wrote the record
      // before it read the positions, so one of the two sees the other.
      const record = await currentRecord(requestId).catch((error: unknown) => {
        this.log.warn({ requestId, err: error }, "could not read whether a request was decided while its message was posted");
        return undefined;
      });
      return record !== undefined && outcomeOfState(record.state) !== undefined ? record : undefined;
    };
    this.slack =
      config.slack === undefined
        ? undefined
        : new SlackIntegration(config.slack, { queue: this.queue, log, consoleUrl: config.consoleUrl, positions: this.positions, decidedSince: this.decidedSince, ...(options.requiresStepUp === undefined ? {} : { requiresStepUp: options.requiresStepUp }) });
    const bot = config.teams?.bot;
    this.teams = bot === undefined ? undefined : new TeamsBot(bot, { log, consoleUrl: config.consoleUrl, requiresStepUp: options.requiresStepUp ?? noStepUp });
    this.enabled = config.slack !== undefined || config.teams !== undefined || config.webhooks.length > 0;
  }

  /** Deliveries waiting or running. */
  get pending(): number {
    return this.queue.size;
  }

  /** Resolves once every queued delivery has succeeded or given up (a graceful shutdown awaits it before {@link close}). */
  idle(): Promise<void> {
    return this.queue.idle();
  }

  /** {@inheritDoc Notifier.notifyReviewRequested} */
  notifyReviewRequested(record: RequestRecord, target: ReviewRequestedTarget): void {
    const groups = target.groups ?? record.outstanding.filter((need) => need.minApprovals > 0).map((need) => need.group);
    this.notify({ kind: "review_requested", record, at: target.at ?? new Date(), groups, reviewers: target.reviewers });
  }

  /** {@inheritDoc Notifier.notifyEscalated} */
  notifyEscalated(record: RequestRecord, target: EscalatedTarget): void {
    this.notify({ kind: "escalated", record, at: target.at ?? new Date(), group: target.group, reviewers: target.reviewers });
  }

  /** {@inheritDoc Notifier.notifyBreakGlass} */
  notifyBreakGlass(record: RequestRecord, target: BreakGlassTarget): void {
    this.notify({
      kind: "break_glass",
      flagged: true,
      record,
      at: target.at ?? new Date(),
      reviewer: target.reviewer,
      reason: target.reason,
      groups: target.groups ?? requirementGroups(record),
      reviewers: target.reviewers,
    });
  }

  /** {@inheritDoc Notifier.notifyDecided} */
  notifyDecided(record: RequestRecord, target: DecidedTarget): void {
    this.notify({
      kind: "decided",
      record,
      at: target.at ?? new Date(),
      outcome: target.outcome,
      by: target.by ?? [],
      reason: target.reason ?? "",
      ...(target.autoRule === undefined ? {} : { autoRule: target.autoRule }),
    });
  }

  /**
   * {@inheritDoc Notifier.notifyEvent}
   * `awaiting_review` → review requested (the groups still needing approvals), `escalated`,
   * `break_glass`, `approved` / `denied` / `expired` / `cancelled` → decided; `voted`,
   * `executing`, `completed` and `failed` are ignored.
   */
  notifyEvent(record: RequestRecord, event: ApprovalEvent): void {
    const at = event.at;
    switch (event.kind) {
      case "awaiting_review":
        this.notifyReviewRequested(record, { reviewers: event.notify, groups: event.outstanding.filter((need) => need.remaining > 0).map((need) => need.group), at });
        return;
      case "escalated":
        this.notifyEscalated(record, { group: event.group, reviewers: event.notify, at });
        return;
      case "break_glass":
        this.notifyBreakGlass(record, { reviewer: event.reviewer, reason: event.reason, reviewers: event.notify, at });
        return;
      case "approved":
      case "denied":
        this.notifyDecided(record, { outcome: event.kind, by: event.by, reason: event.reason, at, ...(event.autoRule === undefined ? {} : { autoRule: event.autoRule }) });
        return;
      case "expired":
        this.notifyDecided(record, { outcome: "expired", reason: `no decision before the deadline ${event.deadline.toISOString()}`, at });
        return;
      case "cancelled":
        this.notifyDecided(record, { outcome: "cancelled", reason: event.reason, at });
        return;
      default:
        // Votes, execution and completion are for the audit trail and the console, not for chat.
        return;
    }
  }

  /**
   * Queues one notification on every configured channel and returns at once. Never
   * throws: a bug in a channel must not fail the vote or intake that triggered it.
   */
  notify(notification: Notification): void {
    if (!this.enabled) return;
    try {
      // A request an auto rule decided at intake was never shown in chat: nothing to update, nobody to ping.
      const chat = notification.kind !== "decided" || notification.autoRule === undefined;
      if (chat) this.slack?.deliver(notification);
      const teamsUrl = this.config.teams?.webhookUrl;
      if (chat && teamsUrl !== undefined) this.deliverTeams(notification, teamsUrl);
      if (chat) this.deliverTeamsBot(notification);
      this.config.webhooks.forEach((webhook, index) => this.deliverWebhook(notification, index, webhook.url, webhook.secret));
    } catch (error) {
      this.log.error({ err: error, requestId: notification.record.request?.id, kind: notification.kind }, "could not queue a notification");
    }
  }

  /** Stops retries, abandons deliveries not started (logged), and waits for those in flight; leaves no timer. */
  async close(): Promise<void> {
    await this.queue.close();
  }

  private deliverTeams(notification: Notification, url: string): void {
    const requestId = notification.record.request?.id ?? "";
    this.queue.enqueue({
      description: `teams webhook ${originOf(url)} (${notification.kind} ${requestId})`,
      key: `teams:${requestId}`,
      run: async (signal) => {
        await postJson(url, teamsMessage(notification, this.teams?.cards ?? this.config.consoleUrl), { what: "teams webhook", signal });
      },
    });
  }

  /** The bot's own cards (Bot Connector API): posted per reviewer group's conversation, updated in place when decided. */
  private deliverTeamsBot(notification: Notification): void {
    const bot = this.config.teams?.bot;
    const sending = bot?.sending;
    const teams = this.teams;
    if (bot === undefined || sending === undefined || teams === undefined) return;
    this.connector ??= new BotConnectorClient(bot.appId, sending);
    const connector = this.connector;
    const requestId = notification.record.request?.id ?? "";
    const key = `teamsbot:${requestId}`;
    if (notification.kind === "decided") {
      // Runs after every earlier delivery of the request on this replica (same key); the cards other
      // replicas posted come from the shared positions. Updating a card twice is harmless.
      const updated = new Set<string>();
      this.queue.enqueue({
        description: `teams bot update (decided ${requestId})`,
        key,
        run: async (signal) => {
          const card = teamsRecordCard(notification.record, teams.cards);
          // A read that fails is retried by the queue (unavailable), and logged.
          for (const posted of await this.positions.recall(requestId, "teams")) {
            const id = `${posted.conversationId}/${posted.activityId}`;
            if (updated.has(id)) continue;
            try {
              await connector.update(posted, card, signal);
            } catch (error) {
              const failure = AirlockError.from(error);
              if (failure.code !== Code.FailedPrecondition) throw failure;
              this.log.warn({ requestId, error: failure.message }, "could not update a Teams card with the outcome");
            }
            updated.add(id);
          }
        },
      });
      return;
    }
    const conversations = destinationsFor(notification, sending.conversations, sending.defaultConversation, (group) =>
      this.log.warn({ requestId, group }, "no Teams conversation for this reviewer group (notifications.teams.bot.conversations); it gets no card from the bot"),
    );
    for (const conversation of conversations) {
      this.queue.enqueue({
        description: `teams bot post (${notification.kind} ${requestId})`,
        key,
        run: async (signal) => {
          const posted = await connector.post(conversation, teamsMessage(notification, teams.cards).attachments[0].content, signal);
          if (notification.kind === "break_glass") return;
          await this.rememberTeamsCard(notification.record, posted);
          const decided = await this.decidedSince(requestId);
          if (decided !== undefined) {
            // Decided (on another replica) while this card was being posted: nobody else knew where it is.
            await connector.update(posted, teamsRecordCard(decided, teams.cards), signal).catch((error: unknown) => {
              this.log.warn({ requestId, error: AirlockError.from(error).message }, "could not update a Teams card decided while it was posted");
            });
          }
        },
      });
    }
  }

  /**
   * Stores where a posted card is. A failure is logged and swallowed: retrying the delivery would
   * post the card again, and a lost position only leaves that card un-updated.
   */
  private async rememberTeamsCard(record: RequestRecord, posted: { readonly conversationId: string; readonly activityId: string }): Promise<void> {
    const requestId = record.request?.id ?? "";
    try {
      await this.positions.remember(requestId, { kind: "teams", conversationId: posted.conversationId, activityId: posted.activityId }, pendingUntilMs(record));
    } catch (error) {
      const failure = AirlockError.from(error, Code.Unavailable);
      this.log.warn({ requestId, error: failure.message }, "could not store where a Teams card is; it will not be updated with the outcome");
    }
  }

  private deliverWebhook(notification: Notification, index: number, url: string, secret: string): void {
    const requestId = notification.record.request?.id ?? "";
    // One id for every attempt, so a receiver can drop a retry of what it already took.
    const deliveryId = randomUUID();
    let body: string | undefined;
    this.queue.enqueue({
      description: `webhook[${index}] ${originOf(url)} (${notification.kind} ${requestId})`,
      key: `webhook${index}:${requestId}`,
      run: async (signal) => {
        body ??= JSON.stringify(webhookPayload(notification));
        // Signed afresh on each attempt: the timestamp is when it was sent, so a late retry still verifies.
        const timestamp = Math.floor(Date.now() / 1000);
        await postJson(url, body, {
          what: `webhook[${index}]`,
          signal,
          headers: {
            "user-agent": "airlock-broker",
            "x-airlock-event": notification.kind,
            "x-airlock-delivery": deliveryId,
            "x-airlock-timestamp": String(timestamp),
            "x-airlock-signature": signWebhookBody(secret, timestamp, body),
          },
        });
      },
    });
  }
}
