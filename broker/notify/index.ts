/**
 * Reviewer notifications of the broker: Slack (Block Kit messages with Approve /
 * Deny buttons per reviewer group, updated when the request is decided, a DM to the
 * requester, and the signed `/slack/interactions` handler), Microsoft Teams
 * (Adaptive Cards with a console link) and HMAC-signed generic webhooks. The
 * broker calls a {@link ReviewNotifier}; every `notify…` returns at once and
 * deliveries run in the background with retries.
 *
 * ```ts
 * const positions = await KvChatPositions.open(nc); // where posted messages are, shared by every replica
 * const notifier = new ReviewNotifier({ config: parseNotificationsConfig(root.object("notifications")), log, positions });
 * for (const event of result.events) notifier.notifyEvent(result.record, event);
 * // route: POST /slack/interactions with the raw form-encoded body
 * const reply = await notifier.slack?.handleInteraction(rawBody, request.headers, (id, ballot) => broker.decide(id, ballot));
 * // route: POST /api/teams/messages with the JSON activity
 * const answer = await notifier.teams?.handleActivity(activity, request.headers, { get: (id) => broker.get(id), decide: (id, ballot) => broker.decide(id, ballot, { channel: "teams" }) });
 * await notifier.close();
 * ```
 * @module
 */
export {
  type NotificationsConfig,
  noNotifications,
  notificationsConfigDefaults,
  parseNotificationsConfig,
  type RetryConfig,
  type SlackConfig,
  type SlackTransport,
  type TeamsBotConfig,
  type TeamsBotSending,
  type TeamsConfig,
  type WebhookConfig,
} from "./config.js";
export type { Notification, NotificationKind } from "./events.js";
export { type HeaderMap, headerValue } from "./http.js";
export {
  type BreakGlassTarget,
  type DecidedTarget,
  type EscalatedTarget,
  type Notifier,
  ReviewNotifier,
  type ReviewNotifierOptions,
  type ReviewRequestedTarget,
} from "./notifier.js";
export {
  type ChatKind,
  type ChatPosition,
  chatPositionKey,
  chatPositionLimits,
  type ChatPositions,
  encodeChatPosition,
  ensureChatPositionsBucket,
  KvChatPositions,
  type KvChatPositionsOptions,
  type DecidedSince,
  MemoryChatPositions,
  pendingUntilMs,
  type PositionOf,
  type SlackPosition,
  type TeamsPosition,
} from "./positions.js";
export { type Delivery, DeliveryQueue, deliveryQueueDefaults, type DeliveryQueueOptions } from "./queue.js";
export {
  type DecideFunction,
  parseSlackInteraction,
  type SlackBallot,
  SlackIntegration,
  type SlackIntegrationOptions,
  type SlackInteraction,
  type SlackInteractionOptions,
  type SlackInteractionReply,
  type SlackSignatureRefusal,
  slackSignatureMaxSkewSeconds,
  verifySlackSignature,
} from "./slack.js";
export { KvSlackModalTickets, type SlackDenyTicket, slackDenyModalTtlMs, type SlackModalRefusal, type SlackModalTickets } from "./slack-modal.js";
export {
  escapeMrkdwn,
  slackActions,
  type SlackBlock,
  slackDenyModal,
  slackDenyReasonModal,
  type SlackModalView,
  type SlackButton,
  type SlackMessage,
  type SlackMessageOptions,
  slackRecordMessage,
  slackRequestMessage,
  slackResultMessage,
  type SlackText,
} from "./slack-blocks.js";
export { type DecidedOutcome } from "./summary.js";
export {
  type AdaptiveCard,
  type AdaptiveElement,
  cardTime,
  chatApprovable,
  escapeCardMarkdown,
  noStepUp,
  type StepUpPredicate,
  type TeamsCardOptions,
  teamsMessage,
  type TeamsMessage,
  type TeamsNotice,
  teamsNoticeCard,
  teamsNoticeId,
  teamsReasonInput,
  teamsRecordCard,
  teamsVerbs,
} from "./teams.js";
export {
  type ActivityOrigin,
  adaptiveCardActionInvoke,
  botFrameworkAlgorithms,
  botFrameworkClockSkewSeconds,
  botFrameworkIssuer,
  BotFrameworkVerifier,
  botFrameworkVerifierDefaults,
  type BotFrameworkVerifierOptions,
  type TeamsActivityReply,
  type TeamsBallot,
  TeamsBot,
  type TeamsBotOptions,
  type TeamsInvokeResponse,
  type TeamsVoteTarget,
} from "./teams-bot.js";
export { BotConnectorClient, botConnectorScope, type PostedCard } from "./teams-connector.js";
export { signWebhookBody, type VerifyWebhookOptions, verifyWebhookSignature, webhookPayload, type WebhookPayload, webhookSignatureMaxSkewSeconds } from "./webhook.js";
