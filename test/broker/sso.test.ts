// Single sign-on at the broker, attacked: a real OpenID Provider (oidc-provider), a real broker,
// the sign-in played over HTTP. Forged and tampered session cookies, a wrong state, a replayed
// code, ID tokens from another issuer or for another client, and expired sessions are each
// refused with a stable code. Browser sign-in is in test/console/sso.test.ts.
import { randomBytes } from "node:crypto";
import t from "tap";
import { openSession, Sealer, sessionPurpose } from "../../broker/index.js";
import { readSessionKey } from "../../broker/reviewers/session.js";
import { AirlockError, codeName } from "../../common/errors.js";
import { approveDevice, FormBrowser, type OidcProviderServer, startOidcProvider, waitUntil } from "../../harness/index.js";
import { signInUntilCallback, signInWithoutBrowser, ssoClients, ssoUsers, startSsoStack } from "../helpers/sso.js";

// Provider tokens live 3 s, so refreshes are due soon; sessions end 15 s after sign-in.
const stack = await startSsoStack(t, { tokenTtlSec: 3, maxAge: "15s", secondReplica: true });
const sealer = new Sealer([await readSessionKey(stack.sessionKeyFile, "test")]);

/** Another tenant of the same multi-tenant provider: same signing key, another issuer. */
const otherTenant = await startOidcProvider({ users: Object.values(ssoUsers), clients: [{ clientId: ssoClients.cli }], signingKey: stack.op.signingKey });
t.teardown(() => otherTenant.stop());

async function me(session: string, extra: Record<string, string> = {}): Promise<{ status: number; body: { code?: string; reviewer?: string; csrfToken?: string; details?: { reason?: string } }; setCookie: string[] }> {
  const response = await fetch(`${stack.brokerUrl}/api/v1/me`, { headers: { cookie: `airlock_session=${session}`, ...extra } });
  return { status: response.status, body: (await response.json()) as never, setCookie: response.headers.getSetCookie() };
}

async function bearerMe(token: string): Promise<{ status: number; reason: string | undefined }> {
  const response = await fetch(`${stack.brokerUrl}/api/v1/me`, { headers: { authorization: `Bearer ${token}` } });
  const body = (await response.json()) as { details?: { reason?: string } };
  return { status: response.status, reason: body.details?.reason };
}

/** An ID token from `op` for `clientId`, through the device flow with the user approving. */
async function deviceIdToken(op: OidcProviderServer, clientId: string, user: { email: string; password: string }): Promise<string> {
  const started = (await (await fetch(`${op.issuer}/device/auth`, { method: "POST", body: new URLSearchParams({ client_id: clientId, scope: "openid email groups" }) })).json()) as { device_code: string; verification_uri_complete: string };
  await approveDevice(started.verification_uri_complete, user);
  const tokens = (await (await fetch(`${op.issuer}/token`, { method: "POST", body: new URLSearchParams({ client_id: clientId, grant_type: "urn:ietf:params:oauth:grant-type:device_code", device_code: started.device_code }) })).json()) as { id_token?: string };
  if (tokens.id_token === undefined) throw new Error("no ID token");
  return tokens.id_token;
}

function ssoError(location: string | null): string | null {
  return location === null ? null : new URL(location, stack.brokerUrl).searchParams.get("sso_error");
}

await t.test("the console advertises SSO; a pasted token is refused for people", async (t) => {
  const options = (await (await fetch(`${stack.brokerUrl}/api/v1/sso`)).json()) as { sso: { provider: string; cliClientId: string } | null; tokenSignIn: boolean };
  t.equal(options.sso?.provider, stack.providerName);
  t.equal(options.sso?.cliClientId, ssoClients.cli, "airlock login learns the CLI's client here");
  t.equal(options.tokenSignIn, false, "no token form in the console");
  const token = await deviceIdToken(stack.op, ssoClients.cli, ssoUsers.dana);
  const response = await fetch(`${stack.brokerUrl}/api/v1/session`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ token }) });
  const body = (await response.json()) as { code: string; details: { reason: string } };
  t.equal(response.status, 403);
  t.equal(body.details.reason, "sso_required", "pasting stays for machines");
  t.equal((await bearerMe(token)).status, 200, "the same token works as a bearer token (API, CLI)");
});

await t.test("dana signs in through the provider and gets a sealed session that any replica can read", async (t) => {
  const { session, location } = await signInWithoutBrowser(stack, ssoUsers.dana);
  t.equal(location, "/console/#/inbox", "back to the console route she started from");
  t.ok(session.startsWith("v1."), "the cookie is sealed");
  t.notMatch(Buffer.from(session.slice(3), "base64url").toString("latin1"), /dana/, "and says nothing readable about who she is");
  const answer = await me(session);
  t.equal(answer.status, 200);
  t.equal(answer.body.reviewer, "dana@example.com");
  t.match(answer.body.csrfToken, /^[0-9a-f]{64}$/, "the console learns its CSRF token from /me");
  const opened = openSession(sealer, session);
  t.same(opened.groups, ["data-owners"], "groups from the provider's groups claim");
  t.ok(opened.refreshToken !== undefined, "the provider's refresh token is kept, sealed");
  t.ok(opened.exp - opened.iat <= 15_000, "the session ends by config (max_age), not with the 3 s provider token");
});

await t.test("sessions need no sticky routing: a sign-in started on one replica ends on the other, and both read the session", async (t) => {
  const second = stack.secondBrokerUrl ?? "";
  const { browser, callback } = await signInUntilCallback(stack, ssoUsers.sam, undefined, second);
  // The sign-in cookie was made by replica 2; the provider sends the browser to the public address (replica 1).
  t.equal(callback.origin, stack.brokerUrl, "the callback lands on the other replica");
  // Behind a load balancer both replicas are one origin: the browser sends replica 2's cookie to replica 1.
  browser.cookies(stack.brokerUrl).set("airlock_sso", browser.cookies(second).get("airlock_sso") ?? "");
  const response = await browser.request(callback);
  t.equal(response.headers.get("location"), "/console/#/inbox", "which finishes the sign-in replica 2 began");
  const session = browser.cookies(stack.brokerUrl).get("airlock_session") ?? "";
  const onSecond = await fetch(`${second}/api/v1/me`, { headers: { cookie: `airlock_session=${session}` } });
  t.equal(onSecond.status, 200, "replica 2 reads the session replica 1 sealed");
  t.equal(((await onSecond.json()) as { reviewer: string }).reviewer, "sam@example.com");
});

await t.test("Entra ID style groups: an object id in the groups claim maps to a group name", async (t) => {
  const { session } = await signInWithoutBrowser(stack, ssoUsers.erin);
  t.same(openSession(sealer, session).groups, ["security"], "8a1b2c3d-… → security (group_map)");
  t.equal((await me(session)).status, 200, "so erin is a reviewer, as a member of security");
});

await t.test("a person in no reviewer group is refused at the callback", async (t) => {
  const { browser, callback } = await signInUntilCallback(stack, ssoUsers.mallory);
  const response = await browser.request(callback);
  t.equal(response.status, 303);
  t.equal(ssoError(response.headers.get("location")), "not_a_reviewer");
  t.equal(browser.cookies(stack.brokerUrl).get("airlock_session"), undefined, "no session");
});

await t.test("a forged or tampered session cookie is refused with bad_session", async (t) => {
  const { session } = await signInWithoutBrowser(stack, ssoUsers.dana);
  const bytes = Buffer.from(session.slice(3), "base64url");
  bytes[20] = (bytes[20] ?? 0) ^ 1;
  const tampered = `v1.${bytes.toString("base64url")}`;
  let answer = await me(tampered);
  t.equal(answer.status, 401, "one flipped bit");
  t.equal(answer.body.details?.reason, "bad_session");
  t.ok(answer.setCookie.some((c) => /^airlock_session=;.*Max-Age=0/.test(c)), "and the bad cookie is cleared");

  const forged = new Sealer([randomBytes(32)]).seal(sessionPurpose, { sid: "x", reviewer: "sam@example.com", groups: ["security"], iat: Date.now(), exp: Date.now() + 3_600_000, via: "sso" });
  answer = await me(forged);
  t.equal(answer.status, 401, "sealed with another key: sam's groups claimed by someone without the key");
  t.equal(answer.body.details?.reason, "bad_session");

  const otherPurpose = sealer.seal("sso", { sid: "x", reviewer: "sam@example.com", groups: ["security"], iat: Date.now(), exp: Date.now() + 3_600_000, via: "sso" });
  answer = await me(otherPurpose);
  t.equal(answer.body.details?.reason, "bad_session", "a value sealed with the right key for another purpose (the sign-in cookie) is no session");

  answer = await me("dana@example.com");
  t.equal(answer.body.details?.reason, "bad_session", "a plain value");

  // A write with a valid session but without its CSRF token.
  const response = await fetch(`${stack.brokerUrl}/api/v1/requests/bulk-deny`, { method: "POST", headers: { cookie: `airlock_session=${session}`, "content-type": "application/json" }, body: JSON.stringify({ reason: "x", olderThan: "1h" }) });
  const body = (await response.json()) as { details: { reason: string } };
  t.equal(response.status, 403);
  t.equal(body.details.reason, "csrf");
});

await t.test("a callback with a wrong state, without the sign-in cookie, or after a provider error is refused", async (t) => {
  const { browser, callback } = await signInUntilCallback(stack, ssoUsers.dana);
  const wrongState = new URL(callback);
  wrongState.searchParams.set("state", "an-attackers-state");
  let response = await browser.request(wrongState);
  t.equal(response.status, 303);
  t.equal(ssoError(response.headers.get("location")), "state_mismatch");
  t.equal(browser.cookies(stack.brokerUrl).get("airlock_session"), undefined, "no session");

  // Login CSRF: the attacker's own callback URL, opened in the victim's browser (no sign-in in flight there).
  const victim = new FormBrowser();
  response = await victim.request(callback);
  t.equal(ssoError(response.headers.get("location")), "no_sign_in_in_progress");
  t.equal(victim.cookies(stack.brokerUrl).get("airlock_session"), undefined);

  const { browser: third, callback: thirdCallback } = await signInUntilCallback(stack, ssoUsers.dana);
  const denied = new URL(thirdCallback);
  denied.search = new URLSearchParams({ error: "access_denied", state: thirdCallback.searchParams.get("state") ?? "", iss: stack.op.issuer }).toString();
  response = await third.request(denied);
  t.equal(ssoError(response.headers.get("location")), "sso_error", "the provider said no");
});

await t.test("a replayed authorization code is refused", async (t) => {
  const { browser, callback } = await signInUntilCallback(stack, ssoUsers.dana);
  const sealedSignIn = browser.cookies(stack.brokerUrl).get("airlock_sso") ?? "";
  let response = await browser.request(callback);
  t.equal(response.status, 303);
  t.equal(response.headers.get("location"), "/console/#/inbox", "the first use signs in");
  t.equal(browser.cookies(stack.brokerUrl).get("airlock_sso"), undefined, "the sign-in cookie is spent");

  // The attacker replays the same callback with the same sign-in cookie (say, from a proxy log).
  const attacker = new FormBrowser();
  attacker.cookies(stack.brokerUrl).set("airlock_sso", sealedSignIn);
  response = await attacker.request(callback);
  t.equal(ssoError(response.headers.get("location")), "code_rejected", "the provider refuses a used code");
  t.equal(attacker.cookies(stack.brokerUrl).get("airlock_session"), undefined, "no session for the attacker");
});

await t.test("ID tokens from another issuer or for another client are refused", async (t) => {
  const foreignTenant = await deviceIdToken(otherTenant, ssoClients.cli, ssoUsers.dana);
  t.same(await bearerMe(foreignTenant), { status: 401, reason: "wrong_issuer" }, "another tenant of the same provider, same signing key: refused as a bearer token");
  const otherClient = await deviceIdToken(stack.op, ssoClients.other, ssoUsers.dana);
  t.same(await bearerMe(otherClient), { status: 401, reason: "wrong_audience" }, "a token made for another app");

  const { SsoClient } = await import("../../broker/index.js");
  const rp = new SsoClient({ providerName: "x", issuer: stack.op.issuer, clientId: ssoClients.console, scopes: ["openid"], reviewerClaim: "email", groupsClaim: "groups", groupMap: {}, clockToleranceSec: 0 });
  const refusal = (token: string) =>
    rp.verifyIdToken(token, undefined).then(
      () => "accepted",
      (error: unknown) => (error instanceof AirlockError ? `${codeName(error.code)}/${String(error.details.reason)}` : String(error)),
    );
  t.equal(await refusal(foreignTenant), "unauthenticated/wrong_issuer", "the console's relying party refuses another issuer's ID token");
  t.equal(await refusal(await deviceIdToken(stack.op, ssoClients.cli, ssoUsers.dana)), "unauthenticated/wrong_audience", "and one for another client");
});

await t.test("silent refresh at the provider; sign-out revokes it; sessions expire by config", async (t) => {
  const { session } = await signInWithoutBrowser(stack, ssoUsers.dana);
  const first = openSession(sealer, session);
  // Wait for the provider's 3 s tokens to be due, then any request refreshes the session.
  t.ok(await waitUntil(async () => Date.now() > (first.refreshAt ?? 0), 10_000, 100), "the provider's token is due");
  const refreshed = await me(session);
  t.equal(refreshed.status, 200, "still signed in after the provider's token expired");
  const fresh = refreshed.setCookie.find((c) => c.startsWith("airlock_session=v1."));
  t.ok(fresh, "a refreshed session cookie came back");
  const renewed = openSession(sealer, (fresh ?? "").split(";")[0]?.slice("airlock_session=".length) ?? "");
  t.ok((renewed.refreshAt ?? 0) > (first.refreshAt ?? 0), "with the new token's expiry");
  t.equal(renewed.exp, first.exp, "the session's end does not move");
  t.equal(renewed.sid, first.sid);

  // Sign-out revokes the refresh token: a copy of the old cookie cannot be refreshed any more.
  const copy = (fresh ?? "").split(";")[0]?.slice("airlock_session=".length) ?? "";
  const out = await fetch(`${stack.brokerUrl}/api/v1/session`, { method: "DELETE", headers: { cookie: `airlock_session=${copy}` } });
  t.equal(out.status, 204);
  t.ok(out.headers.getSetCookie().some((c) => /^airlock_session=;.*Max-Age=0/.test(c)), "the cookie is cleared");
  t.ok(await waitUntil(async () => Date.now() > (renewed.refreshAt ?? 0), 10_000, 100));
  const stolen = await me(copy);
  t.equal(stolen.status, 401, "the copy dies at its next refresh");
  t.equal(stolen.body.details?.reason, "refresh_failed");

  // Past max_age (15 s after sign-in) a session is over, whatever its tokens.
  const { session: later } = await signInWithoutBrowser(stack, ssoUsers.sam);
  const ends = openSession(sealer, later).exp;
  t.ok(await waitUntil(async () => Date.now() > ends, 20_000, 100), "the session's end passes");
  const expired = await me(later);
  t.equal(expired.status, 401);
  t.equal(expired.body.details?.reason, "session_expired");
  const old = sealer.seal(sessionPurpose, { sid: "s", reviewer: "dana@example.com", groups: ["data-owners"], iat: Date.now() - 7_200_000, exp: Date.now() - 3_600_000, via: "sso" });
  t.equal((await me(old)).body.details?.reason, "session_expired", "a properly sealed but expired session");
});
