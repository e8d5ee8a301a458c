import { createHash } from "node:crypto";
import { principalKey } from "../rules.js";

/** The domain-separation prefix of every step-up challenge: a challenge means nothing anywhere else. */
export const stepUpDomain = "airlock.step-up.v1";

/** What a step-up challenge is derived from. */
export interface ChallengeInput {
  readonly requestId: string;
  /** The request's `request_sha256` as the broker stored it: the exact action. */
  readonly requestSha256: Uint8Array;
  /** The reviewer it is issued to (compared trimmed and case-insensitively). */
  readonly reviewer: string;
  /** The verdict it confirms. */
  readonly approve: boolean;
  /** When the broker issued it, in ms since the epoch. */
  readonly issuedAtMs: number;
  /** The broker's random nonce (base64url), also the challenge's id. */
  readonly nonce: string;
}

/**
 * The challenge (base64url of a SHA-256) a passkey signs, or a fresh sign-in carries as its
 * `nonce`, to confirm one verdict on one exact action: SHA-256 over the domain prefix, the
 * request id, the request's hash, the reviewer, the verdict, the broker's issue time and
 * nonce, one per line. An assertion made for another request, another verdict or another
 * reviewer signs another challenge.
 */
export function stepUpChallenge(input: ChallengeInput): string {
  const lines = [
    stepUpDomain,
    input.requestId,
    Buffer.from(input.requestSha256).toString("hex"),
    principalKey(input.reviewer),
    input.approve ? "approve" : "deny",
    String(input.issuedAtMs),
    input.nonce,
  ];
  return createHash("sha256").update(lines.join("\n")).digest("base64url");
}
