/**
 * Single sign-on for people: the OpenID Connect authorization code flow with
 * PKCE (oauth4webapi), run by the broker for the approver console. The
 * in-flight sign-in (state, nonce, PKCE verifier) travels in a sealed,
 * short-lived cookie, so the callback may land on any replica.
 * @module
 */
import { createRemoteJWKSet, type JWTPayload, jwtVerify } from "jose";
import { joseFailure } from "../../common/jose-errors.js";
import * as oauth from "oauth4webapi";
import type { ConfigReader } from "../../common/config.js";
import { AirlockError, Code } from "../../common/errors.js";
import { reviewerAuthDefaults } from "./auth.js";

/** The `reviewers.sso` section. */
export interface SsoConfig {
  /** The name on the console's button: "Sign in with <provider_name>". */
  readonly providerName: string;
  /** The provider's issuer identifier (its discovery document is `<issuer>/.well-known/openid-configuration`). */
  readonly issuer: string;
  readonly clientId: string;
  /** Absent: a public client (PKCE alone). Never logged. */
  readonly clientSecret?: string;
  /** Where the provider sends the browser back; @default `<origin>/api/v1/sso/callback` of the request (or `public_origin`). */
  readonly redirectUri?: string;
  /** @default ["openid", "email", "profile"] */
  readonly scopes: readonly string[];
  /** The claim naming the reviewer. @default "email" */
  readonly reviewerClaim: string;
  /** The claim listing groups (Entra ID: `groups` holds object ids, `roles` app role values). @default "groups" */
  readonly groupsClaim: string;
  /** Claim values (Entra group object ids, app roles) → Airlock group names; unmapped values are kept as they are. */
  readonly groupMap: Readonly<Record<string, string>>;
  /** The public client `airlock login` uses for the device flow; advertised at `GET /api/v1/sso`. */
  readonly cliClientId?: string;
  /** Leeway for the ID token's times, in seconds. @default 30 */
  readonly clockToleranceSec: number;
}

/** Defaults of {@link SsoConfig}. */
export const ssoDefaults = { scopes: ["openid", "email", "profile"], reviewerClaim: "email", groupsClaim: "groups", clockToleranceSec: 30, transactionTtlMs: 10 * 60_000 } as const;

/** Whether a URL's host is this machine (plain HTTP is allowed only there). */
export function isLoopback(url: URL): boolean {
  return ["127.0.0.1", "localhost", "[::1]"].includes(url.hostname);
}

function httpsUrl(reader: ConfigReader, key: string): string {
  const value = reader.string(key);
  if (!URL.canParse(value)) throw reader.fail(`${reader.path}.${key}`, "must be a URL");
  const url = new URL(value);
  if (url.protocol !== "https:" && !(url.protocol === "http:" && isLoopback(url))) throw reader.fail(`${reader.path}.${key}`, "must be an https URL (plain http only on 127.0.0.1 or localhost)");
  return value;
}

/** Validates a `reviewers.sso` section; every error names the field. */
export function parseSsoConfig(reader: ConfigReader): SsoConfig {
  const issuer = httpsUrl(reader, "issuer");
  const clientSecret = reader.optionalString("client_secret");
  const redirectUri = reader.has("redirect_uri") ? httpsUrl(reader, "redirect_uri") : (reader.optionalString("redirect_uri"), undefined);
  const scopes = reader.strings("scopes", ssoDefaults.scopes);
  if (!scopes.includes("openid")) throw reader.fail(`${reader.path}.scopes`, "must include openid");
  const groupMap = reader.has("group_map") ? reader.stringMap("group_map") : (reader.optionalString("group_map"), {});
  const cliClientId = reader.optionalString("cli_client_id");
  const config: SsoConfig = {
    providerName: reader.string("provider_name"),
    issuer,
    clientId: reader.string("client_id"),
    ...(clientSecret === undefined ? {} : { clientSecret }),
    ...(redirectUri === undefined ? {} : { redirectUri }),
    scopes,
    reviewerClaim: reader.string("reviewer_claim", ssoDefaults.reviewerClaim),
    groupsClaim: reader.string("groups_claim", ssoDefaults.groupsClaim),
    groupMap,
    ...(cliClientId === undefined ? {} : { cliClientId }),
    clockToleranceSec: reader.integer("clock_tolerance_sec", ssoDefaults.clockToleranceSec, 0, 600),
  };
  reader.done();
  return config;
}

/** The sign-in in flight, sealed in a cookie between the redirect and the callback. */
export interface SsoTransaction {
  readonly state: string;
  readonly nonce: string;
  readonly verifier: string;
  /** The console route to return to (`#/requests/…`). */
  readonly returnTo: string;
  readonly redirectUri: string;
  /** Ends at (ms). */
  readonly exp: number;
  /** Set when this sign-in is a step-up for one vote: the vote it confirms, cast at the callback. */
  readonly stepUp?: SsoStepUpVote;
}

/**
 * The vote a step-up sign-in confirms. Sealed in the sign-in cookie when the signed-in
 * reviewer starts it (with the CSRF token), so the callback, which a cross-site redirect
 * reaches without the session cookie, knows whose vote it is and on what.
 */
export interface SsoStepUpVote {
  readonly reviewer: string;
  readonly challengeId: string;
  readonly requestId: string;
  readonly approve: boolean;
  readonly reason: string;
  readonly breakGlass: boolean;
}

/** Who signed in, from a verified ID token. */
export interface SsoIdentity {
  readonly reviewer: string;
  readonly groups: readonly string[];
  /** When the provider's tokens expire (ms); a refresh is due then. */
  readonly tokensExpireAt: number;
  readonly refreshToken?: string;
}

function unauthenticated(reason: string, message: string): AirlockError {
  return new AirlockError(Code.Unauthenticated, message, { details: { reason } });
}

/** The groups a claim value gives, mapped through `groupMap`. */
export function groupsOf(claim: unknown, groupMap: Readonly<Record<string, string>>): string[] {
  const values = Array.isArray(claim) ? claim.filter((g): g is string => typeof g === "string") : typeof claim === "string" ? [claim] : [];
  return [...new Set(values.map((value) => groupMap[value] ?? value))];
}

/** The broker's side of the code flow; one per replica, stateless between requests. */
export class SsoClient {
  private discovery: Promise<oauth.AuthorizationServer> | undefined;
  private jwks: ReturnType<typeof createRemoteJWKSet> | undefined;
  private readonly client: oauth.Client;
  private readonly clientAuth: oauth.ClientAuth;
  private readonly insecure: boolean;

  constructor(readonly config: SsoConfig) {
    this.client = { client_id: config.clientId };
    this.clientAuth = config.clientSecret === undefined ? oauth.None() : oauth.ClientSecretPost(config.clientSecret);
    this.insecure = new URL(config.issuer).protocol === "http:";
  }

  private get options(): { [oauth.allowInsecureRequests]?: boolean; signal: AbortSignal } {
    return { ...(this.insecure ? { [oauth.allowInsecureRequests]: true } : {}), signal: AbortSignal.timeout(10_000) };
  }

  /** The provider's metadata, fetched on first use and kept; a failure is `unavailable` and retried next time. */
  async server(): Promise<oauth.AuthorizationServer> {
    this.discovery ??= (async () => {
      const issuer = new URL(this.config.issuer);
      const response = await oauth.discoveryRequest(issuer, { ...this.options, algorithm: "oidc" });
      return oauth.processDiscoveryResponse(issuer, response);
    })();
    try {
      return await this.discovery;
    } catch (error) {
      this.discovery = undefined;
      throw new AirlockError(Code.Unavailable, "the identity provider cannot be reached", { cause: error, details: { reason: "idp_unavailable" } });
    }
  }

  /**
   * Starts a sign-in: the provider's authorization URL and the transaction to seal. With
   * `{ fresh: true }` the provider must ask for the credentials again (`prompt=login`,
   * `max_age=0`), as before a passkey is enrolled. With a step-up it is a re-authentication
   * for one vote: `prompt=login` and `max_age=0` (the
   * provider must ask again, whatever session it has), the step-up challenge as `nonce`,
   * and `acr_values` when the rule names an `acr`.
   */
  async begin(
    redirectUri: string,
    returnTo: string,
    stepUp?: { readonly challenge: string; readonly acr?: string; readonly vote: SsoStepUpVote } | { readonly fresh: true },
  ): Promise<{ url: URL; transaction: SsoTransaction }> {
    const as = await this.server();
    if (as.authorization_endpoint === undefined) throw new AirlockError(Code.Unavailable, "the identity provider has no authorization endpoint", { details: { reason: "idp_unavailable" } });
    const verifier = oauth.generateRandomCodeVerifier();
    const transaction: SsoTransaction = {
      state: oauth.generateRandomState(),
      nonce: stepUp !== undefined && "challenge" in stepUp ? stepUp.challenge : oauth.generateRandomNonce(),
      verifier,
      returnTo,
      redirectUri,
      exp: Date.now() + ssoDefaults.transactionTtlMs,
      ...(stepUp !== undefined && "vote" in stepUp ? { stepUp: stepUp.vote } : {}),
    };
    const url = new URL(as.authorization_endpoint);
    url.search = new URLSearchParams({
      client_id: this.config.clientId,
      redirect_uri: redirectUri,
      response_type: "code",
      // A vote's re-authentication makes no session, so it needs no refresh token of its own: no offline_access for it.
      scope: (stepUp !== undefined && "vote" in stepUp ? this.config.scopes.filter((scope) => scope !== "offline_access") : this.config.scopes).join(" "),
      state: transaction.state,
      nonce: transaction.nonce,
      code_challenge: await oauth.calculatePKCECodeChallenge(verifier),
      code_challenge_method: "S256",
      ...(stepUp === undefined ? {} : { prompt: "login", max_age: "0", ...("acr" in stepUp && stepUp.acr !== undefined && stepUp.acr !== "" ? { acr_values: stepUp.acr } : {}) }),
    }).toString();
    return { url, transaction };
  }

  /**
   * Finishes a sign-in from the callback URL: checks the state, redeems the code
   * with the PKCE verifier, verifies the ID token (signature against the provider's
   * keys, issuer, audience, nonce, times). Refusals are `unauthenticated` with
   * `details.reason`: `state_mismatch`, `sso_error` (the provider said no),
   * `code_rejected` (a used, expired or foreign code), `wrong_issuer`,
   * `wrong_audience`, `token_expired`, `bad_signature`, `nonce_mismatch`, `invalid_claim`.
   */
  async finish(callback: URL, transaction: SsoTransaction): Promise<SsoIdentity & { readonly claims: JWTPayload; readonly idToken: string }> {
    const as = await this.server();
    let parameters: URLSearchParams;
    try {
      parameters = oauth.validateAuthResponse(as, this.client, callback, transaction.state);
    } catch (error) {
      if (error instanceof oauth.AuthorizationResponseError) throw unauthenticated("sso_error", `the identity provider refused the sign-in: ${error.error}`);
      if (error instanceof oauth.OperationProcessingError && /state/i.test(error.message)) throw unauthenticated("state_mismatch", "the sign-in answer does not belong to this browser's sign-in (state mismatch); start again");
      if (error instanceof oauth.OperationProcessingError && /iss/i.test(error.message)) throw unauthenticated("wrong_issuer", "the sign-in answer names another identity provider");
      throw unauthenticated("sso_error", "the sign-in answer is malformed");
    }
    let tokens: oauth.TokenEndpointResponse;
    try {
      const response = await oauth.authorizationCodeGrantRequest(as, this.client, this.clientAuth, parameters, transaction.redirectUri, transaction.verifier, this.options);
      // The ID token's claims are checked again below, with the signature, by jose.
      tokens = await oauth.processAuthorizationCodeResponse(as, this.client, response, { expectedNonce: transaction.nonce, requireIdToken: true });
    } catch (error) {
      throw describeTokenError(error, "code_rejected");
    }
    return this.identity(tokens, transaction.nonce);
  }

  /**
   * Refreshes a session's tokens; `refresh_failed` when the provider refuses (revoked, expired,
   * user disabled). `groups` is absent when the provider sent no new ID token (keep the old ones).
   */
  async refresh(refreshToken: string, reviewer: string): Promise<Omit<SsoIdentity, "groups" | "reviewer"> & { readonly groups?: readonly string[] }> {
    const as = await this.server();
    let tokens: oauth.TokenEndpointResponse;
    try {
      const response = await oauth.refreshTokenGrantRequest(as, this.client, this.clientAuth, refreshToken, this.options);
      tokens = await oauth.processRefreshTokenResponse(as, this.client, response);
    } catch (error) {
      throw describeTokenError(error, "refresh_failed");
    }
    if (tokens.id_token === undefined) {
      // Some providers send no new ID token on refresh: the identity stands, the tokens are fresh.
      const expiresIn = typeof tokens.expires_in === "number" ? tokens.expires_in : 300;
      return { tokensExpireAt: Date.now() + expiresIn * 1000, refreshToken: tokens.refresh_token ?? refreshToken };
    }
    const identity = await this.identity(tokens, undefined, refreshToken);
    if (identity.reviewer.toLowerCase() !== reviewer.toLowerCase()) throw unauthenticated("refresh_failed", "the refreshed identity is another person");
    return identity;
  }

  /** Revokes a refresh token at the provider (best effort: sign-out must work when the provider is down). */
  async revoke(refreshToken: string): Promise<void> {
    const as = await this.server().catch(() => undefined);
    if (as?.revocation_endpoint === undefined) return;
    await oauth
      .revocationRequest(as, this.client, this.clientAuth, refreshToken, this.options)
      .then((response) => oauth.processRevocationResponse(response))
      .catch(() => undefined);
  }

  /**
   * Verifies an ID token as this relying party: the provider's signature, issuer,
   * audience (this client), times, and the nonce when one is expected.
   */
  async verifyIdToken(idToken: string, expectedNonce: string | undefined): Promise<JWTPayload> {
    const as = await this.server();
    if (as.jwks_uri === undefined) throw new AirlockError(Code.Unavailable, "the identity provider publishes no keys", { details: { reason: "idp_unavailable" } });
    this.jwks ??= createRemoteJWKSet(new URL(as.jwks_uri), { cooldownDuration: 5_000, timeoutDuration: 5_000 });
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(idToken, this.jwks, {
        issuer: this.config.issuer,
        audience: this.config.clientId,
        clockTolerance: this.config.clockToleranceSec,
        algorithms: [...reviewerAuthDefaults.algorithms],
        requiredClaims: ["exp", "iat", "sub"],
      }));
    } catch (error) {
      throw joseFailure(error, { token: "the ID token", keys: "the identity provider's keys" });
    }
    if (expectedNonce !== undefined && payload.nonce !== expectedNonce) throw unauthenticated("nonce_mismatch", "the ID token was not issued for this sign-in (nonce mismatch)");
    return payload;
  }

  private async identity(tokens: oauth.TokenEndpointResponse, nonce: string | undefined, previousRefreshToken?: string): Promise<SsoIdentity & { readonly claims: JWTPayload; readonly idToken: string }> {
    if (tokens.id_token === undefined) throw unauthenticated("invalid_claim", "the identity provider sent no ID token");
    const claims = await this.verifyIdToken(tokens.id_token, nonce);
    const id = claims[this.config.reviewerClaim];
    if (typeof id !== "string" || id.trim() === "") throw unauthenticated("invalid_claim", `the ID token has no ${this.config.reviewerClaim} claim naming the reviewer`);
    if (this.config.reviewerClaim === "email" && claims.email_verified === false) throw unauthenticated("email_not_verified", "the ID token's email is not verified");
    const refreshToken = tokens.refresh_token ?? previousRefreshToken;
    return {
      reviewer: id.trim(),
      groups: groupsOf(claims[this.config.groupsClaim], this.config.groupMap),
      tokensExpireAt: (claims.exp ?? 0) * 1000,
      ...(refreshToken === undefined ? {} : { refreshToken }),
      claims,
      idToken: tokens.id_token,
    };
  }
}

function describeTokenError(error: unknown, reason: string): AirlockError {
  if (error instanceof AirlockError) return error;
  if (error instanceof oauth.ResponseBodyError) return unauthenticated(reason, `the identity provider refused: ${error.error}`);
  if (error instanceof oauth.OperationProcessingError) {
    const cause = error.cause as { claim?: string } | undefined;
    if (error.code === oauth.JWT_CLAIM_COMPARISON && cause?.claim === "iss") return unauthenticated("wrong_issuer", "the ID token is from another issuer");
    if (error.code === oauth.JWT_CLAIM_COMPARISON && cause?.claim === "aud") return unauthenticated("wrong_audience", "the ID token is for another client");
    if (error.code === oauth.JWT_CLAIM_COMPARISON && cause?.claim === "nonce") return unauthenticated("nonce_mismatch", "the ID token was not issued for this sign-in (nonce mismatch)");
    if (error.code === oauth.JWT_TIMESTAMP_CHECK) return unauthenticated("token_expired", "the ID token has expired");
    return unauthenticated(reason, "the identity provider's answer is not valid");
  }
  return new AirlockError(Code.Unavailable, "the identity provider cannot be reached", { cause: error, details: { reason: "idp_unavailable" } });
}

