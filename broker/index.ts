/**
 * The broker: the approval workflow on JetStream, one Vault secret per action,
 * revocation on completion, signed decisions, and the audit chain.
 * @module
 */
export { AuditKeyRing, type AuditSigner, AuditLog, auditEventsFromJsonl, auditEventTime, auditEventToJsonLine, readAuditEvents, renderAuditReport, readCheckpointDirectory, TrailVerifier, type TrailVerdict, trailErrors, trailVerdictLine, verifyTrail, writeAuditKey } from "./audit/index.js";
export { CredentialIssuer, configureDatabaseEngine, postgresRoleStatements } from "./credentials.js";
export { type BrokerMetrics, createBrokerMetrics } from "./metrics.js";
export { type ApprovalConfig, type Ballot, isFinal, isSettled, parseApprovalConfig, stateName } from "./rules.js";
export { type BrokerConfig, brokerConfigDefaults, loadBrokerConfig, parseBrokerConfig, type ReviewerApiConfig, type RunningBroker, startBroker, type StartBrokerOptions, type TokenRoleSetup, type VaultAuth } from "./server.js";
export { Broker, type BrokerOptions, brokerDefaults, type VoteOrigin } from "./service.js";
export * from "./reviewers/index.js";
export { type NotificationsConfig, parseNotificationsConfig, ReviewNotifier, verifySlackSignature, verifyWebhookSignature } from "./notify/index.js";
export * from "./stepup/index.js";
