import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { RequestRecord } from "../../proto/index.js";
import type { Notification } from "./events.js";
import { consoleLink, describeNeeds, outcomeOfState, summarize, truncate } from "./summary.js";

/** Whether approving a request needs a step-up (a passkey bound to the action), which chat cannot give. */
export type StepUpPredicate = (record: RequestRecord) => boolean;

/** The predicate used when nothing provides one: no rule requires step-up. */
export const noStepUp: StepUpPredicate = () => false;

/**
 * The `verb`s of the card's `Action.Execute` buttons. Their `data` is
 * `{ requestId }`; the card's `Input.Text` with id {@link teamsReasonInput} adds `reason`.
 */
export const teamsVerbs = { approve: "approve", deny: "deny" } as const;

/** The id of the card's reason box; Teams merges its value into the action's `data`. */
export const teamsReasonInput = "reason";

/** The `id` of the TextBlock saying what became of a vote from the card (recorded, or refused with a stable code). */
export const teamsNoticeId = "airlock-notice";

/** How a Teams card is built. */
export interface TeamsCardOptions {
  /** The console base URL (ends with `/`). */
  readonly consoleUrl: string;
  /** Whether a bot takes votes from the card (`Action.Execute`); otherwise the card only links to the console. @default false */
  readonly bot?: boolean;
  /** Requests that must be approved in the console with a step-up: no Approve on their card. @default {@link noStepUp} */
  readonly requiresStepUp?: StepUpPredicate;
}

/** What the card says about a vote cast from it (the refreshed card of an `adaptiveCard/action` invoke). */
export interface TeamsNotice {
  /** `recorded`, or the stable code of the refusal (`step_up_required`, `unknown_user`, `already_voted`, …). */
  readonly code: string;
  /** One sentence for the person who clicked. */
  readonly text: string;
}

/** An Adaptive Card element or action, as Airlock builds them. */
export type AdaptiveElement = Readonly<Record<string, unknown>>;

/** The Adaptive Card (schema 1.4) of a notification. */
export interface AdaptiveCard {
  readonly $schema: "http://adaptivecards.io/schemas/adaptive-card.json";
  readonly type: "AdaptiveCard";
  readonly version: "1.4";
  readonly body: readonly AdaptiveElement[];
  readonly actions: readonly AdaptiveElement[];
}

/** What a Teams incoming webhook takes: a message with one Adaptive Card attachment. */
export interface TeamsMessage {
  readonly type: "message";
  readonly attachments: readonly [{ readonly contentType: "application/vnd.microsoft.card.adaptive"; readonly contentUrl: null; readonly content: AdaptiveCard }];
}

/**
 * Escapes the Markdown that Adaptive Card text blocks render (links, emphasis, lists),
 * so an agent's reason cannot show as a link or as formatting.
 */
export function escapeCardMarkdown(text: string): string {
  return text
    .replace(/[\\`*_[\]()<>#~]/g, (c) => `\\${c}`)
    .replace(/^(\s*)([-+])(\s)/gm, "$1\\$2$3")
    .replace(/^(\s*)(\d+)\.(\s)/gm, "$1$2\\.$3");
}

function textBlock(text: string, extra: Record<string, unknown> = {}): AdaptiveElement {
  return { type: "TextBlock", text, wrap: true, ...extra };
}

/**
 * Whether a request may be approved from chat: a rule that requires step-up, and any
 * request a break-glass approval touched, are approved in the console only.
 */
export function chatApprovable(record: RequestRecord, requiresStepUp: StepUpPredicate = noStepUp): boolean {
  return !record.votes.some((vote) => vote.breakGlass) && !requiresStepUp(record);
}

/**
 * A time as Teams shows it: `{{DATE(…)}} {{TIME(…)}}` render in the reader's own time
 * zone (Adaptive Card text functions), followed by the UTC time, so the zone is never
 * left to guessing.
 */
export function cardTime(date: Date): string {
  const iso = `${date.toISOString().slice(0, 19)}Z`;
  return `{{DATE(${iso}, SHORT)}} {{TIME(${iso})}} (${iso.slice(0, 10)} ${iso.slice(11, 19)} UTC)`;
}

/** The card's actions: Approve / Deny through the bot, or "Review and approve" when chat may not approve, and the console link. */
function cardActions(record: RequestRecord, options: TeamsCardOptions, votable: boolean): { inputs: AdaptiveElement[]; actions: AdaptiveElement[] } {
  const requestId = record.request?.id ?? "";
  const link = consoleLink(options.consoleUrl, requestId);
  if (!votable || options.bot !== true) return { inputs: [], actions: [{ type: "Action.OpenUrl", title: "Open in console", url: link }] };
  if (!chatApprovable(record, options.requiresStepUp)) {
    return {
      inputs: [textBlock("Approving this request needs a step-up in the console; it cannot be approved from Teams.", { isSubtle: true })],
      actions: [{ type: "Action.OpenUrl", title: "Review and approve", url: link }],
    };
  }
  return {
    inputs: [{ type: "Input.Text", id: teamsReasonInput, isMultiline: true, maxLength: 2000, placeholder: "Reason (required to deny)", label: "Reason" }],
    actions: [
      { type: "Action.Execute", title: "Approve", verb: teamsVerbs.approve, data: { requestId }, style: "positive" },
      { type: "Action.Execute", title: "Deny", verb: teamsVerbs.deny, data: { requestId }, style: "destructive" },
      { type: "Action.OpenUrl", title: "Open in console", url: link },
    ],
  };
}

function card(body: AdaptiveElement[], actions: AdaptiveElement[]): AdaptiveCard {
  return { $schema: "http://adaptivecards.io/schemas/adaptive-card.json", type: "AdaptiveCard", version: "1.4", body, actions };
}

function safeText(text: string, max = 300): string {
  return text === "" ? "—" : escapeCardMarkdown(truncate(text, max));
}

/** The request's facts, reason and preview: what every card shows under its title. */
function requestBody(record: RequestRecord): AdaptiveElement[] {
  const summary = summarize(record);
  const facts = [
    { title: "Agent", value: safeText(summary.agent) },
    { title: "On behalf of", value: safeText(summary.onBehalfOf) },
    { title: "Host", value: safeText(summary.host) },
    { title: "Call", value: safeText(summary.call) },
    { title: "Risk", value: summary.risk.toUpperCase() },
    { title: "Rule", value: safeText(summary.ruleId) },
  ];
  const needs = summary.state === "pending" ? describeNeeds(summary.outstanding) : undefined;
  if (needs !== undefined) facts.push({ title: "Still needed", value: escapeCardMarkdown(needs.join("; ")) });
  if (summary.deadline !== undefined) facts.push({ title: summary.state === "pending" ? "Expires" : "Deadline", value: cardTime(summary.deadline) });
  facts.push({ title: "Request", value: safeText(summary.id) });
  const body: AdaptiveElement[] = [{ type: "FactSet", facts }, textBlock(`**Reason:** ${summary.reason === "" ? "no reason given" : safeText(summary.reason, 1500)}`)];
  if (summary.preview !== "") body.push(textBlock(safeText(summary.preview, 600), { fontType: "Monospace", isSubtle: true }));
  return body;
}

/**
 * The Teams message of a notification: a title, the request's context as a FactSet
 * (agent, on behalf of, host, call, risk, rule, approvals still needed, expiry), the
 * reason, the event's own facts (escalation group, break-glass reviewer and reason,
 * outcome), and the actions. With `options.bot`, a review request or escalation
 * carries a reason box and `Action.Execute` Approve and Deny (verbs
 * {@link teamsVerbs}); a request that chat may not approve ({@link chatApprovable})
 * gets "Review and approve" (a link to the console) instead. Without a bot, Teams
 * cannot verify a vote, so the card only links to the console.
 * @param options - the console URL (a string, as before bots existed) or {@link TeamsCardOptions}.
 */
export function teamsMessage(notification: Notification, options: string | TeamsCardOptions): TeamsMessage {
  const cardOptions: TeamsCardOptions = typeof options === "string" ? { consoleUrl: options } : options;
  const summary = summarize(notification.record);
  const safe = safeText;
  let title: string;
  let color = "Default";
  const extra: AdaptiveElement[] = [];
  switch (notification.kind) {
    case "review_requested":
      title = `Approval needed: ${summary.method}`;
      break;
    case "escalated":
      title = `Escalated: ${summary.method}`;
      color = "Warning";
      extra.push(textBlock(`Nobody decided in time: **${safe(notification.group)}** may now vote.`));
      break;
    case "break_glass":
      title = `BREAK-GLASS: ${summary.method}`;
      color = "Attention";
      extra.push(textBlock(`Flagged for security review. **${safe(notification.reviewer)}** broke glass and approved alone: ${safe(notification.reason, 1500)}`, { color: "Attention" }));
      break;
    case "decided":
      title = `${notification.outcome[0]?.toUpperCase() ?? ""}${notification.outcome.slice(1)}: ${summary.method}`;
      color = notification.outcome === "approved" ? "Good" : notification.outcome === "denied" ? "Attention" : "Default";
      extra.push(
        textBlock(
          `**${notification.outcome}**${notification.by.length > 0 ? ` by ${safe(notification.by.join(", "))}` : ""}${notification.reason === "" ? "" : `: ${safe(notification.reason, 1500)}`}`,
        ),
      );
      break;
  }
  const votable = (notification.kind === "review_requested" || notification.kind === "escalated") && summary.state === "pending";
  const { inputs, actions } = cardActions(notification.record, cardOptions, votable);
  const body: AdaptiveElement[] = [textBlock(escapeCardMarkdown(truncate(title, 150)), { size: "Large", weight: "Bolder", color }), ...extra, ...requestBody(notification.record), ...inputs];
  return { type: "message", attachments: [{ contentType: "application/vnd.microsoft.card.adaptive", contentUrl: null, content: card(body, actions) }] };
}

/**
 * The card of a request as it stands now: what an `adaptiveCard/action` invoke is
 * answered with, so the card refreshes in place. The title says the state, every
 * vote is listed with who cast it and when (in the reader's zone and in UTC), an
 * optional notice says what became of the vote just cast (TextBlock id
 * {@link teamsNoticeId}), and a still pending request keeps its actions.
 */
export function teamsRecordCard(record: RequestRecord, options: TeamsCardOptions, notice?: TeamsNotice): AdaptiveCard {
  const summary = summarize(record);
  const outcome = outcomeOfState(record.state);
  const title = outcome === undefined ? (summary.state === "pending" ? `Approval needed: ${summary.method}` : `${summary.state}: ${summary.method}`) : `${outcome[0]?.toUpperCase() ?? ""}${outcome.slice(1)}: ${summary.method}`;
  const color = outcome === "approved" ? "Good" : outcome === "denied" ? "Attention" : "Default";
  const body: AdaptiveElement[] = [textBlock(escapeCardMarkdown(truncate(title, 150)), { size: "Large", weight: "Bolder", color })];
  if (notice !== undefined) {
    const recorded = notice.code === "recorded";
    body.push(textBlock(recorded ? notice.text : `**Not recorded** (${notice.code}): ${notice.text}`, { id: teamsNoticeId, color: recorded ? "Good" : "Attention", weight: "Bolder" }));
  }
  for (const vote of record.votes) {
    const at = vote.at === undefined ? "" : ` on ${cardTime(timestampDate(vote.at))}`;
    const verdict = vote.breakGlass ? "broke glass and approved" : vote.approve ? "approved" : "denied";
    body.push(textBlock(`**${safeText(vote.reviewer)}** ${verdict}${at}${vote.reason === "" ? "" : `: ${safeText(vote.reason, 500)}`}`));
  }
  body.push(...requestBody(record));
  const { inputs, actions } = cardActions(record, options, summary.state === "pending");
  return card([...body, ...inputs], actions);
}

/**
 * The card of a request that could not be read (unknown id, the store down): the
 * notice and a link to the console.
 */
export function teamsNoticeCard(requestId: string, options: TeamsCardOptions, notice: TeamsNotice): AdaptiveCard {
  const body: AdaptiveElement[] = [
    textBlock("Airlock", { size: "Large", weight: "Bolder" }),
    textBlock(`**Not recorded** (${notice.code}): ${notice.text}`, { id: teamsNoticeId, color: "Attention", weight: "Bolder" }),
  ];
  const actions: AdaptiveElement[] = requestId === "" ? [] : [{ type: "Action.OpenUrl", title: "Open in console", url: consoleLink(options.consoleUrl, requestId) }];
  return card(body, actions);
}
