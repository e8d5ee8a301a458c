import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import { type CryptoKey, generateKeyPair, SignJWT } from "jose";
import t from "tap";
import { randomBytes } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import { ReviewerAuthenticator } from "../../broker/index.js";
import { callServerStream, callUnary, type AirlockError, Code, subjects } from "../../common/index.js";
import { DecisionBodySchema, DecisionSchema, RequestState, ReviewerService, Verdict } from "../../proto/index.js";
import { startTestJwks } from "../helpers/jwks.js";
import { startStack } from "../helpers/stack.js";
import { waitUntil } from "../../harness/index.js";

// A real identity provider's key set, served over HTTP like any OIDC provider's jwks_uri.
const idp = await startTestJwks(t);
const idpKeys = { privateKey: idp.privateKey };
const jwksUrl = idp.url;
const issuer = "https://idp.example.com";

async function idToken(email: string, groups: string[], options: { audience?: string; expiresIn?: string | number; issuer?: string; key?: CryptoKey } = {}): Promise<string> {
  return new SignJWT({ email, groups })
    .setProtectedHeader({ alg: "ES256", kid: "idp-1" })
    .setSubject(email)
    .setIssuer(options.issuer ?? issuer)
    .setAudience(options.audience ?? "airlock-console")
    .setIssuedAt()
    .setExpirationTime(options.expiresIn ?? "10m")
    .sign(options.key ?? idpKeys.privateKey);
}

const stack = await startStack(t, {
  reviewerGrpc: "127.0.0.1:0",
  brokerConfig: {
    reviewers: {
      auth: { kind: "oidc", issuer, audience: "airlock-console", jwks_url: jwksUrl, clock_tolerance_sec: 30 },
      rate_limit_per_minute: 40,
      grpc: "127.0.0.1:0",
      public_origin: "https://airlock.example.com",
    },
  },
});
const dana = await idToken("dana@example.com", ["data-owners"]);
const alice = await idToken("alice@example.com", ["data-owners"]);
const sam = await idToken("sam@example.com", ["security"]);
// Erin is in no configured group: the identity provider's groups claim alone makes her a data owner.
const erin = await idToken("erin@example.com", ["data-owners"]);

interface ApiAnswer {
  status: number;
  body: Record<string, unknown>;
  headers: Headers;
}

async function api(method: string, path: string, token: string | undefined, body?: unknown, headers: Record<string, string> = {}): Promise<ApiAnswer> {
  const response = await fetch(`${stack.brokerUrl}${path}`, {
    method,
    headers: { ...(token === undefined ? {} : { authorization: `Bearer ${token}` }), ...(body === undefined ? {} : { "content-type": "application/json" }), ...headers },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await response.text();
  return { status: response.status, body: text === "" ? {} : (JSON.parse(text) as Record<string, unknown>), headers: response.headers };
}

interface View {
  record: { request: { id: string; method: string; reason: string; identity: { agent: string; onBehalfOf: string } }; state: string; votes?: { reviewer: string }[] };
  needsMe: boolean;
  expiresAt: string;
}

async function pendingFor(token: string, method: string): Promise<View> {
  for (let i = 0; i < 100; i++) {
    const answer = await api("GET", "/api/v1/requests?state=pending", token);
    const found = (answer.body.requests as View[]).find((view) => view.record.request.method === method);
    if (found !== undefined) return found;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`no pending ${method}`);
}

await t.test("OIDC: tokens are verified against the JWKS; bad ones get 401 with a stable code", async (t) => {
  const me = await api("GET", "/api/v1/me", dana);
  t.equal(me.status, 200);
  t.same(me.body, { reviewer: "dana@example.com", groups: ["data-owners"], breakGlass: false });
  const none = await api("GET", "/api/v1/me", undefined);
  t.equal(none.status, 401);
  t.equal(none.body.code, "unauthenticated");
  const expired = await api("GET", "/api/v1/me", await idToken("dana@example.com", [], { expiresIn: Math.floor(Date.now() / 1000) - 120 }));
  t.equal(expired.status, 401);
  t.match(expired.body, { code: "unauthenticated", details: { reason: "token_expired" } });
  const skewed = await api("GET", "/api/v1/me", await idToken("dana@example.com", [], { expiresIn: Math.floor(Date.now() / 1000) - 10 }));
  t.equal(skewed.status, 200, "an exp 10 s ago is inside the 30 s clock tolerance");
  t.match((await api("GET", "/api/v1/me", await idToken("dana@example.com", [], { audience: "other-app" }))).body, { details: { reason: "wrong_audience" } });
  t.match((await api("GET", "/api/v1/me", await idToken("dana@example.com", [], { issuer: "https://evil.example" }))).body, { details: { reason: "wrong_issuer" } });
  const forged = await api("GET", "/api/v1/me", await idToken("dana@example.com", [], { key: (await generateKeyPair("ES256")).privateKey }));
  t.equal(forged.status, 401, "a token signed by another key is refused");
  t.equal((await api("GET", "/api/v1/me", "not-a-jwt")).status, 401);
  const outsider = await api("GET", "/api/v1/me", await idToken("mallory@example.com", ["marketing"]));
  t.match(outsider, { status: 403, body: { code: "permission_denied", details: { reason: "not_a_reviewer" } } }, "a valid token of someone in no reviewer group reads nothing");
  t.equal((await api("POST", "/api/v1/session", undefined, { token: await idToken("mallory@example.com", []) })).status, 403, "nor signs in to the console");
  const unverified = await new SignJWT({ email: "dana@example.com", email_verified: false, groups: ["data-owners"] })
    .setProtectedHeader({ alg: "ES256", kid: "idp-1" })
    .setIssuer(issuer)
    .setAudience("airlock-console")
    .setExpirationTime("5m")
    .sign(idpKeys.privateKey);
  t.match(await api("GET", "/api/v1/me", unverified), { status: 401, body: { details: { reason: "email_not_verified" } } }, "an unverified email is no identity");
  const idpDown = new ReviewerAuthenticator({ kind: "oidc", issuer, audience: "airlock-console", jwksUrl: "http://127.0.0.1:1/jwks.json", reviewerClaim: "email", groupsClaim: "groups", clockToleranceSec: 30 });
  const down = await idpDown.authenticate(dana).catch((error: unknown) => error as AirlockError);
  t.equal((down as AirlockError).code, Code.Unavailable, "an unreachable identity provider is unavailability, not a bad token");
  t.match(await api("GET", "/api/v1/requests/not%20a%20key", dana), { status: 404, body: { code: "not_found" } }, "an id no request can have is not found");
  t.match(await api("GET", "/api/v1/me", undefined, undefined, { cookie: "airlock_session=%E0%A4%A" }), { status: 401, body: { details: { reason: "malformed_cookie" } } });
  t.equal((await api("DELETE", "/api/v1/session", undefined, undefined, { cookie: "airlock_session=stale" })).status, 204, "a stale cookie can still be cleared");
});

await t.test("list, get, self-approval refused, deny needs a reason, approve, then 409", async (t) => {
  const call = stack.callExportTable("quarterly revenue report");
  const held = await pendingFor(dana, "ExportTable");
  const id = held.record.request.id;
  t.equal(held.needsMe, true, "dana (data-owners) is needed");
  t.equal(held.record.request.reason, "quarterly revenue report");
  t.equal(held.record.request.identity.onBehalfOf, "alice@example.com");
  t.ok(Date.parse(held.expiresAt) > Date.now(), "expiresAt is in the future");

  const samList = await api("GET", "/api/v1/requests?state=pending&needsMe=true", sam);
  t.same(
    (samList.body.requests as View[]).map((v) => v.record.request.id),
    [],
    "sam (security) is not needed for an export",
  );
  const mine = await api("GET", "/api/v1/requests?state=pending&needsMe=true&minRisk=high", dana);
  t.same(
    (mine.body.requests as View[]).map((v) => v.record.request.id),
    [id],
  );
  t.equal((await api("GET", "/api/v1/requests?minRisk=critical&state=pending", dana)).body.requests instanceof Array ? ((await api("GET", "/api/v1/requests?minRisk=critical&state=pending", dana)).body.requests as View[]).length : -1, 0, "minRisk filters");
  t.match(await api("GET", "/api/v1/requests?state=bogus", dana), { status: 422, body: { code: "invalid_argument", details: { field: "state" } } });
  t.match(await api("GET", "/api/v1/requests/no-such-request", dana), { status: 404, body: { code: "not_found" } });

  const self = await api("POST", `/api/v1/requests/${id}/decision`, alice, { approve: true, reason: "mine" });
  t.equal(self.status, 403, "the human the agent acts for cannot approve");
  t.equal(self.body.code, "permission_denied");
  const byAgent = await api("POST", `/api/v1/requests/${id}/decision`, await idToken("spiffe://example/agent/reporter", ["data-owners"]), { approve: true });
  t.equal(byAgent.status, 403, "the agent itself cannot approve");
  const noReason = await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: false });
  t.match(noReason, { status: 422, body: { code: "invalid_argument", details: { field: "reason" } } });
  t.match(await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: "yes" }), { status: 422, body: { details: { field: "approve" } } });
  t.equal((await api("GET", `/api/v1/requests/${id}`, dana)).body.record && ((await api("GET", `/api/v1/requests/${id}`, dana)).body.record as View["record"]).state, "REQUEST_STATE_PENDING", "refusals changed nothing");

  const approved = await api("POST", `/api/v1/requests/${id}/decision`, erin, { approve: true, reason: "report is due" });
  t.equal(approved.status, 200, "erin counts for data-owners through her groups claim");
  t.equal(((await call) as { code: number; rows?: number }).rows, 2, "the agent's export ran with the approval");
  const again = await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: true });
  t.equal(again.status, 409);
  t.equal(again.body.code, "already_decided");
  t.ok(["executing", "completed", "approved"].includes((again.body.details as { state: string }).state), "the 409 says which state the request is in");

  const history = await api("GET", "/api/v1/history?agent=spiffe://example/agent/reporter", dana);
  t.ok((history.body.requests as View[]).some((v) => v.record.request.id === id), "history lists the decided request");
});

await t.test("a denial through the API reaches the agent with the reason", async (t) => {
  const call = stack.callRotateKey("rotate after leak drill");
  const held = await pendingFor(sam, "RotateKey");
  const denied = await api("POST", `/api/v1/requests/${held.record.request.id}/decision`, sam, { approve: false, reason: "not during the freeze" });
  t.equal(denied.status, 200);
  const outcome = await call;
  t.equal(outcome.code, Code.PermissionDenied);
  t.match(outcome.details, /not during the freeze/);
});

await t.test("live updates: a held call appears on the event stream within a second; its decision follows", async (t) => {
  const controller = new AbortController();
  const response = await fetch(`${stack.brokerUrl}/api/v1/events?needsMe=true`, { headers: { authorization: `Bearer ${dana}` }, signal: controller.signal });
  t.equal(response.headers.get("content-type"), "text/event-stream");
  if (response.body === null) throw new Error("no body");
  const reader: ReadableStreamDefaultReader<Uint8Array> = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const nextEvent = async (): Promise<{ event: string; data: string }> => {
    for (;;) {
      const end = buffer.indexOf("\n\n");
      if (end >= 0) {
        const chunk = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (chunk.startsWith(":")) continue;
        const event = /^event: (.*)$/m.exec(chunk)?.[1] ?? "";
        const data = /^data: (.*)$/m.exec(chunk)?.[1] ?? "";
        return { event, data };
      }
      const { value, done } = await reader.read();
      if (done) throw new Error("stream ended");
      buffer += decoder.decode(value, { stream: true });
    }
  };
  while ((await nextEvent()).event !== "ready");
  const started = Date.now();
  const call = stack.callExportTable("live update check");
  let view: View | undefined;
  while (view === undefined) {
    const event = await nextEvent();
    const candidate = JSON.parse(event.data) as View;
    if (event.event === "request" && candidate.record.request.reason === "live update check" && candidate.record.state === "REQUEST_STATE_PENDING") view = candidate;
  }
  const seenAfter = Date.now() - started;
  t.ok(seenAfter < 1000 + 500, `the held request appeared on the stream ${seenAfter} ms after the agent's call`);
  t.equal(view.needsMe, true);
  await api("POST", `/api/v1/requests/${view.record.request.id}/decision`, dana, { approve: true });
  let decided: View | undefined;
  while (decided === undefined) {
    const candidate = JSON.parse((await nextEvent()).data) as View;
    if (candidate.record.request.id === view.record.request.id && candidate.record.state !== "REQUEST_STATE_PENDING") decided = candidate;
  }
  t.equal(decided.needsMe, false, "a decided request no longer needs me: the console drops it");
  controller.abort();
  await reader.cancel().catch(() => undefined);
  t.equal((await call).code, 0);
});

await t.test("console sessions: cookie auth, CSRF header required on writes, cross-origin refused", async (t) => {
  const signIn = await api("POST", "/api/v1/session", undefined, { token: dana });
  t.equal(signIn.status, 200);
  const cookie = (signIn.headers.get("set-cookie") ?? "").split(";")[0] ?? "";
  t.match(signIn.headers.get("set-cookie") ?? "", /HttpOnly; SameSite=Strict/);
  const csrf = signIn.body.csrfToken as string;
  t.equal((await api("GET", "/api/v1/me", undefined, undefined, { cookie })).status, 200, "the cookie authenticates reads");
  const call = stack.callExportTable("csrf check");
  const held = await pendingFor(dana, "ExportTable");
  const noHeader = await api("POST", `/api/v1/requests/${held.record.request.id}/decision`, undefined, { approve: true }, { cookie });
  t.match(noHeader, { status: 403, body: { code: "permission_denied", details: { reason: "csrf" } } });
  const crossOrigin = await api("POST", `/api/v1/requests/${held.record.request.id}/decision`, undefined, { approve: true }, { cookie, "x-airlock-csrf": csrf, origin: "https://evil.example" });
  t.equal(crossOrigin.status, 403, "a write from another origin is refused even with the header");
  t.equal(((await api("GET", `/api/v1/requests/${held.record.request.id}`, dana)).body.record as View["record"]).state, "REQUEST_STATE_PENDING", "refused writes changed nothing");
  const ok = await api("POST", `/api/v1/requests/${held.record.request.id}/decision`, undefined, { approve: true }, { cookie, "x-airlock-csrf": csrf, origin: "https://airlock.example.com" });
  t.equal(ok.status, 200, "a write from the configured public origin (behind a proxy) is accepted");
  t.equal((await call).code, 0);
  t.equal((await api("POST", "/api/v1/session", undefined, { token: "garbage" })).status, 401);
});

await t.test("bulk-deny stale requests", async (t) => {
  const calls = [stack.callExportTable("stale one"), stack.callExportTable("stale two")];
  for (let i = 0; i < 100; i++) {
    const pending = (await api("GET", "/api/v1/requests?state=pending", dana)).body.requests as View[];
    if (pending.length >= 2) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  t.match(await api("POST", "/api/v1/requests/bulk-deny", dana, { olderThan: "0s" }), { status: 422, body: { details: { field: "reason" } } });
  const result = await api("POST", "/api/v1/requests/bulk-deny", dana, { olderThan: "0s", reason: "stale: resubmit if still needed" });
  t.equal(result.status, 200);
  t.equal((result.body.denied as string[]).length, 2);
  for (const outcome of await Promise.all(calls)) {
    t.equal(outcome.code, Code.PermissionDenied);
    t.match(outcome.details, /stale: resubmit/);
  }
});

await t.test("the reviewers' gRPC API: list, decide, verify the audit chain; auth required", async (t) => {
  const client = new Client(stack.broker.reviewerGrpcAddress ?? "", credentials.createInsecure());
  t.teardown(() => client.close());
  const auth = (token: string) => {
    const metadata = new Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    return metadata;
  };
  const anonymous = await callUnary(client, ReviewerService.method.listRequests, {}).catch((error: unknown) => error as AirlockError);
  t.equal((anonymous as AirlockError).code, Code.Unauthenticated);
  const anonymousWatch = await (async () => {
    try {
      for await (const _ of callServerStream(client, ReviewerService.method.watchRequests, {}, { deadline: new Date(Date.now() + 5000) })) void _;
      return undefined;
    } catch (error) {
      return error as AirlockError;
    }
  })();
  t.equal(anonymousWatch?.code, Code.Unauthenticated, "an unauthenticated watch gets its status at once, not a hang");
  const watch = callServerStream(client, ReviewerService.method.watchRequests, { needsMe: true }, { metadata: auth(sam) });
  const call = stack.callRotateKey("grpc path");
  let id = "";
  for await (const update of watch) {
    if (update.request?.request?.method === "RotateKey" && update.request.state === RequestState.PENDING) {
      id = update.request.request.id;
      break;
    }
  }
  const listed = await callUnary(client, ReviewerService.method.listRequests, { states: [RequestState.PENDING], needsMe: true }, { metadata: auth(sam) });
  t.same(
    listed.requests.map((r) => r.request?.id),
    [id],
  );
  const decided = await callUnary(client, ReviewerService.method.decide, { requestId: id, approve: true, reason: "rotation window" }, { metadata: auth(sam) });
  t.equal(decided.request?.state, RequestState.APPROVED);
  t.equal((await call).code, 0);
  const verdict = await callUnary(client, ReviewerService.method.verifyAudit, {}, { metadata: auth(sam) });
  t.equal(verdict.intact, true);
  t.ok(verdict.eventsChecked > 10n, `the chain verifies over ${verdict.eventsChecked} events`);
  // The action's completion events may still be landing (a completion's record and audit batch are
  // written side by side): compare the newest five with a trail that did not grow around the read.
  let http = await api("GET", "/api/v1/audit/verify", sam);
  let newest: { sequence: string }[] = [];
  const eventsChecked = (answer: ApiAnswer) => Number((answer.body as { eventsChecked: number }).eventsChecked);
  await waitUntil(async () => {
    const before = await api("GET", "/api/v1/audit/verify", sam);
    newest = (await api("GET", "/api/v1/audit?limit=5", sam)).body.events as { sequence: string }[];
    http = await api("GET", "/api/v1/audit/verify", sam);
    return eventsChecked(before) === eventsChecked(http);
  }, 10_000);
  t.match(http.body, { intact: true });
  t.equal(newest.length, 5);
  t.same(
    newest.map((e) => Number(e.sequence)),
    [0, 1, 2, 3, 4].map((i) => eventsChecked(http) - 4 + i),
    "the newest five, in order",
  );
});

await t.test("a per-reviewer rate limit answers 429 with Retry-After", async (t) => {
  const burst = await idToken("rita@example.com", ["security"]);
  const statuses: number[] = [];
  for (let i = 0; i < 45; i++) statuses.push((await api("GET", "/api/v1/me", burst)).status);
  t.ok(statuses.slice(0, 40).every((s) => s === 200), "the first 40 pass");
  const limited = await api("GET", "/api/v1/me", burst);
  t.equal(limited.status, 429);
  t.equal(limited.body.code, "rate_limited");
  t.ok(Number(limited.headers.get("retry-after")) >= 1);
  t.equal((await api("GET", "/api/v1/me", dana)).status, 200, "other reviewers are not limited");
});

await t.test("the CLI: requests ls / show / approve / deny with a token from env or a file", async (t) => {
  const cli = fileURLToPath(new URL("../../cli/airlock.ts", import.meta.url));
  const airlock = async (args: string[], env: Record<string, string>): Promise<{ stdout: string; stderr: string; code: number }> => {
    try {
      const { stdout, stderr } = await promisify(execFile)(process.execPath, ["--import", import.meta.resolve("tsx"), cli, "requests", ...args, "--url", stack.brokerUrl], { env: { ...process.env, ...env } });
      return { stdout, stderr, code: 0 };
    } catch (error) {
      const failed = error as { stdout: string; stderr: string; code: number };
      return { stdout: failed.stdout, stderr: failed.stderr, code: failed.code };
    }
  };
  const dir = await mkdtemp(join(tmpdir(), "airlock-cli-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, "token"), `${sam}\n`);
  const call = stack.callRotateKey("cli path");
  const held = await pendingFor(sam, "RotateKey");
  const id = held.record.request.id;
  // Side by side: none of these changes the request, and each CLI process starts slowly on a busy machine
  // while the request's deadline runs.
  const [listed, shown, noReason, noToken] = await Promise.all([
    airlock(["ls", "--mine"], { AIRLOCK_TOKEN: sam }),
    airlock(["show", id, "--token-file", join(dir, "token")], {}),
    airlock(["deny", id], { AIRLOCK_TOKEN: sam }),
    airlock(["ls"], { AIRLOCK_TOKEN: "" }),
  ]);
  t.equal(listed.code, 0, listed.stderr);
  t.match(listed.stdout, new RegExp(`${id}.*pending.*medium.*demo.v1.OpsService/RotateKey.*needs you`));
  t.match(shown.stdout, /reason +cli path/);
  t.match(shown.stdout, /needs +1 more from security/);
  t.equal(noReason.code, 1);
  t.match(noReason.stderr, /a denial needs --reason/);
  t.match(noToken.stderr, /no reviewer token/);
  const approved = await airlock(["approve", id, "--reason", "ok from the terminal"], { AIRLOCK_TOKEN: sam });
  t.equal(approved.code, 0, approved.stderr);
  t.match(approved.stdout, /voted to approve/);
  t.equal((await call).code, 0);
  const late = await airlock(["deny", id, "--reason", "too late"], { AIRLOCK_TOKEN: sam });
  t.equal(late.code, 1);
  t.match(late.stderr, /airlock: /);
});

await t.test("a forged decision is refused by the sidecar and lands in the broker's audit trail, flagged", async (t) => {
  // Only a broker or an operator can publish a decision now: the forger here holds the admin credential.
  const nc = await stack.nats.connect({ kind: "admin" });
  t.teardown(() => nc.close());
  const call = stack.callExportTable("forgery target");
  const held = await pendingFor(dana, "ExportTable");
  const id = held.record.request.id;
  const body = toBinary(DecisionBodySchema, create(DecisionBodySchema, { decisionId: "forged-1", requestId: id, verdict: Verdict.APPROVED, reason: "trust me" }));
  nc.publish(subjects.decision(stack.host, id), toBinary(DecisionSchema, create(DecisionSchema, { body, signature: randomBytes(64), keyId: "k1" })));
  interface AuditJson {
    type: string;
    actor: string;
    requestId: string;
    flagged?: boolean;
    details?: Record<string, unknown>;
  }
  let event: AuditJson | undefined;
  for (let i = 0; i < 100 && event === undefined; i++) {
    const events = (await api("GET", "/api/v1/audit?limit=50", dana)).body.events as AuditJson[];
    event = events.find((e) => e.type === "AUDIT_EVENT_TYPE_SECURITY_EVENT" && e.requestId === id);
    if (event === undefined) await new Promise((resolve) => setTimeout(resolve, 50));
  }
  t.ok(event !== undefined, "the sidecar's security event reached the audit trail");
  t.equal(event?.actor, `sidecar:${stack.host}`);
  t.equal(event?.flagged, true);
  t.match(event?.details ?? {}, { host: stack.host });
  t.equal(((await api("GET", `/api/v1/requests/${id}`, dana)).body.record as View["record"]).state, "REQUEST_STATE_PENDING", "the forged approval approved nothing");
  await api("POST", `/api/v1/requests/${id}/decision`, dana, { approve: false, reason: "cleaning up after the forgery test" });
  t.equal((await call).code, Code.PermissionDenied);
  t.match((await api("GET", "/api/v1/audit/verify", dana)).body, { intact: true });
});

await t.test("failed sign-ins are rate limited per client address", async (t) => {
  // Earlier subtests' refused tokens came from this address too: they count.
  const statuses: number[] = [];
  for (let i = 0; i < 35; i++) statuses.push((await api("GET", "/api/v1/me", `wrong-token-${i}`)).status);
  const firstLimited = statuses.indexOf(429);
  t.ok(firstLimited > 0 && firstLimited <= 30, `refused with 401 until the limit, then 429 (after ${firstLimited} more failures)`);
  t.ok(statuses.slice(0, firstLimited).every((status) => status === 401));
  t.equal(statuses.at(-1), 429, "and it stays limited");
});
