// Step-up by a fresh sign-in, in real Chromium against a real OpenID Provider (oidc-provider)
// and the whole stack: a reviewer with no passkey approves a step-up rule's request; the console
// sends her to the provider (prompt=login, max_age=0, the challenge as nonce), the broker casts
// the vote at the callback, and she lands on the request again. Attacked: a sign-in whose nonce
// is another challenge's, and one where the provider reused an earlier sign-in (old auth_time)
// because the browser dropped prompt=login and max_age; both are refused with a stable reason
// and cast nothing.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { Page, Route } from "playwright-core";
import t from "tap";
import { Sealer, sessionCsrfToken, sessionPurpose } from "../../broker/index.js";
import { readSessionKey } from "../../broker/reviewers/session.js";
import { launchBrowser, newPage, screenshot } from "../helpers/browser.js";
import { ssoUsers, startSsoStack } from "../helpers/sso.js";

if (!existsSync(fileURLToPath(new URL("../../approver-console/dist/index.html", import.meta.url)))) {
  throw new Error("approver-console/dist is missing: run `npm run build:console` first (`npm test` does)");
}

/** How old a sign-in may be to confirm a vote; short, so the stale case needs only a short wait. */
const maxAuthAgeMs = 20_000;
/** How old a sign-in may be to enrol a passkey. */
const enrolMaxAgeMs = 15_000;
const stack = await startSsoStack(t, {
  policy: { exportStepUp: true },
  // WebAuthn needs a secure context with a domain: the console at http://localhost.
  host: "localhost",
  stepUp: { rp_id: "localhost", max_auth_age: `${maxAuthAgeMs / 1000}s`, enrol_max_age: `${enrolMaxAgeMs / 1000}s` },
});
const consoleUrl = stack.brokerUrl.replace("127.0.0.1", "localhost");
const sealer = new Sealer([await readSessionKey(stack.sessionKeyFile, "test")]);
const browser = await launchBrowser(t);
const page = await newPage(t, browser);
page.setDefaultTimeout(30_000);
let lastLogin = 0;
let signedInAt = 0;

/** The provider's login page: fill in dana's password. */
async function logInAtProvider(page: Page): Promise<void> {
  await page.waitForURL(`${stack.op.issuer}/interaction/**`);
  await page.locator("#email").fill(ssoUsers.dana.email);
  await page.locator("#password").fill(ssoUsers.dana.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  lastLogin = Date.now();
}

/** A request as the API shows it, read with the page's session. */
async function requestState(id: string): Promise<{ state: string; votes: Array<{ reviewer: string; stepUp?: unknown }> }> {
  return page.evaluate(async (id) => {
    const view = (await (await fetch(`/api/v1/requests/${id}`)).json()) as { record: { state: string; votes?: Array<{ reviewer: string; stepUp?: unknown }> } };
    return { state: view.record.state, votes: view.record.votes ?? [] };
  }, id);
}

/** Opens the inbox row of the held call with this reason and returns the request id. */
async function openRequest(reason: string): Promise<string> {
  await page.goto(`${consoleUrl}/console/#/inbox`);
  const row = page.getByTestId("inbox-row").filter({ hasText: reason });
  await row.waitFor();
  await row.getByRole("link").click();
  await page.getByTestId("decision-form").waitFor();
  return (await page.getByTestId("detail").getAttribute("data-request-id")) ?? "";
}

/** Rewrites the next authorization request the browser sends to the provider. */
async function tamperWithAuthorization(change: (url: URL) => void): Promise<void> {
  const matches = (url: URL) => url.origin === stack.op.issuer && url.pathname === "/auth";
  const handler = async (route: Route) => {
    const url = new URL(route.request().url());
    change(url);
    await route.continue({ url: url.href });
  };
  await page.route(matches, handler, { times: 1 });
}

await t.test("dana signs in, has no passkey, and approves a step-up request by signing in again", async (t) => {
  await page.goto(`${consoleUrl}/console/`);
  await page.getByTestId("sso-sign-in").click();
  await logInAtProvider(page);
  signedInAt = lastLogin;
  await page.locator('[data-testid="live-status"][data-status="live"]').waitFor();
  const loginsBefore = stack.op.logins();

  const call = stack.callExportTable("quarterly export, step-up by sign-in");
  const id = await openRequest("quarterly export, step-up by sign-in");
  t.match(await page.getByTestId("step-up-hint").textContent(), /step-up/i, "the form says in advance that approving needs a step-up");
  await page.getByTestId("reason-input").fill("checked with finance");
  await page.getByTestId("approve-button").click();
  await logInAtProvider(page);
  t.pass("Approve took her to the provider's login page, although she has a session there");
  await page.getByTestId("decision-result").filter({ hasText: /^You approved it\./ }).waitFor();
  t.match(page.url(), new RegExp(`/console/#/requests/${id}$`), "back on the request she approved (the deep link survives; the outcome is taken off the address)");
  t.equal(stack.op.logins(), loginsBefore + 1, "the provider asked for her password again");
  const outcome = await call;
  t.equal(outcome.code, 0, `the agent's export ran (${outcome.details})`);
  const record = await requestState(id);
  t.equal(record.votes.length, 1);
  t.match(record.votes[0], { reviewer: "dana@example.com", stepUp: "oidc" }, "the vote is confirmed by a fresh sign-in");
  await page.getByTestId("vote-step-up").filter({ hasText: "confirmed with a fresh sign-in" }).waitFor();
  await screenshot(t, page, "step-up-fresh-sign-in");
});

await t.test("a sign-in for another challenge, and a reused earlier sign-in, confirm nothing; a real one then does", async (t) => {
  const reason = "export attacked through the sign-in";
  const call = stack.callExportTable(reason);
  const id = await openRequest(reason);

  // Said in advance, on a phone too: a label at the top of the request, and the hint by the buttons.
  await page.setViewportSize({ width: 390, height: 844 });
  const badge = page.getByTestId("step-up-badge");
  await badge.waitFor();
  t.equal(await badge.textContent(), "Step-up to approve", "the request carries a step-up label");
  const box = await badge.boundingBox();
  t.ok(box !== null && box.y >= 0 && box.y + box.height <= 844 && box.x + box.width <= 390, `the label is on the first screen at 390x844 (${JSON.stringify(box)})`);
  t.match(await badge.getAttribute("title"), /passkey, or a fresh sign-in/, "it says what confirms the approval");
  await screenshot(t, page, "step-up-label-390");
  await page.setViewportSize({ width: 1280, height: 800 });

  // Another challenge: the same request's challenge for the other verdict (a real one, from the broker).
  const other = await page.evaluate(async (id) => {
    const response = await fetch(`/api/v1/requests/${id}/step-up`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-airlock-csrf": (globalThis as unknown as { sessionStorage: { getItem(key: string): string | null } }).sessionStorage.getItem("airlock.csrf") ?? "" },
      body: JSON.stringify({ approve: false }),
    });
    return ((await response.json()) as { challenge: string }).challenge;
  }, id);
  t.match(other, /^[A-Za-z0-9_-]{40,}$/, "a challenge for the other verdict");
  await tamperWithAuthorization((url) => url.searchParams.set("nonce", other));
  await page.getByTestId("approve-button").click();
  await logInAtProvider(page);
  await page.getByTestId("step-up-error").waitFor();
  t.match(await page.getByTestId("step-up-error").textContent(), /\(nonce_mismatch\)/, "refused: the ID token's nonce is not this vote's challenge");
  t.match(page.url(), new RegExp(`/console/#/requests/${id}$`), "and back on the request");
  t.same(await requestState(id), { state: "REQUEST_STATE_PENDING", votes: [] }, "nothing was cast");

  // A reused sign-in: wait until dana's last password entry is older than max_auth_age.
  while (Date.now() - lastLogin <= maxAuthAgeMs + 1000) await new Promise((resolve) => setTimeout(resolve, 250));
  const loginsBefore = stack.op.logins();
  await tamperWithAuthorization((url) => {
    url.searchParams.delete("prompt");
    url.searchParams.delete("max_age");
  });
  await page.getByTestId("approve-button").click();
  await page.getByTestId("step-up-error").filter({ hasText: "step_up_stale_authentication" }).waitFor();
  t.equal(stack.op.logins(), loginsBefore, "the provider reused its session: no password was asked");
  t.pass("refused as step_up_stale_authentication: the ID token's auth_time is too old");
  t.same(await requestState(id), { state: "REQUEST_STATE_PENDING", votes: [] }, "nothing was cast");
  await screenshot(t, page, "step-up-refused");

  await page.getByTestId("approve-button").click();
  await logInAtProvider(page);
  await page.getByTestId("decision-result").filter({ hasText: /^You approved it\./ }).waitFor();
  t.equal((await call).code, 0, "a real fresh sign-in then approves it");
});

await t.test("a stolen or old session cannot enrol a passkey; the console sends the reviewer through a fresh sign-in first", async (t) => {
  // A session sealed with the broker's own key, signed in an hour ago and still valid: what a stolen cookie is.
  const now = Date.now();
  const old = { sid: "stolen-session-0001", reviewer: "dana@example.com", groups: ["data-owners"], iat: now - 3_600_000, authAt: now - 3_600_000, exp: now + 3_600_000, via: "sso" as const };
  const cookie = `airlock_session=${sealer.seal(sessionPurpose, old)}`;
  const options = await fetch(`${stack.brokerUrl}/api/v1/passkeys/options`, {
    method: "POST",
    headers: { cookie, "content-type": "application/json", "x-airlock-csrf": sessionCsrfToken(old) },
    body: "{}",
  });
  t.equal(options.status, 403, "registration options are refused");
  t.match(await options.json(), { code: "permission_denied", details: { reason: "fresh_sign_in_required" } }, "with a stable reason");
  const register = await fetch(`${stack.brokerUrl}/api/v1/passkeys`, {
    method: "POST",
    headers: { cookie, "content-type": "application/json", "x-airlock-csrf": sessionCsrfToken(old) },
    body: JSON.stringify({ challengeId: "AAAAAAAAAAAAAAAAAAAAAAAA", response: { id: "AAAAAAAAAAAAAAAAAAAAAAAA" } }),
  });
  t.equal(register.status, 403, "and so is a registration");
  const passkeys = (await (await fetch(`${stack.brokerUrl}/api/v1/passkeys`, { headers: { cookie } })).json()) as { passkeys: unknown[] };
  t.same(passkeys.passkeys, [], "no passkey was enrolled");

  // Dana's own session is older than enrol_max_age by now: the console takes her through the provider again.
  while (Date.now() - signedInAt <= enrolMaxAgeMs + 1000) await new Promise((resolve) => setTimeout(resolve, 250));
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("WebAuthn.enable");
  const { authenticatorId } = await cdp.send("WebAuthn.addVirtualAuthenticator", {
    options: { protocol: "ctap2", transport: "internal", hasResidentKey: true, hasUserVerification: true, isUserVerified: true, automaticPresenceSimulation: true },
  });
  await page.goto(`${consoleUrl}/console/#/settings/passkeys`);
  await page.getByTestId("no-passkeys").waitFor();
  const loginsBefore = stack.op.logins();
  await page.getByTestId("add-passkey").click();
  await logInAtProvider(page);
  t.equal(stack.op.logins(), loginsBefore + 1, "the provider asked for her password again");
  await page.getByTestId("no-passkeys").waitFor();
  t.match(page.url(), /#\/settings\/passkeys$/, "back on the passkeys page");
  await page.getByTestId("passkey-name").fill("after a fresh sign-in");
  await page.getByTestId("add-passkey").click();
  await page.getByTestId("passkey-added").waitFor();
  const { credentials } = await cdp.send("WebAuthn.getCredentials", { authenticatorId });
  t.equal(credentials.length, 1, "the passkey is enrolled after the fresh sign-in");

  // Now that she has one, the stolen cookie may ask for options, but cannot add a passkey without confirming it with hers.
  const further = await fetch(`${stack.brokerUrl}/api/v1/passkeys/options`, { method: "POST", headers: { cookie, "content-type": "application/json", "x-airlock-csrf": sessionCsrfToken(old) }, body: "{}" });
  const furtherOptions = (await further.json()) as { challengeId: string; passkey?: unknown };
  t.ok(furtherOptions.passkey, "the options ask for a confirmation with her passkey");
  const thief = await fetch(`${stack.brokerUrl}/api/v1/passkeys`, {
    method: "POST",
    headers: { cookie, "content-type": "application/json", "x-airlock-csrf": sessionCsrfToken(old) },
    body: JSON.stringify({ challengeId: furtherOptions.challengeId, response: { id: "BBBBBBBBBBBBBBBBBBBBBBBB", type: "public-key" }, name: "thief's key" }),
  });
  t.equal(thief.status, 403);
  t.match(await thief.json(), { code: "step_up_required", details: { causes: ["new_passkey"] } }, "an old session adds no further passkey without her passkey's confirmation");
  const listed = (await (await fetch(`${stack.brokerUrl}/api/v1/passkeys`, { headers: { cookie } })).json()) as { passkeys: unknown[] };
  t.equal(listed.passkeys.length, 1, "still one passkey");
});
