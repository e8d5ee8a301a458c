/**
 * The contract: the messages that cross NATS (ApprovalRequest, Decision,
 * Completion, AuditEvent) and the reviewers' gRPC API, generated from
 * proto/airlock/v1 by protoc-gen-es, plus the binary descriptor set the
 * sidecar loads at run time.
 * @module
 */
import { fileURLToPath } from "node:url";

export * from "./gen/airlock/v1/approval_pb.js";
export * from "./gen/airlock/v1/audit_pb.js";
export * from "./gen/airlock/v1/reviewer_pb.js";

/** Path of the binary FileDescriptorSet (with imports) of every proto in proto/, demo included. */
export const descriptorSetPath: string = fileURLToPath(new URL("./gen/descriptors.binpb", import.meta.url));
