/**
 * Who is calling the sidecar: an agent proves its identity with an mTLS client
 * certificate (its URI SAN) or a signed agent token (a JWT in metadata).
 *
 * The result feeds policy and `ApprovalRequest.identity`, and the identity
 * chain is what keeps an agent's human from approving their own request, so
 * every path here fails closed: a presented credential that does not verify is
 * an error, never "anonymous".
 * @module
 */
import * as crypto from "node:crypto";
import { createHash, createPublicKey, type JsonWebKey as NodeJsonWebKey } from "node:crypto";
import type { PeerCertificate, TLSSocket } from "node:tls";
import { type CryptoKey, createRemoteJWKSet, decodeJwt, decodeProtectedHeader, errors, importJWK, type JWK, type JWTPayload, type JWTVerifyGetKey, jwtVerify } from "jose";
import { AirlockError, Code } from "../common/errors.js";

/** The authenticated caller of a sidecar. Field names match the `airlock.v1.Identity` message. */
export interface AgentIdentity {
  /** The agent: the first URI SAN of its certificate, or the `sub` of its token. */
  readonly agent: string;
  /** The human the agent acts for; empty when the credential names none (an unattended pipeline). */
  readonly onBehalfOf: string;
  /** Every principal in the delegation chain: agent, human, then any further ones; deduplicated, no empty entries. */
  readonly chain: readonly string[];
  /** How the agent proved who it is. */
  readonly authenticatedBy: "mtls" | "jwt";
  /** Who vouches for each link of the chain, for the record (see {@link Attestation}). */
  readonly attestation: Attestation;
}

/**
 * How each link of the identity chain was attested, as recorded on the
 * approval request: `jwt:<issuer>` (the subject of a token the issuer signed),
 * `token_exchange:<issuer>` (RFC 8693: the issuer exchanged the human's own
 * token and names the agent in `act`), `claim:<issuer>:<claim>` (a claim in a
 * token the issuer signed), `mtls` / `mtls_san` (the client certificate, or
 * one of its URI SANs), empty for no human.
 */
export interface Attestation {
  readonly agent: string;
  readonly human: string;
}

/** Where the public keys that verify agent tokens come from. */
export type AgentTokenKeys =
  /** A JWKS document fetched (and cached, refetched on an unknown `kid`) from the issuer. */
  | { readonly kind: "jwks_url"; readonly url: string }
  /** Fixed public keys, each a PEM (SPKI or certificate) or a JSON-encoded public JWK. */
  | { readonly kind: "static"; readonly publicKeys: readonly string[] };

/** Agent tokens: JWTs in metadata `authorization: Bearer <jwt>` or `x-airlock-agent-token`. */
export interface JwtAuthOptions {
  readonly kind: "jwt";
  /** The `iss` every token must carry. */
  readonly issuer: string;
  /** A value the token's `aud` must be or contain. */
  readonly audience: string;
  readonly keys: AgentTokenKeys;
  /**
   * How the human is attested. `token_exchange`: the token's `sub` is the human and its `act`
   * claim (RFC 8693) names the agent, so the issuer vouches for both, having exchanged the
   * human's own token; a token naming the human in `humanClaim` instead is refused
   * (`unattested_human`). `claim`: the agent is `sub` and the human is `humanClaim`, which is
   * only as good as who holds the issuer's key. @default "claim"
   */
  readonly delegation?: "claim" | "token_exchange";
  /**
   * With `delegation: token_exchange`, whether a token without `act` is accepted as an
   * unattended agent (`sub` is the agent, no human). Off by default: the same issuer signs
   * people's own tokens, and one of those must not pass as an agent named after the person
   * (`unattested_agent`). Turn it on only for an issuer whose non-exchanged tokens are all
   * agents' (a workload identity provider). @default false
   */
  readonly unattended?: boolean;
  /** The claim naming the human the agent acts for (`delegation: claim`). @default "act_for" */
  readonly humanClaim?: string;
  /** Leeway for `exp` and `nbf`, in seconds, for clock skew between issuer and sidecar. @default 30 */
  readonly clockToleranceSec?: number;
  /** Signature algorithms accepted (symmetric `HS*` and `none` are refused). @default ["EdDSA", "ES256", "RS256"] */
  readonly algorithms?: readonly string[];
}

/** mTLS client certificates: the agent is the first URI SAN, the human a URI SAN with a prefix. */
export interface MtlsAuthOptions {
  readonly kind: "mtls";
  /**
   * The URI SAN prefix that marks the on-behalf-of human, e.g.
   * `airlock://on-behalf-of/alice@corp.com`. The rest of the URI
   * (percent-decoded) is the human.
   * @default "airlock://on-behalf-of/"
   */
  readonly onBehalfOfPrefix?: string;
}

/** One way an agent may authenticate; {@link AgentAuthenticator.create} takes a list. */
export type AgentAuthOptions = JwtAuthOptions | MtlsAuthOptions;

/** Defaults of {@link JwtAuthOptions} and {@link MtlsAuthOptions}. */
export const agentAuthDefaults = {
  humanClaim: "act_for",
  clockToleranceSec: 30,
  algorithms: ["EdDSA", "ES256", "RS256"],
  onBehalfOfPrefix: "airlock://on-behalf-of/",
} as const satisfies {
  humanClaim: string;
  clockToleranceSec: number;
  algorithms: readonly string[];
  onBehalfOfPrefix: string;
};

/**
 * Limits of the verified-token cache {@link AgentAuthenticator} keeps (the sidecar's only one). Agents send the same
 * token on every call until it expires, and checking its signature costs more
 * CPU than proxying the call (about 0.3 ms for EdDSA here); a token seen before
 * is answered from the cache. The cache never stretches a token's life: an
 * entry ends at the token's own `exp` with no clock tolerance, or after
 * `maxAgeMs`, whichever is first, and only tokens already valid without the
 * tolerance are kept. `maxAgeMs` also bounds how long a key the issuer removed
 * from its JWKS keeps vouching for tokens it signed. Entries are keyed by the
 * token's SHA-256, so no bearer token stays in memory.
 */
export const verifiedTokenCacheDefaults = {
  maxEntries: 4096,
  maxAgeMs: 60_000,
} as const;

/** What {@link AgentAuthenticator.authenticate} looks at: one call's metadata and TLS peer. */
export interface AuthenticationInput {
  /** The call's HTTP/2 headers (gRPC metadata). Names are matched case-insensitively. */
  readonly headers: Readonly<Record<string, string | string[] | undefined>>;
  /**
   * The TLS peer certificate (`TLSSocket.getPeerCertificate()`); an empty
   * object means the client sent none.
   */
  readonly peerCertificate?: PeerCertificate;
  /**
   * Whether the TLS layer verified the peer certificate against the trusted CAs
   * (`TLSSocket.authorized`). Pass it whenever the server runs with
   * `rejectUnauthorized: false` (needed to let token-only agents connect over
   * TLS): `false` makes a presented certificate an authentication failure. When
   * omitted, the certificate is taken as verified, which is only true with
   * `requestCert: true, rejectUnauthorized: true`.
   */
  readonly peerAuthorized?: boolean;
}

/** The header an agent token is looked for in when `authorization` carries no bearer token. */
const agentTokenHeader = "x-airlock-agent-token";

/** JWS algorithm → the JWK key type (and curve) that can verify it; the only algorithms accepted. */
const algorithmKeys: Readonly<Record<string, { kty: string; crv?: string }>> = {
  EdDSA: { kty: "OKP", crv: "Ed25519" },
  Ed25519: { kty: "OKP", crv: "Ed25519" },
  ES256: { kty: "EC", crv: "P-256" },
  ES384: { kty: "EC", crv: "P-384" },
  ES512: { kty: "EC", crv: "P-521" },
  RS256: { kty: "RSA" },
  RS384: { kty: "RSA" },
  RS512: { kty: "RSA" },
  PS256: { kty: "RSA" },
  PS384: { kty: "RSA" },
  PS512: { kty: "RSA" },
};

/** A stable machine-readable reason in `details.reason` of every authentication failure. */
export type AuthFailureReason =
  | "malformed_token"
  | "token_expired"
  | "token_not_yet_valid"
  | "wrong_issuer"
  | "wrong_audience"
  | "bad_signature"
  | "algorithm_not_allowed"
  | "no_matching_key"
  | "invalid_claim"
  /** With token exchange, the token names a human in a claim of its own instead of as its subject. */
  | "unattested_human"
  /** With token exchange, the token has no `act`: a person's own token, not an agent's (unless `unattended` is set). */
  | "unattested_agent"
  | "tokens_not_accepted"
  | "certificate_not_verified"
  | "certificate_without_uri_san";

function unauthenticated(reason: AuthFailureReason, method: "jwt" | "mtls", message: string): AirlockError {
  // No cause: jose's claim errors carry the token's payload, and an error's
  // cause ends up in logs. The message and reason say all a caller needs.
  return new AirlockError(Code.Unauthenticated, message, { details: { reason, method } });
}

function invalidOption(message: string, cause?: unknown): AirlockError {
  return new AirlockError(Code.InvalidArgument, message, cause === undefined ? {} : { cause });
}

/** A quoted, length-capped rendering of an untrusted string for an error message. */
function quote(value: string): string {
  return JSON.stringify(value.length > 120 ? `${value.slice(0, 120)}…` : value);
}

/**
 * Parses a Node `subjectaltname` string (`URI:spiffe://x, DNS:a, URI:"b, c"`)
 * into (type, value) pairs. Node JSON-quotes a value that contains a comma,
 * quote or other special character (since the CVE-2021-44532 fix), so a naive
 * split on ", " would let a crafted SAN smuggle in a second entry.
 */
export function parseSubjectAltName(text: string): { type: string; value: string }[] {
  const entries: { type: string; value: string }[] = [];
  let i = 0;
  while (i < text.length) {
    while (text[i] === " " || text[i] === ",") i++;
    if (i >= text.length) break;
    const colon = text.indexOf(":", i);
    if (colon < 0) break; // A trailing fragment without a type is not an entry.
    const type = text.slice(i, colon).trim();
    i = colon + 1;
    let value: string;
    if (text[i] === '"') {
      let end = i + 1;
      while (end < text.length && text[end] !== '"') end += text[end] === "\\" ? 2 : 1;
      try {
        value = JSON.parse(text.slice(i, end + 1)) as string;
      } catch {
        value = text.slice(i + 1, end);
      }
      i = end + 1;
    } else {
      const comma = text.indexOf(",", i);
      const end = comma < 0 ? text.length : comma;
      value = text.slice(i, end).trim();
      i = end;
    }
    entries.push({ type, value });
  }
  return entries;
}

function buildChain(...principals: readonly string[]): string[] {
  return [...new Set(principals.filter((p) => p.length > 0))];
}

function headerValues(headers: AuthenticationInput["headers"], name: string): string[] {
  const values: string[] = [];
  for (const key in headers) {
    const value = headers[key];
    if (value === undefined || (key !== name && key.toLowerCase() !== name)) continue;
    for (const v of Array.isArray(value) ? value : [value]) values.push(v);
  }
  return values;
}

/** The metadata keys an agent token may travel in. */
export type AgentTokenHeader = "authorization" | typeof agentTokenHeader;

/** A token a call presents and the metadata key it came in. */
interface PresentedToken {
  readonly token: string;
  readonly header: AgentTokenHeader;
}

const bearerPattern = /^bearer(\s|$)/i;

/** The token of an `authorization` value when it is a bearer credential, else undefined. */
function bearerToken(value: string): string | undefined {
  const trimmed = value.trim();
  return bearerPattern.test(trimmed) ? trimmed.slice("bearer".length).trim() : undefined;
}

/**
 * The agent token a call presents: the bearer token of `authorization`, else
 * `x-airlock-agent-token`. `undefined` when neither is present; an empty or
 * repeated token is an error (an agent must not leave the sidecar guessing which one counts).
 */
function presentedToken(headers: AuthenticationInput["headers"]): PresentedToken | undefined {
  return tokenAmong(headerValues(headers, "authorization"), headerValues(headers, agentTokenHeader));
}

/**
 * {@link presentedToken} for a header object whose names are all lowercase, as
 * the sidecar's HTTP/2 stack builds them (HPACK refuses uppercase names): two
 * property reads instead of a walk over every header (the allow path asks this on every call).
 */
function presentedTokenLowercase(headers: AuthenticationInput["headers"]): PresentedToken | undefined {
  const authorization = headers["authorization"];
  const agentToken = headers[agentTokenHeader];
  if (typeof authorization === "string" && agentToken === undefined) {
    // The common case, one authorization value: no arrays.
    const token = bearerToken(authorization);
    if (token === undefined) return undefined;
    if (token.length === 0) throw unauthenticated("malformed_token", "jwt", "the agent token is empty");
    return { token, header: "authorization" };
  }
  const values = (value: string | string[] | undefined): string[] => (value === undefined ? [] : Array.isArray(value) ? value : [value]);
  return tokenAmong(values(authorization), values(agentToken));
}

/** The one token among a call's `authorization` and `x-airlock-agent-token` values (see {@link presentedToken}). */
function tokenAmong(authorization: readonly string[], agentToken: readonly string[]): PresentedToken | undefined {
  const bearer: string[] = [];
  for (const value of authorization) {
    const token = bearerToken(value);
    if (token !== undefined) bearer.push(token);
  }
  const header: AgentTokenHeader = bearer.length > 0 ? "authorization" : agentTokenHeader;
  const candidates = bearer.length > 0 ? bearer : agentToken.map((v) => v.trim());
  if (candidates.length === 0) return undefined;
  if (candidates.length > 1) throw unauthenticated("malformed_token", "jwt", "more than one agent token presented");
  const token = candidates[0] ?? "";
  if (token.length === 0) throw unauthenticated("malformed_token", "jwt", "the agent token is empty");
  return { token, header };
}

/** One configured JWT issuer, ready to verify. */
class JwtVerifier {
  constructor(
    readonly issuer: string,
    private readonly audience: string,
    private readonly algorithms: string[],
    private readonly clockToleranceSec: number,
    private readonly humanClaim: string,
    private readonly delegation: "claim" | "token_exchange",
    private readonly unattended: boolean,
    private readonly keys: { kind: "remote"; url: string; set: JWTVerifyGetKey } | { kind: "static"; jwks: JWK[] },
  ) {}

  static async create(options: JwtAuthOptions): Promise<JwtVerifier> {
    if (options.issuer.length === 0) throw invalidOption("jwt: issuer must not be empty");
    if (options.audience.length === 0) throw invalidOption("jwt: audience must not be empty");
    const algorithms = [...(options.algorithms ?? agentAuthDefaults.algorithms)];
    if (algorithms.length === 0) throw invalidOption("jwt: algorithms must not be empty");
    for (const alg of algorithms) {
      // Symmetric algorithms would need a shared secret (not a public key), and
      // "none" is no signature: neither authenticates an agent.
      if (algorithmKeys[alg] === undefined) throw invalidOption(`jwt: algorithm ${quote(alg)} is not supported; use one of ${Object.keys(algorithmKeys).join(", ")}`);
    }
    const clockToleranceSec = options.clockToleranceSec ?? agentAuthDefaults.clockToleranceSec;
    if (!Number.isFinite(clockToleranceSec) || clockToleranceSec < 0) throw invalidOption("jwt: clockToleranceSec must be a non-negative number");
    const humanClaim = options.humanClaim ?? agentAuthDefaults.humanClaim;
    if (humanClaim.length === 0) throw invalidOption("jwt: humanClaim must not be empty");

    const delegation = options.delegation ?? "claim";
    if (delegation !== "claim" && delegation !== "token_exchange") throw invalidOption(`jwt: delegation must be claim or token_exchange, got ${quote(String(delegation))}`);
    let keys: ConstructorParameters<typeof JwtVerifier>[7];
    if (options.keys.kind === "jwks_url") {
      let url: URL;
      try {
        url = new URL(options.keys.url);
      } catch (cause) {
        throw invalidOption(`jwt: JWKS url ${quote(options.keys.url)} is not a URL`, cause);
      }
      if (url.protocol !== "https:" && url.protocol !== "http:") throw invalidOption(`jwt: JWKS url must be http(s), got ${quote(url.protocol)}`);
      // Fetched lazily and cached by jose (refetched on an unknown kid, at most every 30 s),
      // so a sidecar starts while the issuer is down and fails closed until it is back.
      keys = { kind: "remote", url: url.href, set: createRemoteJWKSet(url) };
    } else {
      if (options.keys.publicKeys.length === 0) throw invalidOption("jwt: static keys must list at least one public key");
      const jwks = options.keys.publicKeys.map((text, index) => staticJwk(text, index));
      for (const [index, jwk] of jwks.entries()) await assertUsable(jwk, index, algorithms);
      keys = { kind: "static", jwks };
    }
    return new JwtVerifier(options.issuer, options.audience, algorithms, clockToleranceSec, humanClaim, delegation, options.unattended === true, keys);
  }

  /** Verifies a token: its identity and the `exp` / `nbf` of its verified claims (seconds). */
  async verify(token: string): Promise<{ identity: AgentIdentity; exp: number | undefined; nbf: number | undefined }> {
    const payload = await this.verifySignatureAndClaims(token);
    return { identity: this.identityOf(payload), exp: payload.exp, nbf: payload.nbf };
  }

  /** The identity a verified token's claims name. */
  private identityOf(payload: JWTPayload): AgentIdentity {
    const subject = payload.sub;
    if (typeof subject !== "string" || subject.length === 0) throw unauthenticated("invalid_claim", "jwt", "agent token has no subject (sub)");
    if (this.delegation === "token_exchange") return this.delegatedIdentity(payload, subject);
    const agent = subject;
    const human = payload[this.humanClaim];
    if (human !== undefined && typeof human !== "string") {
      throw unauthenticated("invalid_claim", "jwt", `agent token claim ${quote(this.humanClaim)} must be a string`);
    }
    const extra = payload["chain"];
    if (extra !== undefined && !(Array.isArray(extra) && extra.every((p) => typeof p === "string"))) {
      throw unauthenticated("invalid_claim", "jwt", 'agent token claim "chain" must be an array of strings');
    }
    const onBehalfOf = human ?? "";
    const attestation = Object.freeze({ agent: `jwt:${this.issuer}`, human: onBehalfOf === "" ? "" : `claim:${this.issuer}:${this.humanClaim}` });
    // Shared by every call that presents this token (the cache): nobody may change it.
    return Object.freeze({ agent, onBehalfOf, chain: Object.freeze(buildChain(agent, onBehalfOf, ...(extra ?? []))), authenticatedBy: "jwt" as const, attestation });
  }

  /**
   * RFC 8693: `sub` is the human, `act.sub` the agent acting for them, and a nested `act` the
   * actors before it (outermost is the current actor). Without `act` the token is refused,
   * unless `unattended` is set: then it is the agent's own (a pipeline), with no human.
   */
  private delegatedIdentity(payload: JWTPayload, subject: string): AgentIdentity {
    if (payload[this.humanClaim] !== undefined) {
      throw unauthenticated("unattested_human", "jwt", `agent token names a human in ${quote(this.humanClaim)}; with token exchange the human must be the token's subject, attested by the issuer`);
    }
    const actors: string[] = [];
    let act: unknown = payload["act"];
    while (act !== undefined) {
      const actor = act !== null && typeof act === "object" && !Array.isArray(act) ? (act as Record<string, unknown>) : undefined;
      if (actor === undefined || typeof actor.sub !== "string" || actor.sub.length === 0 || actors.length >= 8) {
        throw unauthenticated("invalid_claim", "jwt", 'agent token claim "act" must be an object with a subject (sub), nested at most 8 deep');
      }
      actors.push(actor.sub);
      act = actor.act;
    }
    const [agent, ...earlier] = actors;
    if (agent === undefined && !this.unattended) {
      throw unauthenticated("unattested_agent", "jwt", 'agent token has no "act" claim: with token exchange that is a person\'s own token, not an agent\'s (set unattended: true for an issuer of agents\' own tokens)');
    }
    const attestation = Object.freeze({ agent: agent === undefined ? `jwt:${this.issuer}` : `token_exchange:${this.issuer}`, human: agent === undefined ? "" : `token_exchange:${this.issuer}` });
    if (agent === undefined) return Object.freeze({ agent: subject, onBehalfOf: "", chain: Object.freeze([subject]), authenticatedBy: "jwt" as const, attestation });
    return Object.freeze({ agent, onBehalfOf: subject, chain: Object.freeze(buildChain(agent, subject, ...earlier)), authenticatedBy: "jwt" as const, attestation });
  }

  private async verifySignatureAndClaims(token: string): Promise<JWTPayload> {
    const options = {
      issuer: this.issuer,
      audience: this.audience,
      algorithms: this.algorithms,
      clockTolerance: this.clockToleranceSec,
      // A token without expiry would be a standing credential: refuse it.
      requiredClaims: ["exp", "sub"],
    };
    try {
      if (this.keys.kind === "remote") {
        try {
          return (await jwtVerify(token, this.keys.set, options)).payload;
        } catch (error) {
          // Several JWKS keys fit (no kid): jose hands back an iterator over them to try in turn.
          if (!(error instanceof errors.JWKSMultipleMatchingKeys)) throw error;
          return await this.tryEach(token, error, options);
        }
      }
      return await this.tryEach(token, this.staticCandidates(token), options);
    } catch (error) {
      throw this.failure(error);
    }
  }

  /** Tries each candidate key; a signature mismatch moves on, any other failure (a claim) is final. */
  private async tryEach(token: string, candidates: Iterable<JWK> | AsyncIterable<CryptoKey>, options: Parameters<typeof jwtVerify>[2]): Promise<JWTPayload> {
    let tried = 0;
    for await (const key of candidates) {
      tried++;
      try {
        return (await jwtVerify(token, key, options)).payload;
      } catch (error) {
        if (error instanceof errors.JWSSignatureVerificationFailed) continue;
        throw error;
      }
    }
    throw tried === 0 ? new errors.JWKSNoMatchingKey() : new errors.JWSSignatureVerificationFailed();
  }

  /**
   * The static keys that could have signed this token: right key type for its
   * `alg`, and the same `kid` when both sides name one. (jose's local JWK set
   * would drop a kid-less PEM key whenever the token names a kid.)
   */
  private staticCandidates(token: string): JWK[] {
    if (this.keys.kind !== "static") return [];
    let header: ReturnType<typeof decodeProtectedHeader>;
    try {
      header = decodeProtectedHeader(token);
    } catch (cause) {
      throw new errors.JWSInvalid("protected header does not decode", { cause });
    }
    const alg = header.alg;
    if (typeof alg !== "string") throw new errors.JWSInvalid("alg missing");
    const want = this.algorithms.includes(alg) ? algorithmKeys[alg] : undefined;
    if (want === undefined) throw new errors.JOSEAlgNotAllowed("alg not allowed");
    return this.keys.jwks.filter(
      (jwk) =>
        jwk.kty === want.kty &&
        (want.crv === undefined || jwk.crv === want.crv) &&
        (jwk.alg === undefined || jwk.alg === alg) &&
        (jwk.use === undefined || jwk.use === "sig") &&
        (header.kid === undefined || jwk.kid === undefined || jwk.kid === header.kid),
    );
  }

  /** The AirlockError for a jose failure: `unauthenticated` for the token's fault, `unavailable` when the keys could not be fetched. */
  private failure(error: unknown): AirlockError {
    if (error instanceof AirlockError) return error;
    if (error instanceof errors.JWTExpired) return unauthenticated("token_expired", "jwt", "agent token has expired");
    if (error instanceof errors.JWTClaimValidationFailed) {
      if (error.claim === "nbf") return unauthenticated("token_not_yet_valid", "jwt", "agent token is not valid yet (nbf)");
      if (error.claim === "iss") return unauthenticated("wrong_issuer", "jwt", `agent token issuer is not ${quote(this.issuer)}`);
      if (error.claim === "aud") return unauthenticated("wrong_audience", "jwt", `agent token audience does not include ${quote(this.audience)}`);
      if (error.reason === "missing") return unauthenticated("invalid_claim", "jwt", `agent token lacks the ${quote(error.claim)} claim`);
      return unauthenticated("invalid_claim", "jwt", `agent token claim ${quote(error.claim)} is invalid`);
    }
    if (error instanceof errors.JWSSignatureVerificationFailed) return unauthenticated("bad_signature", "jwt", "agent token signature is invalid");
    if (error instanceof errors.JOSEAlgNotAllowed) {
      return unauthenticated("algorithm_not_allowed", "jwt", `agent token algorithm is not one of ${this.algorithms.join(", ")}`);
    }
    if (error instanceof errors.JWKSNoMatchingKey) return unauthenticated("no_matching_key", "jwt", "no trusted key matches the agent token (kid / algorithm)");
    if (error instanceof errors.JWSInvalid || error instanceof errors.JWTInvalid || error instanceof errors.JOSENotSupported) {
      return unauthenticated("malformed_token", "jwt", "agent token is not a well-formed signed JWT");
    }
    if (this.keys.kind === "remote") {
      // Timeouts, refused connections, non-200 or non-JSON answers: not the agent's fault,
      // but still no identity, so the call fails closed.
      return new AirlockError(Code.Unavailable, `agent token keys could not be fetched from ${this.keys.url}`, {
        cause: error,
        details: { method: "jwt", jwksUrl: this.keys.url },
      });
    }
    // jose throws TypeError for a key that cannot serve the algorithm (e.g. RSA under 2048 bits).
    return unauthenticated("no_matching_key", "jwt", "no trusted key can verify the agent token");
  }
}

/** A static key (PEM or JSON JWK) as a public JWK, or InvalidArgument naming its position. */
function staticJwk(text: string, index: number): JWK {
  const label = `jwt: static key #${index}`;
  const trimmed = text.trim();
  if (trimmed.startsWith("{")) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(trimmed);
    } catch (cause) {
      throw invalidOption(`${label} is neither PEM nor JSON`, cause);
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw invalidOption(`${label} is not a JWK object`);
    const jwk = parsed as JWK;
    if (jwk.d !== undefined || jwk.k !== undefined) throw invalidOption(`${label} is a private or symmetric key; configure the public key`);
    try {
      // Parse it once now so a broken key fails at start-up, not on the first call.
      createPublicKey({ key: jwk as NodeJsonWebKey, format: "jwk" });
    } catch (cause) {
      throw invalidOption(`${label} is not a usable public JWK`, cause);
    }
    return jwk;
  }
  // createPublicKey derives a public key from a private PEM too: refuse it so
  // private key material does not sit in a sidecar's configuration.
  if (/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(trimmed)) throw invalidOption(`${label} is a private key; configure the public key`);
  try {
    return createPublicKey({ key: trimmed, format: "pem" }).export({ format: "jwk" });
  } catch (cause) {
    throw invalidOption(`${label} is not a parsable PEM public key or certificate`, cause);
  }
}

/**
 * Fails start-up when a static key can verify none of the allowed algorithms
 * (an RSA key while only EdDSA is allowed): such a key would silently never match.
 */
async function assertUsable(jwk: JWK, index: number, algorithms: readonly string[]): Promise<void> {
  for (const alg of algorithms) {
    const want = algorithmKeys[alg];
    if (want === undefined || jwk.kty !== want.kty || (want.crv !== undefined && jwk.crv !== want.crv)) continue;
    if (jwk.alg !== undefined && jwk.alg !== alg) continue;
    try {
      await importJWK(jwk, alg);
      return;
    } catch {
      // Try the next algorithm.
    }
  }
  throw invalidOption(`jwt: static key #${index} (${jwk.kty ?? "?"}${jwk.crv === undefined ? "" : ` ${jwk.crv}`}) fits none of the allowed algorithms ${algorithms.join(", ")}`);
}

/** What {@link AgentAuthenticator.identify} decided for one call. */
export interface Authentication {
  /** Who is calling; `undefined` when the call presents no credential at all. */
  readonly identity: AgentIdentity | undefined;
  /**
   * The metadata key the call's agent token came in, whichever method won.
   * The token is for the sidecar alone: the caller strips this header before
   * anything is forwarded. `undefined` when the call presents no token.
   */
  readonly consumedHeader: AgentTokenHeader | undefined;
}

const noCredential: Authentication = Object.freeze({ identity: undefined, consumedHeader: undefined });

/**
 * Authenticates the agents calling a sidecar with the configured methods. It
 * is the sidecar's one identity boundary: the proxy asks it on every path
 * (the allow fast path included), and it keeps the one cache of verified
 * tokens. Build it with {@link AgentAuthenticator.create} (or
 * {@link AgentAuthenticator.none} when no method is configured).
 */
export class AgentAuthenticator {
  /**
   * Tokens verified before, by SHA-256: the identity each gave and until when (ms) it may be
   * reused, with the answer for each header the token may come in, so a repeated call allocates nothing.
   */
  private readonly verified = new Map<
    string,
    { readonly identity: AgentIdentity; readonly untilMs: number; readonly viaAuthorization: Authentication; readonly viaAgentTokenHeader: Authentication }
  >();

  private constructor(
    private readonly mtls: { onBehalfOfPrefix: string } | undefined,
    private readonly jwt: readonly JwtVerifier[],
  ) {}

  /**
   * An authenticator accepting the given methods: at most one `mtls`, any
   * number of `jwt` (one per trusted issuer). Static keys are parsed now; a
   * JWKS is fetched on first use.
   * @throws AirlockError `invalid_argument` for an empty list, a second mtls
   * method, two jwt methods for one issuer, or an unusable key or option.
   */
  static async create(methods: readonly AgentAuthOptions[]): Promise<AgentAuthenticator> {
    if (methods.length === 0) throw invalidOption("no agent authentication method configured");
    let mtls: { onBehalfOfPrefix: string } | undefined;
    const jwt: JwtVerifier[] = [];
    for (const method of methods) {
      if (method.kind === "mtls") {
        if (mtls !== undefined) throw invalidOption("mtls is configured twice");
        const onBehalfOfPrefix = method.onBehalfOfPrefix ?? agentAuthDefaults.onBehalfOfPrefix;
        if (onBehalfOfPrefix.length === 0) throw invalidOption("mtls: onBehalfOfPrefix must not be empty");
        mtls = { onBehalfOfPrefix };
      } else {
        const verifier = await JwtVerifier.create(method);
        if (jwt.some((v) => v.issuer === verifier.issuer)) throw invalidOption(`jwt: issuer ${quote(verifier.issuer)} is configured twice`);
        jwt.push(verifier);
      }
    }
    return new AgentAuthenticator(mtls, jwt);
  }

  /**
   * An authenticator with no method: every call is anonymous, and a call that
   * presents a token is refused (`tokens_not_accepted`), since nothing here can verify it.
   */
  static none(): AgentAuthenticator {
    return new AgentAuthenticator(undefined, []);
  }

  /**
   * Who is calling. A verified client certificate with a URI SAN wins (when
   * mtls is configured); otherwise the agent token is verified (signature,
   * issuer, audience, `exp` required, `nbf`, allowed algorithms).
   *
   * A certificate without a URI SAN identifies nobody: the token decides then,
   * and without a token it is an error.
   * @returns `undefined` when the call presents no credential at all.
   * @throws AirlockError `unauthenticated` with `details: { reason, method }`
   * (reason one of {@link AuthFailureReason}) when a presented credential is
   * invalid; `unavailable` when a JWKS cannot be fetched. Messages never
   * contain the token.
   */
  async authenticate(input: AuthenticationInput): Promise<AgentIdentity | undefined> {
    return (await this.decide(input.headers, input.peerCertificate, input.peerAuthorized, false)).identity;
  }

  /**
   * The proxy's entry point: {@link AgentAuthenticator.authenticate} for one
   * call on a connection, plus the header the token came in. Answers
   * synchronously (a plain object) when no I/O or signature check is needed (no
   * credential, a client certificate, a token verified before), else with a
   * promise; the allow fast path stays synchronous for agents that resend
   * their token. The TLS peer is read only when mtls is configured. Header
   * names must be lowercase, as HTTP/2 requires and the sidecar's stack ensures.
   * @throws AirlockError as {@link AgentAuthenticator.authenticate} (thrown
   * synchronously or as a rejection).
   */
  identify(headers: AuthenticationInput["headers"], socket: TLSSocket | undefined): Authentication | Promise<Authentication> {
    if (this.mtls === undefined || socket === undefined) return this.decide(headers, undefined, undefined, true);
    return this.decide(headers, socket.getPeerCertificate(), socket.authorized, true);
  }

  private decide(headers: AuthenticationInput["headers"], cert: PeerCertificate | undefined, peerAuthorized: boolean | undefined, lowercaseNames: boolean): Authentication | Promise<Authentication> {
    let certificateProblem: AirlockError | undefined;
    // getPeerCertificate() answers {} when the client sent no certificate.
    if (this.mtls !== undefined && cert !== undefined && Object.keys(cert).length > 0) {
      if (peerAuthorized === false) {
        certificateProblem = unauthenticated("certificate_not_verified", "mtls", "client certificate is not signed by a trusted CA");
      } else {
        const uris = parseSubjectAltName(cert.subjectaltname ?? "")
          .filter((e) => e.type === "URI" && e.value.length > 0)
          .map((e) => e.value);
        const prefix = this.mtls.onBehalfOfPrefix;
        const agent = uris.find((u) => !u.startsWith(prefix));
        if (agent !== undefined) {
          const human = uris.find((u) => u.startsWith(prefix));
          const onBehalfOf = human === undefined ? "" : decodePercent(human.slice(prefix.length));
          // A token sent alongside is still the agent's: it is consumed (not forwarded), though the certificate decided.
          const attestation = { agent: "mtls", human: onBehalfOf === "" ? "" : "mtls_san" };
          return { identity: { agent, onBehalfOf, chain: buildChain(agent, onBehalfOf), authenticatedBy: "mtls", attestation }, consumedHeader: tokenHeaderOf(headers) };
        }
        certificateProblem = unauthenticated("certificate_without_uri_san", "mtls", "client certificate has no URI SAN naming the agent");
      }
    }

    const presented = lowercaseNames ? presentedTokenLowercase(headers) : presentedToken(headers);
    if (presented === undefined) {
      if (certificateProblem !== undefined) throw certificateProblem;
      return noCredential;
    }
    // An unverified certificate is an attack or a misconfiguration: refuse even with a token.
    if (certificateProblem?.details["reason"] === "certificate_not_verified") throw certificateProblem;
    if (this.jwt.length === 0) throw unauthenticated("tokens_not_accepted", "jwt", "this sidecar does not accept agent tokens; use a client certificate");

    const key = tokenDigest(presented.token);
    const cached = this.verified.get(key);
    if (cached !== undefined) {
      if (Date.now() < cached.untilMs) return presented.header === "authorization" ? cached.viaAuthorization : cached.viaAgentTokenHeader;
      this.verified.delete(key);
    }
    return this.verifyToken(presented, key);
  }

  private async verifyToken(presented: PresentedToken, key: string): Promise<Authentication> {
    let issuer: unknown;
    try {
      issuer = decodeJwt(presented.token).iss;
    } catch {
      throw unauthenticated("malformed_token", "jwt", "agent token is not a well-formed JWT");
    }
    // Pick the verifier by the (still unverified) issuer; the verifier then checks
    // the issuer again together with the signature.
    const verifier = this.jwt.find((v) => v.issuer === issuer);
    if (verifier === undefined) {
      throw unauthenticated("wrong_issuer", "jwt", typeof issuer === "string" ? `agent token issuer ${quote(issuer)} is not trusted` : "agent token has no issuer");
    }
    const { identity, exp, nbf } = await verifier.verify(presented.token);
    const now = Date.now();
    const untilMs = Math.min((exp ?? 0) * 1000, now + verifiedTokenCacheDefaults.maxAgeMs);
    if (untilMs > now && (nbf === undefined || nbf * 1000 <= now)) {
      // Oldest first out: a Map iterates in insertion order.
      if (this.verified.size >= verifiedTokenCacheDefaults.maxEntries) this.verified.delete(this.verified.keys().next().value ?? "");
      this.verified.set(key, {
        identity,
        untilMs,
        viaAuthorization: Object.freeze({ identity, consumedHeader: "authorization" }),
        viaAgentTokenHeader: Object.freeze({ identity, consumedHeader: agentTokenHeader }),
      });
    }
    return { identity, consumedHeader: presented.header };
  }
}

/**
 * The verified-token cache's key for a token: its SHA-256, so the cache holds no bearer token.
 * The one-shot `crypto.hash` (Node 20.12 on) costs half of a Hash object on this path, taken on every call.
 */
const tokenDigest: (token: string) => string =
  typeof (crypto as { hash?: unknown }).hash === "function" ? (token) => crypto.hash("sha256", token, "base64") : (token) => createHash("sha256").update(token).digest("base64");

/** The header an agent token is in, without validating it: `authorization` when it carries a bearer token, else `x-airlock-agent-token` when present. */
function tokenHeaderOf(headers: AuthenticationInput["headers"]): AgentTokenHeader | undefined {
  if (headerValues(headers, "authorization").some((v) => bearerToken(v) !== undefined)) return "authorization";
  return headerValues(headers, agentTokenHeader).length > 0 ? agentTokenHeader : undefined;
}

/** Percent-decodes a URI component, keeping the raw text when it is not valid percent-encoding. */
function decodePercent(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}
