// Step-up without a browser: what needs it (rule, risk, break-glass), the challenge's
// binding, the config and policy syntax, and the fallback where no passkey is set up: an
// OIDC re-authentication (max_age=0) verified through auth_time, nonce and acr, through
// the real broker (NATS, Vault, PostgreSQL) with ID tokens from a local JWKS. The
// passkey path runs in Chromium: test/console/stepup.test.ts.
import { create } from "@bufbuild/protobuf";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import { generateKeyPair, SignJWT } from "jose";
import t from "tap";
import { judgeReauthentication, parseStepUpConfig, stepUpChallenge, stepUpNeed } from "../../broker/index.js";
import { ConfigReader } from "../../common/config.js";
import { type AirlockError, callUnary, Code } from "../../common/index.js";
import { ApprovalRequestSchema, ReviewerService, Risk } from "../../proto/index.js";
import { Policy } from "../../sidecar/index.js";
import { startTestJwks } from "../helpers/jwks.js";
import { startStack } from "../helpers/stack.js";

await t.test("what needs step-up: the rule, a risk at or over min_risk, break-glass; never a denial", async (t) => {
  const plain = create(ApprovalRequestSchema, { id: "r1", risk: Risk.MEDIUM });
  const ruled = create(ApprovalRequestSchema, { id: "r2", risk: Risk.LOW, stepUp: { required: true, acr: "phr" } });
  const critical = create(ApprovalRequestSchema, { id: "r3", risk: Risk.CRITICAL });
  t.same(stepUpNeed(plain, { approve: true }, undefined), { required: false, causes: [], acr: "" });
  t.same(stepUpNeed(plain, { approve: true }, "high"), { required: false, causes: [], acr: "" }, "medium is under high");
  t.same(stepUpNeed(plain, { approve: true }, "medium"), { required: true, causes: ["risk"], acr: "" }, "at min_risk");
  t.same(stepUpNeed(critical, { approve: true }, "high"), { required: true, causes: ["risk"], acr: "" }, "over min_risk");
  t.same(stepUpNeed(ruled, { approve: true }, undefined), { required: true, causes: ["rule"], acr: "phr" }, "the rule asks, with its acr");
  t.same(stepUpNeed(plain, { approve: true, breakGlass: true }, undefined), { required: true, causes: ["break_glass"], acr: "" }, "break-glass always does");
  t.same(stepUpNeed(ruled, { approve: false }, "low"), { required: false, causes: [], acr: "" }, "a denial never needs it");
});

await t.test("the challenge binds the request, its hash, the reviewer, the verdict, the time and the nonce", async (t) => {
  const base = { requestId: "req-1", requestSha256: new Uint8Array(32).fill(7), reviewer: "Dana@Example.com", approve: true, issuedAtMs: 1_700_000_000_000, nonce: "n".repeat(24) };
  const challenge = stepUpChallenge(base);
  t.match(challenge, /^[A-Za-z0-9_-]{43}$/, "base64url of a SHA-256");
  t.equal(stepUpChallenge({ ...base, reviewer: " dana@example.com " }), challenge, "the reviewer is compared trimmed and case-insensitively");
  const variants = [
    { ...base, requestId: "req-2" },
    { ...base, requestSha256: new Uint8Array(32).fill(8) },
    { ...base, reviewer: "sam@example.com" },
    { ...base, approve: false },
    { ...base, issuedAtMs: base.issuedAtMs + 1 },
    { ...base, nonce: "m".repeat(24) },
  ];
  for (const variant of variants) t.not(stepUpChallenge(variant), challenge);
});

await t.test("config and policy syntax; bad values name the field", async (t) => {
  const parse = (value: unknown) => parseStepUpConfig(new ConfigReader(value, "reviewers.step_up", "broker.yaml"));
  t.same(parse({ rp_id: "airlock.example.com", min_risk: "high" }), { minRisk: "high", rpId: "airlock.example.com", rpName: "Airlock", challengeTtlMs: 300_000, maxAuthAgeMs: 300_000, enrolMaxAgeMs: 600_000 });
  const refusal = (value: unknown) => {
    try {
      parse(value);
      return "";
    } catch (error) {
      return String((error as AirlockError).details.field);
    }
  };
  t.equal(refusal({ rp_id: "https://x.example" }), "reviewers.step_up.rp_id");
  t.equal(refusal({ rp_id: "x.example", min_risk: "severe" }), "reviewers.step_up.min_risk");
  t.equal(refusal({ rp_id: "x.example", challenge_ttl: "2h" }), "reviewers.step_up.challenge_ttl");
  t.equal(refusal({ rp_id: "x.example", origins: ["https://x.example/path"] }), "reviewers.step_up.origins[0]");
  t.equal(refusal({ rp_id: "x.example", pin: true }), "reviewers.step_up.pin");

  const policy = (stepUp: string) =>
    Policy.parse(
      `version: 1\nrules:\n  - id: r\n    match: { service: a.B, method: C }\n    effect: approve\n    approve:\n      risk: low\n      reviewers: { all_of: [{ group: g }] }\n      credential: { kind: vault_token, policies: [p] }\n${stepUp}`,
      "p.yaml",
    ).rules[0]?.approve?.stepUp;
  t.same(policy("      step_up: true\n"), { acr: "" });
  t.same(policy("      step_up: { acr: phr }\n"), { acr: "phr" });
  t.equal(policy("      step_up: false\n"), undefined);
  t.equal(policy(""), undefined);
  t.throws(() => policy("      step_up: yes please\n"), /step_up/);
  t.throws(() => policy("      step_up: { level: 2 }\n"), /step_up/);
});

await t.test("judging a re-authentication: nonce, auth_time, acr", async (t) => {
  const issuedAtMs = 1_700_000_000_000;
  const expected = { challenge: "c".repeat(43), issuedAtMs, nowMs: issuedAtMs + 20_000, maxAuthAgeMs: 300_000, acr: "phr" };
  const fresh = { nonce: expected.challenge, auth_time: issuedAtMs / 1000 + 10, acr: "phr" };
  t.equal(judgeReauthentication(fresh, expected), undefined, "a sign-in after the challenge, with its nonce and acr");
  t.equal(judgeReauthentication({ ...fresh, nonce: "other" }, expected), "step_up_mismatch", "made for another challenge");
  t.equal(judgeReauthentication({ ...fresh, auth_time: issuedAtMs / 1000 - 3600 }, expected), "step_up_stale_authentication", "a sign-in from before the challenge");
  t.equal(judgeReauthentication({ nonce: expected.challenge, acr: "phr" }, expected), "step_up_stale_authentication", "no auth_time");
  t.equal(judgeReauthentication(fresh, { ...expected, nowMs: issuedAtMs + 3_600_000 }), "step_up_stale_authentication", "older than max_auth_age by now");
  t.equal(judgeReauthentication({ ...fresh, acr: "pwd" }, expected), "step_up_acr_mismatch");
  t.equal(judgeReauthentication({ ...fresh, acr: "pwd" }, { ...expected, acr: "" }), undefined, "any acr when the rule names none");
});

// A real identity provider's key set, served over HTTP like any OIDC provider's jwks_uri.
const idp = await startTestJwks(t);
const idpKeys = { privateKey: idp.privateKey };
const issuer = "https://idp.example.com";

async function idToken(email: string, claims: Record<string, unknown> = {}): Promise<string> {
  return new SignJWT({ email, groups: ["data-owners"], ...claims })
    .setProtectedHeader({ alg: "ES256", kid: "idp-1" })
    .setSubject(email)
    .setIssuer(issuer)
    .setAudience("airlock-console")
    .setIssuedAt()
    .setExpirationTime("10m")
    .sign(idpKeys.privateKey);
}

const stack = await startStack(t, {
  policy: { exportStepUp: "phr" },
  reviewerGrpc: "127.0.0.1:0",
  brokerConfig: {
    reviewers: {
      auth: { kind: "oidc", issuer, audience: "airlock-console", jwks_url: idp.url },
      grpc: "127.0.0.1:0",
      step_up: { rp_id: "localhost", min_risk: "medium", max_auth_age: "2m" },
    },
  },
});
const dana = await idToken("dana@example.com");
const sam = await idToken("sam@example.com", { groups: ["security"] });

async function api(method: string, path: string, token: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
  const response = await fetch(`${stack.brokerUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await response.text();
  return { status: response.status, body: text === "" ? {} : (JSON.parse(text) as Record<string, unknown>) };
}

async function pendingId(token: string, reason: string): Promise<string> {
  for (;;) {
    const answer = await api("GET", "/api/v1/requests?state=pending", token);
    const found = (answer.body.requests as { record: { request: { id: string; reason: string } } }[]).find((view) => view.record.request.reason === reason);
    if (found !== undefined) return found.record.request.id;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

interface Challenge {
  readonly challengeId: string;
  readonly methods: string[];
  readonly oidc: { nonce: string; maxAge: number; acr?: string };
}

await t.test("no passkey: a fresh sign-in (max_age=0) with the challenge as nonce and the rule's acr approves; stale, wrong-acr and borrowed ones do not", async (t) => {
  const call = stack.callExportTable("oidc step-up export");
  const id = await pendingId(dana, "oidc step-up export");
  t.match(await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: true }), { status: 403, body: { code: "step_up_required", details: { reason: "step_up_required", acr: "phr" } } });
  const answer = await api("POST", `/api/v1/requests/${id}/step-up`, dana, { approve: true });
  t.equal(answer.status, 200);
  const challenge = answer.body as unknown as Challenge;
  t.same(challenge.methods, ["oidc"], "no passkey registered: the identity provider stands in");
  t.same(challenge.oidc, { nonce: (answer.body as { challenge: string }).challenge, maxAge: 0, acr: "phr" }, "ask the provider for max_age=0, this nonce and the rule's acr");
  const now = Math.floor(Date.now() / 1000);
  const proof = (idToken: string) => ({ challengeId: challenge.challengeId, idToken });
  const refusedWith = async (token: string) => ((await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: true, stepUp: proof(token) })).body.details as { reason?: string }).reason;
  t.equal(await refusedWith(await idToken("dana@example.com", { nonce: challenge.oidc.nonce, auth_time: now, acr: "pwd" })), "step_up_acr_mismatch", "a sign-in without the rule's acr");
  t.equal(await refusedWith(await idToken("dana@example.com", { nonce: challenge.oidc.nonce, auth_time: now - 3600, acr: "phr" })), "step_up_stale_authentication", "an old sign-in (no max_age=0)");
  t.equal(await refusedWith(await idToken("dana@example.com", { nonce: "another-challenge", auth_time: now, acr: "phr" })), "step_up_mismatch", "a sign-in for another challenge");
  t.equal(await refusedWith(await idToken("alice@example.com", { nonce: challenge.oidc.nonce, auth_time: now, acr: "phr" })), "step_up_mismatch", "someone else's sign-in");
  const forged = await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: true, stepUp: proof(await new SignJWT({ email: "dana@example.com", nonce: challenge.oidc.nonce, auth_time: now, acr: "phr" }).setProtectedHeader({ alg: "ES256", kid: "idp-1" }).setIssuer(issuer).setAudience("airlock-console").setExpirationTime("5m").sign((await generateKeyPair("ES256")).privateKey)) });
  t.match(forged, { status: 403, body: { code: "permission_denied", details: { reason: "step_up_invalid", token: "bad_signature" } } }, "a token the provider did not sign (refused, without ending the session)");

  const good = await idToken("dana@example.com", { nonce: challenge.oidc.nonce, auth_time: now, acr: "phr" });
  const approved = await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: true, stepUp: proof(good) });
  t.equal(approved.status, 200, "the fresh sign-in for this challenge approves");
  t.match((approved.body.record as { votes: unknown[] }).votes, [{ reviewer: "dana@example.com", stepUp: "oidc" }]);
  t.equal((await call).code, 0, "the agent's call went through");
  const replay = await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: true, stepUp: proof(good) });
  t.match(replay.body, { details: { reason: "step_up_replayed" } }, "the same sign-in again is refused");

  const audit = await api("GET", "/api/v1/audit?limit=100", dana);
  const vote = (audit.body.events as { type: string; requestId: string; details: { stepUp?: { method: string; evidence: Record<string, unknown> } } }[]).find(
    (event) => event.type === "AUDIT_EVENT_TYPE_VOTE_RECORDED" && event.requestId === id,
  );
  t.match(vote?.details.stepUp, { method: "oidc", evidence: { iss: issuer, sub: "dana@example.com", authTime: now, acr: "phr", nonce: challenge.oidc.nonce, challengeId: challenge.challengeId } }, "the receipt is in the vote's audit event");
  t.notMatch(JSON.stringify(vote), good.split(".")[2] ?? "-", "but never the token itself (it would be a live credential)");
});

await t.test("the risk floor: a medium-risk request needs step-up by config; gRPC refuses the bare vote with details.reason", async (t) => {
  const call = stack.callRotateKey("risk step-up rotate");
  const id = await pendingId(sam, "risk step-up rotate");
  const client = new Client(stack.broker.reviewerGrpcAddress ?? "", credentials.createInsecure());
  t.teardown(() => client.close());
  const metadata = new Metadata();
  metadata.set("authorization", `Bearer ${sam}`);
  const refused = await callUnary(client, ReviewerService.method.decide, { requestId: id, approve: true }, { metadata }).catch((error: unknown) => error as AirlockError);
  t.equal((refused as AirlockError).code, Code.PermissionDenied);
  t.match((refused as AirlockError).details, { reason: "step_up_required", causes: ["risk"] }, "a stable reason over gRPC too");
  const denied = await callUnary(client, ReviewerService.method.decide, { requestId: id, approve: false, reason: "not now" }, { metadata });
  t.ok(denied.request, "a denial over gRPC needs none");
  t.not((await call).code, 0);
});
