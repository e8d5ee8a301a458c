/**
 * The console's step-up by a fresh sign-in, for a reviewer with no passkey: the
 * signed-in reviewer asks for it (CSRF-checked), the broker sends the browser to the
 * provider with `prompt=login`, `max_age=0` and the step-up challenge as `nonce`, and at
 * the callback verifies the new ID token (nonce, `auth_time`, `acr`, same person) and
 * casts the vote with it as receipt. The vote travels sealed in the sign-in cookie, so
 * any replica finishes it.
 * @module
 */
import type { FastifyInstance, FastifyRequest } from "fastify";
import type { JWTPayload } from "jose";
import { AirlockError, Code } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import type { ApprovalConfig, Ballot } from "../rules.js";
import type { Broker } from "../service.js";
import type { StepUpService } from "../stepup/index.js";
import type { Reviewer } from "./auth.js";
import type { SsoClient, SsoStepUpVote, SsoTransaction } from "./sso.js";
import { requireReviewer, resolveRequest } from "./views.js";

/** What {@link registerSsoStepUp} needs of the HTTP app. */
export interface SsoStepUpContext {
  readonly sso: SsoClient;
  readonly stepUp: StepUpService | undefined;
  readonly broker: Broker;
  readonly approvals: ApprovalConfig;
  /** Authenticates as the other routes do (session cookie with CSRF on writes). */
  readonly reviewerOf: (request: FastifyRequest) => Promise<Reviewer>;
  readonly bodyOf: (request: FastifyRequest) => Readonly<Record<string, unknown>>;
  /** The provider's redirect target for this request. */
  readonly callbackUrl: (request: FastifyRequest) => string;
  /** Seals the sign-in transaction into the `Set-Cookie` value of the sign-in cookie. */
  readonly transactionCookie: (request: FastifyRequest, transaction: SsoTransaction) => string;
  readonly log: Logger;
}

function unavailable(): AirlockError {
  return new AirlockError(Code.PermissionDenied, "this broker has no step-up configured (reviewers.step_up)", { details: { reason: "step_up_unavailable" } });
}

/**
 * Registers `POST /api/v1/sso/step-up` `{ challengeId, reason?, breakGlass? }`: for the
 * signed-in reviewer's pending step-up challenge (`POST /api/v1/requests/:id/step-up`),
 * answers `{ url }`, the provider's authorization URL the console then navigates to.
 * The challenge is read from the broker's store, never from the browser.
 */
export function registerSsoStepUp(app: FastifyInstance, context: SsoStepUpContext): void {
  app.post("/api/v1/sso/step-up", async (request, reply) => {
    const stepUp = context.stepUp;
    if (stepUp === undefined) throw unavailable();
    const reviewer = await context.reviewerOf(request);
    const body = context.bodyOf(request);
    const challengeId = typeof body.challengeId === "string" ? body.challengeId : "";
    const reason = typeof body.reason === "string" ? body.reason.trim().slice(0, 2000) : "";
    const breakGlass = body.breakGlass === true;
    const pending = await stepUp.pendingVote(reviewer, challengeId);
    const record = await resolveRequest(context.broker, pending.requestId);
    const vote: SsoStepUpVote = { reviewer: reviewer.id, challengeId, requestId: pending.requestId, approve: pending.approve, reason, breakGlass };
    const acr = record.request?.stepUp?.acr ?? "";
    const { url, transaction } = await context.sso.begin(context.callbackUrl(request), `#/requests/${encodeURIComponent(pending.requestId)}`, {
      challenge: pending.challenge,
      ...(acr === "" ? {} : { acr }),
      vote,
    });
    void reply.header("set-cookie", context.transactionCookie(request, transaction));
    void reply.header("cache-control", "no-store");
    context.log.info({ reviewer: reviewer.id, requestId: pending.requestId }, "step-up by a fresh sign-in started");
    return { url: url.href };
  });
}

/**
 * At the callback of a step-up sign-in: the ID token (already verified by the SSO client,
 * nonce = the challenge) must be the same person's, with a fresh `auth_time` and the
 * rule's `acr`; then the vote is cast with the receipt. Refusals are `permission_denied`
 * with the step-up reason (`step_up_stale_authentication`, `step_up_mismatch`, …).
 */
export async function castStepUpVote(
  context: Pick<SsoStepUpContext, "stepUp" | "broker" | "approvals" | "log">,
  vote: SsoStepUpVote,
  signIn: { readonly reviewer: string; readonly groups: readonly string[]; readonly claims: JWTPayload; readonly idToken: string },
): Promise<void> {
  const stepUp = context.stepUp;
  if (stepUp === undefined) throw unavailable();
  // The person who signed in again must be the one who asked; their groups are the provider's latest word.
  const reviewer: Reviewer = { id: vote.reviewer, groups: signIn.groups, expiresAt: undefined };
  requireReviewer(reviewer, context.approvals);
  const record = await resolveRequest(context.broker, vote.requestId);
  const receipt = await stepUp.verifyFreshSignIn(reviewer, record, vote.approve, vote.challengeId, signIn);
  const ballot: Ballot = { reviewer: reviewer.id, approve: vote.approve, groups: reviewer.groups, ...(vote.reason === "" ? {} : { reason: vote.reason }), ...(vote.breakGlass ? { breakGlass: true } : {}), stepUp: receipt };
  await context.broker.decide(vote.requestId, ballot);
  context.log.info({ requestId: vote.requestId, reviewer: reviewer.id, approve: vote.approve }, "reviewer voted with a fresh sign-in");
}
