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

/**
 * Airlock's typed view of the Vault HTTP API. Every method fails with an
 * {@link AirlockError}: `unavailable` when Vault cannot be reached,
 * `permission_denied` when Vault refuses the token, `not_found`, or `internal`.
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

/** The AirlockError for a failed node-vault call: the HTTP status or network failure decides the code. */
export function vaultError(operation: string, error: unknown): AirlockError {
  const candidate = (error ?? {}) as VaultApiError;
  const status = candidate.response?.statusCode;
  const details = { operation, ...(status === undefined ? {} : { vaultStatus: status }) };
  if (status === undefined) {
    // Only a network failure means Vault is unreachable; anything else is a fault on this side.
    const network = typeof candidate.code === "string" && /^(E[A-Z_]+|ERR_NETWORK|ERR_BAD_RESPONSE)$/.test(candidate.code);
    return network
      ? new AirlockError(Code.Unavailable, `Vault is unreachable (${operation}): ${candidate.code ?? "no answer"}`, { cause: error, details })
      : new AirlockError(Code.Internal, `Vault call ${operation} failed: ${candidate.message ?? "unknown error"}`, { cause: error, details });
  }
  const code =
    status === 403 || status === 401 ? Code.PermissionDenied : status === 404 ? Code.NotFound : status === 400 ? Code.InvalidArgument : status === 503 ? Code.Unavailable : Code.Internal;
  return new AirlockError(code, `Vault refused ${operation}: ${candidate.message ?? `status ${status}`}`, { cause: error, details });
}

function stringRecord(value: unknown): Record<string, string> {
  const result: Record<string, string> = {};
  if (value !== null && typeof value === "object") {
    for (const [key, entry] of Object.entries(value)) if (typeof entry === "string") result[key] = entry;
  }
  return result;
}

/** A {@link VaultClient} over node-vault. */
export function createVaultClient(options: VaultClientOptions): VaultClient {
  const timeout = options.timeoutMs ?? vaultClientDefaults.timeoutMs;
  const client = (token: string | undefined) =>
    nodeVault({ apiVersion: "v1", endpoint: options.address, ...(token === undefined ? {} : { token }), requestOptions: { timeout } });
  const root = client(options.token);
  return {
    async health() {
      try {
        const body = (await root.health({ standbyok: true })) as { initialized?: boolean; sealed?: boolean; version?: string };
        return { initialized: body.initialized === true, sealed: body.sealed !== false, version: body.version ?? "" };
      } catch (error) {
        throw vaultError("sys/health", error);
      }
    },
    async lookupSelf(token) {
      let body: { data?: Record<string, unknown> | null };
      try {
        body = (await client(token).tokenLookupSelf()) as typeof body;
      } catch (error) {
        throw vaultError("auth/token/lookup-self", error);
      }
      const data = body.data ?? {};
      return {
        accessor: typeof data.accessor === "string" ? data.accessor : "",
        policies: Array.isArray(data.policies) ? data.policies.filter((p): p is string => typeof p === "string") : [],
        ttl: typeof data.ttl === "number" ? data.ttl : 0,
        numUses: typeof data.num_uses === "number" ? data.num_uses : 0,
        meta: stringRecord(data.meta),
      };
    },
    async unwrap(wrappingToken) {
      let body: { data?: Record<string, unknown> | null; auth?: Record<string, unknown> | null; lease_id?: string };
      try {
        body = (await client(wrappingToken).unwrap()) as typeof body;
      } catch (error) {
        throw vaultError("sys/wrapping/unwrap", error);
      }
      const auth = body.auth;
      return {
        data: body.data ?? {},
        ...(auth === undefined || auth === null || typeof auth.client_token !== "string"
          ? {}
          : { auth: { clientToken: auth.client_token, accessor: typeof auth.accessor === "string" ? auth.accessor : "" } }),
        leaseId: body.lease_id ?? "",
      };
    },
  };
}
