import { clone } from "@bufbuild/protobuf";
import { timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { hostPattern } from "../common/subjects.js";
import { type ApprovalRequest, ApprovalRequestSchema, type Completion, type RequestRecord, RequestState } from "../proto/index.js";
import { approvalTerms, type Policy } from "../sidecar/index.js";

/**
 * Why the broker refused a message it did not write. Stable names: they label
 * the `airlock_broker_refusals_total` metric and the flagged audit event.
 */
export type RefusalReason =
  /** The bytes are not the message the subject carries. */
  | "undecodable"
  /** The subject is not `airlock.<kind>.<host>.<id>` with a host name and the message's id. */
  | "subject_mismatch"
  /** The host in the body is not the host in the subject (the one the server let publish). */
  | "host_mismatch"
  /** The rule the request names is not an `approve` rule of the broker's policy. */
  | "unknown_rule"
  /** The rule does not cover the request's service and method. */
  | "rule_mismatch"
  /** The rule is not for this host (`match.hosts`). */
  | "host_not_allowed"
  /** A request whose id a settled request in the history already has (a replay after its record was retired). */
  | "request_id_reused"
  /** A completion for a request the broker has no record of. */
  | "completion_unknown_request"
  /** A completion from a host other than the one holding the request. */
  | "completion_wrong_host"
  /** A completion for an action that is not executing (not approved yet, or over). */
  | "completion_not_executing"
  /** A completion that names another decision than the one the action runs under. */
  | "completion_decision_mismatch"
  /** A record that says approved without votes or an auto rule that account for it. */
  | "unjustified_approval"
  /** A message whose handling failed in a way no redelivery can mend, or failed at every delivery. */
  | "failed_permanently";

/** A refused message: the reason and a message for the trail and logs (no secret). */
export interface Refusal {
  readonly reason: RefusalReason;
  readonly message: string;
}

/** The host an `airlock.<kind>.<host>…` subject names (the one the server let publish it), or "". */
export function subjectHost(subject: string): string {
  const host = subject.split(".")[2] ?? "";
  return hostPattern.test(host) ? host : "";
}

/** The host and id a request or completion subject names: `airlock.<kind>.<host>.<id>`. */
export function subjectParts(subject: string, kind: "request" | "completion"): { host: string; id: string } | undefined {
  const parts = subject.split(".");
  if (parts.length !== 4 || parts[0] !== "airlock" || parts[1] !== kind) return undefined;
  const [, , host = "", id = ""] = parts;
  return hostPattern.test(host) && id !== "" ? { host, id } : undefined;
}

/**
 * Checks a request against what the broker itself knows, and replaces what the
 * sidecar may not choose: the risk, the reviewer requirement and the credential
 * template come from the broker's own policy (the rule the request names), and
 * the deadline is at most the rule's timeout from now. The sidecar only names
 * the rule it matched; the server's permissions vouch for the subject's host.
 */
export function vetRequest(subject: string, request: ApprovalRequest, policy: Policy, now: Date): { ok: true; request: ApprovalRequest } | { ok: false; refusal: Refusal } {
  const refuse = (reason: RefusalReason, message: string) => ({ ok: false as const, refusal: { reason, message } });
  const parts = subjectParts(subject, "request");
  if (parts === undefined || parts.id !== request.id) return refuse("subject_mismatch", `request ${request.id} arrived on ${subject}`);
  if (request.host !== parts.host) return refuse("host_mismatch", `request ${request.id} from host ${parts.host} names host ${JSON.stringify(request.host)}`);
  const rule = policy.rules.find((candidate) => candidate.id === request.ruleId);
  if (rule?.approve === undefined) return refuse("unknown_rule", `request ${request.id} names rule ${JSON.stringify(request.ruleId)}, which is not an approve rule of the broker's policy`);
  if ((rule.service !== "*" && rule.service !== request.service) || (rule.method !== "*" && rule.method !== request.method)) {
    return refuse("rule_mismatch", `rule ${rule.id} does not cover ${request.service}/${request.method}`);
  }
  if (rule.hosts !== undefined && !rule.hosts.includes(parts.host)) return refuse("host_not_allowed", `rule ${rule.id} is not for host ${parts.host}`);
  const vetted = clone(ApprovalRequestSchema, request);
  const terms = approvalTerms(rule.approve);
  vetted.risk = terms.risk;
  vetted.ruleDescription = terms.ruleDescription;
  vetted.reviewers = terms.reviewers;
  vetted.credential = terms.credential;
  vetted.stepUp = terms.stepUp;
  const latest = now.getTime() + rule.approve.timeoutMs;
  if (vetted.deadline === undefined || timestampDate(vetted.deadline).getTime() > latest) vetted.deadline = timestampFromMs(latest);
  return { ok: true, request: vetted };
}

/**
 * Whether a completion may end the action: it comes from the host that holds
 * the request, names the decision the action runs under, and the action is
 * executing. `"duplicate"` is the same completion delivered again after it
 * counted (nothing to do, nothing to flag).
 */
export function vetCompletion(subject: string, completion: Completion, record: RequestRecord | undefined): Refusal | "duplicate" | undefined {
  const parts = subjectParts(subject, "completion");
  if (parts === undefined || parts.id !== completion.requestId) return { reason: "subject_mismatch", message: `completion of ${completion.requestId} arrived on ${subject}` };
  if (completion.host !== parts.host) return { reason: "host_mismatch", message: `completion from host ${parts.host} names host ${JSON.stringify(completion.host)}` };
  const request = record?.request;
  if (record === undefined || request === undefined) return { reason: "completion_unknown_request", message: `completion for unknown request ${completion.requestId}` };
  if (request.host !== parts.host) return { reason: "completion_wrong_host", message: `completion of ${request.id} from host ${parts.host}; the request is held on ${request.host}` };
  if (completion.decisionId !== record.decisionId) {
    return { reason: "completion_decision_mismatch", message: `completion of ${request.id} names decision ${JSON.stringify(completion.decisionId)}, not the one it runs under` };
  }
  if (record.state === RequestState.COMPLETED && record.completion?.decisionId === completion.decisionId) return "duplicate";
  if (record.state !== RequestState.EXECUTING) return { reason: "completion_not_executing", message: `completion of ${request.id}, which is ${RequestState[record.state] ?? "unknown"}, not executing` };
  return undefined;
}
