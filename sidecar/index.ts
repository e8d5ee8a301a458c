/**
 * The sidecar: a transparent gRPC proxy next to the agents that lets calls
 * through, denies them, or holds them for approval and injects a one-action
 * credential.
 * @module
 */
export { type SidecarConfig, loadSidecarConfig, parseSidecarConfig, sidecarConfigDefaults, type UpstreamConfig } from "./config.js";
export { type Sidecar, type StartSidecarOptions, startSidecar } from "./server.js";
export { callIdKeyFromSeed, callIds, callRequestId } from "./approvals.js";
export { approvalTerms, type ApprovalTerms, explainCall, Policy, type PolicyCall, type PolicyVerdict, PolicyWatcher, policyDefaults } from "./policy.js";
export { type AgentAuthOptions, type AgentIdentity, agentAuthDefaults } from "./identity.js";
