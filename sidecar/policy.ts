/**
 * The sidecar's policy engine: a YAML file of ordered rules that gives every gRPC
 * call one effect (allow, deny, or approve), with optional CEL conditions over the
 * request, the caller's identity, the host and the time.
 *
 * ```yaml
 * version: 1
 * default: deny
 * rules:
 *   - id: status-is-free
 *     match: { service: demo.v1.OpsService, method: GetStatus }
 *     effect: allow
 *   - id: export-customers
 *     match: { service: demo.v1.OpsService, method: ExportTable }
 *     when: 'request.table == "customers" && identity.on_behalf_of != ""'
 *     effect: approve
 *     approve: { risk: high, reviewers: { all_of: [{ group: security }] }, credential: { kind: database, mount: database, role: export } }
 * ```
 *
 * The hot path stays cheap: {@link Policy.needsRequest} says whether a method's
 * request must be decoded at all, and {@link Policy.evaluate} takes the request
 * lazily.
 * @module
 */
export { explainCall, Policy } from "./policy/engine.js";
export { redact } from "./policy/redact.js";
export { approvalTerms, type ApprovalTerms } from "./policy/terms.js";
export {
  type ApproveSpec,
  type CallIdentity,
  type CredentialSpec,
  type Effect,
  type PolicyCall,
  policyDefaults,
  type PolicyVerdict,
  type ReviewerSpec,
  type RuleSummary,
  type StepUpSpec,
} from "./policy/types.js";
export { PolicyWatcher, type PolicyWatcherOptions } from "./policy/watcher.js";
