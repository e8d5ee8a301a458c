/**
 * A typed client of the reviewers' HTTP API (docs/reviewer-api.md), for the
 * `airlock requests` commands and scripts such as the demo's auto-approver.
 * @module
 */
import { AirlockError, Code } from "../common/errors.js";

/** A request as the API returns it (the record in protobuf JSON). */
export interface RequestViewJson {
  readonly record: {
    readonly request?: {
      readonly id: string;
      readonly identity?: { readonly agent?: string; readonly onBehalfOf?: string };
      readonly host?: string;
      readonly service?: string;
      readonly method?: string;
      readonly reason?: string;
      readonly risk?: string;
      readonly ruleId?: string;
      /** Why the rule holds the call, in the policy author's words. */
      readonly ruleDescription?: string;
      readonly credential?: {
        readonly vaultToken?: { readonly policies?: readonly string[]; readonly numUses?: number };
        readonly database?: { readonly mount?: string; readonly role?: string };
        /** Protobuf JSON duration, e.g. "300s". */
        readonly ttl?: string;
        readonly description?: string;
      };
      readonly request?: unknown;
      readonly redactedFields?: readonly string[];
      readonly createdAt?: string;
    };
    readonly state: string;
    readonly votes?: readonly { readonly reviewer: string; readonly group?: string; readonly approve?: boolean; readonly reason?: string }[];
    readonly outstanding?: readonly { readonly group: string; readonly minApprovals?: number }[];
    readonly lease?: { readonly leaseId?: string; readonly kind?: string; readonly issuedAt?: string; readonly revokedAt?: string; readonly revokedBy?: string };
    readonly completion?: { readonly statusCode?: number };
    readonly updatedAt?: string;
  };
  readonly needsMe: boolean;
  readonly expiresAt: string;
}

const statusCodes: Readonly<Record<number, Code>> = {
  401: Code.Unauthenticated,
  403: Code.PermissionDenied,
  404: Code.NotFound,
  409: Code.FailedPrecondition,
  422: Code.InvalidArgument,
  429: Code.ResourceExhausted,
  503: Code.Unavailable,
};

/** Calls the reviewers' API as one reviewer (a bearer token). */
export class ReviewerClient {
  /** @param baseUrl the broker's HTTP address, e.g. `http://127.0.0.1:9465` */
  constructor(
    private readonly baseUrl: string,
    private readonly token: string,
  ) {}

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    let response: Response;
    try {
      response = await fetch(new URL(path, this.baseUrl), {
        method,
        headers: { authorization: `Bearer ${this.token}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
    } catch (error) {
      throw new AirlockError(Code.Unavailable, `the broker at ${this.baseUrl} is unreachable`, { cause: error });
    }
    const text = await response.text();
    let parsed: unknown;
    try {
      parsed = text === "" ? undefined : JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    if (!response.ok) {
      const error = (parsed ?? {}) as { code?: string; message?: string; details?: Record<string, unknown> };
      // 409 covers two facts: the request is no longer pending, or this reviewer already voted.
      const code = response.status === 409 && error.code === "already_voted" ? Code.AlreadyExists : (statusCodes[response.status] ?? Code.Unknown);
      throw new AirlockError(code, error.message ?? `HTTP ${response.status}`, { details: { status: response.status, code: error.code ?? "", ...error.details } });
    }
    return parsed as T;
  }

  /** Who the token belongs to. */
  me(): Promise<{ reviewer: string; groups: string[]; breakGlass: boolean }> {
    return this.call("GET", "/api/v1/me");
  }

  /**
   * Requests matching the query (see the API's `GET /api/v1/requests`), every
   * page of them, up to `max`.
   * @param max - stop after this many. @default 10000
   */
  async list(query: Readonly<Record<string, string>> = {}, max = 10_000): Promise<RequestViewJson[]> {
    const all: RequestViewJson[] = [];
    let cursor: string | undefined;
    do {
      const search = new URLSearchParams({ ...query, ...(cursor === undefined ? {} : { cursor }) }).toString();
      const page = await this.call<{ requests: RequestViewJson[]; nextCursor?: string }>("GET", `/api/v1/requests${search === "" ? "" : `?${search}`}`);
      all.push(...page.requests);
      cursor = page.nextCursor;
    } while (cursor !== undefined && all.length < max);
    return all.slice(0, max);
  }

  /** One request. */
  get(id: string): Promise<RequestViewJson> {
    return this.call("GET", `/api/v1/requests/${encodeURIComponent(id)}`);
  }

  /** Approves or denies (a denial needs a reason). */
  decide(id: string, approve: boolean, reason?: string): Promise<RequestViewJson> {
    return this.call("POST", `/api/v1/requests/${encodeURIComponent(id)}/decision`, { approve, ...(reason === undefined ? {} : { reason }) });
  }
}
