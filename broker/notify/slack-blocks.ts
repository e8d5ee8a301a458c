import type { RequestRecord } from "../../proto/index.js";
import type { Notification } from "./events.js";
import { consoleLink, type DecidedOutcome, describeNeeds, outcomeOfState, type RequestSummary, summarize, truncate } from "./summary.js";

/** A Block Kit text object. `verbatim` mrkdwn is shown without Slack's auto-linking of URLs, channels and mentions. */
export interface SlackText {
  readonly type: "mrkdwn" | "plain_text";
  readonly text: string;
  readonly verbatim?: boolean;
  readonly emoji?: boolean;
}

/** A Block Kit button: a vote (`value` = request id) or a link (`url`). */
export interface SlackButton {
  readonly type: "button";
  /** `airlock_approve`, `airlock_deny` (votes) or `airlock_open` (the console link). */
  readonly action_id: string;
  readonly text: SlackText;
  readonly value?: string;
  readonly url?: string;
  readonly style?: "primary" | "danger";
  readonly confirm?: { readonly title: SlackText; readonly text: SlackText; readonly confirm: SlackText; readonly deny: SlackText; readonly style?: "primary" | "danger" };
}

/** The Block Kit blocks Airlock uses. */
export type SlackBlock =
  | { readonly type: "header"; readonly text: SlackText }
  | { readonly type: "section"; readonly text?: SlackText; readonly fields?: readonly SlackText[] }
  | { readonly type: "context"; readonly elements: readonly SlackText[] }
  | { readonly type: "actions"; readonly block_id: string; readonly elements: readonly SlackButton[] }
  | { readonly type: "divider" };

/** A message: `text` is the notification / fallback text, `blocks` what Slack shows. */
export interface SlackMessage {
  readonly text: string;
  readonly blocks: readonly SlackBlock[];
}

/** The `action_id`s of the vote buttons; the button's `value` is the request id. */
export const slackActions = { approve: "airlock_approve", deny: "airlock_deny", open: "airlock_open" } as const;

/**
 * Escapes text for mrkdwn: `&`, `<` and `>` are the only control characters, so an
 * agent's reason cannot smuggle in `<!channel>` or `<https://evil|a link>`.
 */
export function escapeMrkdwn(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

/**
 * Cuts already escaped mrkdwn to `max` characters (Slack refuses longer texts: 3000 in
 * a section, 2000 in a field, 300 in a confirm dialog) without leaving half an
 * entity (`&am`) or half a mention (`<@U1`) at the end. Escaping can grow text five
 * times, so raw text is cut before escaping and the result again here.
 */
function fit(text: string, max: number): string {
  if (text.length <= max) return text;
  return `${text
    .slice(0, max - 1)
    .replace(/&[a-z]{0,4}$/, "")
    .replace(/<[^>]*$/, "")}…`;
}

function mrkdwn(text: string): SlackText {
  // verbatim: no auto-linking of what agents wrote.
  return { type: "mrkdwn", text, verbatim: true };
}

function plain(text: string): SlackText {
  return { type: "plain_text", text, emoji: true };
}

/** Values in fields are cut: a field holds at most 2000 characters. */
function field(title: string, value: string): SlackText {
  return mrkdwn(`*${title}*\n${value === "" ? "—" : fit(escapeMrkdwn(truncate(value, 300)), 1900)}`);
}

/** `<!date^…>` renders the time in each reader's own time zone; the ISO text is the fallback. */
function slackDate(date: Date): string {
  return `<!date^${Math.floor(date.getTime() / 1000)}^{date_short_pretty} {time}|${date.toISOString()}>`;
}

/** Agent or reviewer text as an escaped block quote of at most `max` characters. */
function quote(text: string, max: number): string {
  return fit(
    truncate(text, max)
      .split("\n")
      .map((line) => `>${escapeMrkdwn(line)}`)
      .join("\n"),
    max,
  );
}

/** Options of the message builders. */
export interface SlackMessageOptions {
  /** The console base URL (ends with `/`). */
  readonly consoleUrl: string;
  /** Whether to show Approve / Deny (only when interactions can be verified and the request is pending). */
  readonly buttons: boolean;
  /**
   * The request's approval needs a step-up (a passkey bound to the action), which chat cannot
   * give: "Review and approve" links to the console instead of an Approve button. Deny stays.
   */
  readonly stepUp?: boolean;
  /** Mentions of the reviewers: `<@U…>` for mapped ones, their id otherwise. Already mrkdwn. */
  readonly mentions?: readonly string[];
  /** Deny opens a modal that asks for the reason (and is the confirmation), instead of a confirm dialog. @default false */
  readonly denyModal?: boolean;
}

function voteLines(record: RequestRecord): string[] {
  return record.votes.map((vote) => {
    const mark = vote.approve ? ":white_check_mark:" : ":no_entry:";
    const group = vote.breakGlass ? "break-glass" : vote.group;
    const why = vote.reason === "" ? "" : `: ${truncate(vote.reason, 200)}`;
    return `${mark} ${escapeMrkdwn(`${vote.reviewer}${group === "" ? "" : ` (${group})`}${why}`)}`;
  });
}

function requestBlocks(summary: RequestSummary, record: RequestRecord): SlackBlock[] {
  const blocks: SlackBlock[] = [
    {
      type: "section",
      fields: [
        field("Agent", summary.agent),
        field("On behalf of", summary.onBehalfOf),
        field("Host", summary.host),
        field("Call", summary.call),
        field("Risk", summary.risk.toUpperCase()),
        field("Rule", summary.ruleId),
      ],
    },
    { type: "section", text: mrkdwn(`*Reason*\n${summary.reason === "" ? "_no reason given_" : quote(summary.reason, 2900)}`) },
  ];
  if (summary.preview !== "") blocks.push({ type: "section", text: mrkdwn(`*Request*\n\`\`\`${fit(escapeMrkdwn(summary.preview), 2900)}\`\`\``) });
  const votes = voteLines(record);
  if (votes.length > 0) blocks.push({ type: "section", text: mrkdwn(`*Votes*\n${fit(votes.join("\n"), 2900)}`) });
  return blocks;
}

function footer(summary: RequestSummary, mentions: readonly string[] | undefined): SlackBlock {
  const elements: SlackText[] = [mrkdwn(`Request \`${escapeMrkdwn(summary.id)}\``)];
  if (summary.deadline !== undefined) elements.push(mrkdwn(`${summary.state === "pending" ? "Expires" : "Deadline"} ${slackDate(summary.deadline)}`));
  if (mentions !== undefined && mentions.length > 0) elements.push(mrkdwn(fit(`Reviewers: ${mentions.join(", ")}`, 2000)));
  return { type: "context", elements };
}

/** Slack refuses a block_id over 255 characters; the buttons' `value` carries the full id anyway. */
function blockId(requestId: string): string {
  return `airlock:${requestId}`.slice(0, 255);
}

function actions(summary: RequestSummary, options: SlackMessageOptions, withVotes: boolean): SlackBlock {
  const open: SlackButton = { type: "button", action_id: slackActions.open, text: plain("Open in console"), url: consoleLink(options.consoleUrl, summary.id) };
  if (!withVotes) return { type: "actions", block_id: blockId(summary.id), elements: [open] };
  const risky = summary.risk === "high" || summary.risk === "critical";
  const review: SlackButton = { type: "button", action_id: slackActions.open, text: plain("Review and approve"), url: consoleLink(options.consoleUrl, summary.id), style: "primary" };
  const approve: SlackButton = {
    type: "button",
    action_id: slackActions.approve,
    text: plain("Approve"),
    value: summary.id,
    style: "primary",
    // A second look before letting a risky action run.
    ...(risky
      ? { confirm: { title: plain("Approve this action?"), text: mrkdwn(fit(`${escapeMrkdwn(summary.call)} on ${escapeMrkdwn(summary.host)}, risk ${summary.risk}`, 300)), confirm: plain("Approve"), deny: plain("Back"), style: "primary" as const } }
      : {}),
  };
  const deny: SlackButton = {
    type: "button",
    action_id: slackActions.deny,
    text: plain("Deny"),
    value: summary.id,
    style: "danger",
    ...(options.denyModal === true
      ? {}
      : { confirm: { title: plain("Deny this action?"), text: mrkdwn("The agent is told it was denied in Slack by you."), confirm: plain("Deny"), deny: plain("Back"), style: "danger" as const } }),
  };
  return { type: "actions", block_id: blockId(summary.id), elements: options.stepUp === true ? [review, deny] : [approve, deny, open] };
}

const outcomeWords: Record<DecidedOutcome, { readonly emoji: string; readonly title: string }> = {
  approved: { emoji: ":white_check_mark:", title: "Approved" },
  denied: { emoji: ":no_entry:", title: "Denied" },
  expired: { emoji: ":hourglass:", title: "Expired" },
  cancelled: { emoji: ":heavy_multiplication_x:", title: "Cancelled" },
};

/**
 * The message asking reviewers to act on a pending request (review requested or
 * escalated), or telling them about a break-glass: the request's context,
 * approvals still needed by group, expiry, and, when `options.buttons`, Approve /
 * Deny buttons whose `value` is the request id.
 */
export function slackRequestMessage(notification: Exclude<Notification, { kind: "decided" }>, options: SlackMessageOptions): SlackMessage {
  const summary = summarize(notification.record);
  const who = escapeMrkdwn(summary.agent === "" ? "an agent" : summary.agent);
  const what = escapeMrkdwn(`${summary.call} on ${summary.host}`);
  let title: string;
  let text: string;
  const blocks: SlackBlock[] = [];
  switch (notification.kind) {
    case "review_requested":
      title = `:lock: Approval needed: ${summary.method}`;
      text = `Approval needed: ${who} wants to call ${what} (risk ${summary.risk})`;
      break;
    case "escalated":
      title = `:arrow_double_up: Escalated: ${summary.method}`;
      text = `Escalated to ${escapeMrkdwn(notification.group)}: ${who} wants to call ${what} (risk ${summary.risk})`;
      blocks.push({ type: "section", text: mrkdwn(`*Escalated* to *${escapeMrkdwn(notification.group)}*: nobody decided in time, your group may now vote.`) });
      break;
    case "break_glass":
      title = `:rotating_light: BREAK-GLASS: ${summary.method}`;
      text = `Break-glass by ${escapeMrkdwn(notification.reviewer)}: ${what}`;
      blocks.push({
        type: "section",
        text: mrkdwn(`:rotating_light: *Flagged for security review.* *${escapeMrkdwn(notification.reviewer)}* broke glass and approved alone:\n${quote(notification.reason, 2500)}`),
      });
      break;
  }
  const needs = summary.state === "pending" ? describeNeeds(summary.outstanding) : undefined;
  const body = requestBlocks(summary, notification.record);
  if (needs !== undefined) body.push({ type: "section", text: mrkdwn(`*Still needed*\n${needs.map((line) => `• ${escapeMrkdwn(line)}`).join("\n")}`) });
  const voting = options.buttons && summary.state === "pending" && notification.kind !== "break_glass";
  return {
    text,
    blocks: [{ type: "header", text: plain(truncate(title, 150)) }, ...blocks, ...body, footer(summary, options.mentions), actions(summary, options, voting)],
  };
}

/**
 * The message a request's messages are updated to: the current state of a record.
 * A decided request shows its outcome, who decided and why, without vote buttons;
 * a still pending one (after a vote from Slack) shows the votes so far and what is
 * still needed, with the buttons.
 */
export function slackRecordMessage(record: RequestRecord, options: SlackMessageOptions, decision?: { readonly outcome: DecidedOutcome; readonly by: readonly string[]; readonly reason: string }): SlackMessage {
  const outcome = decision?.outcome ?? outcomeOfState(record.state);
  if (outcome === undefined) {
    return slackRequestMessage({ kind: "review_requested", record, at: new Date(), groups: [], reviewers: [] }, options);
  }
  const summary = summarize(record);
  const words = outcomeWords[outcome];
  const by = decision?.by ?? record.votes.filter((vote) => vote.approve === (outcome === "approved")).map((vote) => vote.reviewer);
  const reason = decision?.reason ?? record.votes.at(-1)?.reason ?? "";
  const line = `${words.emoji} *${words.title}*${by.length > 0 ? ` by ${escapeMrkdwn(by.join(", "))}` : ""}${reason === "" ? "" : `\n${quote(reason, 2500)}`}`;
  return {
    text: `${words.title}: ${escapeMrkdwn(summary.call)} on ${escapeMrkdwn(summary.host)}${by.length > 0 ? ` by ${escapeMrkdwn(by.join(", "))}` : ""}`,
    blocks: [
      { type: "header", text: plain(truncate(`${words.emoji} ${words.title}: ${summary.method}`, 150)) },
      { type: "section", text: mrkdwn(fit(line, 2990)) },
      ...requestBlocks(summary, record),
      footer(summary, undefined),
      actions(summary, options, false),
    ],
  };
}

/** The direct message that tells the requester (the human the agent acts for) how the request ended. */
export function slackResultMessage(notification: Extract<Notification, { kind: "decided" }>, consoleUrl: string): SlackMessage {
  const summary = summarize(notification.record);
  const words = outcomeWords[notification.outcome];
  const by = notification.by.length > 0 ? ` by ${escapeMrkdwn(notification.by.join(", "))}` : "";
  const text = `${words.emoji} Your request to call ${escapeMrkdwn(summary.call)} on ${escapeMrkdwn(summary.host)} (agent ${escapeMrkdwn(summary.agent)}) was *${notification.outcome}*${by}.`;
  const blocks: SlackBlock[] = [{ type: "section", text: mrkdwn(fit(text, 2990)) }];
  if (notification.reason !== "") blocks.push({ type: "section", text: mrkdwn(quote(notification.reason, 2900)) });
  blocks.push({ type: "context", elements: [mrkdwn(`Request \`${escapeMrkdwn(summary.id)}\` · <${consoleLink(consoleUrl, summary.id)}|Open in console>`)] });
  return { text, blocks };
}

/** The deny-reason modal's ids: `callback_id` of the view, and the input's block and action. */
export const slackDenyModal = { callbackId: "airlock_deny_reason", blockId: "airlock_reason", actionId: "reason", maxReason: 500 } as const;

/** A Slack modal view (`views.open`). */
export interface SlackModalView {
  readonly type: "modal";
  readonly callback_id: string;
  readonly private_metadata: string;
  readonly title: SlackText;
  readonly submit: SlackText;
  readonly close: SlackText;
  readonly blocks: readonly unknown[];
}

/**
 * The modal a Deny click opens: one required text input for the reason (at most
 * {@link slackDenyModal}.maxReason characters). `privateMetadata` is what binds the
 * submission to its request (see slack-modal.ts); Slack returns it unchanged.
 */
export function slackDenyReasonModal(requestId: string, privateMetadata: string): SlackModalView {
  return {
    type: "modal",
    callback_id: slackDenyModal.callbackId,
    private_metadata: privateMetadata,
    title: plain("Deny request"),
    submit: plain("Deny"),
    close: plain("Back"),
    blocks: [
      { type: "section", text: mrkdwn(`Deny request \`${escapeMrkdwn(requestId)}\`? The agent and the person it acts for are told your reason.`) },
      {
        type: "input",
        block_id: slackDenyModal.blockId,
        label: plain("Reason"),
        element: { type: "plain_text_input", action_id: slackDenyModal.actionId, multiline: true, min_length: 1, max_length: slackDenyModal.maxReason },
      },
    ],
  };
}
