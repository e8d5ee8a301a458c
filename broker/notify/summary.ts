import { toJson } from "@bufbuild/protobuf";
import { timestampDate, ValueSchema } from "@bufbuild/protobuf/wkt";
import { type RequestRecord, RequestState, Risk } from "../../proto/index.js";
import type { GroupNeed } from "../rules/types.js";

/** How a request left PENDING, as notifications tell it. */
export type DecidedOutcome = "approved" | "denied" | "expired" | "cancelled";

/** What a notification shows about a request, read once from its record. */
export interface RequestSummary {
  readonly id: string;
  readonly agent: string;
  /** The human the agent acts for; empty when the agent acts for nobody. */
  readonly onBehalfOf: string;
  readonly host: string;
  /** `service/method`, e.g. `demo.v1.OpsService/ExportTable`. */
  readonly call: string;
  readonly method: string;
  /** The agent's stated reason; empty when it gave none. */
  readonly reason: string;
  /** `low` … `critical`, or `unspecified`. */
  readonly risk: string;
  readonly ruleId: string;
  /** Groups that still need approvals, with how many each. */
  readonly outstanding: readonly GroupNeed[];
  /** When the request expires undecided, if the sidecar set a deadline. */
  readonly deadline?: Date;
  /** `pending`, `approved`, … */
  readonly state: string;
  /** The redacted request as compact JSON, cut to {@link maxPreview} characters; empty when absent. */
  readonly preview: string;
}

/** Longest request preview in a notification; a chat message is no place for a whole payload. */
export const maxPreview = 600;

/** Cuts text to `max` characters, marking the cut. */
export function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, Math.max(0, max - 1))}…`;
}

/** The {@link RequestSummary} of a record. */
export function summarize(record: RequestRecord): RequestSummary {
  const request = record.request;
  const identity = request?.identity;
  let preview = "";
  if (request?.request !== undefined) {
    try {
      preview = truncate(JSON.stringify(toJson(ValueSchema, request.request)), maxPreview);
    } catch {
      // An unencodable value (a NaN number) only costs the preview, never the notification.
      preview = "";
    }
  }
  const service = request?.service ?? "";
  const method = request?.method ?? "";
  return {
    id: request?.id ?? "",
    agent: identity?.agent ?? "",
    onBehalfOf: identity?.onBehalfOf ?? "",
    host: request?.host ?? "",
    call: service === "" ? method : `${service}/${method}`,
    method,
    reason: request?.reason ?? "",
    risk: (Risk[request?.risk ?? Risk.UNSPECIFIED] as string | undefined)?.toLowerCase() ?? "unspecified",
    ruleId: request?.ruleId ?? "",
    outstanding: record.outstanding.map((need) => ({ group: need.group, remaining: need.minApprovals })),
    ...(request?.deadline === undefined ? {} : { deadline: timestampDate(request.deadline) }),
    state: (RequestState[record.state] as string | undefined)?.toLowerCase() ?? "unspecified",
    preview,
  };
}

/** Every group of a request's requirement, escalation group included, in order and without repeats. */
export function requirementGroups(record: RequestRecord): string[] {
  const reviewers = record.request?.reviewers;
  const groups = [...(reviewers?.allOf.map((need) => need.group) ?? []), reviewers?.escalationGroup ?? ""];
  return [...new Set(groups.filter((group) => group !== ""))];
}

/** `security: 1 more approval` lines, or undefined when no group needs more. */
export function describeNeeds(needs: readonly GroupNeed[]): string[] | undefined {
  const open = needs.filter((need) => need.remaining > 0);
  if (open.length === 0) return undefined;
  return open.map((need) => `${need.group}: ${need.remaining} more approval${need.remaining === 1 ? "" : "s"}`);
}

/**
 * Where a request's message goes, per reviewer group: the groups a notification is for (the one
 * an escalation reached, or all it names) looked up in `byGroup`, else `fallback`; each place
 * once. `onMissing` hears of a group with no place.
 */
export function destinationsFor(
  notification: { readonly kind: string; readonly group?: string; readonly groups?: readonly string[] },
  byGroup: ReadonlyMap<string, string>,
  fallback: string | undefined,
  onMissing: (group: string) => void,
): Set<string> {
  const groups = notification.kind === "escalated" && notification.group !== undefined ? [notification.group] : (notification.groups ?? []);
  const places = new Set<string>();
  for (const group of groups) {
    const place = byGroup.get(group) ?? fallback;
    if (place === undefined) onMissing(group);
    else places.add(place);
  }
  return places;
}

/** The link to a request in the approver console: `<consoleUrl>#/requests/<id>`. */
export function consoleLink(consoleUrl: string, requestId: string): string {
  return `${consoleUrl}#/requests/${encodeURIComponent(requestId)}`;
}

/** The outcome named by a record's state, when it is past PENDING by a decision. */
export function outcomeOfState(state: RequestState): DecidedOutcome | undefined {
  switch (state) {
    case RequestState.APPROVED:
    case RequestState.EXECUTING:
    case RequestState.COMPLETED:
      return "approved";
    case RequestState.DENIED:
      return "denied";
    case RequestState.EXPIRED:
      return "expired";
    case RequestState.CANCELLED:
      return "cancelled";
    default:
      return undefined;
  }
}
