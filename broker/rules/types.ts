import type { AirlockError } from "../../common/errors.js";
import type { RequestRecord, RequestState } from "../../proto/index.js";

/**
 * How a pending request left PENDING: the verdict the broker signs and publishes
 * (`VERDICT_APPROVED`, `_DENIED`, `_EXPIRED`, `_CANCELLED`).
 */
export type Outcome = "approved" | "denied" | "expired" | "cancelled";

/** One reviewer's vote as it reaches {@link vote}. */
export interface Ballot {
  /** The reviewer's id as authenticated (e.g. an email); compared trimmed and case-insensitively. */
  readonly reviewer: string;
  /** Approve (true) or deny (false). */
  readonly approve: boolean;
  /** Why. Required for a denial and for break-glass; optional for an approval. */
  readonly reason?: string;
  /** An emergency self-approval by a member of the break-glass role. @default false */
  readonly breakGlass?: boolean;
  /**
   * The requirement group the approval should count for, when the reviewer can count
   * for several. Without it the rules choose (see {@link vote}).
   */
  readonly group?: string;
  /**
   * Groups the reviewer's identity provider asserts (the OIDC groups claim). They count
   * like membership in the broker's configured groups, for this ballot only.
   * @default []
   */
  readonly groups?: readonly string[];
  /**
   * The step-up the broker verified for this ballot (a passkey assertion or a fresh
   * sign-in bound to this request and verdict). Recorded on the vote and, whole, in its
   * audit event: the approval's receipt.
   */
  readonly stepUp?: StepUpReceipt;
}

/**
 * Proof, as the broker verified it, that a reviewer stepped up for one vote: the
 * approval's receipt. Made only by the broker's step-up verifier (broker/stepup), never
 * taken from a caller.
 */
export interface StepUpReceipt {
  /** `passkey`: a WebAuthn assertion; `oidc`: a fresh sign-in at the identity provider. */
  readonly method: "passkey" | "oidc";
  /** The request the challenge was derived from. */
  readonly requestId: string;
  /** The verdict the challenge was derived from. */
  readonly approve: boolean;
  /** The reviewer who stepped up. */
  readonly reviewer: string;
  /** The challenge (base64url SHA-256) the proof signs, and the inputs it was derived from. */
  readonly challenge: string;
  /** The evidence itself: for a passkey the credential id, authenticator data, client data, signature and counter (base64url). */
  readonly evidence: Readonly<Record<string, string | number | boolean>>;
}

/** A group of the requirement and how many approvals it still needs. */
export interface GroupNeed {
  /** The requirement group. */
  readonly group: string;
  /** Approvals from distinct reviewers it still needs. */
  readonly remaining: number;
}

/** What every event carries. */
export interface EventBase {
  /** The request the event is about. */
  readonly requestId: string;
  /** When it happened: the `now` the rules were given. */
  readonly at: Date;
}

/** What happened to a request, for notifications, the audit trail and logs. */
export type ApprovalEvent =
  /** Intake left the request PENDING; `notify` lists who may approve it now. */
  | (EventBase & { readonly kind: "awaiting_review"; readonly outstanding: readonly GroupNeed[]; readonly notify: readonly string[] })
  /** A reviewer voted. `group` is the group the vote counts for (empty for break-glass). */
  | (EventBase & { readonly kind: "voted"; readonly reviewer: string; readonly approve: boolean; readonly group: string; readonly reason: string; readonly breakGlass: boolean; readonly stepUp?: StepUpReceipt })
  /**
   * The request was approved: by enough votes, by break-glass, or by an auto rule
   * (`autoRule`). `by` lists the approvers whose votes counted; `reason` is the deciding reason.
   */
  | (EventBase & {
      readonly kind: "approved";
      readonly cause: "votes" | "break_glass" | "auto_rule";
      readonly by: readonly string[];
      readonly reason: string;
      readonly autoRule?: string;
    })
  /**
   * The request was denied: by a denial, because approval can no longer be reached,
   * or by an auto rule (`autoRule`). `by` lists the reviewers who said no.
   */
  | (EventBase & {
      readonly kind: "denied";
      readonly cause: "denial" | "unreachable" | "auto_rule";
      readonly by: readonly string[];
      readonly reason: string;
      readonly autoRule?: string;
    })
  /**
   * Someone broke glass. Always `flagged`: security must look. `notify` lists every
   * member of every group of the requirement.
   */
  | (EventBase & { readonly kind: "break_glass"; readonly flagged: true; readonly reviewer: string; readonly reason: string; readonly notify: readonly string[] })
  /** The escalation group may now vote; `notify` lists its members who may. */
  | (EventBase & { readonly kind: "escalated"; readonly group: string; readonly notify: readonly string[] })
  /** The request passed its deadline undecided. */
  | (EventBase & { readonly kind: "expired"; readonly deadline: Date })
  /** The request was cancelled (the held call went away). */
  | (EventBase & { readonly kind: "cancelled"; readonly from: RequestState; readonly reason: string })
  /** The approved action started running with its credential. */
  | (EventBase & { readonly kind: "executing" })
  /** The sidecar reported the action finished; `statusCode` is the upstream call's gRPC status. */
  | (EventBase & { readonly kind: "completed"; readonly statusCode: number })
  /** The action could not run or never reported back. */
  | (EventBase & { readonly kind: "failed"; readonly from: RequestState; readonly reason: string });

/** A successful step: the new record (a new object; the input is never changed) and what happened. */
export interface RuleSuccess {
  readonly ok: true;
  /** The record after the step. When `events` is empty nothing changed and this is the input record itself. */
  readonly record: RequestRecord;
  /** Set when this step took the request out of PENDING: the verdict to sign and publish. */
  readonly decided?: Outcome;
  /** What happened, in order. */
  readonly events: readonly ApprovalEvent[];
}

/** A refused step; nothing changed. */
export interface RuleFailure {
  readonly ok: false;
  /** Why, with a code: `failed_precondition`, `permission_denied`, `already_exists` or `invalid_argument`. */
  readonly error: AirlockError;
}

/** The result of {@link vote}, {@link tick} and the `mark*` transitions. */
export type RuleResult = RuleSuccess | RuleFailure;

/** A successful {@link intake}: {@link RuleSuccess} plus the auto rule that decided, if one did. */
export interface IntakeSuccess extends RuleSuccess {
  /** The id of the auto rule that approved or denied the request at intake. */
  readonly autoRule?: string;
}

/** The result of {@link intake}. */
export type IntakeResult = IntakeSuccess | RuleFailure;
