/**
 * jose's verification failures as Airlock errors, classified by jose's error
 * classes and codes (never by message text): `unauthenticated` with a stable
 * `details.reason` when the token is at fault, `unavailable` when the issuer's
 * keys could not be fetched. One owner for the reviewers' tokens, the SSO ID
 * tokens and the Bot Framework's tokens.
 * @module
 */
import { errors } from "jose";
import { AirlockError, Code } from "./errors.js";

/** The words a failure is told in: whose token, whose keys. */
export interface JoseFailureWords {
  /** `the reviewer token`, `the ID token`… */
  readonly token: string;
  /** `the identity provider's keys`… */
  readonly keys: string;
  /** `details.reason` when the keys cannot be fetched. @default "jwks_unavailable" */
  readonly keysReason?: string;
}

/**
 * The AirlockError for a jose failure. No cause is kept on the token's faults:
 * jose's claim errors carry the token's payload, and causes reach logs.
 */
export function joseFailure(error: unknown, words: JoseFailureWords): AirlockError {
  if (error instanceof AirlockError) return error;
  const refused = (reason: string, message: string) => new AirlockError(Code.Unauthenticated, message, { details: { reason } });
  const { token } = words;
  if (error instanceof errors.JWTExpired) return refused("token_expired", `${token} has expired`);
  if (error instanceof errors.JWTClaimValidationFailed) {
    if (error.claim === "iss") return refused("wrong_issuer", `${token} is from another issuer`);
    if (error.claim === "aud") return refused("wrong_audience", `${token} is for another audience`);
    if (error.claim === "nbf") return refused("token_not_yet_valid", `${token} is not valid yet`);
    return refused("invalid_claim", `${token}'s ${error.claim} claim is invalid`);
  }
  if (error instanceof errors.JWSSignatureVerificationFailed) return refused("bad_signature", `${token}'s signature does not verify`);
  if (error instanceof errors.JWKSNoMatchingKey) return refused("no_matching_key", `no key matches ${token}`);
  if (error instanceof errors.JOSEAlgNotAllowed) return refused("algorithm_not_allowed", `${token}'s algorithm is not accepted`);
  // The key set could not be had: a timeout, an answer jose refuses (JWKSInvalid, or the generic
  // error of a non-200 answer), or fetch failing (a TypeError). Unavailability, not a bad token.
  const keysDown = error instanceof errors.JWKSTimeout || error instanceof errors.JWKSInvalid || (error instanceof errors.JOSEError && error.code === errors.JOSEError.code) || error instanceof TypeError;
  if (keysDown) return new AirlockError(Code.Unavailable, `${words.keys} cannot be fetched`, { details: { reason: words.keysReason ?? "jwks_unavailable" } });
  return refused("malformed_token", `${token} is malformed`);
}
