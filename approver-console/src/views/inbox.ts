// The inbox: pending requests, newest first, live.
import type { RequestView } from "../api.js";
import { h, listNavigation, replaceChildren } from "../dom.js";
import { shortMethod } from "../format.js";
import { countdown, heading, needsMeBadge, riskBadge, sinceLabel, startClock, type View } from "../ui.js";
import { timestampDate } from "../format.js";

const onlyMineKey = "airlock.inbox.onlyMine";

function row(view: RequestView): HTMLElement {
  const request = view.record.request;
  const id = request?.id ?? "";
  const identity = request?.identity;
  return h(
    "li",
    { class: `row${view.needsMe ? " mine" : ""}`, "data-testid": "inbox-row", "data-request-id": id, "data-needs-me": String(view.needsMe) },
    h(
      "a",
      { class: "row-link", href: `#/requests/${encodeURIComponent(id)}`, "data-testid": "inbox-link" },
      h("span", { class: "row-top" }, riskBadge(request?.risk ?? 0), h("strong", { class: "method" }, shortMethod(request?.service ?? "", request?.method ?? "")), view.needsMe ? needsMeBadge() : null),
      h(
        "span",
        { class: "row-who" },
        h("span", { class: "agent" }, identity?.agent ?? "unknown agent"),
        identity?.onBehalfOf ? [" for ", h("span", { class: "human" }, identity.onBehalfOf)] : null,
        " on ",
        h("span", { class: "host" }, request?.host ?? "?"),
      ),
      request?.reason ? h("span", { class: "row-reason" }, `“${request.reason}”`) : h("span", { class: "row-reason none" }, "no reason given"),
      h("span", { class: "row-time" }, sinceLabel(timestampDate(request?.createdAt)), " · ", countdown(view.expiresAt)),
    ),
  );
}

export const inboxView: View = (main, app) => {
  const onlyMine = h("input", { type: "checkbox", id: "only-mine", "data-testid": "only-mine" });
  onlyMine.checked = localStorage.getItem(onlyMineKey) !== "false";
  const list = h("ul", { class: "rows", "data-testid": "inbox-list", "aria-label": "Pending requests" });
  const empty = h("p", { class: "empty", "data-testid": "inbox-empty", role: "status" });
  const status = h("p", { class: "hint", "aria-live": "polite" });

  const draw = (): void => {
    const all = app.live.pending();
    const shown = onlyMine.checked ? all.filter((view) => view.needsMe) : all;
    // Keep focus on the same request across a redraw.
    const focusedId = document.activeElement?.closest<HTMLElement>("[data-request-id]")?.dataset.requestId;
    replaceChildren(list, shown.map(row));
    if (focusedId !== undefined) list.querySelector<HTMLElement>(`[data-request-id="${CSS.escape(focusedId)}"] a`)?.focus();
    empty.hidden = shown.length > 0;
    empty.textContent = !app.live.ready && all.length === 0 ? "Loading…" : onlyMine.checked && all.length > 0 ? `Nothing needs you. ${all.length} pending for other reviewers.` : "Nothing is pending.";
    status.textContent = app.live.status === "live" ? "" : app.live.status === "reconnecting" ? "Connection lost; reconnecting…" : "Connecting…";
  };
  onlyMine.addEventListener("change", () => {
    localStorage.setItem(onlyMineKey, String(onlyMine.checked));
    draw();
  });

  replaceChildren(
    main,
    h(
      "section",
      { class: "view" },
      h("div", { class: "view-head" }, heading("Inbox"), h("label", { class: "toggle", for: "only-mine" }, onlyMine, " Only what needs me")),
      status,
      list,
      empty,
      // Keyboard hints: hidden on touch screens (style.css), where there is no keyboard to use them.
      h("p", { class: "hint keys", "data-testid": "keyboard-hint" }, h("kbd", {}, "j"), " / ", h("kbd", {}, "k"), " move, ", h("kbd", {}, "Enter"), " opens."),
    ),
  );
  draw();
  const stops = [app.live.subscribe(draw), startClock(list), listNavigation(list, "a.row-link")];
  return () => {
    for (const stop of stops) stop();
  };
};
