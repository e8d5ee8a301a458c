// Sign-in: "Sign in with <provider>" (single sign-on run by the broker). A pasted token is only
// offered where the broker allows it: dev mode's fixed tokens, or a broker without SSO.
import { ApiError, type Me, type SignInOptions, signIn, signInOptions } from "../api.js";
import { h, replaceChildren } from "../dom.js";
import { alertBox, heading } from "../ui.js";

/** Why the broker turned a single sign-on away (`?sso_error=<reason>` on its way back), in words. */
const ssoErrors: Readonly<Record<string, string>> = {
  not_a_reviewer: "You signed in, but you are in no reviewer group of this Airlock. Ask its administrators to add you.",
  state_mismatch: "That sign-in did not start in this browser, so it was refused. Start again here.",
  no_sign_in_in_progress: "That sign-in did not start in this browser, so it was refused. Start again here.",
  sign_in_expired: "The sign-in took too long. Start again.",
  code_rejected: "The identity provider did not accept the sign-in (it may have been used already). Start again.",
  sso_error: "The identity provider refused the sign-in.",
  idp_unavailable: "The identity provider cannot be reached. Try again in a moment.",
};

/** Reads and removes `?sso_error=` from the address, so a reload does not show it again. */
function takeSsoError(): string | undefined {
  const params = new URLSearchParams(location.search);
  const reason = params.get("sso_error");
  if (reason === null) return undefined;
  params.delete("sso_error");
  const search = params.toString();
  history.replaceState(null, "", `${location.pathname}${search === "" ? "" : `?${search}`}${location.hash}`);
  return `${ssoErrors[reason] ?? "The sign-in failed."} (${reason})`;
}

/** Draws the sign-in page into `main`; `onSignedIn` runs once a pasted token was accepted (SSO comes back by a page load). */
export function renderSignIn(main: HTMLElement, notice: string | undefined, onSignedIn: (me: Me) => void): void {
  const error = takeSsoError();
  const status = h("div", { "aria-live": "polite" }, error === undefined ? null : alertBox(error, "sso-error"));
  const body = h("div", { class: "signin-options" }, h("p", { class: "hint" }, "Loading sign-in…"));
  const title = heading("Sign in to review");
  replaceChildren(main, h("section", { class: "view narrow" }, title, notice === undefined ? null : h("p", { class: "notice", role: "status" }, notice), status, body));
  signInOptions().then(
    (options) => drawOptions(body, options, onSignedIn),
    (failure: unknown) => replaceChildren(body, alertBox(failure instanceof ApiError ? failure.describe() : String(failure), "sign-in-error")),
  );
}

function drawOptions(body: HTMLElement, options: SignInOptions, onSignedIn: (me: Me) => void): void {
  const parts: HTMLElement[] = [];
  if (options.sso !== undefined) {
    // Come back to the page the reviewer opened (a notification's deep link) after signing in.
    const loginUrl = `${options.sso.loginUrl}?return=${encodeURIComponent(location.hash === "" ? "#/inbox" : location.hash)}`;
    parts.push(
      h(
        "div",
        { class: "card signin" },
        h("a", { class: "button primary sso", href: loginUrl, "data-testid": "sso-sign-in" }, `Sign in with ${options.sso.provider}`),
        h("p", { class: "hint" }, "You sign in at your company's identity provider; Airlock never sees your password."),
      ),
    );
  }
  if (options.tokenSignIn) parts.push(tokenForm(options, onSignedIn));
  if (parts.length === 0) parts.push(alertBox("This broker offers no way to sign in to the console: its config needs reviewers.sso.", "sign-in-error"));
  replaceChildren(body, ...parts);
  const first = body.querySelector<HTMLElement>("a.sso, input");
  first?.focus();
}

function tokenForm(options: SignInOptions, onSignedIn: (me: Me) => void): HTMLElement {
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "data-testid": "token-input",
    "aria-describedby": "token-help",
  });
  const button = h("button", { type: "submit", class: options.sso === undefined ? "primary" : "", "data-testid": "sign-in" }, "Sign in with a token");
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card signin", "data-testid": "sign-in-form" },
    options.devMode ? h("p", { class: "notice", "data-testid": "dev-mode" }, "Dev mode: this broker accepts fixed reviewer tokens from its config. Never in production.") : null,
    h("label", { for: "token" }, "Reviewer token"),
    input,
    h("p", { id: "token-help", class: "hint" }, "A token your identity provider issued (an OIDC ID token), or a dev token. It is sent once to the broker, which keeps a session in an HttpOnly cookie."),
    button,
    status,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (token === "") {
      replaceChildren(status, alertBox("Paste a token first.", "sign-in-error"));
      input.focus();
      return;
    }
    button.disabled = true;
    replaceChildren(status, h("p", { class: "hint" }, "Signing in…"));
    signIn(token).then(
      (me) => onSignedIn(me),
      (error: unknown) => {
        button.disabled = false;
        const message = error instanceof ApiError ? (error.status === 401 ? `The broker did not accept that token: ${error.message}` : error.describe()) : String(error);
        replaceChildren(status, alertBox(message, "sign-in-error"));
        input.select();
      },
    );
  });
  return form;
}
