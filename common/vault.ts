import http from "node:http";
import https from "node:https";
import nodeVault from "node-vault";
import { AirlockError, Code } from "./errors.js";

/** What Vault's `sys/health` says. */
export interface VaultHealth {
  readonly initialized: boolean;
  readonly sealed: boolean;
  readonly version: string;
}

/** What Vault says of a token when it looks the token up. */
export interface VaultTokenInfo {
  readonly accessor: string;
  readonly policies: readonly string[];
  /** Seconds the token still lives; 0 for a token without expiry. */
  readonly ttl: number;
  /** Uses left; 0 means unlimited. */
  readonly numUses: number;
  readonly meta: Readonly<Record<string, string>>;
  /** Whether the token has no parent (its life does not depend on its creator's token). */
  readonly orphan: boolean;
  /** Whether the token may be renewed (by itself, too). */
  readonly renewable: boolean;
}

/** Options of {@link createVaultClient}. */
export interface VaultClientOptions {
  /** Vault's base URL, e.g. `http://127.0.0.1:8200`. */
  readonly address: string;
  /** The token the client acts with. Never logged. */
  readonly token?: string;
  /** Per-request timeout in milliseconds. @default 5000 */
  readonly timeoutMs?: number;
}

/** Options of {@link VaultClient.createToken}. */
export interface CreateTokenOptions {
  /**
   * The token's policies; `default` is added by Vault. Must not be empty (Vault
   * would give the token its creator's policies) and must not hold `root`.
   */
  readonly policies: readonly string[];
  /** The token's TTL, which is also its explicit max TTL: it cannot be renewed past it. */
  readonly ttlSeconds: number;
  /** How many requests the token may make; 0 means unlimited within its TTL. */
  readonly numUses: number;
  /** Metadata Vault stores with the token (and shows in its audit log). Never a secret. */
  readonly meta: Readonly<Record<string, string>>;
  /** TTL of the response-wrapping token that carries the new token. */
  readonly wrapTtlSeconds: number;
  /** Shown in Vault's audit log and token lookups (Vault prefixes `token-`). */
  readonly displayName?: string;
  /**
   * A token role (`auth/token/roles/<role>`, configured with `orphan=true`) to
   * create the token through. Without one the client uses
   * `auth/token/create-orphan`, which lets only a root or sudo token grant
   * policies it does not hold itself: production brokers use a role.
   */
  readonly role?: string;
}

/** A token created by {@link VaultClient.createToken}: only its wrapping token and its accessor. */
export interface WrappedToken {
  /** Single-use token that unwraps to the new token. Never logged. */
  readonly wrappingToken: string;
  readonly wrappingAccessor: string;
  /** When the wrapping token dies unused. */
  readonly wrapExpiresAt: Date;
  /** The new token's accessor: looks it up and revokes it without knowing it. */
  readonly tokenAccessor: string;
}

/** Options of {@link VaultClient.databaseCredentials}. */
export interface DatabaseCredentialsOptions {
  /** Mount path of the database secrets engine, e.g. `database`. */
  readonly mount: string;
  /** The engine's role to generate credentials for. */
  readonly role: string;
  /** TTL of the response-wrapping token that carries the credentials. */
  readonly wrapTtlSeconds: number;
  /**
   * Shortens the lease to this many seconds when the role's default TTL is
   * longer, so Vault itself revokes the credentials then, even if nobody asks.
   * Absent: the role's default TTL.
   */
  readonly ttlSeconds?: number;
}

/** Database credentials from {@link VaultClient.databaseCredentials}: a wrapping token and the lease. */
export interface WrappedDatabaseCredentials {
  /** Single-use token that unwraps to `{ username, password }`. Never logged. */
  readonly wrappingToken: string;
  readonly wrappingAccessor: string;
  readonly wrapExpiresAt: Date;
  /** The credentials' lease: revoking it drops the database user. */
  readonly leaseId: string;
  /** When Vault revokes the lease by itself (a bound from above: measured after Vault answered). */
  readonly leaseExpiresAt: Date;
}

/** What Vault says of a lease (`sys/leases/lookup`). */
export interface VaultLeaseInfo {
  readonly id: string;
  readonly issueTime: Date;
  /** When Vault revokes the lease by itself; `undefined` for a lease without expiry. */
  readonly expireTime: Date | undefined;
  /** Seconds left. */
  readonly ttl: number;
  readonly renewable: boolean;
}

/**
 * Airlock's typed view of the Vault HTTP API. Every method fails with an
 * {@link AirlockError}: `unavailable` when Vault cannot be reached,
 * `permission_denied` when Vault refuses the token, `not_found`,
 * `invalid_argument`, or `internal`. No error carries a secret: not the
 * client's token, not a request body.
 */
export interface VaultClient {
  /** The server's health, sealed or not. */
  health(): Promise<VaultHealth>;
  /** Looks up a token by itself (the token authenticates the call). */
  lookupSelf(token: string): Promise<VaultTokenInfo>;
  /**
   * Unwraps a response-wrapping token (the token authenticates the call), once:
   * a second unwrap of the same token fails with `permission_denied`.
   */
  unwrap(wrappingToken: string): Promise<UnwrappedSecret>;
  /**
   * Creates an orphan, non-renewable token, response-wrapped, so the caller
   * never holds it: only the wrapping token and the new token's accessor come
   * back. Orphan because the action's token must not die with (or depend on)
   * the creating broker replica's own token: any replica revokes it by accessor.
   */
  createToken(options: CreateTokenOptions): Promise<WrappedToken>;
  /** Writes an ACL policy (`sys/policies/acl/<name>`) in HCL. */
  writePolicy(name: string, hcl: string): Promise<void>;
  /** Deletes an ACL policy; deleting one that does not exist succeeds. */
  deletePolicy(name: string): Promise<void>;
  /**
   * Generates database credentials (`<mount>/creds/<role>`), keeps their lease
   * id, and response-wraps them. If anything fails after Vault issued them, the
   * lease is revoked before the error is thrown.
   */
  databaseCredentials(options: DatabaseCredentialsOptions): Promise<WrappedDatabaseCredentials>;
  /**
   * Revokes a token (and its children and leases) by accessor. Revoking an
   * accessor whose token is already gone succeeds: Vault answers with a warning.
   */
  revokeAccessor(accessor: string): Promise<void>;
  /**
   * Revokes a lease now (`sys/leases/revoke`, synchronous: when this resolves
   * the secrets engine has run its revocation). An unknown or already revoked
   * lease succeeds.
   */
  revokeLease(leaseId: string): Promise<void>;
  /** Looks a token up by accessor; `not_found` when no live token has it. */
  lookupAccessor(accessor: string): Promise<VaultTokenInfo>;
  /** Looks a lease up; `not_found` when it is unknown, expired or revoked. */
  lookupLease(leaseId: string): Promise<VaultLeaseInfo>;
  /**
   * The accessors of every live token (`LIST auth/token/accessors`, which Vault allows only
   * with `sudo` on that one path). Empty when there are none.
   */
  listTokenAccessors(): Promise<string[]>;
  /**
   * The full ids of the live leases under `prefix`, e.g. `database/creds/export/`
   * (`LIST sys/leases/lookup/<prefix>`, `sudo` on that path). Empty when there are none.
   */
  listLeases(prefix: string): Promise<string[]>;
  /**
   * Enables a secrets engine of `type` at `path`. Idempotent: an engine of the
   * same type already there succeeds; one of another type is `already_exists`.
   */
  mount(path: string, type: string): Promise<void>;
  /** Writes configuration (a JSON object) to a path, e.g. `<mount>/config/<name>` or `<mount>/roles/<name>`. */
  writeConfig(path: string, data: Readonly<Record<string, unknown>>): Promise<void>;
}

/** What a response-wrapped Vault response held: `data` for secrets, `auth` for a wrapped token. */
export interface UnwrappedSecret {
  readonly data: Readonly<Record<string, unknown>>;
  readonly auth?: { readonly clientToken: string; readonly accessor: string };
  readonly leaseId: string;
}

/** Defaults of {@link VaultClientOptions}. */
export const vaultClientDefaults = { timeoutMs: 5000 } as const;

interface VaultApiError {
  readonly message?: string;
  readonly code?: string;
  readonly response?: { readonly statusCode?: number };
}

/**
 * The cause an AirlockError keeps of a node-vault failure: message, code and
 * status only. The original may carry what it was sent or answered (node-vault's
 * `ApiResponseError` keeps Vault's whole answer; a transport in front of Vault
 * may keep the request headers with `X-Vault-Token`, or the body, which for
 * `sys/wrapping/wrap` is the secret), and an error's cause ends up in logs.
 */
function safeCause(error: unknown): Error {
  const candidate = (error ?? {}) as VaultApiError;
  const cause = new Error(typeof candidate.message === "string" ? candidate.message : "non-Error failure");
  if (typeof candidate.code === "string") Object.assign(cause, { code: candidate.code });
  if (candidate.response?.statusCode !== undefined) Object.assign(cause, { statusCode: candidate.response.statusCode });
  return cause;
}

/** The AirlockError for a failed node-vault call: the HTTP status or network failure decides the code. */
export function vaultError(operation: string, error: unknown): AirlockError {
  const candidate = (error ?? {}) as VaultApiError;
  const status = candidate.response?.statusCode;
  const details = { operation, ...(status === undefined ? {} : { vaultStatus: status }) };
  const cause = safeCause(error);
  if (status === undefined) {
    // Only a network failure means Vault is unreachable; anything else is a fault on this side.
    const network = typeof candidate.code === "string" && /^(E[A-Z_]+|ERR_NETWORK|ERR_BAD_RESPONSE)$/.test(candidate.code);
    return network
      ? new AirlockError(Code.Unavailable, `Vault is unreachable (${operation}): ${candidate.code ?? "no answer"}`, { cause, details })
      : new AirlockError(Code.Internal, `Vault call ${operation} failed: ${candidate.message ?? "unknown error"}`, { cause, details });
  }
  const code =
    status === 403 || status === 401 ? Code.PermissionDenied : status === 404 ? Code.NotFound : status === 400 ? Code.InvalidArgument : status === 503 ? Code.Unavailable : Code.Internal;
  return new AirlockError(code, `Vault refused ${operation}: ${candidate.message ?? `status ${status}`}`, { cause, details });
}

/**
 * Vault answers "no such thing" with 400 where the one input is the id it does not know (an
 * accessor, a lease, a wrapping token): for those calls the status alone says so, and becomes
 * `replacement`. Classified by status, never by Vault's wording, which changes between versions.
 */
function recode(error: AirlockError, replacement: Code): AirlockError {
  if (error.details.vaultStatus !== 400) return error;
  return new AirlockError(replacement, error.rawMessage, { cause: error.cause, details: error.details });
}

/**
 * A revocation Vault answers 400 or 404 named something Vault no longer has (the one input is
 * its id): it is already revoked or expired, which is what was asked. Vault 1.21 answers 2xx
 * with a warning for both; older releases answered 400.
 */
function alreadyGone(error: unknown): Json {
  if (error instanceof AirlockError && (error.details.vaultStatus === 400 || error.details.vaultStatus === 404)) return {};
  throw error;
}

function stringRecord(value: unknown): Record<string, string> {
  const result: Record<string, string> = {};
  if (value !== null && typeof value === "object") {
    for (const [key, entry] of Object.entries(value)) if (typeof entry === "string") result[key] = entry;
  }
  return result;
}

type Json = Record<string, unknown>;

function record(value: unknown): Json {
  return value !== null && typeof value === "object" && !Array.isArray(value) ? (value as Json) : {};
}

function tokenInfo(data: Json): VaultTokenInfo {
  return {
    accessor: typeof data.accessor === "string" ? data.accessor : "",
    policies: Array.isArray(data.policies) ? data.policies.filter((p): p is string => typeof p === "string") : [],
    ttl: typeof data.ttl === "number" ? data.ttl : 0,
    numUses: typeof data.num_uses === "number" ? data.num_uses : 0,
    meta: stringRecord(data.meta),
    orphan: data.orphan === true,
    renewable: data.renewable === true,
  };
}

function date(value: unknown): Date | undefined {
  if (typeof value !== "string" || value === "") return undefined;
  const ms = Date.parse(value);
  return Number.isNaN(ms) ? undefined : new Date(ms);
}

interface WrapInfo {
  readonly wrappingToken: string;
  readonly wrappingAccessor: string;
  readonly wrapExpiresAt: Date;
  readonly wrappedAccessor: string;
}

function wrapInfo(body: Json): WrapInfo | undefined {
  const info = record(body.wrap_info);
  if (typeof info.token !== "string" || info.token === "") return undefined;
  const ttl = typeof info.ttl === "number" ? info.ttl : 0;
  const created = date(info.creation_time) ?? new Date();
  return {
    wrappingToken: info.token,
    wrappingAccessor: typeof info.accessor === "string" ? info.accessor : "",
    wrapExpiresAt: new Date(created.getTime() + ttl * 1000),
    wrappedAccessor: typeof info.wrapped_accessor === "string" ? info.wrapped_accessor : "",
  };
}

/** A path segment from configuration (mount, role, policy name): no traversal, no query. */
function segment(kind: string, value: string): string {
  if (!/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/.test(value) || value.split("/").some((part) => part === "." || part === "..")) {
    throw new AirlockError(Code.InvalidArgument, `${kind} ${JSON.stringify(value)} is not a valid Vault path segment`, { details: { field: kind } });
  }
  return value;
}

function wholeSeconds(kind: string, seconds: number): number {
  if (!Number.isFinite(seconds) || seconds <= 0) throw new AirlockError(Code.InvalidArgument, `${kind} must be a positive number of seconds, not ${seconds}`, { details: { field: kind } });
  return Math.ceil(seconds);
}

/** What node-vault hands its HTTP transport for one call. */
interface TransportRequest {
  readonly method: string;
  readonly uri: string;
  readonly headers?: Readonly<Record<string, string>>;
  /** The request body, sent as JSON. */
  readonly json?: unknown;
}

/** What node-vault expects back from its HTTP transport. */
interface TransportResponse {
  readonly statusCode: number;
  readonly body: unknown;
  readonly request: { readonly path: string };
}

/** The most of a Vault answer the client reads; a larger one fails instead of filling memory. */
const maxResponseBytes = 4 * 1024 * 1024;

/**
 * node-vault's HTTP transport, given through its `request-promise` hook: one
 * node:http(s) request per call on Node's keep-alive global agents, the body as
 * JSON, a deadline over the whole call. node-vault's own transport goes through
 * axios and follow-redirects, which cost about three times the CPU per call
 * (measured in docs/architecture.md); every approved action makes four Vault
 * calls. Redirects are not followed: a redirect would carry the token to
 * whatever host it names (Vault standbys forward requests rather than redirect
 * unless configured otherwise).
 */
function vaultTransport(timeoutMs: number): { defaults: (defaults: { strictSSL?: boolean }) => (request: TransportRequest) => Promise<TransportResponse> } {
  return {
    defaults: ({ strictSSL }) =>
      (request) =>
        new Promise((resolve, reject) => {
          const url = new URL(request.uri);
          const body = request.json === undefined ? undefined : Buffer.from(JSON.stringify(request.json));
          const headers: Record<string, string> = { accept: "application/json", ...request.headers };
          if (body !== undefined) {
            // node-vault names its own Content-Type (merge-patch) in whatever case it likes.
            if (!Object.keys(headers).some((name) => name.toLowerCase() === "content-type")) headers["content-type"] = "application/json";
            headers["content-length"] = String(body.length);
          }
          // Once the answer has begun, Node reports failures on the response, not the request: both end here.
          const fail = (message: string, code: string) => {
            clearTimeout(deadline);
            reject(Object.assign(new Error(message), { code }));
            call.destroy();
          };
          const options = { method: request.method, headers, ...(strictSSL === false ? { rejectUnauthorized: false } : {}) };
          const call = (url.protocol === "https:" ? https : http).request(url, options, (response) => {
            const chunks: Buffer[] = [];
            let size = 0;
            response.on("data", (chunk: Buffer) => {
              size += chunk.length;
              if (size > maxResponseBytes) fail(`Vault's answer is larger than ${maxResponseBytes} bytes`, "ERR_RESPONSE_TOO_LARGE");
              else chunks.push(chunk);
            });
            response.on("end", () => {
              clearTimeout(deadline);
              const text = Buffer.concat(chunks).toString("utf8");
              let parsed: unknown = text;
              try {
                if (text !== "") parsed = JSON.parse(text);
              } catch {
                // Not JSON (a proxy's error page): node-vault reports the status.
              }
              resolve({ statusCode: response.statusCode ?? 0, body: parsed, request: { path: url.pathname } });
            });
            response.on("error", () => undefined);
            response.on("close", () => {
              if (!response.complete) fail("Vault closed the connection mid-answer", "ECONNRESET");
            });
          });
          const deadline = setTimeout(() => fail(`no answer from Vault within ${timeoutMs} ms`, "ETIMEDOUT"), timeoutMs);
          call.on("error", (error) => {
            clearTimeout(deadline);
            reject(error);
          });
          call.end(body);
        }),
  };
}

/** A LIST answered 404 has nothing under it: Vault's way of saying the list is empty. */
function emptyWhenNotFound(error: unknown): Json {
  if (error instanceof AirlockError && error.code === Code.NotFound) return {};
  throw error;
}

/** The `keys` of a LIST answer. */
function keysOf(body: Json): string[] {
  const keys = record(body.data).keys;
  return Array.isArray(keys) ? keys.filter((key): key is string => typeof key === "string") : [];
}

/** A {@link VaultClient} over node-vault. */
export function createVaultClient(options: VaultClientOptions): VaultClient {
  const transport = vaultTransport(options.timeoutMs ?? vaultClientDefaults.timeoutMs);
  // One node-vault instance per token: node-vault keeps the token an unwrap returns as its own
  // (`tokenSource`), so a shared instance would go on to act with the agent's credential.
  const client = (token: string | undefined) =>
    nodeVault({ apiVersion: "v1", endpoint: options.address, ...(token === undefined ? {} : { token }), "request-promise": transport });
  const root = client(options.token);

  /** Runs one node-vault call; its body as an object (204 has none), its failure as an AirlockError. */
  async function call(operation: string, run: () => Promise<unknown>): Promise<Json> {
    try {
      return record(await run());
    } catch (error) {
      // Our own validation inside `run` already says what is wrong.
      throw error instanceof AirlockError ? error : vaultError(operation, error);
    }
  }
  // node-vault passes requestOptions.headers through to the transport; it adds X-Vault-Token to the
  // same object, so every call gets a fresh one.
  const wrapped = (wrapTtlSeconds: number) => ({ headers: { "X-Vault-Wrap-TTL": `${wholeSeconds("wrapTtlSeconds", wrapTtlSeconds)}s` } });

  const vault: VaultClient = {
    async health() {
      try {
        const body = (await root.health({ standbyok: true })) as { initialized?: boolean; sealed?: boolean; version?: string };
        return { initialized: body.initialized === true, sealed: body.sealed !== false, version: body.version ?? "" };
      } catch (error) {
        throw vaultError("sys/health", error);
      }
    },
    async lookupSelf(token) {
      const body = await call("auth/token/lookup-self", () => client(token).tokenLookupSelf());
      return tokenInfo(record(body.data));
    },
    async unwrap(wrappingToken) {
      // A used, expired or unknown wrapping token is a 400 from Vault; to the holder it is a refusal.
      const body = await call("sys/wrapping/unwrap", () => client(wrappingToken).unwrap()).catch((error: AirlockError) => {
        throw recode(error, Code.PermissionDenied);
      });
      const auth = body.auth === null || body.auth === undefined ? undefined : record(body.auth);
      return {
        data: record(body.data),
        ...(auth === undefined || typeof auth.client_token !== "string"
          ? {}
          : { auth: { clientToken: auth.client_token, accessor: typeof auth.accessor === "string" ? auth.accessor : "" } }),
        leaseId: typeof body.lease_id === "string" ? body.lease_id : "",
      };
    },
    async createToken(request) {
      // Without policies Vault gives the new token its creator's policies: the broker's, or root's.
      if (request.policies.length === 0) throw new AirlockError(Code.InvalidArgument, "a per-action token needs at least one policy", { details: { field: "policies" } });
      if (request.policies.includes("root")) throw new AirlockError(Code.InvalidArgument, "a per-action token may not carry the root policy", { details: { field: "policies" } });
      const ttl = `${wholeSeconds("ttlSeconds", request.ttlSeconds)}s`;
      const path = request.role === undefined ? "auth/token/create-orphan" : `auth/token/create/${segment("role", request.role)}`;
      const wrapOptions = wrapped(request.wrapTtlSeconds);
      const body = await call(path, () =>
        root.write(
          path,
          {
            policies: [...request.policies],
            ttl,
            // Not renewable and capped: the upstream holding the token cannot stretch its life.
            explicit_max_ttl: ttl,
            renewable: false,
            num_uses: request.numUses,
            meta: { ...request.meta },
            ...(request.displayName === undefined ? {} : { display_name: request.displayName }),
          },
          wrapOptions,
        ),
      );
      const info = wrapInfo(body);
      if (info === undefined || info.wrappedAccessor === "") {
        // Something between us and Vault dropped the wrap header: the token came back in the clear.
        // Kill it rather than hand it on; never put it in the error.
        const accessor = record(body.auth).accessor;
        if (typeof accessor === "string" && accessor !== "") await vault.revokeAccessor(accessor).catch(() => undefined);
        throw new AirlockError(Code.Internal, `Vault did not wrap the token from ${path}; the token was revoked`, { details: { operation: path } });
      }
      return { wrappingToken: info.wrappingToken, wrappingAccessor: info.wrappingAccessor, wrapExpiresAt: info.wrapExpiresAt, tokenAccessor: info.wrappedAccessor };
    },
    async writePolicy(name, hcl) {
      const path = `sys/policies/acl/${segment("policy", name)}`;
      await call(path, () => root.write(path, { policy: hcl }));
    },
    async deletePolicy(name) {
      const path = `sys/policies/acl/${segment("policy", name)}`;
      await call(path, () => root.delete(path));
    },
    async databaseCredentials(request) {
      // Why the credentials are read unwrapped and then wrapped with sys/wrapping/wrap:
      // a wrapped read of <mount>/creds/<role> answers with wrap_info only, and Vault fills
      // wrap_info.wrapped_accessor only for responses that carry a token (vault/wrapping.go,
      // wrapInCubbyhole: `if resp.Auth != nil { resp.WrapInfo.WrappedAccessor = resp.Auth.Accessor }`),
      // so the lease id would exist only inside the wrapped response. The alternatives are worse:
      // - listing sys/leases/lookup/<mount>/creds/<role>/ before and after (needs sudo) cannot tell
      //   this lease from one another broker replica created at the same moment;
      // - reading wrapped with a per-action token and revoking that token by accessor works, but
      //   Vault then revokes the lease asynchronously (revoke-accessor answered in 14 ms, the database
      //   user was gone only at ~90 ms, and a failing revocation statement is never reported back),
      //   and the broker would need to mint tokens that may read every credential path.
      // Reading directly gives the exact lease id, and sys/leases/revoke is synchronous and reports
      // failures. The cost: the secret is in this process's memory between the two calls; it is never
      // logged, never returned, and kept out of errors (safeCause). The sidecar unwraps the same
      // `data` ({ username, password }) either way; only creation_path says sys/wrapping/wrap.
      const path = `${segment("mount", request.mount)}/creds/${segment("role", request.role)}`;
      const wrapOptions = wrapped(request.wrapTtlSeconds);
      const ttlSeconds = request.ttlSeconds === undefined ? undefined : wholeSeconds("ttlSeconds", request.ttlSeconds);
      const read = await call(path, () => root.read(path));
      const leaseId = typeof read.lease_id === "string" ? read.lease_id : "";
      if (leaseId === "") throw new AirlockError(Code.FailedPrecondition, `${path} returned no lease: not a dynamic secret`, { details: { operation: path } });
      try {
        let leaseSeconds = typeof read.lease_duration === "number" ? read.lease_duration : 0;
        let leaseStart = Date.now();
        if (ttlSeconds !== undefined && (leaseSeconds === 0 || ttlSeconds < leaseSeconds)) {
          // A renewal's increment is the new TTL counted from now, so a smaller one shortens the
          // lease (and the database plugin moves the user's VALID UNTIL with it): Vault itself then
          // revokes at the template's TTL, also if the broker crashes.
          const renewed = await call("sys/leases/renew", () => root.write("sys/leases/renew", { lease_id: leaseId, increment: ttlSeconds }));
          leaseStart = Date.now();
          leaseSeconds = typeof renewed.lease_duration === "number" ? renewed.lease_duration : leaseSeconds;
          if (leaseSeconds === 0 || leaseSeconds > ttlSeconds) {
            throw new AirlockError(Code.FailedPrecondition, `Vault kept the lease of ${path} at ${leaseSeconds}s, longer than the ${ttlSeconds}s asked for`, { details: { operation: path } });
          }
        }
        const body = await call("sys/wrapping/wrap", () => root.write("sys/wrapping/wrap", record(read.data), wrapOptions));
        const info = wrapInfo(body);
        if (info === undefined) throw new AirlockError(Code.Internal, "Vault did not wrap the database credentials", { details: { operation: "sys/wrapping/wrap" } });
        return {
          wrappingToken: info.wrappingToken,
          wrappingAccessor: info.wrappingAccessor,
          wrapExpiresAt: info.wrapExpiresAt,
          leaseId,
          leaseExpiresAt: new Date(leaseStart + leaseSeconds * 1000),
        };
      } catch (error) {
        // Nobody will ever receive these credentials: drop them now rather than at their TTL.
        await vault.revokeLease(leaseId).catch(() => undefined);
        throw error;
      }
    },
    async revokeAccessor(accessor) {
      await call("auth/token/revoke-accessor", () => root.write("auth/token/revoke-accessor", { accessor })).catch(alreadyGone);
    },
    async revokeLease(leaseId) {
      // An empty lease id is refused here: it never names one lease.
      if (leaseId === "") throw new AirlockError(Code.InvalidArgument, "no lease id to revoke", { details: { field: "leaseId" } });
      await call("sys/leases/revoke", () => root.write("sys/leases/revoke", { lease_id: leaseId })).catch(alreadyGone);
    },
    async lookupAccessor(accessor) {
      const body = await call("auth/token/lookup-accessor", () => root.write("auth/token/lookup-accessor", { accessor })).catch((error: AirlockError) => {
        throw recode(error, Code.NotFound);
      });
      return tokenInfo(record(body.data));
    },
    async lookupLease(leaseId) {
      const body = await call("sys/leases/lookup", () => root.write("sys/leases/lookup", { lease_id: leaseId })).catch((error: AirlockError) => {
        throw recode(error, Code.NotFound);
      });
      const data = record(body.data);
      return {
        id: typeof data.id === "string" ? data.id : leaseId,
        issueTime: date(data.issue_time) ?? new Date(0),
        expireTime: date(data.expire_time),
        ttl: typeof data.ttl === "number" ? data.ttl : 0,
        renewable: data.renewable === true,
      };
    },
    async listTokenAccessors() {
      return keysOf(await call("auth/token/accessors", () => root.list("auth/token/accessors")).catch(emptyWhenNotFound));
    },
    async listLeases(prefix) {
      const folder = `${segment("prefix", prefix.replace(/\/+$/, ""))}/`;
      const path = `sys/leases/lookup/${folder}`;
      return keysOf(await call(path, () => root.list(path)).catch(emptyWhenNotFound)).map((key) => `${folder}${key}`);
    },
    async mount(path, type) {
      const mountPath = `sys/mounts/${segment("mount", path)}`;
      try {
        await call(mountPath, () => root.write(mountPath, { type }));
      } catch (error) {
        if (!(error instanceof AirlockError) || !/already in use/.test(error.rawMessage)) throw error;
        const existing = await call(mountPath, () => root.read(mountPath));
        const existingType = existing.type ?? record(existing.data).type;
        if (existingType !== type) {
          throw new AirlockError(Code.AlreadyExists, `${path} is already mounted as ${String(existingType)}, not ${type}`, { details: { operation: mountPath } });
        }
      }
    },
    async writeConfig(path, data) {
      const target = segment("path", path);
      await call(target, () => root.write(target, { ...data }));
    },
  };
  return vault;
}
