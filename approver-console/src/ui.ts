// Small pieces shared by the views.
import type { Risk } from "../../proto/gen/airlock/v1/approval_pb.js";
import type { RequestState } from "../../proto/gen/airlock/v1/reviewer_pb.js";
import type { LiveRequests } from "./live.js";
import type { Me } from "./api.js";
import { h } from "./dom.js";
import { ago, durationWords, riskName, stateName, when } from "./format.js";

/** What every view gets from the app. */
export interface AppContext {
  readonly me: Me;
  readonly live: LiveRequests;
}

/** A view draws itself into `main` and returns what undoes its timers and listeners. */
export type View = (main: HTMLElement, app: AppContext) => () => void;

/** The risk as a coloured badge that also says it in words (colour is never the only cue). */
export function riskBadge(risk: Risk): HTMLElement {
  const name = riskName(risk);
  return h("span", { class: `badge risk risk-${name}`, "data-testid": "risk", "data-risk": name, title: `Risk: ${name}` }, name);
}

export function stateBadge(state: RequestState): HTMLElement {
  const name = stateName(state);
  return h("span", { class: `badge state state-${name}`, "data-testid": "state", "data-state": name }, name);
}

export function needsMeBadge(): HTMLElement {
  return h("span", { class: "badge needs-me", "data-testid": "needs-me" }, "needs you");
}

/**
 * An element whose text is the time left until `until`, labelled ("decide within 58 min"),
 * kept current by {@link startClock}; its title is the deadline with its zone.
 */
export function countdown(until: Date | undefined, attrs: Record<string, string> = {}): HTMLElement {
  const element = h("span", { ...attrs, class: "countdown", "data-until": until?.toISOString(), title: until === undefined ? undefined : `Expires ${when(until)}` });
  paintCountdown(element);
  return element;
}

/** An element whose text is how long ago `since` was, kept current by {@link startClock}. */
export function sinceLabel(since: Date | undefined): HTMLElement {
  return h("time", { class: "ago", "data-since": since?.toISOString(), datetime: since?.toISOString(), title: when(since) }, ago(since));
}

function paintCountdown(element: HTMLElement): void {
  const until = element.dataset.until;
  const date = until === undefined ? undefined : new Date(until);
  const ms = date === undefined ? Infinity : date.getTime() - Date.now();
  element.textContent = date === undefined ? "no deadline" : ms <= 0 ? "expired" : `decide within ${durationWords(ms)}`;
  element.classList.toggle("soon", ms < 60_000);
  element.classList.toggle("expired", ms <= 0);
}

/** Updates every countdown and "ago" label under `root` once a second. Returns the stop function. */
export function startClock(root: HTMLElement): () => void {
  const timer = setInterval(() => {
    for (const element of root.querySelectorAll<HTMLElement>("[data-until]")) paintCountdown(element);
    for (const element of root.querySelectorAll<HTMLElement>("[data-since]")) {
      const since = element.dataset.since;
      element.textContent = ago(since === undefined ? undefined : new Date(since));
    }
  }, 1000);
  return () => clearInterval(timer);
}

/** A view's heading, focusable so that a route change can move focus (and screen readers) to it. */
export function heading(text: string): HTMLHeadingElement {
  return h("h1", { tabindex: -1, class: "view-title" }, text);
}

/** An error message read out when it appears. */
export function alertBox(message: string, testid = "error"): HTMLElement {
  return h("p", { class: "alert", role: "alert", "data-testid": testid }, message);
}
