import { createHash, randomBytes } from "node:crypto";
import { jetstreamManager } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import {
  type AuthenticationResponseJSON,
  generateAuthenticationOptions,
  generateRegistrationOptions,
  type PublicKeyCredentialCreationOptionsJSON,
  type PublicKeyCredentialRequestOptionsJSON,
  type RegistrationResponseJSON,
  verifyAuthenticationResponse,
  verifyRegistrationResponse,
} from "@simplewebauthn/server";
import type { JWTPayload } from "jose";
import { AirlockError, Code } from "../../common/errors.js";
import { bucketStream, type EnsureOptions, ensureDefaults, ensureStream, passkeyBucket, stepUpBucket } from "../../common/subjects.js";
import type { RequestRecord } from "../../proto/index.js";
import type { Reviewer, ReviewerAuthenticator } from "../reviewers/auth.js";
import { principalKey, type StepUpReceipt } from "../rules.js";
import { stepUpChallenge } from "./challenge.js";
import { type StepUpConfig, stepUpDefaults } from "./config.js";

/** A registered passkey as the API shows it (never the public key's bytes). */
export interface PasskeyView {
  /** The credential id, base64url. */
  readonly id: string;
  /** The reviewer's name for it ("laptop", "phone"). */
  readonly name: string;
  readonly createdAt: string;
  /** When it last confirmed a vote; absent: never. */
  readonly lastUsedAt?: string;
}

interface StoredPasskey {
  readonly id: string;
  readonly reviewer: string;
  readonly name: string;
  /** COSE public key, base64url. */
  readonly publicKey: string;
  readonly counter: number;
  readonly transports: readonly string[];
  readonly createdAt: string;
  readonly lastUsedAt?: string;
}

interface StoredChallenge {
  readonly purpose: "vote" | "register";
  readonly reviewer: string;
  readonly challenge: string;
  readonly issuedAtMs: number;
  readonly used: boolean;
  /** For registrations by a reviewer who has passkeys: the challenge an existing one must sign. */
  readonly enrolChallenge?: string;
  /** For votes: the request and the verdict the challenge confirms. */
  readonly requestId?: string;
  readonly approve?: boolean;
}

/** What the console needs to step up for one vote. */
export interface StepUpChallengeView {
  /** The challenge's id: send it back with the proof. */
  readonly challengeId: string;
  /** The challenge itself (base64url): a passkey signs it; a fresh sign-in carries it as `nonce`. */
  readonly challenge: string;
  readonly expiresAt: string;
  /** The ways this reviewer can answer it, best first: `passkey` when one is registered, `oidc` when reviewers sign in with OIDC. */
  readonly methods: readonly ("passkey" | "oidc")[];
  /** The WebAuthn request options when `passkey` is offered. */
  readonly passkey?: PublicKeyCredentialRequestOptionsJSON;
  /** The re-authentication to ask the identity provider for when `oidc` is offered. */
  readonly oidc?: { readonly nonce: string; readonly maxAge: 0; readonly acr?: string };
}

/** The reasons (`details.reason`) a step-up proof is refused with; every one is `permission_denied`. */
export type StepUpRefusal =
  | "step_up_malformed"
  | "step_up_unknown_challenge"
  | "step_up_replayed"
  | "step_up_mismatch"
  | "step_up_expired"
  | "step_up_unknown_passkey"
  | "step_up_invalid"
  | "step_up_acr_mismatch"
  | "step_up_stale_authentication";

function refused(reason: StepUpRefusal | "no_step_up_method", message: string): AirlockError {
  return new AirlockError(Code.PermissionDenied, message, { details: { reason } });
}

function invalid(field: string, message: string): AirlockError {
  return new AirlockError(Code.InvalidArgument, message, { details: { field } });
}

/** The key prefix of one reviewer's passkeys: a hash, since ids (emails) are not KV key material. */
function reviewerKey(reviewer: string): string {
  return createHash("sha256").update(principalKey(reviewer)).digest("hex").slice(0, 32);
}

const nonceText = /^[A-Za-z0-9_-]{16,64}$/;
const credentialIdText = /^[A-Za-z0-9_-]{16,1400}$/;

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * Judges an OIDC re-authentication offered as step-up: the ID token's claims (already
 * verified for issuer, audience, signature and expiry by the reviewer authenticator)
 * must carry the challenge as `nonce`, an `auth_time` no earlier than the challenge was
 * issued (less clock tolerance) and no older than `maxAuthAgeMs` now, and the rule's
 * `acr` when it names one. Pure: the refusal's reason, or undefined when it holds.
 */
export function judgeReauthentication(
  claims: JWTPayload,
  expected: { readonly challenge: string; readonly issuedAtMs: number; readonly nowMs: number; readonly maxAuthAgeMs: number; readonly acr: string; readonly clockToleranceSec?: number },
): StepUpRefusal | undefined {
  const tolerance = (expected.clockToleranceSec ?? stepUpDefaults.clockToleranceSec) * 1000;
  if (claims.nonce !== expected.challenge) return "step_up_mismatch";
  const authTime = claims.auth_time;
  if (typeof authTime !== "number" || !Number.isFinite(authTime)) return "step_up_stale_authentication";
  const authMs = authTime * 1000;
  if (authMs < expected.issuedAtMs - tolerance || authMs > expected.nowMs + tolerance || expected.nowMs - authMs > expected.maxAuthAgeMs) return "step_up_stale_authentication";
  if (expected.acr !== "" && claims.acr !== expected.acr) return "step_up_acr_mismatch";
  return undefined;
}

/**
 * The single-use bucket's settings (`AIRLOCK_STEPUP`: step-up challenges and Slack's deny-reason
 * tickets): one revision per key, entries expiring, `replicas` copies ({@link ensureStream}).
 */
export async function ensureSingleUseBucket(nc: NatsConnection, ensure: EnsureOptions = {}): Promise<void> {
  const replicas = ensure.replicas ?? ensureDefaults.replicas;
  await ensureStream(await jetstreamManager(nc), { name: bucketStream(stepUpBucket), max_msgs_per_subject: 1, max_age: stepUpDefaults.maxChallengeTtlMs * 1_000_000 }, { ...ensure, create: () => new Kvm(nc).create(stepUpBucket, { history: 1, ttl: stepUpDefaults.maxChallengeTtlMs, replicas }) });
}

/** The passkey bucket's settings: one revision per key, `replicas` copies ({@link ensureStream}). */
export async function ensurePasskeyBucket(nc: NatsConnection, ensure: EnsureOptions = {}): Promise<void> {
  const replicas = ensure.replicas ?? ensureDefaults.replicas;
  await ensureStream(await jetstreamManager(nc), { name: bucketStream(passkeyBucket), max_msgs_per_subject: 1 }, { ...ensure, create: () => new Kvm(nc).create(passkeyBucket, { history: 1, replicas }) });
}

/**
 * Step-up for approvals, bound to the action: single-use challenges derived from a
 * request's hash and the verdict, passkey registration, and verification of the proof
 * (a WebAuthn assertion, or an OIDC re-authentication) into a {@link StepUpReceipt}.
 * Passkeys and challenges live in the broker's own JetStream KV buckets, so every
 * replica sees them and a challenge is spent once across replicas (compare-and-set).
 */
export class StepUpService {
  private constructor(
    readonly config: StepUpConfig,
    private readonly passkeys: KV,
    private readonly challenges: KV,
    private readonly auth: ReviewerAuthenticator | undefined,
  ) {}

  /** Opens the broker's passkey and challenge buckets, creating them or bringing their replicas up to date first ({@link ensureStream}). */
  static async open(nc: NatsConnection, config: StepUpConfig, auth?: ReviewerAuthenticator, ensure: EnsureOptions = {}): Promise<StepUpService> {
    const kvm = new Kvm(nc);
    await ensurePasskeyBucket(nc, ensure);
    await ensureSingleUseBucket(nc, ensure);
    try {
      const passkeys = await kvm.open(passkeyBucket);
      const challenges = await kvm.open(stepUpBucket);
      return new StepUpService(config, passkeys, challenges, auth);
    } catch (error) {
      throw new AirlockError(Code.Unavailable, "cannot open the step-up buckets in NATS", { cause: error });
    }
  }

  private async storedPasskeys(reviewer: string): Promise<StoredPasskey[]> {
    const found: StoredPasskey[] = [];
    for await (const key of await this.passkeys.keys(`${reviewerKey(reviewer)}.>`)) {
      const entry = await this.passkeys.get(key);
      if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) continue;
      found.push(entry.json<StoredPasskey>());
    }
    return found.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  /** The reviewer's registered passkeys. */
  async list(reviewer: Reviewer): Promise<PasskeyView[]> {
    return (await this.storedPasskeys(reviewer.id)).map(viewOf);
  }

  /** Removes one of the reviewer's passkeys; `not_found` when they have no such passkey. */
  async remove(reviewer: Reviewer, id: string): Promise<void> {
    if (!credentialIdText.test(id)) throw new AirlockError(Code.NotFound, "no such passkey", { details: { passkey: id.slice(0, 64) } });
    const key = `${reviewerKey(reviewer.id)}.${id}`;
    const entry = await this.passkeys.get(key);
    if (entry === null || entry.operation !== "PUT") throw new AirlockError(Code.NotFound, "no such passkey", { details: { passkey: id } });
    await this.passkeys.purge(key);
  }

  private async issue(key: string, value: StoredChallenge): Promise<void> {
    await this.challenges.create(key, JSON.stringify(value));
  }

  /**
   * Starts a passkey registration: WebAuthn creation options whose challenge the broker keeps
   * for one use. A reviewer who has a passkey already must confirm the new one with it
   * (`passkey`: assertion options over a second challenge), so a stolen session cannot
   * enrol its own authenticator next to theirs.
   */
  async registrationOptions(reviewer: Reviewer): Promise<{ challengeId: string; options: PublicKeyCredentialCreationOptionsJSON; passkey?: PublicKeyCredentialRequestOptionsJSON }> {
    const existing = await this.storedPasskeys(reviewer.id);
    // The first passkey can only come from a fresh sign-in: a stolen or old session enrols nothing.
    if (existing.length === 0) this.requireFreshSignIn(reviewer);
    const options = await generateRegistrationOptions({
      rpName: this.config.rpName,
      rpID: this.config.rpId,
      userName: reviewer.id,
      userID: createHash("sha256").update(`airlock.reviewer\n${principalKey(reviewer.id)}`).digest().subarray(0, 32),
      attestationType: "none",
      excludeCredentials: existing.map((passkey) => ({ id: passkey.id })),
      authenticatorSelection: { residentKey: "preferred", userVerification: "required" },
      timeout: this.config.challengeTtlMs,
    });
    const challengeId = randomBytes(18).toString("base64url");
    const issuedAtMs = Date.now();
    const enrolChallenge = createHash("sha256").update(["airlock.passkey-enrol.v1", principalKey(reviewer.id), String(issuedAtMs), challengeId].join("\n")).digest("base64url");
    await this.issue(`r.${challengeId}`, { purpose: "register", reviewer: reviewer.id, challenge: options.challenge, issuedAtMs, used: false, ...(existing.length > 0 ? { enrolChallenge } : {}) });
    if (existing.length === 0) return { challengeId, options };
    const passkey = await generateAuthenticationOptions({
      rpID: this.config.rpId,
      challenge: Buffer.from(enrolChallenge, "base64url"),
      allowCredentials: existing.map((stored) => ({ id: stored.id })),
      userVerification: "required",
      timeout: this.config.challengeTtlMs,
    });
    return { challengeId, options, passkey };
  }

  /** Finishes a registration: verifies the authenticator's answer and stores the passkey for this reviewer. */
  async register(reviewer: Reviewer, body: unknown): Promise<PasskeyView> {
    if (!isObject(body)) throw invalid("body", "the body must be a JSON object");
    const { challengeId, response, name } = body;
    if (typeof challengeId !== "string" || !nonceText.test(challengeId)) throw invalid("challengeId", "challengeId is required");
    if (!isObject(response) || typeof response.id !== "string" || !credentialIdText.test(response.id)) throw invalid("response", "response must be the authenticator's registration response");
    const label = name === undefined || name === null ? "passkey" : typeof name === "string" && name.trim() !== "" && name.length <= 64 ? name.trim() : undefined;
    if (label === undefined) throw invalid("name", "name must be a string of 1 to 64 characters");
    const { entry, stored } = await this.openChallenge(`r.${challengeId}`, reviewer, "register");
    // Passkeys registered since the options were issued count too: the check is made now.
    const existing = await this.storedPasskeys(reviewer.id);
    let confirmedWith: Awaited<ReturnType<StepUpService["verifyPasskey"]>> | undefined;
    if (existing.length === 0) {
      this.requireFreshSignIn(reviewer);
    } else if (stored.enrolChallenge !== undefined && isObject(body.assertion)) {
      confirmedWith = await this.verifyPasskey(reviewer, body.assertion, stored.enrolChallenge);
    } else if (!this.freshSignIn(reviewer)) {
      throw new AirlockError(Code.PermissionDenied, "adding a passkey needs a step-up: confirm with a passkey you have, or sign in again", {
        details: { reason: "step_up_required", causes: ["new_passkey"], enrolMaxAgeSec: this.config.enrolMaxAgeMs / 1000 },
      });
    }
    let verified;
    try {
      verified = await verifyRegistrationResponse({
        response: response as unknown as RegistrationResponseJSON,
        expectedChallenge: stored.challenge,
        expectedOrigin: this.originsFor(response),
        expectedRPID: this.config.rpId,
        requireUserVerification: true,
      });
    } catch (error) {
      throw refused("step_up_invalid", `the registration does not verify: ${error instanceof Error ? error.message : String(error)}`);
    }
    if (!verified.verified) throw refused("step_up_invalid", "the registration does not verify");
    await this.spend(`r.${challengeId}`, stored, entry);
    if (confirmedWith !== undefined) await this.touch(confirmedWith.passkey, confirmedWith.counter);
    const credential = verified.registrationInfo.credential;
    const passkey: StoredPasskey = {
      id: credential.id,
      reviewer: reviewer.id,
      name: label,
      publicKey: Buffer.from(credential.publicKey).toString("base64url"),
      counter: credential.counter,
      transports: credential.transports ?? [],
      createdAt: new Date().toISOString(),
    };
    try {
      await this.passkeys.create(`${reviewerKey(reviewer.id)}.${credential.id}`, JSON.stringify(passkey));
    } catch {
      throw new AirlockError(Code.AlreadyExists, "this passkey is already registered", { details: { passkey: credential.id } });
    }
    return viewOf(passkey);
  }

  /** Whether the reviewer entered their credentials at the provider within `enrol_max_age` (unknown: no). */
  private freshSignIn(reviewer: Reviewer): boolean {
    const at = reviewer.authenticatedAt?.getTime();
    return at !== undefined && Date.now() - at <= this.config.enrolMaxAgeMs;
  }

  /**
   * For the first passkey: `permission_denied` (`fresh_sign_in_required`) unless {@link freshSignIn}.
   * Dev tokens have no provider to sign in at again, so their first passkey is let through (dev mode is never production).
   */
  private requireFreshSignIn(reviewer: Reviewer): void {
    if (this.freshSignIn(reviewer) || this.auth?.devMode === true) return;
    throw new AirlockError(Code.PermissionDenied, "registering a passkey needs a recent sign-in: sign in again at your identity provider, then add it", {
      details: { reason: "fresh_sign_in_required", enrolMaxAgeSec: this.config.enrolMaxAgeMs / 1000 },
    });
  }

  /**
   * Issues a single-use challenge for `reviewer` to confirm `approve` on `record`'s exact
   * action. `permission_denied` (`no_step_up_method`) when the reviewer has no passkey and
   * there is no identity provider to re-authenticate at.
   */
  async challenge(reviewer: Reviewer, record: RequestRecord, approve: boolean): Promise<StepUpChallengeView> {
    const request = record.request;
    if (request === undefined) throw new AirlockError(Code.DataLoss, "the record has no request");
    const passkeys = await this.storedPasskeys(reviewer.id);
    const oidc = this.auth !== undefined && !this.auth.devMode;
    if (passkeys.length === 0 && !oidc) throw refused("no_step_up_method", "approving this request needs a passkey: register one under Settings › Passkeys");
    const nonce = randomBytes(18).toString("base64url");
    const issuedAtMs = Date.now();
    const challenge = stepUpChallenge({ requestId: request.id, requestSha256: request.requestSha256, reviewer: reviewer.id, approve, issuedAtMs, nonce });
    await this.issue(`c.${nonce}`, { purpose: "vote", reviewer: reviewer.id, challenge, issuedAtMs, used: false, requestId: request.id, approve });
    const acr = request.stepUp?.acr ?? "";
    return {
      challengeId: nonce,
      challenge,
      expiresAt: new Date(issuedAtMs + this.config.challengeTtlMs).toISOString(),
      methods: [...(passkeys.length > 0 ? (["passkey"] as const) : []), ...(oidc ? (["oidc"] as const) : [])],
      ...(passkeys.length === 0
        ? {}
        : {
            passkey: await generateAuthenticationOptions({
              rpID: this.config.rpId,
              challenge: Buffer.from(challenge, "base64url"),
              allowCredentials: passkeys.map((passkey) => ({ id: passkey.id })),
              userVerification: "required",
              timeout: this.config.challengeTtlMs,
            }),
          }),
      ...(oidc ? { oidc: { nonce: challenge, maxAge: 0 as const, ...(acr === "" ? {} : { acr }) } } : {}),
    };
  }

  /**
   * Verifies a step-up proof for `reviewer`'s vote (`approve`) on `record` and spends its
   * challenge: `{ challengeId, passkey: <WebAuthn assertion JSON> }` or
   * `{ challengeId, idToken }`. The challenge is recomputed from the broker's own record
   * (request id and hash), so a proof made for another request, verdict or reviewer, or
   * a replayed one, is refused with `permission_denied` and a {@link StepUpRefusal} as
   * `details.reason`; a refused proof spends nothing.
   */
  async verify(reviewer: Reviewer, record: RequestRecord, approve: boolean, proof: unknown): Promise<StepUpReceipt> {
    if (!isObject(proof) || typeof proof.challengeId !== "string" || !nonceText.test(proof.challengeId)) throw refused("step_up_malformed", "stepUp needs the challengeId it answers");
    const vote = await this.openVote(reviewer, record, approve, proof.challengeId);
    if (isObject(proof.passkey)) {
      const evidence = await this.verifyPasskey(reviewer, proof.passkey, vote.challenge);
      await this.spend(vote.key, vote.stored, vote.entry);
      await this.touch(evidence.passkey, evidence.counter);
      return { ...vote.base, method: "passkey", evidence: { ...vote.inputs, ...evidence.receipt } };
    }
    if (typeof proof.idToken === "string" && proof.idToken.length <= 16_384) {
      if (this.auth === undefined) throw refused("step_up_invalid", "no identity provider is configured for re-authentication");
      // A bad re-authentication token refuses the vote; it is no reason to end the reviewer's session (401).
      const { reviewer: who, claims } = await this.auth.verifiedClaims(proof.idToken).catch((error: unknown) => {
        if (!(error instanceof AirlockError) || error.code !== Code.Unauthenticated) throw error;
        throw new AirlockError(Code.PermissionDenied, `the re-authentication token is not valid: ${error.rawMessage}`, { details: { reason: "step_up_invalid", token: error.details.reason } });
      });
      return this.reauthenticated(reviewer, record, vote, { reviewer: who.id, claims, idToken: proof.idToken });
    }
    throw refused("step_up_malformed", "stepUp needs a passkey assertion or an idToken");
  }

  /**
   * The console's fallback: a fresh sign-in at the provider (`prompt=login`, `max_age=0`,
   * the challenge as `nonce`) whose ID token the broker's SSO client already verified for
   * signature, issuer, audience and nonce. Judged and spent as {@link verify} does an `idToken`.
   */
  async verifyFreshSignIn(reviewer: Reviewer, record: RequestRecord, approve: boolean, challengeId: string, signIn: { readonly reviewer: string; readonly claims: JWTPayload; readonly idToken: string }): Promise<StepUpReceipt> {
    if (!nonceText.test(challengeId)) throw refused("step_up_malformed", "stepUp needs the challengeId it answers");
    return this.reauthenticated(reviewer, record, await this.openVote(reviewer, record, approve, challengeId), signIn);
  }

  /**
   * The challenge a reviewer's pending vote step-up must carry as `nonce` at a fresh sign-in,
   * and what it is for; refused as {@link verify} would (unknown, spent, expired, another's).
   */
  async pendingVote(reviewer: Reviewer, challengeId: string): Promise<{ readonly challenge: string; readonly requestId: string; readonly approve: boolean }> {
    if (!nonceText.test(challengeId)) throw refused("step_up_malformed", "stepUp needs the challengeId it answers");
    const { stored } = await this.openChallenge(`c.${challengeId}`, reviewer, "vote");
    return { challenge: stored.challenge, requestId: stored.requestId ?? "", approve: stored.approve === true };
  }

  /** Opens a vote's challenge and checks it was made for this request, verdict and reviewer. */
  private async openVote(reviewer: Reviewer, record: RequestRecord, approve: boolean, nonce: string) {
    const request = record.request;
    if (request === undefined) throw new AirlockError(Code.DataLoss, "the record has no request");
    const key = `c.${nonce}`;
    const { entry, stored } = await this.openChallenge(key, reviewer, "vote");
    const challenge = stepUpChallenge({ requestId: request.id, requestSha256: request.requestSha256, reviewer: reviewer.id, approve, issuedAtMs: stored.issuedAtMs, nonce });
    if (stored.requestId !== request.id || stored.approve !== approve || stored.challenge !== challenge) {
      throw refused("step_up_mismatch", `this step-up was made for ${stored.requestId === request.id ? `the other verdict (${stored.approve === true ? "approve" : "deny"})` : "another request"}`);
    }
    const base = { requestId: request.id, approve, reviewer: reviewer.id, challenge };
    const inputs = { challengeId: nonce, issuedAt: new Date(stored.issuedAtMs).toISOString(), requestSha256: Buffer.from(request.requestSha256).toString("hex"), verdict: approve ? "approve" : "deny" };
    return { key, entry, stored, challenge, base, inputs };
  }

  /** Judges a verified re-authentication against an opened vote, spends the challenge, and makes the receipt. */
  private async reauthenticated(
    reviewer: Reviewer,
    record: RequestRecord,
    vote: Awaited<ReturnType<StepUpService["openVote"]>>,
    signIn: { readonly reviewer: string; readonly claims: JWTPayload; readonly idToken: string },
  ): Promise<StepUpReceipt> {
    const { claims } = signIn;
    if (principalKey(signIn.reviewer) !== principalKey(reviewer.id)) throw refused("step_up_mismatch", "the re-authentication is another person's");
    const refusal = judgeReauthentication(claims, { challenge: vote.challenge, issuedAtMs: vote.stored.issuedAtMs, nowMs: Date.now(), maxAuthAgeMs: this.config.maxAuthAgeMs, acr: record.request?.stepUp?.acr ?? "" });
    if (refusal !== undefined) throw refused(refusal, `the re-authentication does not confirm this vote (${refusal})`);
    await this.spend(vote.key, vote.stored, vote.entry);
    // The claims, not the token: a kept token would be a usable credential until it expires.
    return {
      ...vote.base,
      method: "oidc",
      evidence: {
        ...vote.inputs,
        iss: String(claims.iss ?? ""),
        sub: String(claims.sub ?? ""),
        authTime: Number(claims.auth_time),
        acr: typeof claims.acr === "string" ? claims.acr : "",
        nonce: typeof claims.nonce === "string" ? claims.nonce : "",
        idTokenSha256: createHash("sha256").update(signIn.idToken).digest("base64url"),
      },
    };
  }

  private async openChallenge(key: string, reviewer: Reviewer, purpose: StoredChallenge["purpose"]): Promise<{ entry: { revision: number }; stored: StoredChallenge }> {
    const entry = await this.challenges.get(key);
    if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) throw refused("step_up_unknown_challenge", "no such step-up challenge (it may have expired); ask for a new one");
    const stored = entry.json<StoredChallenge>();
    if (stored.used) throw refused("step_up_replayed", "this step-up challenge was already used");
    if (stored.purpose !== purpose || principalKey(stored.reviewer) !== principalKey(reviewer.id)) throw refused("step_up_mismatch", "this step-up challenge was issued for something else");
    if (Date.now() > stored.issuedAtMs + this.config.challengeTtlMs) throw refused("step_up_expired", "this step-up challenge has expired; ask for a new one");
    return { entry, stored };
  }

  /** Marks a challenge used, compare-and-set: of two replicas spending one challenge, one fails. */
  private async spend(key: string, stored: StoredChallenge, entry: { revision: number }): Promise<void> {
    try {
      await this.challenges.update(key, JSON.stringify({ ...stored, used: true }), entry.revision);
    } catch {
      throw refused("step_up_replayed", "this step-up challenge was already used");
    }
  }

  private originsFor(response: Record<string, unknown>): string[] {
    if (this.config.origins !== undefined) return [...this.config.origins];
    // Without a list: the client data's own origin when its host is the RP id (https, or http on localhost).
    const clientData = isObject(response.response) && typeof response.response.clientDataJSON === "string" ? response.response.clientDataJSON : "";
    let origin: string;
    try {
      const parsed = (JSON.parse(Buffer.from(clientData, "base64url").toString("utf8")) as { origin?: unknown }).origin;
      origin = typeof parsed === "string" ? parsed : "";
    } catch {
      return [];
    }
    if (!URL.canParse(origin)) return [];
    const url = new URL(origin);
    const secure = url.protocol === "https:" || (url.protocol === "http:" && url.hostname === "localhost");
    return secure && url.hostname === this.config.rpId && url.origin === origin ? [origin] : [];
  }

  private async verifyPasskey(reviewer: Reviewer, assertion: Record<string, unknown>, challenge: string) {
    const id = assertion.id;
    if (typeof id !== "string" || !credentialIdText.test(id)) throw refused("step_up_malformed", "the passkey assertion has no credential id");
    const key = `${reviewerKey(reviewer.id)}.${id}`;
    const entry = await this.passkeys.get(key);
    if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) throw refused("step_up_unknown_passkey", "this passkey is not registered to you");
    const passkey = entry.json<StoredPasskey>();
    let result;
    try {
      result = await verifyAuthenticationResponse({
        response: assertion as unknown as AuthenticationResponseJSON,
        expectedChallenge: challenge,
        expectedOrigin: this.originsFor(assertion),
        expectedRPID: this.config.rpId,
        credential: { id: passkey.id, publicKey: Buffer.from(passkey.publicKey, "base64url"), counter: passkey.counter },
        requireUserVerification: true,
      });
    } catch (error) {
      throw refused("step_up_invalid", `the passkey assertion does not verify: ${error instanceof Error ? error.message : String(error)}`);
    }
    if (!result.verified) throw refused("step_up_invalid", "the passkey assertion does not verify");
    const response = (assertion as unknown as AuthenticationResponseJSON).response;
    return {
      passkey: { key, stored: passkey, revision: entry.revision },
      counter: result.authenticationInfo.newCounter,
      receipt: {
        credentialId: passkey.id,
        authenticatorData: response.authenticatorData,
        clientDataJSON: response.clientDataJSON,
        signature: response.signature,
        ...(response.userHandle === undefined ? {} : { userHandle: response.userHandle }),
        counter: result.authenticationInfo.newCounter,
        userVerified: result.authenticationInfo.userVerified,
        rpId: result.authenticationInfo.rpID,
        origin: result.authenticationInfo.origin,
      },
    };
  }

  /** Records the new counter and the time of use; a concurrent write wins (the counter only grows). */
  private async touch(passkey: { key: string; stored: StoredPasskey; revision: number }, counter: number): Promise<void> {
    await this.passkeys.update(passkey.key, JSON.stringify({ ...passkey.stored, counter: Math.max(counter, passkey.stored.counter), lastUsedAt: new Date().toISOString() }), passkey.revision).catch(() => undefined);
  }
}

function viewOf(passkey: StoredPasskey): PasskeyView {
  return { id: passkey.id, name: passkey.name, createdAt: passkey.createdAt, ...(passkey.lastUsedAt === undefined ? {} : { lastUsedAt: passkey.lastUsedAt }) };
}
