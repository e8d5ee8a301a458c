// Step-up in the browser: a passkey assertion over the broker's challenge for one vote,
// and passkey registration. The broker derives each challenge from the request's hash and
// the verdict, so the assertion made here confirms only this vote on this exact action.
import type { JsonObject } from "@bufbuild/protobuf";
import { startAuthentication, startRegistration } from "@simplewebauthn/browser";
import type { PublicKeyCredentialCreationOptionsJSON, PublicKeyCredentialRequestOptionsJSON } from "@simplewebauthn/browser";
import { ApiError, type Passkey, passkeyOptions, registerPasskey, startFreshSignIn, stepUpChallenge } from "./api.js";

/** Whether this browser can use passkeys at all (WebAuthn needs a secure context). */
export function passkeysSupported(): boolean {
  return window.isSecureContext && typeof window.PublicKeyCredential === "function";
}

function asJson(value: unknown): JsonObject {
  return JSON.parse(JSON.stringify(value)) as JsonObject;
}

function ceremonyError(error: unknown): ApiError {
  if (error instanceof ApiError) return error;
  const name = error instanceof Error ? error.name : "";
  if (name === "NotAllowedError" || name === "AbortError") return new ApiError(0, "step_up_cancelled", "the passkey prompt was cancelled or timed out; nothing was sent");
  return new ApiError(0, "step_up_failed", `the passkey could not be used: ${error instanceof Error ? error.message : String(error)}`);
}

/**
 * Gets a challenge for this vote and answers it with a passkey: the `stepUp` object the
 * decision then carries. A reviewer without a passkey, where the broker offers a fresh
 * sign-in (`oidc`), is sent to the identity provider instead (`prompt=login`, the challenge
 * as nonce): the broker casts the vote when the provider sends the browser back to this
 * request, so this promise never settles then (`onRedirect` runs first). Otherwise the
 * reviewer is told to register a passkey.
 */
export async function stepUpProof(id: string, approve: boolean, vote: { reason: string; breakGlass: boolean }, onRedirect: () => void): Promise<JsonObject> {
  const challenge = await stepUpChallenge(id, approve);
  if (challenge.passkey === undefined || !passkeysSupported()) {
    if (challenge.methods.includes("oidc")) {
      const url = await startFreshSignIn(challenge.challengeId, vote);
      onRedirect();
      location.assign(url);
      return new Promise<never>(() => undefined);
    }
    if (challenge.passkey === undefined) throw new ApiError(403, "step_up_required", "approving this request needs a passkey; register one under Passkeys");
    throw new ApiError(0, "step_up_failed", "this browser cannot use passkeys here (WebAuthn needs https or localhost)");
  }
  try {
    const response = await startAuthentication({ optionsJSON: challenge.passkey as unknown as PublicKeyCredentialRequestOptionsJSON });
    return { challengeId: challenge.challengeId, passkey: asJson(response) };
  } catch (error) {
    throw ceremonyError(error);
  }
}

/** What the broker said about a step-up by a fresh sign-in, read (and removed) from the address it sent the browser back to. */
export function takeStepUpOutcome(): { readonly done: true } | { readonly done: false; readonly reason: string } | undefined {
  const params = new URLSearchParams(location.search);
  const done = params.get("step_up");
  const reason = params.get("step_up_error");
  if (done === null && reason === null) return undefined;
  params.delete("step_up");
  params.delete("step_up_error");
  const search = params.toString();
  history.replaceState(history.state, "", `${location.pathname}${search === "" ? "" : `?${search}`}${location.hash}`);
  return reason === null ? { done: true } : { done: false, reason };
}

/** A refused fresh sign-in, in words. */
export const freshSignInRefusals: Readonly<Record<string, string>> = {
  step_up_stale_authentication: "The identity provider did not ask for your password again (an earlier sign-in was reused), so the approval was not confirmed.",
  step_up_mismatch: "That sign-in was for another request, verdict or person, so it confirms nothing here.",
  step_up_replayed: "That confirmation was already used.",
  step_up_expired: "The confirmation took too long. Approve again.",
  step_up_acr_mismatch: "The identity provider did not use the sign-in method this rule asks for.",
  nonce_mismatch: "That sign-in was not made for this approval.",
};

/** Registers a new passkey for the signed-in reviewer under `name` (confirmed with an existing one, if any). */
export async function addPasskey(name: string): Promise<Passkey> {
  const { challengeId, options, passkey } = await passkeyOptions();
  let response: unknown;
  let assertion: unknown;
  try {
    // With a passkey already registered, that one confirms the new one first.
    if (passkey !== undefined) assertion = await startAuthentication({ optionsJSON: passkey as unknown as PublicKeyCredentialRequestOptionsJSON });
    response = await startRegistration({ optionsJSON: options as unknown as PublicKeyCredentialCreationOptionsJSON });
  } catch (error) {
    throw ceremonyError(error);
  }
  return registerPasskey(challengeId, asJson(response), name, assertion === undefined ? undefined : asJson(assertion));
}
