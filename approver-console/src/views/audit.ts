// The audit trail and whether its hash chain is intact.
import type { AuditEvent } from "../../../proto/gen/airlock/v1/audit_pb.js";
import type { VerifyAuditResponse } from "../../../proto/gen/airlock/v1/reviewer_pb.js";
import { ApiError, auditEvents, verifyAudit } from "../api.js";
import { type Child, h, replaceChildren } from "../dom.js";
import { auditTypeName, hex, timestampDate, when } from "../format.js";
import { alertBox, heading, type View } from "../ui.js";

function verification(result: VerifyAuditResponse): HTMLElement {
  if (result.intact) {
    return h("p", { class: "verify ok", "data-testid": "audit-verify", "data-intact": "true" }, h("span", { "aria-hidden": "true" }, "✓ "), `Chain intact: ${result.eventsChecked} event${result.eventsChecked === 1n ? "" : "s"} checked, ${result.signed} signature${result.signed === 1n ? "" : "s"} verified.`);
  }
  return h(
    "p",
    { class: "verify broken", "data-testid": "audit-verify", "data-intact": "false" },
    h("span", { "aria-hidden": "true" }, "✗ "),
    `Chain broken at sequence ${result.firstBrokenSequence}`,
    result.error ? ` (${result.error})` : "",
    result.problem ? `: ${result.problem}` : "",
    ` (${result.eventsChecked} checked).`,
  );
}

/** The columns, in order; each cell also carries its label, which narrow screens show beside the value (style.css). */
const columns = ["#", "When", "Event", "Actor", "Request", "Details", "SHA-256"] as const;

function cell(column: (typeof columns)[number], attrs: Record<string, string>, ...children: Child[]): HTMLTableCellElement {
  return h("td", { ...attrs, "data-label": column }, ...children);
}

function eventRow(event: AuditEvent): HTMLElement {
  const details = event.details === undefined || Object.keys(event.details).length === 0 ? "" : JSON.stringify(event.details);
  return h(
    "tr",
    { "data-testid": "audit-row", "data-sequence": String(event.sequence), class: event.flagged ? "flagged" : "" },
    cell("#", { class: "num seq" }, String(event.sequence)),
    cell("When", { class: "at" }, h("time", { datetime: timestampDate(event.at)?.toISOString() ?? "" }, when(timestampDate(event.at)))),
    cell("Event", { class: "type" }, auditTypeName(event.type), event.flagged ? [" ", h("span", { class: "badge risk-critical" }, "flagged")] : null),
    cell("Actor", { class: "mono" }, event.actor),
    cell("Request", { class: `mono${event.requestId ? "" : " empty-cell"}` }, event.requestId ? h("a", { href: `#/requests/${encodeURIComponent(event.requestId)}` }, event.requestId) : ""),
    cell("Details", { class: `mono details${details === "" ? " empty-cell" : ""}` }, details),
    cell("SHA-256", { class: "mono", title: hex(event.sha256) }, hex(event.sha256).slice(0, 12)),
  );
}

/** `#/audit` */
export const auditView: View = (main) => {
  const verifyBox = h("div", { "aria-live": "polite" }, h("p", { class: "hint" }, "Verifying the chain…"));
  const again = h("button", { type: "button", "data-testid": "audit-verify-again" }, "Verify again");
  const filter = h("input", { id: "audit-filter", type: "search", autocomplete: "off", placeholder: "request id, actor or event type", "data-testid": "audit-filter" });
  const body = h("tbody");
  const status = h("div", { role: "status" }, h("p", { class: "hint" }, "Loading…"));
  let events: AuditEvent[] = [];
  let closed = false;

  const draw = (): void => {
    const needle = filter.value.trim().toLowerCase();
    const shown = needle === "" ? events : events.filter((e) => [e.requestId, e.actor, auditTypeName(e.type)].some((text) => text.toLowerCase().includes(needle)));
    replaceChildren(body, [...shown].reverse().map(eventRow));
    replaceChildren(status, h("p", { class: "hint" }, `${shown.length} of the newest ${events.length} events, newest first.`));
  };
  const verify = (): void => {
    again.disabled = true;
    verifyAudit().then(
      (result) => {
        if (!closed) replaceChildren(verifyBox, verification(result));
      },
      (error: unknown) => {
        if (!closed) replaceChildren(verifyBox, alertBox(`Could not verify: ${error instanceof ApiError ? error.describe() : String(error)}`, "audit-verify-error"));
      },
    ).finally(() => {
      again.disabled = false;
    });
  };
  again.addEventListener("click", verify);
  filter.addEventListener("input", draw);

  replaceChildren(
    main,
    h(
      "section",
      { class: "view" },
      heading("Audit trail"),
      h("div", { class: "card verify-card" }, verifyBox, again),
      h("div", { class: "filters" }, h("div", { class: "field" }, h("label", { for: "audit-filter" }, "Filter"), filter)),
      status,
      h(
        "div",
        { class: "table-wrap", tabindex: 0, role: "region", "aria-label": "Audit events" },
        h(
          "table",
          { class: "audit", "data-testid": "audit-table" },
          h("thead", {}, h("tr", {}, columns.map((label) => h("th", { scope: "col" }, label)))),
          body,
        ),
      ),
    ),
  );
  verify();
  auditEvents(200).then(
    (list) => {
      if (closed) return;
      events = list;
      draw();
    },
    (error: unknown) => {
      if (!closed) replaceChildren(status, alertBox(error instanceof ApiError ? error.describe() : String(error)));
    },
  );
  return () => {
    closed = true;
  };
};
