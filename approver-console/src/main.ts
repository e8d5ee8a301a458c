// The approver console: sign-in, then a hash-routed app over the reviewers' API.
import "./style.css";
import { getMe, listRequests, type Me, onSignedOut, session, signOut } from "./api.js";
import { h, replaceChildren } from "./dom.js";
import { LiveRequests } from "./live.js";
import type { AppContext, View } from "./ui.js";
import { auditView } from "./views/audit.js";
import { detailView } from "./views/detail.js";
import { historyView } from "./views/history.js";
import { inboxView } from "./views/inbox.js";
import { passkeysView } from "./views/passkeys.js";
import { renderSignIn } from "./views/signin.js";

const appName = "Airlock";

interface Route {
  readonly name: "inbox" | "request" | "history" | "audit" | "passkeys";
  readonly view: View;
  readonly label: string;
}

/** `#/inbox`, `#/requests/<id>`, `#/history?agent=…&outcome=…`, `#/audit`, `#/settings/passkeys`; anything else is the inbox. */
function parseRoute(hash: string): Route {
  const [path = "", query = ""] = hash.replace(/^#/, "").split("?", 2);
  const parts = path.split("/").filter((part) => part !== "");
  if (parts[0] === "requests" && parts[1] !== undefined) {
    const id = decodeURIComponent(parts[1]);
    return { name: "request", view: detailView(id), label: "Request" };
  }
  if (parts[0] === "history") return { name: "history", view: historyView(new URLSearchParams(query)), label: "History" };
  if (parts[0] === "audit") return { name: "audit", view: auditView, label: "Audit" };
  if (parts[0] === "settings" && parts[1] === "passkeys") return { name: "passkeys", view: passkeysView, label: "Passkeys" };
  return { name: "inbox", view: inboxView, label: "Inbox" };
}

function appRoot(): HTMLElement {
  const element = document.getElementById("app");
  if (element === null) throw new Error("index.html has no #app");
  return element;
}

const root = appRoot();

const main = h("main", { id: "main", tabindex: -1 });
let live: LiveRequests | undefined;
let stopView: (() => void) | undefined;
let stopShell: (() => void) | undefined;
let routeLabel = "Inbox";

function setTitle(): void {
  const count = live?.needCount() ?? 0;
  document.title = `${count > 0 ? `(${count}) ` : ""}${routeLabel} · ${appName}`;
}

function showRoute(app: AppContext, nav: HTMLElement): void {
  stopView?.();
  const route = parseRoute(location.hash);
  routeLabel = route.label;
  for (const link of nav.querySelectorAll<HTMLAnchorElement>("a[data-route]")) {
    if (link.dataset.route === route.name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  stopView = route.view(main, app);
  setTitle();
  // Move focus to the new view's heading, as a page load would, unless the view focused something itself.
  if (!main.contains(document.activeElement)) main.querySelector<HTMLElement>("h1")?.focus({ preventScroll: true });
}

function startApp(me: Me): void {
  const liveRequests = new LiveRequests(() => {
    // A failing stream may mean the session ended: a 401 here signs out through onSignedOut.
    getMe().catch(() => undefined);
  });
  live = liveRequests;
  const app: AppContext = { me, live: liveRequests };

  const needCount = h("span", { class: "count", "data-testid": "need-count", "aria-label": "requests that need you" }, "0");
  const liveStatus = h("span", { class: "live-status", "data-testid": "live-status", role: "status" });
  const signOutButton = h("button", { type: "button", class: "link-button", "data-testid": "sign-out" }, "Sign out");
  const nav = h(
    "nav",
    { "aria-label": "Main" },
    h("a", { href: "#/inbox", "data-route": "inbox", "data-testid": "nav-inbox" }, "Inbox ", needCount),
    h("a", { href: "#/history", "data-route": "history", "data-testid": "nav-history" }, "History"),
    h("a", { href: "#/audit", "data-route": "audit", "data-testid": "nav-audit" }, "Audit"),
    h("a", { href: "#/settings/passkeys", "data-route": "passkeys", "data-testid": "nav-passkeys" }, "Passkeys"),
  );
  const header = h(
    "header",
    { class: "topbar" },
    h("a", { class: "brand", href: "#/inbox" }, appName),
    nav,
    h("div", { class: "who" }, liveStatus, h("span", { class: "reviewer", "data-testid": "reviewer", title: me.groups.length > 0 ? `Groups: ${me.groups.join(", ")}` : "No groups" }, me.reviewer), signOutButton),
  );
  replaceChildren(root, h("a", { class: "skip", href: "#main" }, "Skip to content"), header, main);

  const paintShell = (): void => {
    const count = liveRequests.needCount();
    needCount.textContent = String(count);
    needCount.classList.toggle("zero", count === 0);
    liveStatus.dataset.status = liveRequests.status;
    liveStatus.textContent = liveRequests.status === "live" ? "live" : liveRequests.status === "reconnecting" ? "reconnecting…" : "connecting…";
    setTitle();
  };
  const onHash = (): void => showRoute(app, nav);
  // The skip link targets #main, which is not a route: focus main and put the route back.
  const onSkip = (event: MouseEvent): void => {
    event.preventDefault();
    main.focus();
  };
  root.querySelector<HTMLAnchorElement>("a.skip")?.addEventListener("click", onSkip);
  const unsubscribe = liveRequests.subscribe(paintShell);
  window.addEventListener("hashchange", onHash);
  signOutButton.addEventListener("click", () => {
    signOutButton.disabled = true;
    signOut().then(
      () => showSignIn("You are signed out."),
      () => showSignIn("Signed out here; the broker could not be told, so the cookie lasts until it expires."),
    );
  });
  stopShell = () => {
    unsubscribe();
    window.removeEventListener("hashchange", onHash);
    liveRequests.stop();
  };

  liveRequests.start();
  // The stream's snapshot is the truth; the list only fills the inbox sooner if the stream is slow.
  listRequests({ state: "pending" }).then((views) => liveRequests.seed(views), () => undefined);
  paintShell();
  showRoute(app, nav);
}

function stopApp(): void {
  stopView?.();
  stopView = undefined;
  stopShell?.();
  stopShell = undefined;
  live = undefined;
}

function showSignIn(notice?: string): void {
  stopApp();
  session.clear();
  routeLabel = "Sign in";
  setTitle();
  replaceChildren(root, main);
  renderSignIn(main, notice, (me) => startApp(me));
}

onSignedOut(() => {
  if (live !== undefined) showSignIn("Your session has ended. Sign in again.");
});

// A session cookie may be there (single sign-on lands here with one): ask the broker before showing anything.
getMe().then(
  (me) => startApp(me),
  () => showSignIn(),
);
