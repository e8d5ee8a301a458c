/**
 * The audit trail: an append-only, hash-chained and signed JetStream stream,
 * anchored by signed checkpoints written outside NATS.
 * @module
 */
export { type AuditEntry, auditEventsFromJsonl, auditEventTime, auditEventToJsonLine, AuditLog, auditLogDefaults, type AuditLogOptions, auditStream, ensureAuditStream, eventHash, readAuditEvents } from "./log.js";
export { AuditKeyRing, type AuditSigner, signatureContexts, writeAuditKey } from "./signing.js";
export { type Checkpoint, checkpointDefaults, Checkpointer, type CheckpointerOptions, type CheckpointFiles, type CheckpointSink, checkpointToJsonLine, DirectoryCheckpointSink, readCheckpointDirectory } from "./checkpoints.js";
export { TrailVerifier, type TrailError, trailErrors, type TrailExpectations, type TrailVerdict, trailVerdictLine, verifyTrail } from "./verify.js";
export { type AuditReportInput, renderAuditReport } from "./report.js";
