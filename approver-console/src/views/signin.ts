// Sign-in: a reviewer token (an OIDC token, or a static dev token) becomes a session cookie.
import { ApiError, type Me, signIn } from "../api.js";
import { h, replaceChildren } from "../dom.js";
import { alertBox, heading } from "../ui.js";

/** Draws the sign-in form into `main`; `onSignedIn` runs once the broker accepted the token. */
export function renderSignIn(main: HTMLElement, notice: string | undefined, onSignedIn: (me: Me) => void): void {
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
  const button = h("button", { type: "submit", class: "primary", "data-testid": "sign-in" }, "Sign in");
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card signin", "data-testid": "sign-in-form" },
    h("label", { for: "token" }, "Reviewer token"),
    input,
    h("p", { id: "token-help", class: "hint" }, "Paste the token your identity provider issued (an OIDC ID or access token). It is sent once to the broker, which keeps it in an HttpOnly cookie."),
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
  const title = heading("Sign in to review");
  replaceChildren(main, h("section", { class: "view narrow" }, title, notice === undefined ? null : h("p", { class: "notice", role: "status" }, notice), form));
  input.focus();
}
