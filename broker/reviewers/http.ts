/**
 * The broker's HTTP face (Fastify): the reviewers' JSON API, live updates over
 * Server-Sent Events, the approver console, Slack interactions, the Teams bot
 * endpoint, and /metrics,
 * /healthz, /readyz. Contract: docs/reviewer-api.md.
 * @module
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import fastifyStatic from "@fastify/static";
import { toJson } from "@bufbuild/protobuf";
import type { NatsConnection } from "@nats-io/transport-node";
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import type { Registry } from "prom-client";
import { AirlockError, Code, codeName } from "../../common/errors.js";
import type { ReadinessChecks } from "../../common/health.js";
import type { Logger } from "../../common/logger.js";
import { AuditEventSchema, type RequestRecord, RequestState } from "../../proto/index.js";
import { readAuditEvents, TrailVerifier } from "../audit/index.js";
import { type ApprovalConfig, type Ballot, stateName } from "../rules.js";
import type { Broker } from "../service.js";
import { bearerToken, type Reviewer, type ReviewerAuthenticator } from "./auth.js";
import { type BrowserSession, newSessionId, openSession, type Sealer, sessionCsrfToken, sessionPurpose } from "./session.js";
import type { SsoClient, SsoTransaction } from "./sso.js";
import { RateLimiter } from "./rate-limit.js";
import type { StepUpService } from "../stepup/index.js";
import { registerStepUpRoutes, stepUpReceipt } from "./stepup-routes.js";
import { castStepUpVote, registerSsoStepUp } from "./sso-stepup.js";
import { liveRequests } from "./live.js";
import { admitReviewer, listDefaults, listRequests, parseLimit, parseRequestFilter, requestIdRefusals, requestView, requireReviewer, resolveRequest } from "./views.js";

/** The states `GET /api/v1/history` lists when no outcome is asked for: all but pending. */
const historyStates = [RequestState.APPROVED, RequestState.DENIED, RequestState.EXPIRED, RequestState.CANCELLED, RequestState.EXECUTING, RequestState.COMPLETED, RequestState.FAILED] as const;

/** Handles a Slack interaction: verifies it and answers Slack (see broker/notify). */
export type SlackInteractionHandler = (
  rawBody: string,
  headers: Readonly<Record<string, string | string[] | undefined>>,
  decide: (requestId: string, ballot: Ballot) => Promise<RequestRecord>,
) => Promise<{ status: number; body: unknown; headers?: Readonly<Record<string, string>> }>;

/**
 * Handles an activity the Bot Framework POSTs to the Teams bot endpoint: verifies its
 * token and answers the invoke (see broker/notify `TeamsBot.handleActivity`).
 */
export type TeamsActivityHandler = (
  activity: unknown,
  headers: Readonly<Record<string, string | string[] | undefined>>,
  target: { get(requestId: string): Promise<RequestRecord>; decide(requestId: string, ballot: Ballot): Promise<RequestRecord> },
) => Promise<{ status: number; body: unknown }>;

/** Options of {@link createBrokerHttpApp}. */
export interface BrokerHttpOptions {
  readonly broker: Broker;
  /** The connection audit reads go over. */
  readonly nc: NatsConnection;
  readonly approvals: ApprovalConfig;
  /** How reviewers authenticate; without it every `/api/v1` route answers 404 (no reviewers' API configured). */
  readonly auth?: ReviewerAuthenticator;
  readonly log: Logger;
  /** Metrics served at /metrics. */
  readonly registry: Registry;
  /** Checks of /readyz. */
  readonly ready: ReadinessChecks;
  /** Requests per minute one reviewer may make. @default 300 */
  readonly ratePerMinute?: number;
  /** The built console (`approver-console/dist`). @default the repository's approver-console/dist */
  readonly consoleDir?: string;
  /**
   * The origin browsers reach the console at when it is not the broker's own
   * `Host` (behind a proxy that rewrites it), e.g. `https://airlock.example.com`.
   */
  readonly publicOrigin?: string;
  /** Slack interactions; without it `/slack/interactions` answers 404. */
  readonly slack?: SlackInteractionHandler;
  /** Step-up (passkeys, challenges); without it the step-up and passkey routes answer 404 and no vote can step up. */
  readonly stepUp?: StepUpService;
  /**
   * Sealed browser sessions (`reviewers.sessions`): the cookie holds the session sealed with
   * the replicas' shared key. Without it the cookie holds the pasted token (the old dev path).
   */
  readonly sessions?: { readonly sealer: Sealer; readonly maxAgeMs: number };
  /** Single sign-on for the console (`reviewers.sso`); needs {@link BrokerHttpOptions.sessions}. */
  readonly sso?: SsoClient;
  /** The Teams bot; without it `/api/teams/messages` answers 404. */
  readonly teams?: TeamsActivityHandler;
}

/** Defaults of {@link BrokerHttpOptions}. */
export const brokerHttpDefaults = {
  ratePerMinute: 300,
  consoleDir: fileURLToPath(new URL("../../approver-console/dist", import.meta.url)),
  sessionCookie: "airlock_session",
  /** The sealed sign-in in flight, between the redirect to the provider and its callback. */
  ssoCookie: "airlock_sso",
  csrfHeader: "x-airlock-csrf",
  keepAliveMs: 15_000,
  /** Failed sign-ins a minute one client address may make before it has to wait. */
  failedSignInsPerMinute: 30,
  /** A live stream whose client lets more than this pile up unread is ended. */
  maxStreamBufferBytes: 1024 * 1024,
  /** How long a dev-mode session cookie lives, in seconds (OIDC sessions end with their token). */
  devSessionSeconds: 8 * 3600,
} as const;

/** The HTTP status and stable code an error is answered with. */
export function httpErrorOf(error: AirlockError): { status: number; code: string } {
  switch (error.code) {
    case Code.Unauthenticated:
      return { status: 401, code: "unauthenticated" };
    case Code.PermissionDenied:
      // A vote that lacks its step-up has a code of its own: the console answers it with a passkey prompt.
      return { status: 403, code: error.details.reason === "step_up_required" ? "step_up_required" : "permission_denied" };
    case Code.NotFound:
      return { status: 404, code: "not_found" };
    case Code.FailedPrecondition:
      return { status: 409, code: "already_decided" };
    case Code.AlreadyExists:
      return { status: 409, code: "already_voted" };
    case Code.InvalidArgument:
      // A request id that names no one request (ambiguous, too short) has a code of its own.
      return { status: 422, code: typeof error.details.reason === "string" && requestIdRefusals.has(error.details.reason) ? error.details.reason : "invalid_argument" };
    case Code.ResourceExhausted:
      return { status: 429, code: "rate_limited" };
    case Code.Unavailable:
      return { status: 503, code: "unavailable" };
    case Code.Aborted:
      return { status: 409, code: "aborted" };
    default:
      return { status: 500, code: codeName(error.code) };
  }
}

function asAirlockError(error: unknown): AirlockError {
  if (error instanceof AirlockError) return error;
  const fastifyError = error as { statusCode?: number; code?: string; validation?: unknown };
  if (fastifyError.statusCode === 400 || fastifyError.statusCode === 415 || fastifyError.code === "FST_ERR_CTP_INVALID_MEDIA_TYPE") {
    return new AirlockError(Code.InvalidArgument, "the body must be JSON", { details: { field: "body" } });
  }
  if (fastifyError.statusCode === 413) return new AirlockError(Code.InvalidArgument, "the body is too large", { details: { field: "body" } });
  return new AirlockError(Code.Internal, "internal error", { cause: error });
}

function cookieValue(header: string | undefined, name: string): string | undefined {
  for (const part of (header ?? "").split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key !== name) continue;
    try {
      return decodeURIComponent(rest.join("="));
    } catch {
      throw new AirlockError(Code.Unauthenticated, "the session cookie is malformed; sign in again", { details: { reason: "malformed_cookie" } });
    }
  }
  return undefined;
}

/** The CSRF token of a session: the SHA-256 hex of its token, so any replica can check it without shared state. */
export function csrfTokenOf(token: string): string {
  return createHash("sha256").update(token).digest("hex");
}

function sameText(a: string, b: string): boolean {
  const left = Buffer.from(a);
  const right = Buffer.from(b);
  return left.length === right.length && timingSafeEqual(left, right);
}

/** A request's JSON body, as the handlers read it. */
export interface Body {
  readonly [key: string]: unknown;
}

/** The request's body as a JSON object (`{}` when empty); `invalid_argument` for anything else. */
export function bodyOf(request: FastifyRequest): Body {
  const body = request.body;
  if (body === undefined || body === null) return {};
  if (typeof body !== "object" || Array.isArray(body)) throw new AirlockError(Code.InvalidArgument, "the body must be a JSON object", { details: { field: "body" } });
  return body as Body;
}

function optionalText(body: Body, field: string, max = 2000): string | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "string") throw new AirlockError(Code.InvalidArgument, `${field} must be a string`, { details: { field } });
  if (value.length > max) throw new AirlockError(Code.InvalidArgument, `${field} is longer than ${max} characters`, { details: { field } });
  return value;
}

function optionalFlag(body: Body, field: string): boolean | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "boolean") throw new AirlockError(Code.InvalidArgument, `${field} must be true or false`, { details: { field } });
  return value;
}

/** A `Set-Cookie` value; `maxAgeSec` 0 clears the cookie. */
function cookie(name: string, value: string, options: { maxAgeSec: number; path: string; sameSite: "Strict" | "Lax"; secure: boolean }): string {
  return `${name}=${value}; HttpOnly; SameSite=${options.sameSite}; Path=${options.path}; Max-Age=${Math.max(0, Math.floor(options.maxAgeSec))}${options.secure ? "; Secure" : ""}`;
}

/** The console route a sign-in returns to: a plain hash route, never another page or site. */
function safeReturn(value: unknown): string {
  return typeof value === "string" && /^#\/[A-Za-z0-9/_\-?=&.%:]{0,200}$/.test(value) ? value : "#/inbox";
}

/** Builds (does not start) the broker's HTTP app. */
export async function createBrokerHttpApp(options: BrokerHttpOptions): Promise<FastifyInstance> {
  const { broker, approvals, auth, log } = options;
  const limiter = new RateLimiter(options.ratePerMinute ?? brokerHttpDefaults.ratePerMinute);
  const failedSignIns = new RateLimiter(brokerHttpDefaults.failedSignInsPerMinute);
  const app = Fastify({ logger: false, bodyLimit: 256 * 1024, forceCloseConnections: true });
  const { sessions, sso } = options;
  /** Cookies a request's authentication wants set (a refreshed or ended session), added as the reply goes out. */
  const pendingCookies = new WeakMap<FastifyRequest, string[]>();
  const addCookie = (request: FastifyRequest, value: string) => pendingCookies.set(request, [...(pendingCookies.get(request) ?? []), value]);
  /** Sessions being refreshed now, by session id: parallel requests of one browser share one refresh. */
  const refreshing = new Map<string, Promise<BrowserSession>>();
  app.addHook("onSend", (request, reply, payload, done) => {
    const extra = pendingCookies.get(request);
    if (extra !== undefined) {
      const existing = reply.getHeader("set-cookie");
      const list = existing === undefined ? [] : Array.isArray(existing) ? existing.map(String) : [String(existing)];
      void reply.header("set-cookie", [...list, ...extra]);
    }
    done(null, payload);
  });
  const secureCookies = (request: FastifyRequest): boolean => request.protocol === "https" || options.publicOrigin?.startsWith("https:") === true;
  const sessionCookie = (request: FastifyRequest, value: string, maxAgeSec: number): string =>
    cookie(brokerHttpDefaults.sessionCookie, value, { maxAgeSec, path: "/", sameSite: "Strict", secure: secureCookies(request) });

  // Slack signs the raw form body: keep it as a string, untouched.
  app.addContentTypeParser("application/x-www-form-urlencoded", { parseAs: "string" }, (_request, body, done) => done(null, body));

  app.setErrorHandler((error, request, reply) => {
    const airlock = asAirlockError(error);
    const { status, code } = httpErrorOf(airlock);
    if (status >= 500) log.error({ err: airlock, url: request.url }, "reviewer API error");
    else log.debug({ code, url: request.url, message: airlock.rawMessage }, "reviewer API refused a request");
    if (airlock.code === Code.ResourceExhausted) void reply.header("retry-after", typeof airlock.details.retryAfterSec === "number" ? String(airlock.details.retryAfterSec) : "1");
    const details = status >= 500 ? {} : airlock.details;
    void reply.status(status).send({ code, message: status >= 500 ? "internal error" : airlock.rawMessage, details });
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({ code: "not_found", message: `no route ${request.method} ${request.url.split("?")[0] ?? ""}`, details: {} });
  });

  app.get("/healthz", (_request, reply) => reply.type("text/plain").send("ok\n"));
  app.get("/readyz", (_request, reply) => {
    const checks = Object.fromEntries(Object.entries(options.ready).map(([name, check]) => [name, check()]));
    const ready = Object.values(checks).every(Boolean);
    return reply.status(ready ? 200 : 503).send({ ready, checks });
  });
  app.get("/metrics", async (_request, reply) => reply.type(options.registry.contentType).send(await options.registry.metrics()));

  /** Authenticates a request: bearer token, else the session cookie with its CSRF header on writes. */
  async function reviewerOf(request: FastifyRequest): Promise<Reviewer> {
    const bearer = bearerToken(request.headers.authorization);
    let reviewer: Reviewer;
    if (bearer !== undefined) {
      reviewer = await authenticate(request, bearer);
    } else {
      const cookieText = cookieValue(request.headers.cookie, brokerHttpDefaults.sessionCookie);
      if (sessions !== undefined) {
        const session = await sealedSession(request, cookieText);
        reviewer = reviewerOfSession(session);
        if (request.method !== "GET" && request.method !== "HEAD") checkCsrf(request, sessionCsrfToken(session));
      } else {
        reviewer = await authenticate(request, cookieText);
        if (request.method !== "GET" && request.method !== "HEAD") checkCsrf(request, csrfTokenOf(cookieText ?? ""));
      }
    }
    return admitReviewer(reviewer, limiter, approvals);
  }

  /** The reviewer of a sealed session; its credential ends at the session's end or its next refresh, whichever is first. */
  function reviewerOfSession(session: BrowserSession): Reviewer {
    const ends = session.refreshAt === undefined || session.refreshToken === undefined ? session.exp : Math.min(session.exp, session.refreshAt);
    const authAt = session.via === "sso" ? (session.authAt ?? session.iat) : undefined;
    return { id: session.reviewer, groups: session.groups, expiresAt: new Date(ends), ...(authAt === undefined ? {} : { authenticatedAt: new Date(authAt) }) };
  }

  /**
   * Opens the sealed session cookie and refreshes it at the provider when its tokens are due
   * (the new cookie goes out with the reply). Failures count as failed sign-ins; a session the
   * provider no longer backs is cleared.
   */
  async function sealedSession(request: FastifyRequest, cookieText: string | undefined): Promise<BrowserSession> {
    if (sessions === undefined) throw new AirlockError(Code.Internal, "no sessions configured");
    try {
      if (cookieText === undefined || cookieText === "") throw new AirlockError(Code.Unauthenticated, "sign in: no session", { details: { reason: "missing_token" } });
      let session = openSession(sessions.sealer, cookieText);
      if (session.refreshToken !== undefined && session.refreshAt !== undefined && session.refreshAt <= Date.now() && sso !== undefined) {
        session = await refreshSession(session);
        addCookie(request, sessionCookie(request, sessions.sealer.seal(sessionPurpose, session), (session.exp - Date.now()) / 1000));
      }
      return session;
    } catch (error) {
      if (error instanceof AirlockError && error.code === Code.Unauthenticated) {
        if (error.details.reason !== "missing_token") addCookie(request, sessionCookie(request, "", 0));
        const wait = failedSignIns.take(request.ip);
        if (wait !== undefined) throw new AirlockError(Code.ResourceExhausted, `too many failed sign-ins from ${request.ip}; retry in ${wait} s`, { details: { retryAfterSec: wait } });
      }
      throw error;
    }
  }

  function refreshSession(session: BrowserSession): Promise<BrowserSession> {
    const key = `${session.sid} ${session.refreshToken ?? ""}`;
    const running = refreshing.get(key);
    // Requests that raced one refresh share its result, but only while that result is itself fresh:
    // a copy of the cookie presented later goes to the provider, which may have revoked it.
    if (running !== undefined) {
      return running.then((fresh) => {
        if (fresh.refreshAt === undefined || fresh.refreshAt > Date.now()) return fresh;
        if (refreshing.get(key) === running) refreshing.delete(key);
        return refreshSession(session);
      });
    }
    const refresh = (async (): Promise<BrowserSession> => {
      if (sso === undefined || session.refreshToken === undefined) return session;
      const fresh = await sso.refresh(session.refreshToken, session.reviewer);
      log.info({ reviewer: session.reviewer }, "reviewer session refreshed at the identity provider");
      return { ...session, groups: fresh.groups ?? session.groups, refreshAt: fresh.tokensExpireAt, ...(fresh.refreshToken === undefined ? {} : { refreshToken: fresh.refreshToken }) };
    })();
    refreshing.set(key, refresh);
    // Kept a moment after it settles, so requests that raced it reuse the result rather than a spent (rotated) token.
    void refresh.then(
      () => setTimeout(() => refreshing.delete(key), 5_000).unref(),
      () => refreshing.delete(key),
    );
    return refresh;
  }

  /** Verifies a token; failures count against the caller's address, so tokens cannot be guessed at speed. */
  async function authenticate(request: FastifyRequest, token: string | undefined): Promise<Reviewer> {
    if (auth === undefined) throw new AirlockError(Code.NotFound, "this broker serves no reviewers' API (its config has no reviewers section)");
    try {
      return await auth.authenticate(token);
    } catch (error) {
      if (error instanceof AirlockError && error.code === Code.Unauthenticated) {
        const wait = failedSignIns.take(request.ip);
        if (wait !== undefined) throw new AirlockError(Code.ResourceExhausted, `too many failed sign-ins from ${request.ip}; retry in ${wait} s`, { details: { retryAfterSec: wait } });
      }
      throw error;
    }
  }

  function checkCsrf(request: FastifyRequest, expected: string): void {
    const header = request.headers[brokerHttpDefaults.csrfHeader];
    if (typeof header !== "string" || !sameText(header, expected)) {
      throw new AirlockError(Code.PermissionDenied, `a console write needs the ${brokerHttpDefaults.csrfHeader} header from sign-in`, { details: { reason: "csrf" } });
    }
    const origin = request.headers.origin;
    if (origin !== undefined && origin !== "null") {
      let host: string;
      try {
        host = new URL(origin).host;
      } catch {
        host = "";
      }
      if (host !== request.headers.host && origin !== options.publicOrigin) throw new AirlockError(Code.PermissionDenied, "cross-origin writes are refused", { details: { reason: "csrf" } });
    } else if (origin === "null") {
      throw new AirlockError(Code.PermissionDenied, "cross-origin writes are refused", { details: { reason: "csrf" } });
    }
  }

  /** Whether the console may sign in with a pasted token: dev mode, or no SSO configured (the old path). */
  const tokenSignIn = auth !== undefined && (auth.devMode || sso === undefined);

  app.get("/api/v1/sso", () => {
    if (auth === undefined) throw new AirlockError(Code.NotFound, "this broker serves no reviewers' API (its config has no reviewers section)");
    return {
      sso: sso === undefined ? null : { provider: sso.config.providerName, loginUrl: "/api/v1/sso/login", issuer: sso.config.issuer, scopes: sso.config.scopes, ...(sso.config.cliClientId === undefined ? {} : { cliClientId: sso.config.cliClientId }) },
      tokenSignIn,
      devMode: auth.devMode,
    };
  });

  if (sso !== undefined && sessions !== undefined) {
    const ssoCookie = (request: FastifyRequest, value: string, maxAgeSec: number): string =>
      // Lax: the provider sends the browser back with a cross-site navigation, which a Strict cookie would miss.
      cookie(brokerHttpDefaults.ssoCookie, value, { maxAgeSec, path: "/api/v1/sso", sameSite: "Lax", secure: secureCookies(request) });
    const callbackUrl = (request: FastifyRequest): string => sso.config.redirectUri ?? `${options.publicOrigin ?? `${request.protocol}://${request.headers.host ?? ""}`}/api/v1/sso/callback`;

    app.get("/api/v1/sso/login", async (request, reply) => {
      const query = request.query as Record<string, unknown>;
      const returnTo = safeReturn(query.return);
      // `fresh=1`: the provider must ask for the credentials again (before a passkey is enrolled).
      const { url, transaction } = await sso.begin(callbackUrl(request), returnTo, query.fresh === "1" ? { fresh: true } : undefined);
      void reply.header("set-cookie", ssoCookie(request, sessions.sealer.seal("sso", transaction), (transaction.exp - Date.now()) / 1000));
      void reply.header("cache-control", "no-store");
      return reply.redirect(url.href, 302);
    });

    app.get("/api/v1/sso/callback", async (request, reply) => {
      void reply.header("cache-control", "no-store");
      // The sign-in in flight is used once, whatever happens.
      void reply.header("set-cookie", ssoCookie(request, "", 0));
      const fail = (error: unknown) => {
        const airlock = asAirlockError(error);
        const reason = typeof airlock.details.reason === "string" ? airlock.details.reason : httpErrorOf(airlock).code;
        if (airlock.code === Code.Unauthenticated || airlock.code === Code.PermissionDenied) failedSignIns.take(request.ip);
        log.warn({ reason, ip: request.ip }, "single sign-on refused");
        // A browser is on this page: back to the console, which says why.
        return reply.redirect(`/console/?sso_error=${encodeURIComponent(reason)}`, 303);
      };
      let stepUpReturn: string | undefined;
      try {
        const sealed = cookieValue(request.headers.cookie, brokerHttpDefaults.ssoCookie);
        if (sealed === undefined || sealed === "") throw new AirlockError(Code.Unauthenticated, "no sign-in is in progress in this browser", { details: { reason: "no_sign_in_in_progress" } });
        const transaction = sessions.sealer.open("sso", sealed) as SsoTransaction;
        if (typeof transaction.exp !== "number" || transaction.exp <= Date.now()) throw new AirlockError(Code.Unauthenticated, "the sign-in took too long; start again", { details: { reason: "sign_in_expired" } });
        if (transaction.stepUp !== undefined) stepUpReturn = safeReturn(transaction.returnTo);
        const callback = new URL(request.url, `http://${request.headers.host ?? "localhost"}`);
        const identity = await sso.finish(callback, transaction);
        if (transaction.stepUp !== undefined) {
          // A step-up, not a sign-in: the session stays as it is; the vote is cast with the fresh ID token.
          await castStepUpVote({ stepUp: options.stepUp, broker, approvals, log }, transaction.stepUp, identity);
          return await reply.redirect(`/console/?step_up=done${stepUpReturn ?? ""}`, 303);
        }
        const reviewer: Reviewer = { id: identity.reviewer, groups: identity.groups, expiresAt: undefined };
        requireReviewer(reviewer, approvals);
        const now = Date.now();
        const session: BrowserSession = {
          sid: newSessionId(),
          reviewer: identity.reviewer,
          groups: identity.groups,
          iat: now,
          exp: now + sessions.maxAgeMs,
          // When the person entered their credentials: a provider that reused its own session says so in auth_time.
          authAt: typeof identity.claims.auth_time === "number" ? Math.min(now, identity.claims.auth_time * 1000) : now,
          via: "sso",
          ...(identity.refreshToken === undefined ? {} : { refreshToken: identity.refreshToken, refreshAt: identity.tokensExpireAt }),
        };
        addCookie(request, sessionCookie(request, sessions.sealer.seal(sessionPurpose, session), sessions.maxAgeMs / 1000));
        log.info({ reviewer: identity.reviewer, via: "sso", refresh: identity.refreshToken !== undefined }, "reviewer signed in");
        return reply.redirect(`/console/${transaction.returnTo}`, 303);
      } catch (error) {
        if (stepUpReturn === undefined) return fail(error);
        // A refused step-up goes back to the request it was for, which says why.
        const airlock = asAirlockError(error);
        const reason = typeof airlock.details.reason === "string" ? airlock.details.reason : httpErrorOf(airlock).code;
        failedSignIns.take(request.ip);
        log.warn({ reason, ip: request.ip }, "step-up by a fresh sign-in refused");
        return reply.redirect(`/console/?step_up_error=${encodeURIComponent(reason)}${stepUpReturn}`, 303);
      }
    });

    registerSsoStepUp(app, {
      sso,
      stepUp: options.stepUp,
      broker,
      approvals,
      reviewerOf,
      bodyOf,
      callbackUrl,
      transactionCookie: (request, transaction) => ssoCookie(request, sessions.sealer.seal("sso", transaction), (transaction.exp - Date.now()) / 1000),
      log,
    });
  }

  app.post("/api/v1/session", async (request, reply) => {
    if (!tokenSignIn) {
      throw new AirlockError(Code.PermissionDenied, "people sign in with single sign-on here; a pasted token works only as a bearer token (API, CLI)", { details: { reason: "sso_required" } });
    }
    const token = optionalText(bodyOf(request), "token", 16_384);
    if (token === undefined || token.trim() === "") throw new AirlockError(Code.InvalidArgument, "token is required", { details: { field: "token" } });
    const reviewer = await authenticate(request, token.trim());
    requireReviewer(reviewer, approvals);
    if (sessions !== undefined) {
      const now = Date.now();
      const exp = Math.min(now + sessions.maxAgeMs, reviewer.expiresAt?.getTime() ?? Number.POSITIVE_INFINITY);
      const session: BrowserSession = { sid: newSessionId(), reviewer: reviewer.id, groups: reviewer.groups, iat: now, exp, via: "dev_token" };
      void reply.header("set-cookie", sessionCookie(request, sessions.sealer.seal(sessionPurpose, session), (exp - now) / 1000));
      log.info({ reviewer: reviewer.id, via: "token" }, "reviewer signed in");
      return { reviewer: reviewer.id, groups: reviewer.groups, csrfToken: sessionCsrfToken(session) };
    }
    const maxAge = reviewer.expiresAt === undefined ? brokerHttpDefaults.devSessionSeconds : Math.max(0, Math.floor((reviewer.expiresAt.getTime() - Date.now()) / 1000));
    const secure = request.protocol === "https" ? "; Secure" : "";
    void reply.header("set-cookie", `${brokerHttpDefaults.sessionCookie}=${encodeURIComponent(token.trim())}; HttpOnly; SameSite=Strict; Path=/; Max-Age=${maxAge}${secure}`);
    log.info({ reviewer: reviewer.id }, "reviewer signed in");
    return { reviewer: reviewer.id, groups: reviewer.groups, csrfToken: csrfTokenOf(token.trim()) };
  });

  app.delete("/api/v1/session", async (request, reply) => {
    // Signing out needs no valid session: a stale cookie must be clearable too.
    const cookieText = cookieValue(request.headers.cookie, brokerHttpDefaults.sessionCookie);
    if (sessions !== undefined && sso !== undefined && cookieText !== undefined && cookieText !== "") {
      let session: BrowserSession | undefined;
      try {
        session = openSession(sessions.sealer, cookieText);
      } catch {
        session = undefined;
      }
      // The provider forgets the refresh token, so a copy of the cookie cannot be refreshed any more.
      if (session?.refreshToken !== undefined) {
        refreshing.delete(`${session.sid} ${session.refreshToken}`);
        await sso.revoke(session.refreshToken);
      }
      if (session !== undefined) log.info({ reviewer: session.reviewer }, "reviewer signed out");
    }
    void reply.header("set-cookie", sessionCookie(request, "", 0));
    return reply.status(204).send();
  });

  app.get("/api/v1/me", async (request) => {
    const reviewer = await reviewerOf(request);
    const key = reviewer.id.trim().toLowerCase();
    // A console signed in by SSO learns its CSRF token here (a cross-origin page cannot read this answer).
    let csrfToken: string | undefined;
    if (request.headers.authorization === undefined) {
      const cookieText = cookieValue(request.headers.cookie, brokerHttpDefaults.sessionCookie) ?? "";
      // A refresh keeps the session's id, so the cookie this request came with gives the same token.
      csrfToken = sessions === undefined ? csrfTokenOf(cookieText) : sessionCsrfToken(openSession(sessions.sealer, cookieText));
    }
    return {
      reviewer: reviewer.id,
      groups: reviewer.groups,
      breakGlass: approvals.breakGlassRole.some((member) => member.trim().toLowerCase() === key),
      // The console says in advance when approving will need a step-up, from the rule and this floor.
      ...(options.stepUp?.config.minRisk === undefined ? {} : { stepUpMinRisk: options.stepUp.config.minRisk }),
      ...(csrfToken === undefined ? {} : { csrfToken }),
    };
  });

  app.get("/api/v1/requests", async (request) => {
    const reviewer = await reviewerOf(request);
    const query = request.query as Record<string, unknown>;
    const filter = parseRequestFilter(query);
    const limit = parseLimit(query.limit);
    const { items, nextCursor } = await listRequests(broker, filter, reviewer, approvals, limit, query.cursor);
    const now = new Date();
    return { requests: items.map((record) => requestView(record, reviewer, approvals, now)), ...(nextCursor === undefined ? {} : { nextCursor }) };
  });

  app.get("/api/v1/history", async (request) => {
    const reviewer = await reviewerOf(request);
    const query = request.query as Record<string, unknown>;
    const parsed = parseRequestFilter({ agent: query.agent, outcome: query.outcome, since: query.since });
    // History is every state but pending (one outcome when asked).
    const filter = parsed.states.size > 0 ? parsed : { ...parsed, states: new Set(historyStates) };
    const limit = parseLimit(query.limit);
    const { items, nextCursor } = await listRequests(broker, filter, reviewer, approvals, limit, query.cursor);
    const now = new Date();
    return { requests: items.filter((record) => record.state !== RequestState.PENDING).map((record) => requestView(record, reviewer, approvals, now)), ...(nextCursor === undefined ? {} : { nextCursor }) };
  });

  app.get<{ Params: { id: string } }>("/api/v1/requests/:id", async (request) => {
    const reviewer = await reviewerOf(request);
    return requestView(await resolveRequest(broker, request.params.id), reviewer, approvals, new Date());
  });

  app.post<{ Params: { id: string } }>("/api/v1/requests/:id/decision", async (request) => {
    const reviewer = await reviewerOf(request);
    const body = bodyOf(request);
    const approve = optionalFlag(body, "approve");
    if (approve === undefined) throw new AirlockError(Code.InvalidArgument, "approve (true or false) is required", { details: { field: "approve" } });
    const reason = optionalText(body, "reason")?.trim();
    if (!approve && (reason === undefined || reason === "")) throw new AirlockError(Code.InvalidArgument, "a denial needs a reason", { details: { field: "reason" } });
    const breakGlass = optionalFlag(body, "breakGlass");
    // A shortened id is resolved first, so the vote goes to the one request it names.
    const resolved = await resolveRequest(broker, request.params.id);
    const requestId = resolved.request?.id ?? request.params.id;
    // A step-up proof is verified (and its challenge spent) against the broker's own record of the request.
    const stepUp = body.stepUp === undefined || body.stepUp === null ? undefined : await stepUpReceipt(options.stepUp, reviewer, resolved, approve, body.stepUp);
    const ballot: Ballot = {
      reviewer: reviewer.id,
      approve,
      groups: reviewer.groups,
      ...(reason === undefined ? {} : { reason }),
      ...(breakGlass === undefined ? {} : { breakGlass }),
      ...(stepUp === undefined ? {} : { stepUp }),
    };
    let record: RequestRecord;
    try {
      record = await broker.decide(requestId, ballot);
    } catch (error) {
      throw await withState(error, requestId);
    }
    log.info({ requestId, reviewer: reviewer.id, approve }, "reviewer voted");
    return requestView(record, reviewer, approvals, new Date());
  });

  /** A refusal because the request is no longer pending says which state it is in. */
  async function withState(error: unknown, requestId: string): Promise<unknown> {
    if (!(error instanceof AirlockError) || error.code !== Code.FailedPrecondition) return error;
    const state = await broker.get(requestId).then(
      (record) => stateName(record.state),
      () => "unknown",
    );
    return new AirlockError(error.code, error.rawMessage, { details: { ...error.details, state } });
  }

  app.post("/api/v1/requests/bulk-deny", async (request) => {
    const reviewer = await reviewerOf(request);
    const body = bodyOf(request);
    const reason = optionalText(body, "reason")?.trim();
    if (reason === undefined || reason === "") throw new AirlockError(Code.InvalidArgument, "a denial needs a reason", { details: { field: "reason" } });
    const olderThan = optionalText(body, "olderThan", 32);
    if (olderThan === undefined) throw new AirlockError(Code.InvalidArgument, "olderThan (e.g. 30m) is required", { details: { field: "olderThan" } });
    const filter = parseRequestFilter({ state: "pending", olderThan });
    const stale: RequestRecord[] = [];
    let cursor: string | undefined;
    do {
      const listed = await listRequests(broker, filter, reviewer, approvals, listDefaults.maxLimit, cursor);
      stale.push(...listed.items);
      cursor = listed.nextCursor;
    } while (cursor !== undefined);
    const denied: string[] = [];
    const failed: { id: string; code: string; message: string }[] = [];
    for (const record of stale) {
      const id = record.request?.id ?? "";
      try {
        await broker.decide(id, { reviewer: reviewer.id, approve: false, reason, groups: reviewer.groups });
        denied.push(id);
      } catch (error) {
        const airlock = asAirlockError(error);
        failed.push({ id, code: httpErrorOf(airlock).code, message: airlock.rawMessage });
      }
    }
    log.info({ reviewer: reviewer.id, denied: denied.length, failed: failed.length }, "bulk deny");
    return { denied, failed };
  });

  app.get("/api/v1/audit", async (request) => {
    await reviewerOf(request);
    const limit = parseLimit((request.query as Record<string, unknown>).limit, 200);
    const events = [];
    for await (const event of readAuditEvents(options.nc, { last: limit })) events.push(event);
    return { events: events.map((event) => toJson(AuditEventSchema, event)) };
  });

  app.get("/api/v1/audit/verify", async (request) => {
    await reviewerOf(request);
    const verifier = new TrailVerifier({ keys: options.broker.auditKeys });
    for await (const event of readAuditEvents(options.nc, { onUndecodable: (sequence) => verifier.undecodable(sequence) })) verifier.add(event);
    return verifier.finish();
  });

  app.get("/api/v1/events", async (request, reply) => {
    // Listen for the client going away before anything is awaited: a close during sign-in
    // checks would otherwise go unseen and leave the stream's watch running for good.
    const stop = new AbortController();
    const abort = () => stop.abort();
    reply.raw.once("close", abort);
    let reviewer: Reviewer;
    try {
      reviewer = await reviewerOf(request);
    } catch (error) {
      reply.raw.off("close", abort);
      throw error;
    }
    if (stop.signal.aborted) return reply.hijack();
    const onlyMine = (request.query as Record<string, unknown>).needsMe === "true";
    streamRequests(request, reply, reviewer, onlyMine, stop);
  });

  function streamRequests(request: FastifyRequest, reply: FastifyReply, reviewer: Reviewer, onlyMine: boolean, stop: AbortController): void {
    reply.hijack();
    const out = reply.raw;
    const cookies = pendingCookies.get(request);
    out.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store", connection: "keep-alive", "x-accel-buffering": "no", ...(cookies === undefined ? {} : { "set-cookie": cookies }) });
    const write = (text: string) => {
      // A client that stops reading does not get to make the broker buffer without bound.
      if (!out.write(text) && out.writableLength > brokerHttpDefaults.maxStreamBufferBytes) stop.abort();
    };
    const keepAlive = setInterval(() => write(": keep-alive\n\n"), brokerHttpDefaults.keepAliveMs);
    // The stream lives no longer than the credential that opened it.
    const expiry = reviewer.expiresAt === undefined ? undefined : setTimeout(() => {
      write("event: expired\ndata: {}\n\n");
      stop.abort();
    }, Math.max(0, reviewer.expiresAt.getTime() - Date.now()));
    // With needsMe, a request that stops needing me is sent once more (so the console drops it), then forgotten.
    const shown = new Set<string>();
    void (async () => {
      try {
        for await (const update of liveRequests(broker, stop.signal)) {
          if (update.kind === "ready") {
            write("event: ready\ndata: {}\n\n");
            continue;
          }
          const id = update.record.request?.id ?? "";
          const view = requestView(update.record, reviewer, approvals, new Date());
          if (onlyMine && !view.needsMe && !shown.has(id)) continue;
          if (onlyMine && !view.needsMe) shown.delete(id);
          else if (onlyMine) shown.add(id);
          write(`event: request\ndata: ${JSON.stringify(view)}\n\n`);
        }
      } catch (error) {
        if (!stop.signal.aborted) log.warn({ err: error }, "live updates stream ended");
      } finally {
        clearInterval(keepAlive);
        clearTimeout(expiry);
        stop.abort();
        out.end();
      }
    })();
  }

  if (options.stepUp !== undefined) registerStepUpRoutes(app, { stepUp: options.stepUp, broker, reviewerOf, bodyOf, log });

  if (options.slack !== undefined) {
    const slack = options.slack;
    app.post("/slack/interactions", async (request, reply) => {
      const raw = typeof request.body === "string" ? request.body : "";
      const answer = await slack(raw, request.headers, (requestId, ballot) => broker.decide(requestId, ballot, { channel: "slack" }));
      return reply
        .status(answer.status)
        .headers(answer.headers ?? {})
        .send(answer.body);
    });
  }

  if (options.teams !== undefined) {
    const teams = options.teams;
    // The Bot Framework's token is in the Authorization header and does not cover the body: JSON as parsed.
    app.post("/api/teams/messages", async (request, reply) => {
      const answer = await teams(request.body, request.headers, {
        get: (requestId) => broker.get(requestId),
        decide: (requestId, ballot) => broker.decide(requestId, ballot, { channel: "teams" }),
      });
      return reply.status(answer.status).send(answer.body);
    });
  }

  const consoleDir = options.consoleDir ?? brokerHttpDefaults.consoleDir;
  if (existsSync(consoleDir)) {
    await app.register(fastifyStatic, { root: consoleDir, prefix: "/console/", index: ["index.html"], cacheControl: false });
    app.get("/console", (_request, reply) => reply.redirect("/console/"));
  } else {
    app.get("/console/*", (_request, reply) => reply.status(503).type("text/plain").send("the approver console is not built: run `npm run build:console`\n"));
  }
  app.get("/", (_request, reply) => reply.redirect("/console/"));
  return app;
}
