/**
 * The auditor's report: one self-contained HTML page for a period of the audit
 * trail. Every privileged action (who asked, for whom, why, under which rule,
 * who approved it and why, when its credential was issued and revoked, how it
 * ended), the denials and refusals, the break-glass uses, and the verification
 * of the whole trail with the checkpoints that anchor the period.
 *
 * The page has inline CSS only: no script, no font, no image, nothing fetched,
 * so it can be mailed, archived and opened offline. Event contents are
 * untrusted input (agents write reasons, sidecars report fields), so every
 * value goes through {@link html}'s escaping, and a Content-Security-Policy
 * forbids scripts as a second wall.
 * @module
 */
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { type AuditEvent, AuditEventType } from "../../proto/index.js";
import type { Checkpoint } from "./checkpoints.js";
import { auditEventTime } from "./log.js";
import { type TrailVerdict, trailVerdictLine } from "./verify.js";

/** What {@link renderAuditReport} builds the page from. */
export interface AuditReportInput {
  /**
   * The trail's events in order. Events before `since` are ignored; events at or
   * after `until` only complete the requests the period holds (a credential
   * revoked after the period ends still shows on its request). A caller may
   * pass the whole trail or only the events from `since` on.
   */
  readonly events: Iterable<AuditEvent>;
  /** The verification of the whole trail (not only the period). */
  readonly verdict: TrailVerdict;
  /** Every checkpoint the trail was verified against; the page lists those that anchor the period. */
  readonly checkpoints: readonly Checkpoint[];
  /** Whether checkpoints were given at all (no `--checkpoints`: the page says what that leaves unproven). */
  readonly checkpointsGiven: boolean;
  /** The period's start (inclusive). */
  readonly since: Date;
  /** The period's end (exclusive). */
  readonly until: Date;
  /** When the report was made; passed in so the page is a pure function of its input. */
  readonly generatedAt: Date;
}

// ---------------------------------------------------------------------------------------------
// Escaping: a tagged template that escapes every interpolation unless it is already Html.

/** Markup that is already safe: built by {@link html}, never from raw input. */
class Html {
  constructor(readonly markup: string) {}
  toString(): string {
    return this.markup;
  }
}

const entities: Record<string, string> = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Text made safe for element content and quoted attribute values alike. */
function escapeText(text: string): string {
  return text.replace(/[&<>"']/g, (char) => entities[char] ?? char);
}

type Part = Html | string | number | bigint | boolean | null | undefined | readonly Part[];

function renderPart(part: Part): string {
  if (part instanceof Html) return part.markup;
  if (Array.isArray(part)) return (part as readonly Part[]).map(renderPart).join("");
  // false, null and undefined render as nothing, so `cond && html\`…\`` works inside templates.
  if (part === undefined || part === null || part === false) return "";
  return escapeText(String(part));
}

/** Builds markup: the literal parts are trusted, every interpolated value is escaped unless it is {@link Html}. */
function html(strings: TemplateStringsArray, ...values: Part[]): Html {
  let markup = strings[0] ?? "";
  values.forEach((value, index) => {
    markup += renderPart(value) + (strings[index + 1] ?? "");
  });
  return new Html(markup);
}

// ---------------------------------------------------------------------------------------------
// Reading events: details are a protobuf Struct written by the broker or, for call reports,
// from a sidecar's account; nothing in them is trusted to have the expected type.

function field(details: JsonObject | undefined, key: string): string {
  const value: JsonValue | undefined = details?.[key];
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  return "";
}

function list(details: JsonObject | undefined, key: string): string[] {
  const value = details?.[key];
  return Array.isArray(value) ? value.filter((item): item is string => typeof item === "string") : [];
}

function typeName(type: AuditEventType): string {
  return AuditEventType[type] ?? `TYPE_${String(type)}`;
}

/** A time for people, in UTC, to the second; the exact instant stays in the `datetime` attribute. */
function when(date: Date | undefined): Html {
  if (date === undefined) return html`<span class="none">—</span>`;
  return html`<time datetime="${date.toISOString()}">${date.toISOString().replace("T", " ").replace(/\.\d{3}Z$/, " UTC")}</time>`;
}

/** The call an action was for, as `service/Method` (the request names them apart). */
function callName(received: Action["received"]): string {
  if (received === undefined) return "";
  if (received.method.startsWith("/") || received.service === "") return received.method;
  return `${received.service}/${received.method}`;
}

/** A value, or a dash when the event did not say. */
function shown(text: string): Html {
  return text === "" ? html`<span class="none">—</span>` : html`${text}`;
}

// ---------------------------------------------------------------------------------------------
// One privileged action, assembled from its request's events.

interface Vote {
  readonly at: Date;
  readonly reviewer: string;
  readonly approve: boolean;
  readonly group: string;
  readonly reason: string;
  readonly breakGlass: boolean;
}

interface Action {
  readonly requestId: string;
  received?: { at: Date; agent: string; onBehalfOf: string; reason: string; rule: string; service: string; method: string; host: string };
  readonly votes: Vote[];
  verdict: string;
  decisionReason: string;
  decidedAt?: Date;
  cause: string;
  autoRule: string;
  by: string[];
  issued?: { at: Date; kind: string; expiresAt: string };
  readonly revoked: Array<{ at: Date; why: string }>;
  completed?: { at: Date; statusCode: string; statusMessage: string };
  expiredAt?: Date;
  refusedAtIntake: string;
  /** Why the approved action could not run or never reported back (the rules' `failed`). */
  failed: string;
  readonly security: AuditEvent[];
  breakGlass: boolean;
  /** The highest sequence among the request's events: past a broken link, what the card says is unproven. */
  lastSequence: number;
  /** An event of the request falls inside the period. */
  inPeriod: boolean;
}

/** Events a sidecar reports on its own (no broker request behind them): listed apart, never as actions. */
const callReports: ReadonlySet<AuditEventType> = new Set([AuditEventType.CALL_DENIED, AuditEventType.CALL_REFUSED, AuditEventType.CALL_TIMED_OUT, AuditEventType.CALLS_ALLOWED]);

function newAction(requestId: string): Action {
  return { requestId, votes: [], verdict: "", decisionReason: "", cause: "", autoRule: "", by: [], revoked: [], refusedAtIntake: "", failed: "", security: [], breakGlass: false, lastSequence: 0, inPeriod: false };
}

/** Folds one event into its request's action. The shapes are those broker/service.ts writes. */
function fold(action: Action, event: AuditEvent): void {
  const at = auditEventTime(event);
  const d = event.details;
  action.lastSequence = Math.max(action.lastSequence, Number(event.sequence));
  switch (event.type) {
    case AuditEventType.REQUEST_RECEIVED:
      action.received ??= { at, agent: event.actor, onBehalfOf: field(d, "onBehalfOf"), reason: field(d, "reason"), rule: field(d, "rule"), service: field(d, "service"), method: field(d, "method"), host: field(d, "host") };
      return;
    case AuditEventType.VOTE_RECORDED: {
      const vote: Vote = { at, reviewer: field(d, "reviewer") || event.actor, approve: d?.approve === true, group: field(d, "group"), reason: field(d, "reason"), breakGlass: d?.breakGlass === true };
      action.votes.push(vote);
      if (vote.breakGlass) action.breakGlass = true;
      return;
    }
    case AuditEventType.BREAK_GLASS:
      action.breakGlass = true;
      action.votes.push({ at, reviewer: field(d, "reviewer") || event.actor, approve: true, group: "", reason: field(d, "reason"), breakGlass: true });
      return;
    case AuditEventType.DECIDED: {
      // Two DECIDED events per decision: the rules' (kind, cause, by) and the published one (verdict, decision id).
      const verdict = field(d, "verdict") || field(d, "kind").toUpperCase();
      if (verdict !== "") action.verdict = verdict;
      if (field(d, "reason") !== "") action.decisionReason = field(d, "reason");
      if (field(d, "cause") !== "") action.cause = field(d, "cause");
      if (field(d, "autoRule") !== "") action.autoRule = field(d, "autoRule");
      if (list(d, "by").length > 0) action.by = list(d, "by");
      if (action.cause === "break_glass") action.breakGlass = true;
      action.decidedAt ??= at;
      return;
    }
    case AuditEventType.CREDENTIAL_ISSUED:
      action.issued = { at, kind: field(d, "kind"), expiresAt: field(d, "expiresAt") };
      return;
    case AuditEventType.CREDENTIAL_REVOKED:
      action.revoked.push({ at, why: field(d, "why") });
      return;
    case AuditEventType.ACTION_COMPLETED:
      action.completed = { at, statusCode: field(d, "statusCode"), statusMessage: field(d, "statusMessage") };
      return;
    case AuditEventType.EXPIRED:
      action.expiredAt = at;
      return;
    case AuditEventType.POLICY_EVALUATED:
      // The rules' other steps land here too: `cancelled` and `failed` say how the request ended.
      if (field(d, "refused") !== "") action.refusedAtIntake = field(d, "refused");
      if (field(d, "kind") === "failed") action.failed = field(d, "reason") || "failed";
      if (field(d, "kind") === "cancelled" && action.verdict === "") action.verdict = "CANCELLED";
      return;
    case AuditEventType.SECURITY_EVENT:
      action.security.push(event);
      return;
    default:
      return;
  }
}

/** How the action ended, for people, and a class for its colour. */
function outcome(action: Action): { text: string; tone: "ok" | "denied" | "open" | "failed" } {
  if (action.completed !== undefined) {
    const code = action.completed.statusCode;
    return code === "0" || code === "" ? { text: "Completed", tone: "ok" } : { text: `Completed with error (status ${code})`, tone: "failed" };
  }
  if (action.refusedAtIntake !== "") return { text: "Refused at intake", tone: "denied" };
  if (action.failed !== "") return { text: `Failed: ${action.failed}`, tone: "failed" };
  switch (action.verdict) {
    case "APPROVED":
      return { text: action.issued === undefined ? "Approved" : "Approved, credential issued", tone: "ok" };
    case "DENIED":
      return { text: "Denied", tone: "denied" };
    case "EXPIRED":
      return { text: "Expired undecided", tone: "failed" };
    case "CANCELLED":
      return { text: "Cancelled", tone: "failed" };
    default:
      return action.expiredAt === undefined ? { text: "Undecided", tone: "open" } : { text: "Expired undecided", tone: "failed" };
  }
}

// ---------------------------------------------------------------------------------------------
// The page.

const style = `
:root { --ink:#1d2330; --muted:#5b6474; --line:#d9dee7; --bg:#f6f7f9; --ok:#12703a; --okbg:#e5f5ea; --bad:#a3140f; --badbg:#fdecea; --warn:#8a5a00; --warnbg:#fff4d6; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 0; }
h4 { font-size: 13px; margin: 12px 0 4px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.sub { color: var(--muted); margin: 0 0 16px; }
.none { color: #9aa1ad; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; word-break: break-all; }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid var(--line); }
th { background: #eef1f5; font-weight: 600; font-size: 12.5px; }
td { overflow-wrap: anywhere; }
.summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; margin: 12px 0; }
.summary div { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
.summary b { display: block; font-size: 20px; }
.summary span { color: var(--muted); font-size: 12.5px; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
.meta dt { color: var(--muted); }
.meta dd { margin: 0; overflow-wrap: anywhere; }
.verification { border-radius: 8px; padding: 14px 16px; border: 2px solid; }
.verification.verified { border-color: var(--ok); background: var(--okbg); }
.verification.broken { border-color: var(--bad); background: var(--badbg); }
.verdict { font-size: 20px; font-weight: 700; margin: 0 0 6px; }
.verified .verdict { color: var(--ok); }
.broken .verdict { color: var(--bad); }
.verdict-line { display: block; background: #fff; border: 1px solid var(--line); padding: 6px 8px; margin: 8px 0; }
.action { background: #fff; border: 1px solid var(--line); border-left: 5px solid #8793a6; border-radius: 6px; padding: 12px 14px; margin: 12px 0; }
.action > header { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-bottom: 8px; }
.action.tone-ok { border-left-color: var(--ok); }
.action.tone-denied { border-left-color: var(--bad); }
.action.tone-failed { border-left-color: var(--warn); }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 4px 18px; margin: 0; }
.facts div { display: grid; grid-template-columns: 110px 1fr; gap: 8px; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.pill { display: inline-block; border-radius: 999px; padding: 1px 9px; font-size: 12px; font-weight: 600; border: 1px solid currentColor; }
.pill.ok { color: var(--ok); background: var(--okbg); }
.pill.denied { color: var(--bad); background: var(--badbg); }
.pill.failed { color: var(--warn); background: var(--warnbg); }
.pill.open { color: var(--muted); background: #fff; }
.pill.unproven { color: #fff; background: var(--warn); border-color: var(--warn); }
.vote-yes { color: var(--ok); font-weight: 600; }
.vote-no { color: var(--bad); font-weight: 600; }
.break-glass-label { display: inline-block; white-space: nowrap; background: var(--bad); color: #fff; font-weight: 700; font-size: 12px; letter-spacing: .06em; padding: 2px 8px; border-radius: 4px; }
.action.break-glass { border: 2px solid var(--bad); border-left-width: 8px; background: var(--badbg); }
tr.break-glass td { background: var(--badbg); }
tr.flagged td:first-child { box-shadow: inset 4px 0 0 var(--bad); }
.after-period { color: var(--muted); font-size: 12px; }
.empty { color: var(--muted); font-style: italic; background: #fff; border: 1px dashed var(--line); padding: 8px 10px; border-radius: 6px; }
.warning { background: var(--warnbg); border: 1px solid #e6c777; padding: 8px 10px; border-radius: 6px; }
@media print { body { background: #fff; } main { padding: 0; } .action { break-inside: avoid; } }
`;

/** The checkpoints that anchor the period: each taken in it, and each writer's first one after it (which anchors its last events). */
function coveringCheckpoints(checkpoints: readonly Checkpoint[], since: Date, until: Date): Checkpoint[] {
  const time = (checkpoint: Checkpoint) => new Date(checkpoint.at).getTime();
  const chosen = checkpoints.filter((checkpoint) => time(checkpoint) >= since.getTime() && time(checkpoint) < until.getTime());
  const writers = new Set(checkpoints.map((checkpoint) => checkpoint.writer));
  for (const writer of writers) {
    const next = checkpoints.filter((checkpoint) => checkpoint.writer === writer && time(checkpoint) >= until.getTime()).sort((a, b) => time(a) - time(b))[0];
    if (next !== undefined) chosen.push(next);
  }
  return chosen.sort((a, b) => time(a) - time(b) || a.writer.localeCompare(b.writer) || a.index - b.index);
}

/**
 * Whether something resting on events up to `sequence` is unproven: the trail broke at or
 * before it (`brokenAt` is the first bad event, 0 when the trail verified).
 */
function unproven(sequence: number, brokenAt: number): boolean {
  return brokenAt > 0 && sequence >= brokenAt;
}

const unprovenLabel = html`<span class="pill unproven" title="this rests on events after the trail's first broken link">UNPROVEN</span>`;

/** A call a sidecar decided alone, as a table row. */
function callRow(event: AuditEvent, brokenAt: number): Html {
  const d = event.details;
  const first = field(d, "firstAt");
  const last = field(d, "lastAt");
  const span = first !== "" && last !== "" && first !== last ? `${first} – ${last}` : first;
  return html`<tr class="${event.flagged ? "flagged" : ""}" data-sequence="${event.sequence}">
    <td>${when(auditEventTime(event))}${unproven(Number(event.sequence), brokenAt) && html` ${unprovenLabel}`}${span === "" ? "" : html`<div class="after-period">calls: ${span}</div>`}</td>
    <td>${shown(field(d, "host"))}</td>
    <td>${shown(field(d, "agent"))}</td>
    <td>${shown(field(d, "onBehalfOf"))}</td>
    <td class="mono">${shown(field(d, "method"))}</td>
    <td>${shown(field(d, "rule"))}</td>
    <td class="call-reason">${shown(field(d, "reason"))}</td>
    <td>${field(d, "count") || "1"}</td>
  </tr>`;
}

function callTable(kind: string, events: readonly AuditEvent[], empty: string, brokenAt: number): Html {
  if (events.length === 0) return html`<p class="empty">${empty}</p>`;
  return html`<table class="calls ${kind}">
    <thead><tr><th>Reported</th><th>Host</th><th>Agent</th><th>On behalf of</th><th>Method</th><th>Rule</th><th>Reason</th><th>Calls</th></tr></thead>
    <tbody>${events.map((event) => callRow(event, brokenAt))}</tbody>
  </table>`;
}

function actionCard(action: Action, until: Date, brokenAt: number): Html {
  const r = action.received;
  const end = outcome(action);
  const after = (at: Date) => (at.getTime() >= until.getTime() ? html` <span class="after-period">(after the period)</span>` : "");
  const classes = ["action", `tone-${end.tone}`, action.breakGlass ? "break-glass" : ""].filter((c) => c !== "").join(" ");
  const approvals = action.votes.length === 0
    ? action.cause === "auto_rule"
      ? html`<p class="sub">Decided by auto rule <b>${action.autoRule}</b>, with no reviewer.</p>`
      : html`<p class="empty">No reviewer voted.</p>`
    : html`<table class="approvals">
        <thead><tr><th>Reviewer</th><th>Vote</th><th>Group</th><th>Reason</th><th>At</th></tr></thead>
        <tbody>${action.votes.map(
          (vote) => html`<tr class="approver${vote.breakGlass ? " break-glass" : ""}">
            <td class="approver-name">${vote.reviewer}</td>
            <td>${vote.breakGlass ? html`<span class="break-glass-label">BREAK-GLASS</span>` : vote.approve ? html`<span class="vote-yes">approve</span>` : html`<span class="vote-no">deny</span>`}</td>
            <td>${shown(vote.group)}</td>
            <td class="approver-reason">${shown(vote.reason)}</td>
            <td>${when(vote.at)}${after(vote.at)}</td>
          </tr>`,
        )}</tbody>
      </table>`;
  return html`<article class="${classes}" id="request-${action.requestId}" data-request-id="${action.requestId}">
    <header>
      <h3 class="mono">${r === undefined ? "(request received before the period)" : callName(r)}</h3>
      ${action.breakGlass && html`<span class="break-glass-label">BREAK-GLASS</span>`}
      <span class="pill outcome ${end.tone}">${end.text}</span>
      ${unproven(action.lastSequence, brokenAt) && unprovenLabel}
    </header>
    <dl class="facts">
      <div><dt>Request</dt><dd class="mono">${action.requestId}</dd></div>
      <div><dt>Requested</dt><dd>${when(r?.at)}</dd></div>
      <div><dt>Agent</dt><dd class="agent">${shown(r?.agent ?? "")}</dd></div>
      <div><dt>On behalf of</dt><dd class="on-behalf-of">${shown(r?.onBehalfOf ?? "")}</dd></div>
      <div><dt>Reason</dt><dd class="reason">${shown(r?.reason ?? "")}</dd></div>
      <div><dt>Rule</dt><dd class="rule">${shown(r?.rule ?? "")}</dd></div>
      <div><dt>Host</dt><dd>${shown(r?.host ?? "")}</dd></div>
      <div><dt>Decision</dt><dd class="decision">${action.verdict === "" ? shown("") : html`${action.verdict.toLowerCase()}${action.cause === "" ? "" : ` (${action.cause.replace(/_/g, " ")})`}${action.by.length > 0 ? ` by ${action.by.join(", ")}` : ""}${action.decidedAt === undefined ? "" : html`, ${when(action.decidedAt)}`}${action.decidedAt === undefined ? "" : after(action.decidedAt)}`}</dd></div>
      <div><dt>Decision reason</dt><dd class="decision-reason">${shown(action.decisionReason || action.refusedAtIntake)}</dd></div>
      <div><dt>Credential issued</dt><dd class="credential-issued">${action.issued === undefined ? shown("") : html`${when(action.issued.at)}${after(action.issued.at)}${action.issued.kind === "" ? "" : ` (${action.issued.kind}${action.issued.expiresAt === "" ? "" : `, expires ${action.issued.expiresAt}`})`}`}</dd></div>
      <div><dt>Credential revoked</dt><dd class="credential-revoked">${action.revoked.length === 0 ? shown("") : action.revoked.map((revoked, index) => html`${index > 0 ? "; " : ""}${when(revoked.at)}${after(revoked.at)}${revoked.why === "" ? "" : ` (${revoked.why.replace(/_/g, " ")})`}`)}</dd></div>
      <div><dt>Completed</dt><dd class="completed">${action.completed === undefined ? shown("") : html`${when(action.completed.at)}${after(action.completed.at)} status ${action.completed.statusCode}${action.completed.statusMessage === "" ? "" : `: ${action.completed.statusMessage}`}`}</dd></div>
    </dl>
    <h4>Approvers</h4>
    ${approvals}
    ${action.security.length > 0 && html`<h4>Security events</h4><ul>${action.security.map((event) => html`<li>${when(auditEventTime(event))} ${event.actor}: <code>${JSON.stringify(event.details ?? {})}</code></li>`)}</ul>`}
  </article>`;
}

/**
 * Renders the auditor's report for a period as one self-contained HTML page.
 * A pure function: the same input gives the same page. Requests are assembled
 * from their events (one card per request id); a request is in the report when
 * any of its events falls inside the period.
 */
export function renderAuditReport(input: AuditReportInput): string {
  const { since, until, verdict } = input;
  const inPeriod = (event: AuditEvent) => {
    const at = auditEventTime(event).getTime();
    return at >= since.getTime() && at < until.getTime();
  };
  const actions = new Map<string, Action>();
  const periodEvents: AuditEvent[] = [];
  for (const event of input.events) {
    if (auditEventTime(event).getTime() < since.getTime()) continue;
    const within = inPeriod(event);
    if (within) periodEvents.push(event);
    if (event.requestId === "" || callReports.has(event.type)) continue;
    let action = actions.get(event.requestId);
    if (action === undefined) {
      // A request first seen after the period belongs to a later report.
      if (!within) continue;
      action = newAction(event.requestId);
      actions.set(event.requestId, action);
    }
    if (within) action.inPeriod = true;
    fold(action, event);
  }
  const listed = [...actions.values()].filter((action) => action.inPeriod);
  const ofType = (type: AuditEventType) => periodEvents.filter((event) => event.type === type);
  const breakGlass = listed.filter((action) => action.breakGlass);
  const reviewerDenials = listed.filter((action) => action.verdict === "DENIED" || action.refusedAtIntake !== "");
  const policyDenials = ofType(AuditEventType.CALL_DENIED);
  const refused = ofType(AuditEventType.CALL_REFUSED);
  const timedOut = ofType(AuditEventType.CALL_TIMED_OUT);
  const allowed = ofType(AuditEventType.CALLS_ALLOWED);
  const security = periodEvents.filter((event) => event.type === AuditEventType.SECURITY_EVENT || event.type === AuditEventType.AUTH_FAILED);
  const counts = new Map<string, number>();
  for (const event of periodEvents) counts.set(typeName(event.type), (counts.get(typeName(event.type)) ?? 0) + 1);
  // Loops, not Math.min(...): a busy period has more events than a call may take arguments.
  let firstSequence = 0;
  let lastSequence = 0;
  for (const event of periodEvents) {
    const sequence = Number(event.sequence);
    if (firstSequence === 0 || sequence < firstSequence) firstSequence = sequence;
    if (sequence > lastSequence) lastSequence = sequence;
  }
  const covering = coveringCheckpoints(input.checkpoints, since, until);
  const anchoredTo = input.checkpoints.reduce((highest, checkpoint) => Math.max(highest, checkpoint.sequence), 0);
  const line = trailVerdictLine(verdict);
  const brokenAt = verdict.intact ? 0 : Math.max(1, verdict.firstBrokenSequence);

  const verification = html`<section class="verification ${verdict.intact ? "verified" : "broken"}" id="verification">
    <p class="verdict">${verdict.intact ? "Verified" : html`BROKEN: <code class="error-name">${verdict.error ?? "unknown"}</code>`}</p>
    <p>${
      verdict.intact
        ? `The whole trail (${verdict.eventsChecked} events, from event 1) is intact: every event links to the one before it, ${verdict.signed} signatures verify against the key ring, and it agrees with ${verdict.checkpoints} checkpoint${verdict.checkpoints === 1 ? "" : "s"}.`
        : `The trail fails verification at event ${verdict.firstBrokenSequence}: ${verdict.problem}. What this report shows from that event on is not proven (marked UNPROVEN); treat it as unreliable.`
    }</p>
    <code class="verdict-line">${line}</code>
    ${
      input.checkpointsGiven
        ? lastSequence > 0 &&
          html`<p class="anchoring">${
            anchoredTo >= lastSequence
              ? `The period's events (${firstSequence}–${lastSequence}) are all anchored by a checkpoint (the newest names event ${anchoredTo}).`
              : `Only events up to ${anchoredTo} are anchored by a checkpoint; the period's events ${Math.max(firstSequence, anchoredTo + 1)}–${lastSequence} are held by the chain and signatures alone.`
          }</p>`
        : html`<p class="warning">No checkpoints were given: the trail was held to its chain and signatures only. A trail replaced or truncated by someone holding a broker's key would still verify.</p>`
    }
    <h4>Checkpoints covering the period (${covering.length})</h4>
    ${
      covering.length === 0
        ? html`<p class="empty">No checkpoint was taken during the period or after it.</p>`
        : html`<table class="checkpoints">
            <thead><tr><th>Writer</th><th>Index</th><th>Sequence</th><th>Time</th><th>Head hash</th></tr></thead>
            <tbody>${covering.map(
              (checkpoint) => html`<tr class="checkpoint">
                <td>${checkpoint.writer}</td><td>${checkpoint.index}</td><td>${checkpoint.sequence}</td>
                <td>${when(new Date(checkpoint.at))}${new Date(checkpoint.at).getTime() >= until.getTime() ? html` <span class="after-period">(after the period)</span>` : ""}</td>
                <td class="mono">${checkpoint.headSha256.slice(0, 16)}…</td>
              </tr>`,
            )}</tbody>
          </table>`
    }
  </section>`;

  const page = html`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Airlock audit report ${since.toISOString()} – ${until.toISOString()}</title>
<style>${new Html(style)}</style>
</head>
<body>
<main>
<header id="report-header">
  <h1>Airlock audit report</h1>
  <p class="sub">Privileged actions, denials and break-glass uses from the signed audit trail.</p>
  <dl class="meta">
    <dt>Period</dt><dd class="period">${when(since)} to ${when(until)} <span class="after-period">(start included, end excluded)</span></dd>
    <dt>Generated at</dt><dd class="generated-at">${when(input.generatedAt)}</dd>
    <dt>Trail</dt><dd>${verdict.eventsChecked} events in all; ${periodEvents.length} in the period${lastSequence > 0 ? ` (sequences ${firstSequence}–${lastSequence})` : ""}</dd>
  </dl>
  <div class="summary">
    <div><b class="count-actions">${listed.length}</b><span>privileged actions</span></div>
    <div><b class="count-break-glass">${breakGlass.length}</b><span>break-glass uses</span></div>
    <div><b class="count-denials">${reviewerDenials.length + policyDenials.length}</b><span>denials</span></div>
    <div><b class="count-refused">${refused.length}</b><span>refused call reports</span></div>
    <div><b class="count-events">${periodEvents.length}</b><span>events in the period</span></div>
    <div><b>${verdict.intact ? "yes" : "NO"}</b><span>trail verified</span></div>
  </div>
</header>

<h2>Verification</h2>
${verification}

<h2 id="break-glass">Break-glass uses (${breakGlass.length})</h2>
${
  breakGlass.length === 0
    ? html`<p class="empty">No break-glass use in the period.</p>`
    : html`<table class="break-glass-uses">
        <thead><tr><th></th><th>At</th><th>Reviewer</th><th>Reason</th><th>Request</th><th>Agent</th><th>Method</th><th>Outcome</th></tr></thead>
        <tbody>${breakGlass.flatMap((action) =>
          action.votes
            .filter((vote) => vote.breakGlass)
            .map(
              (vote) => html`<tr class="break-glass">
                <td><span class="break-glass-label">BREAK-GLASS</span></td>
                <td>${when(vote.at)}</td><td>${vote.reviewer}</td><td>${shown(vote.reason)}</td>
                <td class="mono">${action.requestId}</td><td>${shown(action.received?.agent ?? "")}</td><td class="mono">${shown(callName(action.received))}</td><td>${outcome(action).text}</td>
              </tr>`,
            ),
        )}</tbody>
      </table>`
}

<h2 id="actions">Privileged actions (${listed.length})</h2>
${listed.length === 0 ? html`<p class="empty">No privileged action in the period.</p>` : listed.map((action) => actionCard(action, until, brokenAt))}

<h2 id="denials">Denials</h2>
<h4>Denied by reviewers or refused by the broker (${reviewerDenials.length})</h4>
${
  reviewerDenials.length === 0
    ? html`<p class="empty">No request was denied in the period.</p>`
    : html`<table class="reviewer-denials">
        <thead><tr><th>Requested</th><th>Request</th><th>Agent</th><th>On behalf of</th><th>Method</th><th>Denied by</th><th>Reason</th></tr></thead>
        <tbody>${reviewerDenials.map(
          (action) => html`<tr data-request-id="${action.requestId}">
            <td>${when(action.received?.at)}</td><td class="mono">${action.requestId}</td><td>${shown(action.received?.agent ?? "")}</td><td>${shown(action.received?.onBehalfOf ?? "")}</td>
            <td class="mono">${shown(callName(action.received))}</td>
            <td>${action.refusedAtIntake !== "" ? "the broker" : shown(action.by.join(", ") || action.votes.filter((vote) => !vote.approve).map((vote) => vote.reviewer).join(", "))}</td>
            <td class="denial-reason">${shown(action.decisionReason || action.refusedAtIntake)}</td>
          </tr>`,
        )}</tbody>
      </table>`
}
<h4>Denied by policy at a sidecar (${policyDenials.length})</h4>
${callTable("policy-denials", policyDenials, "No call was denied by policy in the period.", brokenAt)}

<h2 id="refused">Refused calls (${refused.length})</h2>
<p class="sub">Calls a sidecar refused before policy could allow them: no or a bad token, a missing reason, a limit.</p>
${callTable("refused-calls", refused, "No call was refused in the period.", brokenAt)}
${timedOut.length > 0 && html`<h4>Calls whose agent stopped waiting (${timedOut.length})</h4>${callTable("timed-out-calls", timedOut, "", brokenAt)}`}
${allowed.length > 0 && html`<h4>Calls allowed by rules with audit: true (${allowed.length})</h4>${callTable("allowed-calls", allowed, "", brokenAt)}`}

<h2 id="security">Security events (${security.length})</h2>
${
  security.length === 0
    ? html`<p class="empty">No security event in the period.</p>`
    : html`<table class="security-events">
        <thead><tr><th>At</th><th>Type</th><th>Actor</th><th>Request</th><th>Details</th></tr></thead>
        <tbody>${security.map((event) => html`<tr class="flagged"><td>${when(auditEventTime(event))}</td><td>${typeName(event.type)}</td><td>${event.actor}</td><td class="mono">${shown(event.requestId)}</td><td><code>${JSON.stringify(event.details ?? {})}</code></td></tr>`)}</tbody>
      </table>`
}

<h2 id="counts">Events in the period by type</h2>
${
  counts.size === 0
    ? html`<p class="empty">No event in the period.</p>`
    : html`<table class="event-counts"><thead><tr><th>Type</th><th>Events</th></tr></thead><tbody>${[...counts.entries()]
        .sort((a, b) => a[0].localeCompare(b[0]))
        .map(([type, count]) => html`<tr><td class="mono">${type}</td><td>${count}</td></tr>`)}</tbody></table>`
}
</main>
</body>
</html>
`;
  return page.markup;
}
