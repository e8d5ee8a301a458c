// Step-up in the browser: a passkey assertion over the broker's challenge for one vote,
// and passkey registration. The broker derives each challenge from the request's hash and
// the verdict, so the assertion made here confirms only this vote on this exact action.
import type { JsonObject } from "@bufbuild/protobuf";
import { startAuthentication, startRegistration } from "@simplewebauthn/browser";
import type { PublicKeyCredentialCreationOptionsJSON, PublicKeyCredentialRequestOptionsJSON } from "@simplewebauthn/browser";
import { ApiError, type Passkey, passkeyOptions, registerPasskey, stepUpChallenge } from "./api.js";

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
 * decision then carries. A reviewer without a passkey is told to register one.
 */
export async function stepUpProof(id: string, approve: boolean): Promise<JsonObject> {
  const challenge = await stepUpChallenge(id, approve);
  if (challenge.passkey === undefined) {
    throw new ApiError(403, "step_up_required", "approving this request needs a passkey; register one under Passkeys (a fresh sign-in at your identity provider is not offered by this console yet)");
  }
  if (!passkeysSupported()) throw new ApiError(0, "step_up_failed", "this browser cannot use passkeys here (WebAuthn needs https or localhost)");
  try {
    const response = await startAuthentication({ optionsJSON: challenge.passkey as unknown as PublicKeyCredentialRequestOptionsJSON });
    return { challengeId: challenge.challengeId, passkey: asJson(response) };
  } catch (error) {
    throw ceremonyError(error);
  }
}

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
