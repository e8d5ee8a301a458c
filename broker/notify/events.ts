import type { RequestRecord } from "../../proto/index.js";
import type { DecidedOutcome } from "./summary.js";

/** What every notification carries. */
interface NotificationBase {
  /** The request as it stands after the event. Not changed afterwards (the broker's records never are). */
  readonly record: RequestRecord;
  /** When the event happened. */
  readonly at: Date;
}

/**
 * One event reviewers (or the requester) hear about. `kind` is also the `event`
 * field of generic webhook payloads.
 */
export type Notification =
  /** A request waits for review: `groups` get a message in their channel, `reviewers` are mentioned. */
  | (NotificationBase & { readonly kind: "review_requested"; readonly groups: readonly string[]; readonly reviewers: readonly string[] })
  /** The escalation `group` may now vote; `reviewers` are its members who may. */
  | (NotificationBase & { readonly kind: "escalated"; readonly group: string; readonly reviewers: readonly string[] })
  /**
   * `reviewer` broke glass with `reason`. Always flagged: every group of the request's
   * requirement (`groups`) and every approver of the rule (`reviewers`) are told.
   */
  | (NotificationBase & {
      readonly kind: "break_glass";
      readonly flagged: true;
      readonly reviewer: string;
      readonly reason: string;
      readonly groups: readonly string[];
      readonly reviewers: readonly string[];
    })
  /**
   * The request left PENDING: `outcome`, decided `by` whom (empty for expiry or an auto
   * rule), and why. `autoRule` names the auto rule that decided it at intake: nobody was
   * asked, so chat channels stay quiet and only generic webhooks hear about it.
   */
  | (NotificationBase & { readonly kind: "decided"; readonly outcome: DecidedOutcome; readonly by: readonly string[]; readonly reason: string; readonly autoRule?: string });

/** The kinds of {@link Notification}. */
export type NotificationKind = Notification["kind"];
