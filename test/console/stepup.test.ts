// Step-up bound to the action, in headless Chromium with the DevTools Protocol's virtual
// authenticator, against the whole stack (real NATS, Vault, PostgreSQL, broker, sidecar):
// a reviewer registers a passkey in the console and approves a step-up rule's request with
// it; votes without step-up, replayed assertions and assertions made for another request or
// the other verdict are refused; the vote's audit event carries the assertion as receipt.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { Page } from "playwright-core";
import t from "tap";
import { stepUpChallenge } from "../../broker/index.js";
import { launchBrowser, newPage, screenshot } from "../helpers/browser.js";
import { startStack } from "../helpers/stack.js";

if (!existsSync(fileURLToPath(new URL("../../approver-console/dist/index.html", import.meta.url)))) {
  throw new Error("approver-console/dist is missing: run `npm run build:console` first (`npm test` does)");
}

const stack = await startStack(t, {
  policy: { exportStepUp: true },
  brokerConfig: {
    reviewers: {
      auth: { kind: "static", tokens: [{ token: "dana-dev-token-0001", reviewer: "dana@example.com", groups: ["data-owners"] }] },
      // WebAuthn needs a secure context: http://localhost is one, and `localhost` is the RP id.
      step_up: { rp_id: "localhost", challenge_ttl: "5m" },
    },
  },
});
const dana = stack.tokens.dana;
// The console at localhost (the broker listens on 127.0.0.1; Chromium resolves localhost to loopback).
const consoleUrl = stack.brokerUrl.replace("127.0.0.1", "localhost");
const browser = await launchBrowser(t);

interface Answer {
  readonly status: number;
  readonly body: Record<string, unknown>;
}

async function api(method: string, path: string, body?: unknown): Promise<Answer> {
  const response = await fetch(`${stack.brokerUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${dana}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await response.text();
  return { status: response.status, body: text === "" ? {} : (JSON.parse(text) as Record<string, unknown>) };
}

interface PendingView {
  readonly record: { readonly request: { readonly id: string; readonly reason: string; readonly requestSha256: string; readonly stepUp?: { readonly required?: boolean } }; readonly state: string };
}

/** Waits until the held call with this reason is a pending request, and returns it. */
async function pending(reason: string): Promise<PendingView> {
  for (;;) {
    const answer = await api("GET", "/api/v1/requests?state=pending");
    const found = (answer.body.requests as PendingView[]).find((view) => view.record.request.reason === reason);
    if (found !== undefined) return found;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * Answers a step-up challenge with the page's passkey (the virtual authenticator), as the
 * console would, and returns the assertion as WebAuthn JSON. (A string, evaluated in the
 * page: this file has no DOM types.)
 */
async function assertion(page: Page, options: unknown): Promise<Record<string, unknown>> {
  return page.evaluate<Record<string, unknown>>(`(async () => {
    const options = ${JSON.stringify(options)};
    const bytes = (text) => Uint8Array.from(atob(text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4)), (c) => c.charCodeAt(0));
    const text = (buffer) => btoa(String.fromCharCode(...new Uint8Array(buffer))).replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
    const credential = await navigator.credentials.get({ publicKey: {
      challenge: bytes(options.challenge),
      rpId: options.rpId,
      allowCredentials: options.allowCredentials.map((c) => ({ type: "public-key", id: bytes(c.id) })),
      userVerification: options.userVerification,
    } });
    const r = credential.response;
    return { id: credential.id, rawId: text(credential.rawId), type: credential.type, clientExtensionResults: {}, response: {
      authenticatorData: text(r.authenticatorData), clientDataJSON: text(r.clientDataJSON), signature: text(r.signature),
      ...(r.userHandle ? { userHandle: text(r.userHandle) } : {}) } };
  })()`);
}

/** Makes a passkey on the page's authenticator for WebAuthn creation options, as registration JSON. */
async function creation(page: Page, options: unknown): Promise<Record<string, unknown>> {
  return page.evaluate<Record<string, unknown>>(`(async () => {
    const options = ${JSON.stringify(options)};
    const bytes = (text) => Uint8Array.from(atob(text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4)), (c) => c.charCodeAt(0));
    const text = (buffer) => btoa(String.fromCharCode(...new Uint8Array(buffer))).replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
    const credential = await navigator.credentials.create({ publicKey: {
      ...options,
      challenge: bytes(options.challenge),
      user: { ...options.user, id: bytes(options.user.id) },
      excludeCredentials: options.excludeCredentials.map((c) => ({ type: "public-key", id: bytes(c.id) })),
    } });
    const r = credential.response;
    return { id: credential.id, rawId: text(credential.rawId), type: credential.type, clientExtensionResults: {}, response: {
      attestationObject: text(r.attestationObject), clientDataJSON: text(r.clientDataJSON), transports: r.getTransports() } };
  })()`);
}

/** A challenge for dana's vote on `id`, and the passkey's answer to it. */
async function stepUpFor(page: Page, id: string, approve: boolean): Promise<{ challengeId: string; passkey: Record<string, unknown> }> {
  const challenge = await api("POST", `/api/v1/requests/${id}/step-up`, { approve });
  if (challenge.status !== 200) throw new Error(`step-up challenge: ${challenge.status} ${JSON.stringify(challenge.body)}`);
  return { challengeId: challenge.body.challengeId as string, passkey: await assertion(page, challenge.body.passkey) };
}

const page = await newPage(t, browser);
page.setDefaultTimeout(20_000);
const cdp = await page.context().newCDPSession(page);
await cdp.send("WebAuthn.enable");
const { authenticatorId } = await cdp.send("WebAuthn.addVirtualAuthenticator", {
  options: { protocol: "ctap2", transport: "internal", hasResidentKey: true, hasUserVerification: true, isUserVerified: true, automaticPresenceSimulation: true },
});

await t.test("dana registers a passkey in the console", async (t) => {
  await page.goto(`${consoleUrl}/console/`);
  await page.getByTestId("token-input").fill(dana);
  await page.getByTestId("sign-in").click();
  await page.locator('[data-testid="live-status"][data-status="live"]').waitFor();
  await page.getByTestId("nav-passkeys").click();
  await page.getByTestId("no-passkeys").waitFor();
  await page.getByTestId("passkey-name").fill("test laptop");
  await page.getByTestId("add-passkey").click();
  await page.getByTestId("passkey-added").waitFor();
  const row = page.getByTestId("passkey-row");
  await row.waitFor();
  t.equal(await row.count(), 1, "one passkey listed");
  t.match(await row.textContent(), /test laptop/);
  const { credentials } = await cdp.send("WebAuthn.getCredentials", { authenticatorId });
  t.equal(credentials.length, 1, "the authenticator holds the new credential");
  const listed = await api("GET", "/api/v1/passkeys");
  t.equal((listed.body.passkeys as { id: string }[])[0]?.id, await row.getAttribute("data-passkey-id"), "the API lists the same passkey");
  t.equal(credentials[0]?.credentialId.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, ""), await row.getAttribute("data-passkey-id"), "the one the authenticator made");
  const audit = await api("GET", "/api/v1/audit?limit=50");
  const registered = (audit.body.events as { type: string; actor: string; details: Record<string, unknown> }[]).find((event) => event.details.reason === "passkey_registered");
  t.match(registered, { type: "AUDIT_EVENT_TYPE_SECURITY_EVENT", actor: "dana@example.com", details: { passkey: await row.getAttribute("data-passkey-id"), name: "test laptop" } }, "the registration is in the audit trail");
  await screenshot(t, page, "passkeys-1280");
});

await t.test("a step-up rule's approval: refused without step-up, with a replay, or with a proof for another request or verdict; the receipt is audited", async (t) => {
  const first = stack.callExportTable("step-up export one");
  const second = stack.callExportTable("step-up export two");
  const one = await pending("step-up export one");
  const two = await pending("step-up export two");
  const oneId = one.record.request.id;
  const twoId = two.record.request.id;
  t.equal(one.record.request.stepUp?.required, true, "the broker marked the request: its rule asks for step-up");

  const bare = await api("POST", `/api/v1/requests/${oneId}/decision`, { approve: true });
  t.match(bare, { status: 403, body: { code: "step_up_required", details: { reason: "step_up_required", causes: ["rule"] } } }, "a vote without step-up is refused with step_up_required");
  const forged = await api("POST", `/api/v1/requests/${oneId}/decision`, { approve: true, stepUp: { challengeId: "AAAAAAAAAAAAAAAAAAAAAAAA", passkey: { id: "AAAAAAAAAAAAAAAAAAAA" } } });
  t.match(forged, { status: 403, body: { code: "permission_denied", details: { reason: "step_up_unknown_challenge" } } }, "a challenge the broker never issued is refused");

  const forOne = await stepUpFor(page, oneId, true);
  const wrongRequest = await api("POST", `/api/v1/requests/${twoId}/decision`, { approve: true, stepUp: forOne });
  t.match(wrongRequest, { status: 403, body: { code: "permission_denied", details: { reason: "step_up_mismatch" } } }, "an assertion made for another request is refused");

  const denyOne = await stepUpFor(page, oneId, false);
  const wrongVerdict = await api("POST", `/api/v1/requests/${oneId}/decision`, { approve: true, stepUp: denyOne });
  t.match(wrongVerdict, { status: 403, body: { details: { reason: "step_up_mismatch" } } }, "an assertion made for the other verdict is refused");
  const swapped = await api("POST", `/api/v1/requests/${oneId}/decision`, { approve: true, stepUp: { challengeId: forOne.challengeId, passkey: denyOne.passkey } });
  t.match(swapped, { status: 403, body: { details: { reason: "step_up_invalid" } } }, "the deny assertion under the approve challenge's id does not verify");

  t.equal(((await api("GET", `/api/v1/requests/${oneId}`)).body.record as { state: string }).state, "REQUEST_STATE_PENDING", "refusals changed nothing");

  const approved = await api("POST", `/api/v1/requests/${oneId}/decision`, { approve: true, stepUp: forOne });
  t.equal(approved.status, 200, "the assertion made for this request and verdict approves it");
  const votes = (approved.body.record as { votes: { reviewer: string; stepUp?: string }[] }).votes;
  t.match(votes, [{ reviewer: "dana@example.com", stepUp: "passkey" }], "the vote says it was stepped up with a passkey");
  t.equal((await first).code, 0, "the agent's call went through");

  const replayed = await api("POST", `/api/v1/requests/${twoId}/decision`, { approve: true, stepUp: forOne });
  t.match(replayed, { status: 403, body: { details: { reason: "step_up_replayed" } } }, "the same assertion again is refused as a replay");
  const replayedHere = await api("POST", `/api/v1/requests/${oneId}/decision`, { approve: true, stepUp: forOne });
  t.match(replayedHere, { status: 403, body: { details: { reason: "step_up_replayed" } } }, "also on its own request");

  const audit = await api("GET", "/api/v1/audit?limit=200");
  const events = audit.body.events as { type: string; requestId: string; details: { stepUp?: { method: string; requestId: string; approve: boolean; challenge: string; evidence: Record<string, unknown> } } }[];
  const vote = events.find((event) => event.type === "AUDIT_EVENT_TYPE_VOTE_RECORDED" && event.requestId === oneId);
  const receipt = vote?.details.stepUp;
  t.ok(receipt, "the vote's audit event carries the step-up receipt");
  const passkeyId = (await api("GET", "/api/v1/passkeys")).body.passkeys as { id: string; lastUsedAt?: string }[];
  t.match(receipt, { method: "passkey", requestId: oneId, approve: true, evidence: { credentialId: passkeyId[0]?.id, challengeId: forOne.challengeId, verdict: "approve", userVerified: true } });
  for (const field of ["authenticatorData", "clientDataJSON", "signature"]) t.type(receipt?.evidence[field], "string", `the receipt keeps the ${field}`);
  t.type(receipt?.evidence.counter, "number", "and the counter");
  // The receipt is checkable on its own: the challenge the authenticator signed is the one derived from the request's hash and the verdict.
  const clientData = JSON.parse(Buffer.from(String(receipt?.evidence.clientDataJSON), "base64url").toString("utf8")) as { challenge: string; origin: string };
  const expected = stepUpChallenge({
    requestId: oneId,
    requestSha256: Buffer.from(one.record.request.requestSha256, "base64"),
    reviewer: "dana@example.com",
    approve: true,
    issuedAtMs: Date.parse(String(receipt?.evidence.issuedAt)),
    nonce: forOne.challengeId,
  });
  t.equal(clientData.challenge, expected, "the signed challenge is SHA-256 over the request id, its hash, the reviewer, the verdict and the broker's time and nonce");
  t.equal(receipt?.evidence.requestSha256, Buffer.from(one.record.request.requestSha256, "base64").toString("hex"), "and names the request's hash");
  t.equal(clientData.origin, consoleUrl, "made at the console's origin");
  t.ok(passkeyId[0]?.lastUsedAt, "the passkey's last use is recorded");

  // Two is still pending: dana approves it in the console, which asks the passkey itself.
  await page.goto(`${consoleUrl}/console/#/requests/${twoId}`);
  await page.getByTestId("step-up-hint").waitFor();
  await page.getByTestId("approve-button").click();
  await page.getByTestId("decision-result").filter({ hasText: /approved/i }).waitFor();
  t.equal((await second).code, 0, "approved in the console with the passkey; the agent's call went through");
  const record = (await api("GET", `/api/v1/requests/${twoId}`)).body.record as { votes: { stepUp?: string }[] };
  t.equal(record.votes[0]?.stepUp, "passkey");
  t.equal(await page.getByTestId("vote-step-up").textContent(), "confirmed with a passkey", "the page says how the vote was confirmed");
  await screenshot(t, page, "approved-with-passkey-1280");
});

await t.test("a second passkey needs a step-up with the first", async (t) => {
  const options = await api("POST", "/api/v1/passkeys/options", {});
  t.ok(options.body.passkey, "the options ask for an assertion with an existing passkey");
  const confirm = await assertion(page, options.body.passkey);
  // The new passkey is made on a second authenticator (the first one is excluded).
  await cdp.send("WebAuthn.removeVirtualAuthenticator", { authenticatorId });
  await cdp.send("WebAuthn.addVirtualAuthenticator", {
    options: { protocol: "ctap2", transport: "usb", hasResidentKey: true, hasUserVerification: true, isUserVerified: true, automaticPresenceSimulation: true },
  });
  const made = await creation(page, options.body.options);
  const bare = await api("POST", "/api/v1/passkeys", { challengeId: options.body.challengeId, response: made, name: "thief's key" });
  t.match(bare, { status: 403, body: { code: "step_up_required", details: { causes: ["new_passkey"] } } }, "without the existing passkey's confirmation it is refused");
  t.equal(((await api("GET", "/api/v1/passkeys")).body.passkeys as unknown[]).length, 1, "and nothing was added");
  const added = await api("POST", "/api/v1/passkeys", { challengeId: options.body.challengeId, response: made, name: "security key", assertion: confirm });
  t.equal(added.status, 201, "confirmed with the first passkey, the second is added");
  t.match(added.body, { name: "security key" });
  t.equal(((await api("GET", "/api/v1/passkeys")).body.passkeys as unknown[]).length, 2);
  const again = await api("POST", "/api/v1/passkeys", { challengeId: options.body.challengeId, response: made, name: "again", assertion: confirm });
  t.match(again, { status: 403, body: { details: { reason: "step_up_replayed" } } }, "the registration challenge is spent");
});

await t.test("a denial needs no step-up; a passkey can be removed", async (t) => {
  const call = stack.callExportTable("step-up export denied");
  const view = await pending("step-up export denied");
  const denied = await api("POST", `/api/v1/requests/${view.record.request.id}/decision`, { approve: false, reason: "not today" });
  t.equal(denied.status, 200, "denying is never harder than approving");
  t.not((await call).code, 0);
  const listed = (await api("GET", "/api/v1/passkeys")).body.passkeys as { id: string }[];
  for (const passkey of listed) t.equal((await api("DELETE", `/api/v1/passkeys/${passkey.id}`)).status, 204);
  t.same((await api("GET", "/api/v1/passkeys")).body.passkeys, [], "gone");
  const removed = ((await api("GET", "/api/v1/audit?limit=50")).body.events as { actor: string; details: Record<string, unknown> }[]).find((event) => event.details.reason === "passkey_removed");
  t.match(removed, { actor: "dana@example.com", details: { passkey: listed[0]?.id } }, "so is the removal");
  t.match(await api("DELETE", "/api/v1/passkeys/AAAAAAAAAAAAAAAAAAAA"), { status: 404, body: { code: "not_found" } });
  const again = stack.callExportTable("step-up without a passkey");
  const next = await pending("step-up without a passkey");
  t.match(await api("POST", `/api/v1/requests/${next.record.request.id}/step-up`, { approve: true }), { status: 403, body: { details: { reason: "no_step_up_method" } } }, "no passkey and no identity provider: nothing to step up with");
  t.equal((await api("POST", `/api/v1/requests/${next.record.request.id}/decision`, { approve: false, reason: "cleanup" })).status, 200);
  await again;
});
