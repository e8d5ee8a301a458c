/**
 * The reviewers' API of a broker replica: authentication, the HTTP app (JSON
 * API, live updates, console, Slack interactions, health) and the gRPC
 * ReviewerService. Contract: docs/reviewer-api.md.
 * @module
 */
export { type OidcAuthConfig, parseReviewerAuthConfig, type Reviewer, type ReviewerAuthConfig, ReviewerAuthenticator, reviewerAuthDefaults, type StaticAuthConfig } from "./auth.js";
export { type ReviewerGrpcOptions, type RunningReviewerGrpc, startReviewerGrpc } from "./grpc.js";
export { brokerHttpDefaults, type BrokerHttpOptions, createBrokerHttpApp, csrfTokenOf, httpErrorOf, type SlackInteractionHandler } from "./http.js";
export { liveRequests, type LiveUpdate } from "./live.js";
export { type RequestIdRefusal, requestIdPrefix, requestIdRefusals, type RequestView, requireReviewer, resolveRequest } from "./views.js";
export { type BrowserSession, openSession, parseSessionConfig, readSessionKey, Sealer, type SessionConfig, sessionCsrfToken, sessionDefaults, sessionPurpose } from "./session.js";
export { groupsOf, parseSsoConfig, SsoClient, type SsoConfig, ssoDefaults, type SsoIdentity, type SsoTransaction } from "./sso.js";
