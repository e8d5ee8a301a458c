/**
 * The reviewers' step-up routes: a challenge bound to one request and verdict, and the
 * signed-in reviewer's passkeys. Contract: docs/reviewer-api.md.
 * @module
 */
import type { FastifyInstance, FastifyRequest } from "fastify";
import { AirlockError, Code } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import { type RequestRecord, RequestState } from "../../proto/index.js";
import { type StepUpReceipt, stateName } from "../rules.js";
import type { Broker } from "../service.js";
import type { StepUpService } from "../stepup/index.js";
import type { Reviewer } from "./auth.js";
import { resolveRequest } from "./views.js";

/** What {@link registerStepUpRoutes} needs of the HTTP app. */
export interface StepUpRouteContext {
  readonly stepUp: StepUpService;
  readonly broker: Broker;
  /** Authenticates a request as the other routes do (bearer or session cookie with CSRF on writes). */
  readonly reviewerOf: (request: FastifyRequest) => Promise<Reviewer>;
  readonly bodyOf: (request: FastifyRequest) => Readonly<Record<string, unknown>>;
  readonly log: Logger;
}

/**
 * Verifies a vote's step-up proof into a receipt. Without step-up configured on this
 * broker, any proof is refused (`permission_denied`, `step_up_unavailable`).
 */
export async function stepUpReceipt(stepUp: StepUpService | undefined, reviewer: Reviewer, record: RequestRecord, approve: boolean, proof: unknown): Promise<StepUpReceipt> {
  if (stepUp === undefined) throw new AirlockError(Code.PermissionDenied, "this broker has no step-up configured (reviewers.step_up)", { details: { reason: "step_up_unavailable" } });
  return stepUp.verify(reviewer, record, approve, proof);
}

/** Registers `POST /api/v1/requests/:id/step-up` and `/api/v1/passkeys[...]`. */
export function registerStepUpRoutes(app: FastifyInstance, context: StepUpRouteContext): void {
  const { stepUp, broker, reviewerOf, bodyOf, log } = context;

  app.post<{ Params: { id: string } }>("/api/v1/requests/:id/step-up", async (request) => {
    const reviewer = await reviewerOf(request);
    const approve = bodyOf(request).approve;
    if (typeof approve !== "boolean") throw new AirlockError(Code.InvalidArgument, "approve (true or false) is required", { details: { field: "approve" } });
    const record = await resolveRequest(broker, request.params.id);
    if (record.state !== RequestState.PENDING) {
      throw new AirlockError(Code.FailedPrecondition, `request ${record.request?.id ?? ""} is ${stateName(record.state)}, not pending`, { details: { state: stateName(record.state) } });
    }
    return stepUp.challenge(reviewer, record, approve);
  });

  app.get("/api/v1/passkeys", async (request) => {
    const reviewer = await reviewerOf(request);
    return { passkeys: await stepUp.list(reviewer) };
  });

  app.post("/api/v1/passkeys/options", async (request) => {
    const reviewer = await reviewerOf(request);
    return stepUp.registrationOptions(reviewer);
  });

  app.post("/api/v1/passkeys", async (request, reply) => {
    const reviewer = await reviewerOf(request);
    const passkey = await stepUp.register(reviewer, bodyOf(request));
    // No audit, no passkey: one the trail does not show is taken back.
    await broker.auditReviewerAct(reviewer.id, { reason: "passkey_registered", passkey: passkey.id, name: passkey.name }).catch(async (error: unknown) => {
      await stepUp.remove(reviewer, passkey.id).catch(() => undefined);
      throw error;
    });
    log.info({ reviewer: reviewer.id, passkey: passkey.id }, "passkey registered");
    return reply.status(201).send(passkey);
  });

  app.delete<{ Params: { id: string } }>("/api/v1/passkeys/:id", async (request, reply) => {
    const reviewer = await reviewerOf(request);
    await stepUp.remove(reviewer, request.params.id);
    await broker.auditReviewerAct(reviewer.id, { reason: "passkey_removed", passkey: request.params.id });
    log.info({ reviewer: reviewer.id, passkey: request.params.id }, "passkey removed");
    return reply.status(204).send();
  });
}
