// Decided requests, filtered by agent and outcome.
import { ApiError, auditEvents, history, type RequestView } from "../api.js";
import { type AuditEvent, AuditEventType } from "../../../proto/gen/airlock/v1/audit_pb.js";
import { h, listNavigation, replaceChildren } from "../dom.js";
import { outcomes, shortMethod, timestampDate, when } from "../format.js";
import { alertBox, heading, riskBadge, sinceLabel, startClock, stateBadge, type View } from "../ui.js";

function decidedBy(view: RequestView): string {
  const names = view.record.votes.map((vote) => `${vote.reviewer} (${vote.approve ? "approved" : "denied"})`);
  return names.length > 0 ? names.join(", ") : "no reviewer (expired, cancelled or automatic)";
}

function row(view: RequestView): HTMLElement {
  const request = view.record.request;
  const id = request?.id ?? "";
  return h(
    "li",
    { class: "row", "data-testid": "history-row", "data-request-id": id, "data-state": String(view.record.state) },
    h(
      "a",
      { class: "row-link", href: `#/requests/${encodeURIComponent(id)}` },
      h("span", { class: "row-top" }, stateBadge(view.record.state), riskBadge(request?.risk ?? 0), h("strong", { class: "method" }, shortMethod(request?.service ?? "", request?.method ?? ""))),
      h("span", { class: "row-who" }, h("span", { class: "agent" }, request?.identity?.agent ?? ""), request?.identity?.onBehalfOf ? ` for ${request.identity.onBehalfOf}` : "", ` on ${request?.host ?? ""}`),
      h("span", { class: "row-reason" }, decidedBy(view)),
      h("span", { class: "row-time" }, "requested ", sinceLabel(timestampDate(request?.createdAt)), ", last change ", when(timestampDate(view.record.updatedAt))),
    ),
  );
}

/** Calls the sidecar decided alone (denied by policy, refused, timed out): they never became requests. */
const sidecarDecisions: ReadonlySet<AuditEventType> = new Set([AuditEventType.CALL_DENIED, AuditEventType.CALL_REFUSED, AuditEventType.CALL_TIMED_OUT]);

function sidecarRow(event: AuditEvent): HTMLElement {
  const details = (event.details ?? {}) as Record<string, unknown>;
  const text = (key: string) => (typeof details[key] === "string" ? details[key] : "");
  const what = event.type === AuditEventType.CALL_DENIED ? "denied by policy" : event.type === AuditEventType.CALL_REFUSED ? "refused" : "timed out";
  const count = typeof details.count === "number" && details.count > 1 ? ` ×${details.count}` : "";
  return h(
    "li",
    { class: "row", "data-testid": "sidecar-decision", "data-type": AuditEventType[event.type] ?? "" },
    h("span", { class: "row-top" }, h("span", { class: "badge state-denied" }, what), h("strong", { class: "method" }, text("method").replace(/^\//, "").replace("/", ".")), count),
    h("span", { class: "row-who" }, h("span", { class: "agent" }, text("agent") || "no authenticated agent"), text("onBehalfOf") ? ` for ${text("onBehalfOf")}` : "", ` on ${text("host")}`),
    h("span", { class: "row-reason" }, `${text("rule") ? `rule ${text("rule")}: ` : ""}${text("reason")}`),
    h("span", { class: "row-time" }, when(timestampDate(event.at))),
  );
}

/** `#/history?agent=…&outcome=…`: the filters live in the address, so a filtered list can be shared. */
export function historyView(params: URLSearchParams): View {
  return (main) => {
    const agent = h("input", { id: "history-agent", name: "agent", type: "search", autocomplete: "off", placeholder: "spiffe://corp/agent/etl", "data-testid": "history-agent" });
    agent.value = params.get("agent") ?? "";
    const outcome = h("select", { id: "history-outcome", name: "outcome", "data-testid": "history-outcome" }, h("option", { value: "" }, "any outcome"), outcomes.map((o) => h("option", { value: o }, o)));
    outcome.value = params.get("outcome") ?? "";
    const form = h(
      "form",
      { class: "filters", role: "search", "data-testid": "history-filters" },
      h("div", { class: "field" }, h("label", { for: "history-agent" }, "Agent"), agent),
      h("div", { class: "field" }, h("label", { for: "history-outcome" }, "Outcome"), outcome),
      h("button", { type: "submit", "data-testid": "history-apply" }, "Filter"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      if (agent.value.trim() !== "") next.set("agent", agent.value.trim());
      if (outcome.value !== "") next.set("outcome", outcome.value);
      const query = next.toString();
      location.hash = `#/history${query === "" ? "" : `?${query}`}`;
    });
    const list = h("ul", { class: "rows", "data-testid": "history-list", "aria-label": "Decided requests" });
    const status = h("div", { role: "status" }, h("p", { class: "hint" }, "Loading…"));
    const sidecarList = h("ul", { class: "rows", "data-testid": "sidecar-decisions", "aria-label": "Calls decided at the sidecar" });
    replaceChildren(
      main,
      h("section", { class: "view" }, heading("History"), form, status, list, h("h2", {}, "Decided at the sidecar"), h("p", { class: "hint" }, "Calls denied by policy, refused or timed out: they never reached a reviewer."), sidecarList),
    );

    let closed = false;
    // Pages of 100; "Load more" reads the next one (older records come from the broker's history stream).
    let shown = 0;
    const more = h("button", { type: "button", "data-testid": "history-more", hidden: true }, "Load more");
    list.after(more);
    const load = (cursor: string | undefined) => {
      more.hidden = true;
      history({ agent: params.get("agent") ?? undefined, outcome: params.get("outcome") ?? undefined, limit: 100, cursor }).then(
        ({ views, nextCursor }) => {
          if (closed) return;
          shown += views.length;
          replaceChildren(status, shown === 0 ? h("p", { class: "empty", "data-testid": "history-empty" }, "No decided request matches.") : h("p", { class: "hint" }, `${shown} request${shown === 1 ? "" : "s"}, newest first.`));
          list.append(...views.map(row));
          more.hidden = nextCursor === undefined;
          more.onclick = () => load(nextCursor);
        },
        (error: unknown) => {
          if (!closed) replaceChildren(status, alertBox(error instanceof ApiError ? error.describe() : String(error)));
        },
      );
    };
    load(undefined);
    auditEvents(200).then(
      (events) => {
        if (closed) return;
        const agentFilter = params.get("agent") ?? "";
        const decided = events.filter((event) => sidecarDecisions.has(event.type) && (agentFilter === "" || (event.details as Record<string, unknown> | undefined)?.agent === agentFilter)).reverse();
        replaceChildren(sidecarList, decided.length === 0 ? h("li", { class: "empty" }, "None in the recent audit trail.") : decided.map(sidecarRow));
      },
      () => {
        if (!closed) replaceChildren(sidecarList, h("li", { class: "empty" }, "The audit trail could not be read."));
      },
    );
    const stops = [startClock(list), listNavigation(list, "a.row-link")];
    return () => {
      closed = true;
      for (const stop of stops) stop();
    };
  };
}
