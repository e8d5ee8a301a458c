/**
 * The counting of `npm run chaos`, kept apart from the processes so it can be
 * tested on its own: how one agent call is classified from what the agent saw
 * and what the upstream's database holds, how a fault window's calls add up,
 * which credentials Vault created (read from Vault's own audit device), and
 * which of them are still alive or named by nobody.
 *
 * Every figure comes from the servers' own state (PostgreSQL rows, Vault's
 * audit log and lease/accessor lookups, the audit trail), never from Airlock's
 * claims about itself.
 * @module
 */
import { codeName, isCode } from "../common/errors.js";

/** What the agent saw of one call. */
export type CallOutcome =
  /** The upstream's success reached the agent. */
  | { readonly kind: "ok" }
  /**
   * A gRPC error. `airlockCode` is the `x-airlock-error-code` the sidecar puts on every error it
   * makes itself (undefined when the error came from anywhere else: a dropped connection, the client).
   */
  | {
      readonly kind: "error";
      readonly code: number;
      readonly airlockCode: string | undefined;
      readonly message: string;
      /** `details.reason` of the sidecar's `x-airlock-error-details`, when it gave one. */
      readonly reason?: string;
    }
  /** No answer within the run's bound (the agent's own deadline fired, or it was still waiting). */
  | { readonly kind: "unanswered" };

/** Where one call lands. `failed_unclear`: an error without Airlock's code, and the upstream did nothing. */
export type CallClass = "ok" | "failed_clearly" | "failed_unclear" | "lost";

/** Whether an error carries a stable Airlock code: the sidecar's `x-airlock-error-code`, naming the status it came with. */
export function isClearFailure(outcome: CallOutcome): boolean {
  return outcome.kind === "error" && isCode(outcome.code) && outcome.airlockCode !== undefined && outcome.airlockCode === codeName(outcome.code);
}

/**
 * Whether the sidecar told the agent, with its stable code, that the call's outcome is unknown
 * (`outcome_unknown`: an earlier run of the sidecar took the credential and died mid-call).
 */
export function isToldUnknown(outcome: CallOutcome): boolean {
  return isClearFailure(outcome) && outcome.kind === "error" && outcome.reason === "outcome_unknown";
}

/**
 * Classifies one call by what the agent saw and how many times the upstream executed it:
 * - `ok`: the agent got success and the upstream did it;
 * - `lost`: no answer within the bound; or success without the upstream having done it; or the
 *   upstream did it while the agent was told it failed (with or without a clear code: either
 *   way the agent believes it did not happen);
 * - `failed_clearly`: an error with a stable Airlock code, and the upstream did nothing; or the
 *   sidecar's `outcome_unknown`, whatever the upstream did: the agent was told the action may
 *   have run, so it believes nothing false;
 * - `failed_unclear`: an error without one (a dropped connection), and the upstream did nothing.
 */
export function classifyCall(outcome: CallOutcome, executions: number): CallClass {
  if (outcome.kind === "unanswered") return "lost";
  if (outcome.kind === "ok") return executions > 0 ? "ok" : "lost";
  if (isToldUnknown(outcome)) return "failed_clearly";
  if (executions > 0) return "lost";
  return isClearFailure(outcome) ? "failed_clearly" : "failed_unclear";
}

/** One call the load generator started, with what the agent saw. */
export interface StartedCall {
  /** The per-call id the load generator put into the request (and the upstream wrote to its table). */
  readonly callId: string;
  readonly outcome: CallOutcome;
}

/** A fault window's calls, added up. */
export interface CallTally {
  readonly actions: number;
  readonly ok: number;
  readonly failedClearly: number;
  readonly failedUnclear: number;
  readonly lost: number;
  /** Calls the upstream executed more than once. */
  readonly duplicated: number;
  /** Among `lost`: calls with no answer within the bound. */
  readonly unanswered: number;
  /** Among `lost`: calls executed upstream while the agent saw an error. */
  readonly executedButFailed: number;
  /** Among `lost`: success without an execution. */
  readonly okWithoutExecution: number;
  /** Among `failed_clearly`: calls the sidecar answered `outcome_unknown`. */
  readonly toldUnknown: number;
  /** Among those: the ones the upstream had in fact executed. */
  readonly toldUnknownRan: number;
  /** Error code names of the failures (clear or not), with counts, for the detail line. */
  readonly failureCodes: ReadonlyMap<string, number>;
}

/** Adds up a window's calls against the upstream's executions per call id. */
export function tallyCalls(calls: readonly StartedCall[], executions: ReadonlyMap<string, number>): CallTally {
  const counts = { ok: 0, failed_clearly: 0, failed_unclear: 0, lost: 0 };
  let duplicated = 0;
  let unanswered = 0;
  let executedButFailed = 0;
  let okWithoutExecution = 0;
  let toldUnknown = 0;
  let toldUnknownRan = 0;
  const failureCodes = new Map<string, number>();
  for (const call of calls) {
    const executed = executions.get(call.callId) ?? 0;
    const kind = classifyCall(call.outcome, executed);
    counts[kind]++;
    if (executed > 1) duplicated++;
    if (call.outcome.kind === "unanswered") unanswered++;
    else if (call.outcome.kind === "ok" && executed === 0) okWithoutExecution++;
    else if (call.outcome.kind === "error") {
      if (isToldUnknown(call.outcome)) {
        toldUnknown++;
        if (executed > 0) toldUnknownRan++;
      } else if (executed > 0) executedButFailed++;
      const name = `${isCode(call.outcome.code) ? codeName(call.outcome.code) : `status_${call.outcome.code}`}${isClearFailure(call.outcome) ? "" : "(no_airlock_code)"}`;
      failureCodes.set(name, (failureCodes.get(name) ?? 0) + 1);
    }
  }
  return {
    actions: calls.length,
    ok: counts.ok,
    failedClearly: counts.failed_clearly,
    failedUnclear: counts.failed_unclear,
    lost: counts.lost,
    duplicated,
    unanswered,
    executedButFailed,
    okWithoutExecution,
    toldUnknown,
    toldUnknownRan,
    failureCodes,
  };
}

/** A credential Vault created, as its own audit device logged the response. */
export interface CreatedCredential {
  /** `lease`: a dynamic secret's lease id (the database engine); `token`: a token's accessor. */
  readonly kind: "lease" | "token";
  readonly id: string;
  /** The request path that created it, e.g. `database/creds/import`. */
  readonly path: string;
}

/** What one line of Vault's file audit device says was created. */
export interface AuditLineFacts {
  /** A per-action credential: a dynamic secret's lease or a created token (never a wrapping token). */
  readonly credential?: CreatedCredential;
  /** The accessor of a response-wrapping token the response was wrapped in. */
  readonly wrappingAccessor?: string;
}

function objectAt(value: unknown, key: string): Record<string, unknown> | undefined {
  if (value === null || typeof value !== "object") return undefined;
  const inner = (value as Record<string, unknown>)[key];
  return inner !== null && typeof inner === "object" && !Array.isArray(inner) ? (inner as Record<string, unknown>) : undefined;
}

function stringAt(value: Record<string, unknown> | undefined, key: string): string | undefined {
  const inner = value?.[key];
  return typeof inner === "string" && inner !== "" ? inner : undefined;
}

/**
 * Reads one JSON line of Vault's file audit device (enabled with `hmac_accessor=false`, so
 * accessors are in the clear; lease ids never are HMAC'd). Only `response` entries that
 * succeeded count: a dynamic secret's `response.secret.lease_id` (outside `sys/`), a token created under
 * `auth/token/create*` (`response.auth.accessor`), and a wrapping token (`response.wrap_info.accessor`).
 * Anything else, or a line that is not JSON, says nothing.
 */
export function parseVaultAuditLine(line: string): AuditLineFacts {
  let entry: unknown;
  try {
    entry = JSON.parse(line);
  } catch {
    return {};
  }
  if (entry === null || typeof entry !== "object" || (entry as Record<string, unknown>).type !== "response") return {};
  const request = objectAt(entry, "request");
  const response = objectAt(entry, "response");
  if (response === undefined || typeof (entry as Record<string, unknown>).error === "string") return {};
  const path = stringAt(request, "path") ?? "";
  const facts: { credential?: CreatedCredential; wrappingAccessor?: string } = {};
  const leaseId = stringAt(objectAt(response, "secret"), "lease_id");
  const tokenAccessor = stringAt(objectAt(response, "auth"), "accessor");
  // sys/ paths (a renewal, a lookup) answer about a lease that exists already: not a creation.
  if (leaseId !== undefined && !path.startsWith("sys/")) facts.credential = { kind: "lease", id: leaseId, path };
  else if (tokenAccessor !== undefined && path.startsWith("auth/token/create")) facts.credential = { kind: "token", id: tokenAccessor, path };
  const wrapping = stringAt(objectAt(response, "wrap_info"), "accessor");
  if (wrapping !== undefined) facts.wrappingAccessor = wrapping;
  return facts;
}

/** The credentials of a window, judged. */
export interface CredentialVerdict {
  /** Created in the window and alive after it settled. */
  readonly aliveAfter: readonly CreatedCredential[];
  /** Created in the window (alive or not) and named by no request record and no audit event. */
  readonly unknown: readonly CreatedCredential[];
}

/**
 * Judges a window's credentials: `created` from Vault's audit log, `alive` what Vault still
 * resolves after the window settled, `named` every lease id and accessor the request records
 * and the audit trail's events mention.
 */
export function judgeCredentials(created: readonly CreatedCredential[], alive: ReadonlySet<string>, named: ReadonlySet<string>): CredentialVerdict {
  const unique = [...new Map(created.map((c) => [c.id, c])).values()];
  return { aliveAfter: unique.filter((c) => alive.has(c.id)), unknown: unique.filter((c) => !named.has(c.id)) };
}

/** Every string anywhere inside a JSON value (an audit event's details), to find lease ids and accessors it names. */
export function stringsIn(value: unknown, into: Set<string> = new Set()): Set<string> {
  if (typeof value === "string") into.add(value);
  else if (Array.isArray(value)) for (const item of value) stringsIn(item, into);
  else if (value !== null && typeof value === "object") for (const item of Object.values(value)) stringsIn(item, into);
  return into;
}

/** One fault's figures, as the run prints them. */
export interface FaultLine {
  readonly fault: string;
  readonly calls: CallTally;
  readonly credentials: CredentialVerdict;
  readonly auditIntact: boolean;
}

/** `chaos: fault=<name> actions=… ok=… failed_clearly=… lost=… duplicated=… credentials_alive_after=… unknown_credentials=… audit=intact|broken` */
export function faultLine(line: FaultLine): string {
  const c = line.calls;
  return `chaos: fault=${line.fault} actions=${c.actions} ok=${c.ok} failed_clearly=${c.failedClearly} lost=${c.lost} duplicated=${c.duplicated} credentials_alive_after=${line.credentials.aliveAfter.length} unknown_credentials=${line.credentials.unknown.length} audit=${line.auditIntact ? "intact" : "broken"}`;
}

/** The run's totals over every fault. */
export interface ChaosTotals {
  readonly lost: number;
  readonly duplicated: number;
  readonly credentialsAliveAfter: number;
  readonly unknownCredentials: number;
}

/** Sums the faults' figures. */
export function chaosTotals(lines: readonly FaultLine[]): ChaosTotals {
  return {
    lost: lines.reduce((sum, l) => sum + l.calls.lost, 0),
    duplicated: lines.reduce((sum, l) => sum + l.calls.duplicated, 0),
    credentialsAliveAfter: lines.reduce((sum, l) => sum + l.credentials.aliveAfter.length, 0),
    unknownCredentials: lines.reduce((sum, l) => sum + l.credentials.unknown.length, 0),
  };
}

/** `chaos: lost=… duplicated=… credentials_alive_after=… unknown_credentials=…` */
export function totalsLine(totals: ChaosTotals): string {
  return `chaos: lost=${totals.lost} duplicated=${totals.duplicated} credentials_alive_after=${totals.credentialsAliveAfter} unknown_credentials=${totals.unknownCredentials}`;
}

/** Whether the run passed: every total zero and every fault's audit trail intact. */
export function chaosPassed(lines: readonly FaultLine[]): boolean {
  const totals = chaosTotals(lines);
  return totals.lost === 0 && totals.duplicated === 0 && totals.credentialsAliveAfter === 0 && totals.unknownCredentials === 0 && lines.every((l) => l.auditIntact);
}
