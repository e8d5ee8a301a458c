// The reviewers' HTTP API (docs/reviewer-api.md) as typed functions.
import { fromJson, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import { type AuditEvent, AuditEventSchema } from "../../proto/gen/airlock/v1/audit_pb.js";
import { type RequestRecord, RequestRecordSchema, type VerifyAuditResponse, VerifyAuditResponseSchema } from "../../proto/gen/airlock/v1/reviewer_pb.js";

/** A request as the API shows it to the signed-in reviewer. */
export interface RequestView {
  readonly record: RequestRecord;
  /** Whether the signed-in reviewer may still vote on it. */
  readonly needsMe: boolean;
  /** When a pending request expires undecided. */
  readonly expiresAt: Date | undefined;
}

/** Who is signed in. */
export interface Me {
  readonly reviewer: string;
  readonly groups: readonly string[];
  readonly breakGlass: boolean;
  /** Approving requests at this risk or above needs a step-up (`reviewers.step_up.min_risk`); absent: only rules ask. */
  readonly stepUpMinRisk?: string;
}

/** An error answer of the API: `{ code, message, details }` with its HTTP status. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details: JsonObject = {},
  ) {
    super(message);
    this.name = "ApiError";
  }

  /** The message for humans, with the facts a reviewer needs (such as the state of an already decided request). */
  describe(): string {
    const state = this.details.state;
    if (this.code === "already_decided" && typeof state === "string") {
      return `${this.message} (it is ${state.replace(/^REQUEST_STATE_/, "").toLowerCase()})`;
    }
    return this.message;
  }
}

const csrfKey = "airlock.csrf";
const meKey = "airlock.me";

function isObject(value: unknown): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function asObject(value: unknown, what: string): JsonObject {
  if (!isObject(value)) throw new ApiError(0, "bad_response", `the broker sent an unexpected ${what}`);
  return value;
}

function readMe(json: JsonObject): Me {
  const groups = Array.isArray(json.groups) ? json.groups.filter((g): g is string => typeof g === "string") : [];
  return {
    reviewer: typeof json.reviewer === "string" ? json.reviewer : "",
    groups,
    breakGlass: json.breakGlass === true,
    ...(typeof json.stepUpMinRisk === "string" ? { stepUpMinRisk: json.stepUpMinRisk } : {}),
  };
}

/** Decodes a RequestView (its record is canonical protobuf JSON). */
export function readRequestView(value: unknown): RequestView {
  const json = asObject(value, "request");
  const record = fromJson(RequestRecordSchema, json.record ?? null, { ignoreUnknownFields: true });
  const expiresAt = typeof json.expiresAt === "string" ? new Date(json.expiresAt) : undefined;
  return { record, needsMe: json.needsMe === true, expiresAt: expiresAt !== undefined && !Number.isNaN(expiresAt.getTime()) ? expiresAt : undefined };
}

function readViews(value: unknown): RequestView[] {
  const list = asObject(value, "answer").requests;
  return Array.isArray(list) ? list.map(readRequestView) : [];
}

/** Listeners told when the broker says the session is gone (401). */
const signedOutListeners = new Set<() => void>();

/** Calls `listener` whenever an API call comes back 401. Returns the unsubscribe function. */
export function onSignedOut(listener: () => void): () => void {
  signedOutListeners.add(listener);
  return () => signedOutListeners.delete(listener);
}

/** The session as this tab knows it: kept in sessionStorage, so it ends with the tab. */
export const session = {
  csrfToken(): string | null {
    return sessionStorage.getItem(csrfKey);
  },
  me(): Me | null {
    const raw = sessionStorage.getItem(meKey);
    if (raw === null) return null;
    try {
      return readMe(asObject(JSON.parse(raw), "session"));
    } catch {
      return null;
    }
  },
  save(me: Me, csrfToken: string): void {
    sessionStorage.setItem(csrfKey, csrfToken);
    sessionStorage.setItem(meKey, JSON.stringify(me));
  },
  clear(): void {
    sessionStorage.removeItem(csrfKey);
    sessionStorage.removeItem(meKey);
  },
};

type Query = Readonly<Record<string, string | number | boolean | undefined>>;

function url(path: string, query: Query = {}): string {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== "") params.set(key, String(value));
  }
  const search = params.toString();
  // Relative to the page (served under /console/), the API lives at the origin's /api/v1.
  return `/api/v1${path}${search === "" ? "" : `?${search}`}`;
}

async function call(method: "GET" | "POST" | "DELETE", path: string, options: { query?: Query; body?: JsonValue } = {}): Promise<unknown> {
  const headers: Record<string, string> = { accept: "application/json" };
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const csrf = session.csrfToken();
  if (method !== "GET" && csrf !== null) headers["x-airlock-csrf"] = csrf;
  let response: Response;
  try {
    response = await fetch(url(path, options.query), {
      method,
      headers,
      credentials: "same-origin",
      ...(options.body === undefined ? {} : { body: JSON.stringify(options.body) }),
    });
  } catch {
    throw new ApiError(0, "unavailable", "the broker cannot be reached; check your connection");
  }
  if (response.status === 204) return undefined;
  const text = await response.text();
  let json: unknown = undefined;
  if (text !== "") {
    try {
      json = JSON.parse(text) as unknown;
    } catch {
      json = undefined;
    }
  }
  if (!response.ok) {
    const body = isObject(json) ? json : {};
    const code = typeof body.code === "string" ? body.code : `http_${response.status}`;
    let message = typeof body.message === "string" ? body.message : `${response.status} ${response.statusText}`;
    const retry = response.headers.get("retry-after");
    if (response.status === 429 && retry !== null) message += ` (try again in ${retry} s)`;
    const error = new ApiError(response.status, code, message, isObject(body.details) ? body.details : {});
    // Signing in with a bad token is a 401 too, but that is not a session ending.
    if (response.status === 401 && path !== "/session") for (const listener of signedOutListeners) listener();
    throw error;
  }
  return json;
}

/** Exchanges a reviewer token for the session cookie; keeps the CSRF token for this tab. */
export async function signIn(token: string): Promise<Me> {
  const json = asObject(await call("POST", "/session", { body: { token } }), "session");
  if (typeof json.csrfToken !== "string") throw new ApiError(0, "bad_response", "the broker sent no CSRF token");
  session.save(readMe(json), json.csrfToken);
  // The sign-in answer does not say whether the reviewer may break glass; /me does.
  const me = await getMe().catch(() => readMe(json));
  session.save(me, json.csrfToken);
  return me;
}

/** Ends the session at the broker (best effort) and forgets it here. */
export async function signOut(): Promise<void> {
  try {
    await call("DELETE", "/session");
  } finally {
    session.clear();
  }
}

/** Who is signed in. A cookie session (single sign-on) learns its CSRF token here and keeps it for this tab. */
export async function getMe(): Promise<Me> {
  const json = asObject(await call("GET", "/me"), "me");
  const me = readMe(json);
  if (typeof json.csrfToken === "string") session.save(me, json.csrfToken);
  return me;
}

/** How people sign in to this broker. */
export interface SignInOptions {
  /** Single sign-on, when configured: the provider's name and where the sign-in starts. */
  readonly sso: { readonly provider: string; readonly loginUrl: string } | undefined;
  /** Whether a token may be pasted (dev mode, or a broker without SSO). */
  readonly tokenSignIn: boolean;
  /** Whether the broker runs with fixed dev tokens. */
  readonly devMode: boolean;
}

/** Asks the broker how people sign in (no session needed). */
export async function signInOptions(): Promise<SignInOptions> {
  const json = asObject(await call("GET", "/sso"), "sign-in options");
  const sso = isObject(json.sso) && typeof json.sso.provider === "string" && typeof json.sso.loginUrl === "string" ? { provider: json.sso.provider, loginUrl: json.sso.loginUrl } : undefined;
  return { sso, tokenSignIn: json.tokenSignIn === true, devMode: json.devMode === true };
}

export async function listRequests(query: { state?: string; needsMe?: boolean; agent?: string | undefined; limit?: number }): Promise<RequestView[]> {
  return readViews(await call("GET", "/requests", { query: { ...query, needsMe: query.needsMe === true ? "true" : undefined } }));
}

export async function getRequest(id: string): Promise<RequestView> {
  return readRequestView(await call("GET", `/requests/${encodeURIComponent(id)}`));
}

export async function decide(id: string, decision: { approve: boolean; reason: string; breakGlass: boolean; stepUp?: JsonObject }): Promise<RequestView> {
  const body: JsonObject = { approve: decision.approve };
  if (decision.reason !== "") body.reason = decision.reason;
  if (decision.breakGlass) body.breakGlass = true;
  if (decision.stepUp !== undefined) body.stepUp = decision.stepUp;
  return readRequestView(await call("POST", `/requests/${encodeURIComponent(id)}/decision`, { body }));
}

/** One page of history, and the cursor of the next one (absent at the oldest). */
export async function history(query: { agent?: string | undefined; outcome?: string | undefined; limit?: number; cursor?: string | undefined }): Promise<{ views: RequestView[]; nextCursor: string | undefined }> {
  const answer = await call("GET", "/history", { query });
  const nextCursor = asObject(answer, "answer").nextCursor;
  return { views: readViews(answer), nextCursor: typeof nextCursor === "string" ? nextCursor : undefined };
}

export async function auditEvents(limit = 200): Promise<AuditEvent[]> {
  const list = asObject(await call("GET", "/audit", { query: { limit } }), "answer").events;
  return Array.isArray(list) ? list.map((event) => fromJson(AuditEventSchema, event, { ignoreUnknownFields: true })) : [];
}

export async function verifyAudit(): Promise<VerifyAuditResponse> {
  const json = asObject(await call("GET", "/audit/verify"), "answer");
  return fromJson(VerifyAuditResponseSchema, json, { ignoreUnknownFields: true });
}

/** The URL of the live event stream. */
export const eventsUrl = "/api/v1/events";

/** A step-up challenge for one vote (see `POST /api/v1/requests/:id/step-up`). */
export interface StepUpChallenge {
  readonly challengeId: string;
  /** `passkey` when the reviewer has one, `oidc` when a fresh sign-in can stand in. */
  readonly methods: readonly string[];
  /** WebAuthn request options (JSON) when `passkey` is offered. */
  readonly passkey?: JsonObject;
  /** The re-authentication to ask the identity provider for when `oidc` is offered. */
  readonly oidc?: JsonObject;
}

/** Asks the broker for a challenge bound to this request and verdict. */
export async function stepUpChallenge(id: string, approve: boolean): Promise<StepUpChallenge> {
  const json = asObject(await call("POST", `/requests/${encodeURIComponent(id)}/step-up`, { body: { approve } }), "challenge");
  const methods = Array.isArray(json.methods) ? json.methods.filter((m): m is string => typeof m === "string") : [];
  return {
    challengeId: typeof json.challengeId === "string" ? json.challengeId : "",
    methods,
    ...(isObject(json.passkey) ? { passkey: json.passkey } : {}),
    ...(isObject(json.oidc) ? { oidc: json.oidc } : {}),
  };
}

/**
 * Starts a step-up by a fresh sign-in for a challenge that offers `oidc`: the broker seals
 * the vote (this reason, break-glass) into the sign-in and answers the provider's URL to go to.
 */
export async function startFreshSignIn(challengeId: string, vote: { reason: string; breakGlass: boolean }): Promise<string> {
  const json = asObject(await call("POST", "/sso/step-up", { body: { challengeId, reason: vote.reason, breakGlass: vote.breakGlass } }), "answer");
  if (typeof json.url !== "string") throw new ApiError(0, "step_up_failed", "the broker did not say where to sign in again");
  return json.url;
}

/** One of the signed-in reviewer's passkeys. */
export interface Passkey {
  readonly id: string;
  readonly name: string;
  readonly createdAt: Date;
  readonly lastUsedAt: Date | undefined;
}

function readPasskey(value: unknown): Passkey {
  const json = asObject(value, "passkey");
  return {
    id: typeof json.id === "string" ? json.id : "",
    name: typeof json.name === "string" ? json.name : "",
    createdAt: new Date(typeof json.createdAt === "string" ? json.createdAt : 0),
    lastUsedAt: typeof json.lastUsedAt === "string" ? new Date(json.lastUsedAt) : undefined,
  };
}

export async function listPasskeys(): Promise<Passkey[]> {
  const list = asObject(await call("GET", "/passkeys"), "answer").passkeys;
  return Array.isArray(list) ? list.map(readPasskey) : [];
}

/** Starts a registration: the WebAuthn creation options and the challenge's id. */
export async function passkeyOptions(): Promise<{ challengeId: string; options: JsonObject; passkey?: JsonObject }> {
  const json = asObject(await call("POST", "/passkeys/options", { body: {} }), "options");
  return { challengeId: typeof json.challengeId === "string" ? json.challengeId : "", options: asObject(json.options, "options"), ...(isObject(json.passkey) ? { passkey: json.passkey } : {}) };
}

/** Registers a passkey; `assertion` confirms it with an existing one (required once the reviewer has any). */
export async function registerPasskey(challengeId: string, response: JsonObject, name: string, assertion?: JsonObject): Promise<Passkey> {
  return readPasskey(await call("POST", "/passkeys", { body: { challengeId, response, name, ...(assertion === undefined ? {} : { assertion }) } }));
}

export async function removePasskey(id: string): Promise<void> {
  await call("DELETE", `/passkeys/${encodeURIComponent(id)}`);
}
