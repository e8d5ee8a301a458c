/**
 * Who is reviewing: OIDC bearer tokens verified against the identity provider's
 * JWKS, or, only when explicitly configured, fixed dev tokens.
 * @module
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { createRemoteJWKSet, type JWTPayload, jwtVerify } from "jose";
import { joseFailure } from "../../common/jose-errors.js";
import type { ConfigReader } from "../../common/config.js";
import { AirlockError, Code } from "../../common/errors.js";

/** An authenticated reviewer. */
export interface Reviewer {
  /** The reviewer's id (an email), as votes record it. */
  readonly id: string;
  /** Groups the identity provider (or the dev token table) asserts. */
  readonly groups: readonly string[];
  /** When the credential stops being valid. */
  readonly expiresAt: Date | undefined;
  /**
   * When the person last proved who they are at the identity provider (the ID token's
   * `auth_time`, or the console sign-in's); absent when unknown (dev tokens, a token without
   * `auth_time`). Enrolling a passkey needs it recent.
   */
  readonly authenticatedAt?: Date;
}

/** OIDC: bearer JWTs signed by the identity provider. */
export interface OidcAuthConfig {
  readonly kind: "oidc";
  /** The `iss` every token must carry. */
  readonly issuer: string;
  /** A value the token's `aud` must be or contain. */
  readonly audience: string;
  /** Where the provider's signing keys are published (fetched, cached, refetched on an unknown `kid`). */
  readonly jwksUrl: string;
  /** The claim naming the reviewer. @default "email" */
  readonly reviewerClaim: string;
  /** The claim listing the reviewer's groups. @default "groups" */
  readonly groupsClaim: string;
  /** Leeway for `exp` / `nbf` in seconds. @default 30 */
  readonly clockToleranceSec: number;
}

/** Dev mode: fixed tokens, for demos and tests only; the broker warns when it starts with them. */
export interface StaticAuthConfig {
  readonly kind: "static";
  readonly tokens: readonly { readonly token: string; readonly reviewer: string; readonly groups: readonly string[] }[];
}

/** How reviewers authenticate: a union keyed by `kind`. */
export type ReviewerAuthConfig = OidcAuthConfig | StaticAuthConfig;

/** Defaults of {@link OidcAuthConfig}. */
export const reviewerAuthDefaults = { reviewerClaim: "email", groupsClaim: "groups", clockToleranceSec: 30, algorithms: ["EdDSA", "ES256", "ES384", "RS256", "PS256"] } as const;

/** Validates a `reviewers.auth` config section; every error names the field. */
export function parseReviewerAuthConfig(reader: ConfigReader): ReviewerAuthConfig {
  const kind = reader.oneOf("kind", ["oidc", "static"] as const);
  let config: ReviewerAuthConfig;
  if (kind === "oidc") {
    const jwksUrl = reader.string("jwks_url");
    if (!/^https?:\/\//.test(jwksUrl) || !URL.canParse(jwksUrl)) throw reader.fail(`${reader.path}.jwks_url`, "must be an http(s) URL");
    config = {
      kind,
      issuer: reader.string("issuer"),
      audience: reader.string("audience"),
      jwksUrl,
      reviewerClaim: reader.string("reviewer_claim", reviewerAuthDefaults.reviewerClaim),
      groupsClaim: reader.string("groups_claim", reviewerAuthDefaults.groupsClaim),
      clockToleranceSec: reader.integer("clock_tolerance_sec", reviewerAuthDefaults.clockToleranceSec, 0, 600),
    };
  } else {
    const seen = new Set<string>();
    const tokens = reader.list("tokens").map((entry) => {
      const token = entry.string("token");
      if (token.length < 8) throw entry.fail(`${entry.path}.token`, "must be at least 8 characters");
      if (seen.has(token)) throw entry.fail(`${entry.path}.token`, "is listed twice");
      seen.add(token);
      const parsed = { token, reviewer: entry.string("reviewer"), groups: entry.strings("groups", []) };
      entry.done();
      return parsed;
    });
    config = { kind, tokens };
  }
  reader.done();
  return config;
}

/** The token of an `authorization: Bearer <token>` value (HTTP header or gRPC metadata); undefined when absent. */
export function bearerToken(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(value);
  if (match === null) throw unauthenticated("malformed_header", "authorization must be `Bearer <token>`");
  return match[1];
}

function unauthenticated(reason: string, message: string): AirlockError {
  // No cause: jose's errors carry the token's claims, and causes end up in logs.
  return new AirlockError(Code.Unauthenticated, message, { details: { reason } });
}

function sameSecret(a: string, b: string): boolean {
  const left = createHash("sha256").update(a).digest();
  const right = createHash("sha256").update(b).digest();
  return timingSafeEqual(left, right);
}

/** Verifies reviewer credentials; one instance per broker. */
export class ReviewerAuthenticator {
  private readonly jwks: ReturnType<typeof createRemoteJWKSet> | undefined;

  constructor(readonly config: ReviewerAuthConfig) {
    this.jwks = config.kind === "oidc" ? createRemoteJWKSet(new URL(config.jwksUrl), { cooldownDuration: 5_000, timeoutDuration: 5_000 }) : undefined;
  }

  /** Whether this is dev mode (fixed tokens). */
  get devMode(): boolean {
    return this.config.kind === "static";
  }

  /**
   * The reviewer a token belongs to, or an `unauthenticated` error with
   * `details.reason` (`missing_token`, `token_expired`, `wrong_issuer`,
   * `wrong_audience`, `bad_signature`, `invalid_claim`, `email_not_verified`, `unknown_token`,
   * `no_matching_key`), or `unavailable` when the provider's keys cannot be fetched.
   */
  async authenticate(token: string | undefined): Promise<Reviewer> {
    if (token === undefined || token === "") throw unauthenticated("missing_token", "sign in: no reviewer token was presented");
    if (this.config.kind === "static") {
      const match = this.config.tokens.find((entry) => sameSecret(entry.token, token));
      if (match === undefined) throw unauthenticated("unknown_token", "the reviewer token is not valid");
      return { id: match.reviewer, groups: match.groups, expiresAt: undefined };
    }
    const config = this.config;
    if (this.jwks === undefined) throw new AirlockError(Code.Internal, "no JWKS for OIDC");
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, this.jwks, {
        issuer: config.issuer,
        audience: config.audience,
        clockTolerance: config.clockToleranceSec,
        algorithms: [...reviewerAuthDefaults.algorithms],
        requiredClaims: ["exp"],
      }));
    } catch (error) {
      throw joseFailure(error, { token: "the reviewer token", keys: "the identity provider's keys" });
    }
    const id = payload[config.reviewerClaim];
    if (typeof id !== "string" || id.trim() === "") throw unauthenticated("invalid_claim", `the token has no ${config.reviewerClaim} claim naming the reviewer`);
    // An unverified email must not make someone an approver (some providers let users edit it).
    if (config.reviewerClaim === "email" && payload.email_verified === false) throw unauthenticated("email_not_verified", "the reviewer token's email is not verified");
    const claimed = payload[config.groupsClaim];
    const groups = Array.isArray(claimed) ? claimed.filter((g): g is string => typeof g === "string") : typeof claimed === "string" ? [claimed] : [];
    return {
      id: id.trim(),
      groups,
      expiresAt: payload.exp === undefined ? undefined : new Date(payload.exp * 1000),
      ...(typeof payload.auth_time === "number" && Number.isFinite(payload.auth_time) ? { authenticatedAt: new Date(payload.auth_time * 1000) } : {}),
    };
  }

  /**
   * An OIDC ID token's reviewer and verified claims (issuer, audience, signature and
   * expiry checked as {@link authenticate} checks them), for a step-up re-authentication
   * whose `auth_time`, `nonce` and `acr` the caller judges. `unauthenticated` with
   * `details.reason` as for {@link authenticate}; `failed_precondition` in dev mode, where
   * there is no identity provider to re-authenticate at.
   */
  async verifiedClaims(token: string): Promise<{ readonly reviewer: Reviewer; readonly claims: JWTPayload }> {
    if (this.config.kind !== "oidc" || this.jwks === undefined) {
      throw new AirlockError(Code.FailedPrecondition, "re-authentication needs an OIDC identity provider (reviewers.auth.kind: oidc)", { details: { reason: "no_identity_provider" } });
    }
    const reviewer = await this.authenticate(token);
    // Verified again for the claims: authenticate returns only the reviewer. Cheap, the key set is cached.
    const { payload } = await jwtVerify(token, this.jwks, {
      issuer: this.config.issuer,
      audience: this.config.audience,
      clockTolerance: this.config.clockToleranceSec,
      algorithms: [...reviewerAuthDefaults.algorithms],
      requiredClaims: ["exp"],
    }).catch((error: unknown) => {
      throw joseFailure(error, { token: "the reviewer token", keys: "the identity provider's keys" });
    });
    return { reviewer, claims: payload };
  }
}

