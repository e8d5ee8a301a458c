// One request: everything a reviewer needs to decide, and the decision itself.
import { toJson } from "@bufbuild/protobuf";
import { ValueSchema } from "@bufbuild/protobuf/wkt";
import { RequestState } from "../../../proto/gen/airlock/v1/reviewer_pb.js";
import type { CredentialTemplate } from "../../../proto/gen/airlock/v1/approval_pb.js";
import { ApiError, decide, getRequest, listRequests, type RequestView } from "../api.js";
import { freshSignInRefusals, stepUpProof, takeStepUpOutcome } from "../stepup.js";
import { type Child, h, replaceChildren } from "../dom.js";
import { ago, durationWords, riskName, shortMethod, stateName, timestampDate, timestampMs, when } from "../format.js";
import { alertBox, type AppContext, countdown, heading, needsMeBadge, riskBadge, startClock, stateBadge } from "../ui.js";
import { jsonView } from "./json.js";

/**
 * Whether approving this request will need a step-up, as the broker will judge it: the rule's
 * `step_up`, or a risk at or over the broker's `min_risk` (break-glass always does).
 */
function approvalNeedsStepUp(view: RequestView, minRisk: string | undefined): boolean {
  const request = view.record.request;
  if (request?.stepUp?.required === true) return true;
  if (minRisk === undefined || request === undefined) return false;
  const order = ["low", "medium", "high", "critical"];
  const floor = order.indexOf(minRisk);
  const risk = order.indexOf(riskName(request.risk));
  return floor >= 0 && risk >= floor;
}

/** The words of the step-up label: what will confirm the approval. */
const stepUpWords = "Approval needs a step-up: your passkey, or a fresh sign-in at your identity provider, confirms this exact request.";

function fact(term: string, value: Child, testid?: string): Child {
  return [h("dt", {}, term), h("dd", testid === undefined ? {} : { "data-testid": testid }, value)];
}

function durationText(seconds: bigint | undefined): string {
  return seconds === undefined ? "" : durationWords(Number(seconds) * 1000);
}

/**
 * What an approval buys, in plain words first ("SELECT on customers · lives 5 min · 1 use"),
 * from the rule's credential description, the template's life and uses; then the Vault
 * terms it is made of (database role and mount, or token policies).
 */
function credentialFact(credential: CredentialTemplate | undefined): Child {
  if (credential === undefined) return h("span", { "data-testid": "credential" }, "none");
  const kind = credential.kind;
  const technical =
    kind.case === "database"
      ? `a database user from Vault role ${kind.value.role}, mount ${kind.value.mount}`
      : kind.case === "vaultToken"
        ? `a Vault token with ${kind.value.policies.length === 1 ? "policy" : "policies"} ${kind.value.policies.join(", ") || "none"}`
        : "an unknown kind of credential";
  const parts = [
    credential.description || technical,
    credential.ttl === undefined ? null : `lives ${durationText(credential.ttl.seconds)}`,
    kind.case === "vaultToken" ? `${kind.value.numUses} use${kind.value.numUses === 1 ? "" : "s"}` : null,
  ].filter((part): part is string => part !== null && part !== "");
  return h(
    "span",
    { "data-testid": "credential" },
    h("strong", { class: "credential-plain" }, parts.join(" · ")),
    credential.description ? h("span", { class: "hint credential-terms" }, ` (${technical})`) : null,
  );
}

/** The parts of a request that never change: who, what, why. */
function facts(view: RequestView): HTMLElement {
  const request = view.record.request;
  const identity = request?.identity;
  const credential = request?.credential;
  const chain = identity?.chain.filter((p) => p !== identity.agent && p !== identity.onBehalfOf) ?? [];
  return h(
    "dl",
    { class: "facts", "data-testid": "facts" },
    fact("Agent", [h("span", { class: "mono" }, identity?.agent ?? "unknown"), identity?.authenticatedBy ? h("span", { class: "hint" }, ` (${identity.authenticatedBy})`) : null], "agent"),
    fact("Acting for", identity?.onBehalfOf || h("span", { class: "hint" }, "nobody named"), "on-behalf-of"),
    chain.length > 0 ? fact("Also in chain", chain.join(" → ")) : null,
    fact("Host", h("span", { class: "mono" }, request?.host ?? ""), "host"),
    fact("Call", h("span", { class: "mono" }, `${request?.service ?? ""}/${request?.method ?? ""}`), "call"),
    fact("Rule", h("span", { class: "mono" }, request?.ruleId || "—"), "rule"),
    fact("Approval grants", credentialFact(credential)),
    fact("Requested", [h("span", { "data-testid": "requested-at" }, when(timestampDate(request?.createdAt))), h("span", { class: "hint" }, ` (${ago(timestampDate(request?.createdAt))})`)]),
    request?.deadline ? fact("Deadline", h("span", { "data-testid": "deadline" }, `decide by ${when(timestampDate(request.deadline))}`)) : null,
    fact("Request id", h("span", { class: "mono" }, request?.id ?? ""), "request-id"),
  );
}

/** Why the rule holds the call: its risk level and, next to it, the rule's own description of the risk. */
function riskWhy(view: RequestView): HTMLElement {
  const request = view.record.request;
  const risk = riskName(request?.risk ?? 0);
  const description = request?.ruleDescription ?? "";
  return h(
    "p",
    { class: `risk-why risk-why-${risk}`, "data-testid": "risk-description" },
    h("strong", {}, `Why ${risk} risk: `),
    description !== "" ? description : h("span", { class: "hint" }, `rule ${request?.ruleId ?? ""} gives no description; ask its author to add one.`),
  );
}

/** How many of the agent's other requests the page lists. */
const recentRequests = { count: 5 } as const;

/** The agent's other recent requests and how each ended, newest first. */
function recentList(views: readonly RequestView[]): HTMLElement {
  return h(
    "section",
    { class: "card", "data-testid": "recent-requests", "aria-labelledby": "recent-title" },
    h("h2", { id: "recent-title" }, "This agent's recent requests"),
    views.length === 0
      ? h("p", { class: "hint", "data-testid": "recent-empty" }, "None before this one.")
      : h(
          "ul",
          { class: "recent" },
          views.map((view) => {
            const request = view.record.request;
            const other = request?.id ?? "";
            return h(
              "li",
              { "data-testid": "recent-request", "data-request-id": other, "data-state": stateName(view.record.state) },
              stateBadge(view.record.state),
              " ",
              h("a", { href: `#/requests/${encodeURIComponent(other)}` }, shortMethod(request?.service ?? "", request?.method ?? "")),
              h("span", { class: "hint" }, ` ${ago(timestampDate(request?.createdAt))}`),
              request?.reason ? h("div", { class: "recent-reason" }, `“${request.reason}”`) : null,
            );
          }),
        ),
  );
}

/** The requests an ambiguous shortened id matches, as links (from the error's `details.matches`). */
function matchList(error: ApiError): HTMLElement {
  const matches = Array.isArray(error.details.matches) ? error.details.matches : [];
  return h(
    "ul",
    { class: "recent", "data-testid": "id-matches" },
    matches.map((match) => {
      const fields = typeof match === "object" && match !== null && !Array.isArray(match) ? match : {};
      const text = (key: string): string => (typeof fields[key] === "string" ? fields[key] : "");
      return h("li", {}, h("a", { class: "mono", href: `#/requests/${encodeURIComponent(text("id"))}` }, text("id")), h("span", { class: "hint" }, ` ${text("state")} · ${text("call")} · ${when(text("createdAt") === "" ? undefined : new Date(text("createdAt")))}`));
    }),
  );
}

/** Votes so far and what each group still needs. */
function approvals(view: RequestView): HTMLElement {
  const record = view.record;
  const requirement = record.request?.reviewers;
  const pending = record.state === RequestState.PENDING;
  return h(
    "section",
    { class: "card", "data-testid": "approvals", "aria-labelledby": "approvals-title" },
    h("h2", { id: "approvals-title" }, "Approvals"),
    requirement && requirement.allOf.length > 0
      ? h("p", { class: "hint" }, "Needs ", requirement.allOf.map((g, i) => [i > 0 ? " and " : "", `${g.minApprovals} from ${g.group}`]), requirement.escalationGroup ? `; escalates to ${requirement.escalationGroup} after ${durationText(requirement.escalateAfter?.seconds)}` : "", record.escalated ? " (escalated)" : "")
      : null,
    pending
      ? record.outstanding.length > 0
        ? h(
            "ul",
            { class: "outstanding", "data-testid": "outstanding" },
            record.outstanding.map((g) => h("li", { "data-group": g.group }, h("strong", {}, g.group), `: ${g.minApprovals} more approval${g.minApprovals === 1 ? "" : "s"} needed`)),
          )
        : h("p", { "data-testid": "outstanding" }, "Every group requirement is met.")
      : null,
    record.votes.length === 0
      ? h("p", { class: "hint", "data-testid": "votes" }, "No votes yet.")
      : h(
          "ol",
          { class: "votes", "data-testid": "votes" },
          record.votes.map((vote) =>
            h(
              "li",
              { class: vote.approve ? "vote approve" : "vote deny" },
              h("span", { class: `badge ${vote.approve ? "state-approved" : "state-denied"}` }, vote.approve ? "approved" : "denied"),
              " ",
              h("strong", {}, vote.reviewer),
              h("span", { class: "hint" }, ` for ${vote.group}, ${ago(timestampDate(vote.at))}`),
              vote.breakGlass ? h("span", { class: "badge risk-critical" }, "break-glass") : null,
              vote.stepUp ? h("span", { class: "badge step-up", "data-testid": "vote-step-up", title: "The vote's audit event keeps the proof" }, `confirmed with ${vote.stepUp === "oidc" ? "a fresh sign-in" : "a passkey"}`) : null,
              vote.reason ? h("div", { class: "vote-reason" }, `“${vote.reason}”`) : null,
            ),
          ),
        ),
  );
}

/** What happened after the decision: the credential's lease and the action's completion. */
function outcome(view: RequestView): HTMLElement | null {
  const { lease, completion, state } = view.record;
  if (state === RequestState.PENDING) return null;
  return h(
    "section",
    { class: "card", "data-testid": "outcome" },
    h("h2", {}, "Outcome"),
    h(
      "dl",
      { class: "facts" },
      fact("State", stateBadge(state)),
      fact("Last change", when(timestampDate(view.record.updatedAt))),
      lease ? fact("Credential", [`${lease.kind} issued ${when(timestampDate(lease.issuedAt))}`, lease.revokedAt ? `, revoked ${when(timestampDate(lease.revokedAt))}${lease.revokedBy ? ` by ${lease.revokedBy}` : ""}` : ", not revoked yet"]) : null,
      completion ? fact("Action", `finished with gRPC status ${completion.statusCode}${completion.statusMessage ? ` (${completion.statusMessage})` : ""} at ${when(timestampDate(completion.finishedAt))}`) : null,
    ),
  );
}

/** The approve / deny form. It is built once per visit, so a live update never wipes a reason being typed. */
interface DecisionHooks {
  /** The vote is on its way. */
  sending(): void;
  /** The broker counted it. */
  done(view: RequestView, approved: boolean): void;
  /** The broker refused it. */
  refused(): void;
}

function decisionForm(id: string, app: AppContext, view: RequestView, hooks: DecisionHooks): HTMLElement {
  const reason = h("textarea", { id: "reason", name: "reason", rows: 3, maxlength: 2000, "data-testid": "reason-input", "aria-describedby": "reason-help" });
  const approve = h("button", { type: "button", class: "approve", "data-testid": "approve-button" }, "Approve");
  const deny = h("button", { type: "button", class: "deny", "data-testid": "deny-button" }, "Deny");
  const errorSlot = h("div", { "aria-live": "assertive" });
  const breakGlassAllowed = app.me.breakGlass && view.record.request?.reviewers?.breakGlassAllowed === true;
  const breakGlass = h("input", { type: "checkbox", id: "break-glass", "data-testid": "break-glass" });
  const hint = view.needsMe ? null : h("p", { class: "notice", "data-testid": "not-yours" }, "You cannot vote on this one as it stands (you voted already, it is not for your groups, or you are in its identity chain). The broker will say why if you try.");

  const submit = (approved: boolean): void => {
    const text = reason.value.trim();
    replaceChildren(errorSlot);
    if (!approved && text === "") {
      replaceChildren(errorSlot, alertBox("A denial needs a reason: the agent and the audit trail get it.", "decision-error"));
      reason.focus();
      return;
    }
    if (breakGlass.checked && text === "") {
      replaceChildren(errorSlot, alertBox("Break-glass needs a reason.", "decision-error"));
      reason.focus();
      return;
    }
    approve.disabled = deny.disabled = true;
    hooks.sending();
    const vote = { approve: approved, reason: text, breakGlass: breakGlass.checked };
    decide(id, vote)
      .catch(async (error: unknown) => {
        // The broker says this approval needs a step-up: confirm it with a passkey bound to this request and verdict, then send it again.
        if (!(error instanceof ApiError) || error.code !== "step_up_required") throw error;
        replaceChildren(errorSlot, h("p", { class: "notice", "data-testid": "step-up-prompt" }, "This approval needs a step-up: follow your browser's prompt."));
        const stepUp = await stepUpProof(id, approved, { reason: text, breakGlass: breakGlass.checked }, () =>
          replaceChildren(errorSlot, h("p", { class: "notice", "data-testid": "step-up-redirect" }, "This approval needs a fresh sign-in: taking you to your identity provider…")),
        );
        replaceChildren(errorSlot);
        return decide(id, { ...vote, stepUp });
      })
      .then(
        (answer) => hooks.done(answer, approved),
        (error: unknown) => {
          approve.disabled = deny.disabled = false;
          hooks.refused();
          const message = error instanceof ApiError ? `${error.describe()} (${error.status === 0 ? error.code : `${error.status} ${error.code}`})` : String(error);
          replaceChildren(errorSlot, alertBox(message, "decision-error"));
          // An already decided request: show what it became.
          if (error instanceof ApiError && error.code === "already_decided") getRequest(id).then((latest) => app.live.apply(latest), () => undefined);
        },
      );
  };
  approve.addEventListener("click", () => submit(true));
  deny.addEventListener("click", () => submit(false));

  return h(
    "form",
    { class: "card decide", "data-testid": "decision-form", "aria-labelledby": "decide-title" },
    h("h2", { id: "decide-title" }, "Your decision"),
    hint,
    h("label", { for: "reason" }, "Reason"),
    reason,
    h("p", { id: "reason-help", class: "hint" }, "Required to deny; the agent receives it. Optional to approve."),
    approvalNeedsStepUp(view, app.me.stepUpMinRisk) ? h("p", { class: "hint", "data-testid": "step-up-hint" }, stepUpWords) : null,
    breakGlassAllowed ? h("label", { class: "toggle", for: "break-glass" }, breakGlass, " Break-glass (self-approval, flagged and notified; needs a reason)") : null,
    // On a phone this bar stays at the bottom of the screen (style.css), so Approve and Deny never need a scroll.
    h("div", { class: "actions decision-bar", "data-testid": "decision-bar" }, approve, deny),
    errorSlot,
  );
}

/** `#/requests/<id>` */
export function detailView(id: string): (main: HTMLElement, app: AppContext) => () => void {
  return (main, app) => {
    const stops: Array<() => void> = [];
    const title = heading("Request");
    const body = h("div", { class: "detail-body" }, h("p", { class: "hint", role: "status" }, "Loading…"));
    const section = h("section", { class: "view detail", "data-testid": "detail", "data-request-id": id }, h("a", { href: "#/inbox", class: "back" }, "← Inbox"), title, body);
    replaceChildren(main, section);
    let closed = false;

    const show = (first: RequestView): void => {
      const request = first.record.request;
      // The address may hold a shortened id: from here on, the request's full id.
      const fullId = request?.id ?? id;
      section.dataset.requestId = fullId;
      if (fullId !== id) history.replaceState(history.state, "", `#/requests/${encodeURIComponent(fullId)}`);
      title.textContent = shortMethod(request?.service ?? "", request?.method ?? "");
      const badges = h("p", { class: "badges" });
      const approvalsSlot = h("div");
      const outcomeSlot = h("div");
      const decisionSlot = h("div");
      const result = h("p", { class: "result", role: "status", tabindex: -1, "data-testid": "decision-result", hidden: true });
      let form: HTMLElement | undefined;
      let shown = first;
      let shownMs = -1;
      /** What the signed-in reviewer decided here, once they have. */
      let mine: boolean | undefined;
      /** A vote is on its way: the stream may show its effect before the answer comes back. */
      let sending = false;

      const paintResult = (): void => {
        const state = shown.record.state;
        if (mine !== undefined) {
          result.hidden = false;
          result.textContent =
            state === RequestState.PENDING ? `Your ${mine ? "approval" : "denial"} is recorded. The request still waits for other reviewers.` : `You ${mine ? "approved" : "denied"} it. It is now ${stateName(state)}.`;
        } else if (state !== RequestState.PENDING && !sending) {
          result.hidden = false;
          result.textContent = `This request is ${stateName(state)}; there is nothing left to decide.`;
        }
      };

      const update = (view: RequestView, decidedByMe?: boolean): void => {
        // Views arrive from the stream and from the decision's answer in any order: never go back in time.
        if (timestampMs(view.record.updatedAt) >= shownMs) {
          shown = view;
          shownMs = timestampMs(view.record.updatedAt);
          const record = view.record;
          const pending = record.state === RequestState.PENDING;
          replaceChildren(
            badges,
            riskBadge(request?.risk ?? 0),
            " ",
            stateBadge(record.state),
            view.needsMe ? [" ", needsMeBadge()] : null,
            pending && approvalNeedsStepUp(view, app.me.stepUpMinRisk) ? [" ", h("span", { class: "badge step-up-needed", "data-testid": "step-up-badge", title: stepUpWords }, "Step-up to approve")] : null,
            pending ? [" ", countdown(view.expiresAt, { "data-testid": "countdown", role: "timer", "aria-label": "Time left before it expires" })] : null,
          );
          replaceChildren(approvalsSlot, approvals(view));
          replaceChildren(outcomeSlot, outcome(view));
          if (pending) {
            form ??= decisionForm(fullId, app, view, {
              sending: () => {
                sending = true;
              },
              done: (answer, approved) => {
                sending = false;
                app.live.apply(answer);
                update(answer, approved);
              },
              refused: () => {
                sending = false;
                paintResult();
              },
            });
            if (form.parentNode !== decisionSlot) replaceChildren(decisionSlot, form);
          } else {
            form = undefined;
            replaceChildren(decisionSlot);
          }
        }
        if (decidedByMe !== undefined) mine = decidedByMe;
        paintResult();
        if (decidedByMe !== undefined) result.focus();
      };

      const reason = request?.reason ?? "";
      const redacted = request?.redactedFields ?? [];
      const recentSlot = h("div");
      replaceChildren(
        body,
        badges,
        riskWhy(first),
        result,
        h(
          "div",
          { class: "detail-grid" },
          h(
            "div",
            { class: "detail-main" },
            h("section", { class: "card", "aria-labelledby": "why-title" }, h("h2", { id: "why-title" }, "Why the agent asks"), reason ? h("blockquote", { "data-testid": "agent-reason" }, reason) : h("p", { class: "notice", "data-testid": "agent-reason" }, "The agent gave no reason.")),
            h("section", { class: "card", "aria-labelledby": "who-title" }, h("h2", { id: "who-title" }, "Who, where, what"), facts(first)),
            h(
              "section",
              { class: "card", "aria-labelledby": "request-title" },
              h("h2", { id: "request-title" }, "The request"),
              jsonView(request?.request === undefined ? undefined : toJson(ValueSchema, request.request), redacted),
              redacted.length > 0 ? h("p", { class: "hint", "data-testid": "redacted-fields" }, "Redacted by policy before it left the host: ", redacted.map((path, i) => [i > 0 ? ", " : "", h("code", {}, path)])) : null,
            ),
          ),
          h("div", { class: "detail-side" }, decisionSlot, approvalsSlot, outcomeSlot, recentSlot),
        ),
      );
      update(first);
      // Back from a step-up by a fresh sign-in: the broker cast the vote (or says why not).
      const freshSignIn = takeStepUpOutcome();
      if (freshSignIn !== undefined && freshSignIn.done) {
        mine = true;
        paintResult();
      } else if (freshSignIn !== undefined) {
        result.after(alertBox(`${freshSignInRefusals[freshSignIn.reason] ?? "The fresh sign-in did not confirm the approval."} (${freshSignIn.reason})`, "step-up-error"));
      }
      const agent = request?.identity?.agent ?? "";
      if (agent !== "") {
        listRequests({ agent, limit: recentRequests.count + 1 }).then(
          (views) => {
            if (!closed) replaceChildren(recentSlot, recentList(views.filter((view) => view.record.request?.id !== fullId).slice(0, recentRequests.count)));
          },
          (error: unknown) => {
            if (!closed) replaceChildren(recentSlot, h("section", { class: "card" }, h("h2", {}, "This agent's recent requests"), alertBox(`Could not list them: ${error instanceof ApiError ? error.describe() : String(error)}`, "recent-error")));
          },
        );
      }
      stops.push(
        app.live.onView((view) => {
          if (view.record.request?.id === fullId) update(view);
        }),
        startClock(body),
      );
    };

    getRequest(id).then(
      (view) => {
        if (!closed) show(view);
      },
      (error: unknown) => {
        if (closed) return;
        if (error instanceof ApiError && error.code === "ambiguous_id") {
          title.textContent = "Which request?";
          replaceChildren(body, alertBox(`More than one request has an id starting with “${id}”.`, "ambiguous-id"), matchList(error));
          return;
        }
        title.textContent = error instanceof ApiError && error.status === 404 ? "No such request" : "Request";
        replaceChildren(body, alertBox(error instanceof ApiError ? error.describe() : String(error)), h("p", {}, h("a", { href: "#/inbox" }, "Back to the inbox")));
      },
    );
    return () => {
      closed = true;
      for (const stop of stops) stop();
    };
  };
}
