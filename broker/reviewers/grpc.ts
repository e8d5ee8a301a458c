/**
 * The reviewers' gRPC API (`airlock.v1.ReviewerService`) on a broker replica:
 * the same operations and authentication as the HTTP API, for scripts.
 * @module
 */
import { create } from "@bufbuild/protobuf";
import { durationMs, timestampNow } from "@bufbuild/protobuf/wkt";
import { type Metadata, type sendUnaryData, Server, ServerCredentials, type ServerUnaryCall, type ServerWritableStream } from "@grpc/grpc-js";
import type { NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../../common/errors.js";
import { grpcServiceDefinition, toServiceError } from "../../common/grpc.js";
import type { Logger } from "../../common/logger.js";
import {
  type DecideRequest,
  DecideResponseSchema,
  type GetRequestRequest,
  GetRequestResponseSchema,
  type ListRequestsRequest,
  ListRequestsResponseSchema,
  ReviewerService,
  VerifyAuditResponseSchema,
  type WatchRequestsRequest,
  WatchRequestsResponseSchema,
} from "../../proto/index.js";
import { readAuditEvents, TrailVerifier } from "../audit/index.js";
import type { ApprovalConfig } from "../rules.js";
import type { Broker } from "../service.js";
import { bearerToken, type Reviewer, type ReviewerAuthenticator } from "./auth.js";
import { RateLimiter } from "./rate-limit.js";
import { liveRequests } from "./live.js";
import { admitReviewer, listRequests, needsReviewer, type RequestFilter, resolveRequest } from "./views.js";

/** Options of {@link startReviewerGrpc}. */
export interface ReviewerGrpcOptions {
  readonly broker: Broker;
  readonly nc: NatsConnection;
  readonly approvals: ApprovalConfig;
  readonly auth: ReviewerAuthenticator;
  readonly log: Logger;
  /** `host:port`; port 0 picks a free one. */
  readonly listen: string;
  /** Requests per minute one reviewer may make. @default 300 */
  readonly ratePerMinute?: number;
}

/** A running reviewer gRPC server. */
export interface RunningReviewerGrpc {
  /** `host:port` it listens on. */
  readonly address: string;
  close(): Promise<void>;
}

/** Starts `airlock.v1.ReviewerService` on its own port. */
export async function startReviewerGrpc(options: ReviewerGrpcOptions): Promise<RunningReviewerGrpc> {
  const { broker, approvals, auth } = options;
  const limiter = new RateLimiter(options.ratePerMinute ?? 300);

  async function reviewerOf(metadata: Metadata): Promise<Reviewer> {
    const header = metadata.get("authorization")[0];
    return admitReviewer(await auth.authenticate(bearerToken(header === undefined ? undefined : String(header))), limiter, approvals);
  }

  function unary<I, O>(run: (request: I, reviewer: Reviewer) => Promise<O>) {
    return (call: ServerUnaryCall<I, O>, callback: sendUnaryData<O>) => {
      reviewerOf(call.metadata)
        .then((reviewer) => run(call.request, reviewer))
        .then(
          (response) => callback(null, response),
          (error: unknown) => callback(toServiceError(error)),
        );
    };
  }

  const handlers = {
    listRequests: unary(async (request: ListRequestsRequest, reviewer) => {
      const filter: RequestFilter = {
        states: new Set(request.states),
        needsMe: request.needsMe,
        minRisk: request.minRisk,
        agent: request.agent.toLowerCase(),
        olderThanMs: request.olderThan === undefined ? 0 : durationMs(request.olderThan),
        sinceMs: 0,
      };
      const limit = request.pageSize === 0 ? 100 : Math.min(request.pageSize, 1000);
      const { items, nextCursor } = await listRequests(broker, filter, reviewer, approvals, limit, request.pageToken === "" ? undefined : request.pageToken);
      return create(ListRequestsResponseSchema, { requests: items, nextPageToken: nextCursor ?? "" });
    }),
    getRequest: unary(async (request: GetRequestRequest) => create(GetRequestResponseSchema, { request: await resolveRequest(broker, request.requestId) })),
    decide: unary(async (request: DecideRequest, reviewer) => {
      const reason = request.reason.trim();
      if (!request.approve && reason === "") throw new AirlockError(Code.InvalidArgument, "a denial needs a reason", { details: { field: "reason" } });
      const requestId = (await resolveRequest(broker, request.requestId)).request?.id ?? request.requestId;
      const record = await broker.decide(requestId, {
        reviewer: reviewer.id,
        approve: request.approve,
        groups: reviewer.groups,
        breakGlass: request.breakGlass,
        ...(reason === "" ? {} : { reason }),
      });
      options.log.info({ requestId, reviewer: reviewer.id, approve: request.approve }, "reviewer voted over gRPC");
      return create(DecideResponseSchema, { request: record });
    }),
    verifyAudit: unary(async () => {
      const verifier = new TrailVerifier({ keys: options.broker.auditKeys });
      for await (const event of readAuditEvents(options.nc, { onUndecodable: (sequence) => verifier.undecodable(sequence) })) verifier.add(event);
      const verdict = verifier.finish();
      return create(VerifyAuditResponseSchema, {
        intact: verdict.intact,
        eventsChecked: BigInt(verdict.eventsChecked),
        firstBrokenSequence: BigInt(verdict.firstBrokenSequence),
        problem: verdict.problem,
        error: verdict.error ?? "",
        signed: BigInt(verdict.signed),
      });
    }),
    watchRequests: (call: ServerWritableStream<WatchRequestsRequest, unknown>) => {
      const stop = new AbortController();
      call.on("cancelled", () => stop.abort());
      call.on("close", () => stop.abort());
      let expiry: NodeJS.Timeout | undefined;
      void (async () => {
        try {
          const reviewer = await reviewerOf(call.metadata);
          // The stream lives no longer than the credential that opened it.
          const expired = new AirlockError(Code.Unauthenticated, "the reviewer token expired; watch again with a fresh one", { details: { reason: "token_expired" } });
          if (reviewer.expiresAt !== undefined) expiry = setTimeout(() => stop.abort(expired), Math.max(0, reviewer.expiresAt.getTime() - Date.now()));
          const shown = new Set<string>();
          for await (const update of liveRequests(broker, stop.signal)) {
            if (update.kind === "ready") continue;
            const { record } = update;
            const id = record.request?.id ?? "";
            if (call.request.needsMe) {
              const needed = needsReviewer(record, reviewer, approvals, new Date());
              if (!needed && !shown.has(id)) continue;
              if (needed) shown.add(id);
              else shown.delete(id);
            }
            // A client that stops reading does not get to make the broker buffer without bound.
            if (!call.write(create(WatchRequestsResponseSchema, { request: record, at: timestampNow() })) && call.writableLength > 1024 * 1024) {
              throw new AirlockError(Code.ResourceExhausted, "the watch fell too far behind; reconnect");
            }
          }
          if (call.cancelled) return;
          const reason: unknown = stop.signal.reason;
          if (reason instanceof AirlockError) call.emit("error", toServiceError(reason));
          else call.end();
        } catch (error) {
          // emit('error') makes grpc-js send the status; destroy() would leave the client waiting.
          if (!call.cancelled) call.emit("error", toServiceError(error));
        } finally {
          clearTimeout(expiry);
          stop.abort();
        }
      })();
    },
  };

  const server = new Server();
  server.addService(grpcServiceDefinition(ReviewerService), handlers);
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(options.listen, ServerCredentials.createInsecure(), (error, bound) => (error === null ? resolve(bound) : reject(error)));
  });
  const host = options.listen.slice(0, options.listen.lastIndexOf(":"));
  return {
    address: `${host}:${port}`,
    async close() {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, 1000);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    },
  };
}
