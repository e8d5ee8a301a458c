import type { Notification } from "./events.js";
import { consoleLink, describeNeeds, summarize, truncate } from "./summary.js";

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
 * The Teams message of a notification: a title, the request's context as a FactSet
 * (agent, on behalf of, host, call, risk, rule, approvals still needed, expiry), the
 * reason, the event's own facts (escalation group, break-glass reviewer and reason,
 * outcome), and an `Action.OpenUrl` to the request in the console. Teams cannot
 * verify a vote from a card posted by a webhook, so voting happens in the console.
 */
export function teamsMessage(notification: Notification, consoleUrl: string): TeamsMessage {
  const summary = summarize(notification.record);
  const safe = (text: string, max = 300): string => (text === "" ? "—" : escapeCardMarkdown(truncate(text, max)));
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
  const facts = [
    { title: "Agent", value: safe(summary.agent) },
    { title: "On behalf of", value: safe(summary.onBehalfOf) },
    { title: "Host", value: safe(summary.host) },
    { title: "Call", value: safe(summary.call) },
    { title: "Risk", value: summary.risk.toUpperCase() },
    { title: "Rule", value: safe(summary.ruleId) },
  ];
  const needs = summary.state === "pending" ? describeNeeds(summary.outstanding) : undefined;
  if (needs !== undefined) facts.push({ title: "Still needed", value: escapeCardMarkdown(needs.join("; ")) });
  if (summary.deadline !== undefined) facts.push({ title: summary.state === "pending" ? "Expires" : "Deadline", value: summary.deadline.toISOString() });
  facts.push({ title: "Request", value: safe(summary.id) });
  const body: AdaptiveElement[] = [
    textBlock(escapeCardMarkdown(truncate(title, 150)), { size: "Large", weight: "Bolder", color }),
    ...extra,
    { type: "FactSet", facts },
    textBlock(`**Reason:** ${summary.reason === "" ? "no reason given" : safe(summary.reason, 1500)}`),
  ];
  if (summary.preview !== "") body.push(textBlock(safe(summary.preview, 600), { fontType: "Monospace", isSubtle: true }));
  return {
    type: "message",
    attachments: [
      {
        contentType: "application/vnd.microsoft.card.adaptive",
        contentUrl: null,
        content: {
          $schema: "http://adaptivecards.io/schemas/adaptive-card.json",
          type: "AdaptiveCard",
          version: "1.4",
          body,
          actions: [{ type: "Action.OpenUrl", title: "Open in console", url: consoleLink(consoleUrl, summary.id) }],
        },
      },
    ],
  };
}
