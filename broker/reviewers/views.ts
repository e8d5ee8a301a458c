/**
 * What reviewers see of a request, and the filters they list with: shared by the
 * HTTP API, the gRPC ReviewerService and the console's live updates.
 * @module
 */
import { type JsonObject, toJson } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { AirlockError, Code } from "../../common/errors.js";
import { parseDuration } from "../../common/duration.js";
import { type RequestRecord, RequestRecordSchema, RequestState, Risk } from "../../proto/index.js";
import type { IndexQuery } from "../request-index.js";
import type { ApprovalConfig } from "../rules.js";
import type { Broker } from "../service.js";
import { mayApprove } from "../rules.js";
import type { Reviewer } from "./auth.js";
import type { RateLimiter } from "./rate-limit.js";

/** A request as the API returns it: the record, whether the caller may still vote, and when it expires. */
export interface RequestView {
  /** `airlock.v1.RequestRecord` in canonical protobuf JSON. */
  readonly record: JsonObject;
  readonly needsMe: boolean;
  /** RFC 3339; when a pending request expires. */
  readonly expiresAt: string;
}

// Lower-case state names the API takes and their enum values.
const stateNames: Readonly<Record<string, RequestState>> = {
  pending: RequestState.PENDING,
  approved: RequestState.APPROVED,
  denied: RequestState.DENIED,
  expired: RequestState.EXPIRED,
  cancelled: RequestState.CANCELLED,
  executing: RequestState.EXECUTING,
  completed: RequestState.COMPLETED,
  failed: RequestState.FAILED,
};

// Lower-case risk names the API takes and their enum values.
const riskNames: Readonly<Record<string, Risk>> = { low: Risk.LOW, medium: Risk.MEDIUM, high: Risk.HIGH, critical: Risk.CRITICAL };

/** When a request was created, in epoch ms (0 when unknown). */
function createdMs(record: RequestRecord): number {
  const created = record.request?.createdAt;
  return created === undefined ? 0 : timestampMs(created);
}

/** When a pending request expires: its own deadline, else created + the default expiry. */
function expiresMs(record: RequestRecord, approvals: ApprovalConfig): number {
  const deadline = record.request?.deadline;
  return deadline === undefined ? createdMs(record) + approvals.defaultExpiryMs : timestampMs(deadline);
}

/**
 * Whether `reviewer` may still vote on the request now: the rules are asked
 * whether an approval would be accepted ({@link mayApprove}), so the answer never
 * drifts from what {@link Broker.decide} enforces.
 */
export function needsReviewer(record: RequestRecord, reviewer: Reviewer, approvals: ApprovalConfig, now: Date): boolean {
  return record.request !== undefined && mayApprove(record, record.request, approvals, reviewer, now);
}

/**
 * Refuses (`permission_denied`) anyone who is not a reviewer at all: in no configured
 * group, not in the break-glass role, and asserting no configured group. A token
 * the identity provider signed for this audience is not enough to read requests,
 * leases and the audit trail.
 */
export function requireReviewer(reviewer: Reviewer, approvals: ApprovalConfig): void {
  const key = reviewer.id.trim().toLowerCase();
  const member = (ids: readonly string[]) => ids.some((id) => id.trim().toLowerCase() === key);
  if ([...approvals.groups.values()].some(member) || member(approvals.breakGlassRole)) return;
  if (reviewer.groups.some((group) => approvals.groups.has(group))) return;
  throw new AirlockError(Code.PermissionDenied, `${reviewer.id} is not a reviewer: in no reviewer group of this broker`, { details: { reason: "not_a_reviewer" } });
}

/**
 * Lets an authenticated reviewer through: within the per-reviewer rate
 * (`resource_exhausted` with `details.retryAfterSec` otherwise) and a reviewer
 * at all ({@link requireReviewer}).
 */
export function admitReviewer(reviewer: Reviewer, limiter: RateLimiter, approvals: ApprovalConfig): Reviewer {
  const wait = limiter.take(reviewer.id.toLowerCase());
  if (wait !== undefined) throw new AirlockError(Code.ResourceExhausted, `too many requests from ${reviewer.id}; retry in ${wait} s`, { details: { retryAfterSec: wait } });
  requireReviewer(reviewer, approvals);
  return reviewer;
}

/** The {@link RequestView} of a record for one reviewer. */
export function requestView(record: RequestRecord, reviewer: Reviewer, approvals: ApprovalConfig, now: Date): RequestView {
  return {
    record: toJson(RequestRecordSchema, record) as JsonObject,
    needsMe: needsReviewer(record, reviewer, approvals, now),
    expiresAt: new Date(expiresMs(record, approvals)).toISOString(),
  };
}

/** The filters of a request listing. */
export interface RequestFilter {
  /** Empty: every state. */
  readonly states: ReadonlySet<RequestState>;
  readonly needsMe: boolean;
  readonly minRisk: Risk;
  /** Exact agent id, compared case-insensitively; empty: any. */
  readonly agent: string;
  /** Only requests created longer ago than this, in ms; 0: any age. */
  readonly olderThanMs: number;
  /** Only requests created at or after this instant (epoch ms); 0: any. */
  readonly sinceMs: number;
}

/** Defaults of the listing query. */
export const listDefaults = { limit: 100, maxLimit: 1000 } as const;

function invalid(field: string, message: string): AirlockError {
  return new AirlockError(Code.InvalidArgument, `${field}: ${message}`, { details: { field } });
}

/** Reads the listing query (`state`, `needsMe`, `minRisk`, `agent`, `olderThan`, `since`); names the bad field. */
export function parseRequestFilter(query: Readonly<Record<string, unknown>>): RequestFilter {
  const text = (name: string): string => {
    const value = query[name];
    if (value === undefined) return "";
    if (typeof value !== "string") throw invalid(name, "must be given once");
    return value.trim();
  };
  const states = new Set<RequestState>();
  for (const name of text("state").split(",").filter((s) => s !== "")) {
    const state = stateNames[name.toLowerCase()];
    if (state === undefined) throw invalid("state", `unknown state ${JSON.stringify(name)} (one of ${Object.keys(stateNames).join(", ")})`);
    states.add(state);
  }
  const needsMeText = text("needsMe");
  if (!["", "true", "false"].includes(needsMeText)) throw invalid("needsMe", "must be true or false");
  const riskText = text("minRisk").toLowerCase();
  const minRisk = riskText === "" ? Risk.UNSPECIFIED : riskNames[riskText];
  if (minRisk === undefined) throw invalid("minRisk", `must be one of ${Object.keys(riskNames).join(", ")}`);
  const olderThan = text("olderThan");
  let olderThanMs = 0;
  if (olderThan !== "") {
    const parsed = parseDuration(olderThan);
    if (parsed === undefined) throw invalid("olderThan", "must be a duration such as 30s, 10m or 2h");
    olderThanMs = parsed;
  }
  const since = text("since");
  const sinceMs = since === "" ? 0 : Date.parse(since);
  if (Number.isNaN(sinceMs)) throw invalid("since", "must be an RFC 3339 time");
  const outcome = text("outcome");
  if (outcome !== "") {
    const state = stateNames[outcome.toLowerCase()];
    if (state === undefined) throw invalid("outcome", `unknown state ${JSON.stringify(outcome)}`);
    states.add(state);
  }
  return { states, needsMe: needsMeText === "true", minRisk, agent: text("agent").toLowerCase(), olderThanMs, sinceMs };
}

/** Reads `limit` (1 to 1000, default 100). */
export function parseLimit(value: unknown, fallback: number = listDefaults.limit): number {
  if (value === undefined) return fallback;
  const limit = typeof value === "string" && /^\d+$/.test(value) ? Number(value) : Number.NaN;
  if (!Number.isInteger(limit) || limit < 1 || limit > listDefaults.maxLimit) throw invalid("limit", `must be a whole number from 1 to ${listDefaults.maxLimit}`);
  return limit;
}

/** Whether a record passes the filter, for this reviewer, now. */
export function matchesFilter(record: RequestRecord, filter: RequestFilter, reviewer: Reviewer, approvals: ApprovalConfig, now: Date): boolean {
  if (filter.states.size > 0 && !filter.states.has(record.state)) return false;
  const request = record.request;
  if (request === undefined) return false;
  if (filter.minRisk !== Risk.UNSPECIFIED && request.risk < filter.minRisk) return false;
  if (filter.agent !== "" && request.identity?.agent.toLowerCase() !== filter.agent) return false;
  const created = createdMs(record);
  if (filter.olderThanMs > 0 && now.getTime() - created < filter.olderThanMs) return false;
  if (filter.sinceMs > 0 && created < filter.sinceMs) return false;
  if (filter.needsMe && !needsReviewer(record, reviewer, approvals, now)) return false;
  return true;
}

/** Newest first (by creation), ties by id so pages are stable. */
export function newestFirst(a: RequestRecord, b: RequestRecord): number {
  return createdMs(b) - createdMs(a) || (b.request?.id ?? "").localeCompare(a.request?.id ?? "");
}

/** The part of a filter the broker's request index answers (the rest, such as `needsMe`, is checked per record). */
export function indexQueryOf(filter: RequestFilter, now: Date): IndexQuery {
  return {
    states: filter.states,
    agent: filter.agent,
    minRisk: filter.minRisk,
    createdFromMs: filter.sinceMs,
    createdToMs: filter.olderThanMs > 0 ? now.getTime() - filter.olderThanMs : 0,
  };
}

/**
 * One page of the requests passing `filter` for `reviewer`: newest first from the broker's
 * index of the state bucket, then older settled ones from the history. The cursor is opaque
 * to callers (`invalid_argument` with field `cursor` when it is not one this API returned).
 */
export async function listRequests(
  broker: Pick<Broker, "listPage">,
  filter: RequestFilter,
  reviewer: Reviewer,
  approvals: ApprovalConfig,
  limit: number,
  cursor: unknown,
): Promise<{ items: RequestRecord[]; nextCursor?: string }> {
  if (cursor !== undefined && typeof cursor !== "string") throw invalid("cursor", "is not a cursor this API returned");
  const now = new Date();
  const { records, nextCursor } = await broker.listPage(indexQueryOf(filter, now), (record) => matchesFilter(record, filter, reviewer, approvals, now), limit, cursor);
  return nextCursor === undefined ? { items: records } : { items: records, nextCursor };
}

/** How request ids may be shortened: a prefix of at least `minPrefix` characters that only one request's id starts with. */
export const requestIdPrefix = {
  /** Shortest prefix taken; a shorter one is refused (`id_prefix_too_short`), since it would match too much to be safe. */
  minPrefix: 6,
  /** How many of an ambiguous prefix's matches the error lists. */
  maxListed: 20,
} as const;

/**
 * The stable `details.reason` of the errors {@link resolveRequest} throws; the HTTP API
 * answers them with this as its `code`.
 */
export type RequestIdRefusal = "ambiguous_id" | "id_prefix_too_short";

/** The refusals of {@link RequestIdRefusal}, to map them to the HTTP `code`. */
export const requestIdRefusals: ReadonlySet<string> = new Set<RequestIdRefusal>(["ambiguous_id", "id_prefix_too_short"]);

/**
 * The request a full id or a unique id prefix names (case-insensitive). An exact id is
 * looked up directly. A prefix shorter than {@link requestIdPrefix.minPrefix} is refused
 * (`invalid_argument`, `details.reason: "id_prefix_too_short"`); one that no id starts with is
 * `not_found`; one that several ids start with is `invalid_argument` with
 * `details.reason: "ambiguous_id"` and `details.matches`, the matching requests newest first
 * (`{ id, call, state, agent, createdAt }`, at most {@link requestIdPrefix.maxListed}), and
 * `details.count`, how many matched.
 */
export async function resolveRequest(broker: Pick<Broker, "get" | "findByIdPrefix">, idOrPrefix: string): Promise<RequestRecord> {
  const text = idOrPrefix.trim();
  try {
    return await broker.get(text);
  } catch (error) {
    if (!(error instanceof AirlockError) || error.code !== Code.NotFound) throw error;
  }
  if (text.length < requestIdPrefix.minPrefix) {
    throw new AirlockError(Code.InvalidArgument, `no request has the id ${JSON.stringify(text)}, and a shortened id needs at least ${requestIdPrefix.minPrefix} characters`, {
      details: { field: "id", reason: "id_prefix_too_short" satisfies RequestIdRefusal, minLength: requestIdPrefix.minPrefix },
    });
  }
  const prefix = text.toLowerCase();
  const matches = (await broker.findByIdPrefix(prefix)).sort(newestFirst);
  const [only] = matches;
  if (only !== undefined && matches.length === 1) return only;
  if (only === undefined) throw new AirlockError(Code.NotFound, `no request ${text} (and no request id starts with it)`, { details: { requestId: text } });
  const listed = matches.slice(0, requestIdPrefix.maxListed).map((record) => ({
    id: record.request?.id ?? "",
    call: `${record.request?.service ?? ""}/${record.request?.method ?? ""}`,
    state: stateNameOf(record.state),
    agent: record.request?.identity?.agent ?? "",
    createdAt: new Date(createdMs(record)).toISOString(),
  }));
  throw new AirlockError(Code.InvalidArgument, `${matches.length} requests have ids starting with ${JSON.stringify(text)}: ${listed.map((match) => match.id).join(", ")}${matches.length > listed.length ? ", …" : ""}; give more of the id`, {
    details: { field: "id", reason: "ambiguous_id" satisfies RequestIdRefusal, count: matches.length, matches: listed },
  });
}

/** "pending", "approved", … as the API's filters name states. */
function stateNameOf(state: RequestState): string {
  return Object.entries(stateNames).find(([, value]) => value === state)?.[0] ?? "unknown";
}
