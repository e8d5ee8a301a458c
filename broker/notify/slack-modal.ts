/**
 * The binding of a Slack deny-reason modal to the request and the Slack user it was
 * opened for. A Deny click opens a modal; its `private_metadata` names only the request
 * and a random ticket id, and the ticket (request, Slack user, reviewer, the clicked
 * message) lives in the broker's JetStream KV, so the replica that receives the
 * `view_submission` need not be the one that opened the modal. A ticket is spent once
 * (compare-and-set) and expires, so a replayed or late submission casts nothing.
 * @module
 */
import { randomBytes } from "node:crypto";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../../common/errors.js";
import { type EnsureOptions, stepUpBucket } from "../../common/subjects.js";
import { ensureSingleUseBucket } from "../stepup/index.js";
import { isWrongLastSequence } from "../store.js";

/** How long a deny-reason modal can be submitted after the Deny click, in ms. */
export const slackDenyModalTtlMs = 15 * 60_000;

/** What a deny-reason modal was opened for. */
export interface SlackDenyTicket {
  readonly requestId: string;
  /** The Slack user who clicked Deny: only they may submit the modal. */
  readonly slackUserId: string;
  /** The Airlock reviewer that Slack user was mapped to at the click. */
  readonly reviewer: string;
  /** The clicked message's response_url, channel and ts: updated with the outcome. */
  readonly responseUrl: string;
  readonly channel?: string;
  readonly messageTs?: string;
  /** When the modal was opened (ms since the epoch). */
  readonly issuedAtMs: number;
}

/** The stable reasons (`details.reason`) a deny-reason submission is refused with. */
export type SlackModalRefusal = "slack_modal_unknown" | "slack_modal_mismatch" | "slack_modal_replayed" | "slack_modal_expired" | "slack_modal_withdrawn";

function refused(reason: SlackModalRefusal, message: string): AirlockError {
  return new AirlockError(Code.PermissionDenied, message, { details: { reason } });
}

interface StoredTicket extends SlackDenyTicket {
  readonly purpose: "slack_deny";
  readonly used: boolean;
  /** Set when the modal could not be opened: the ticket is void. */
  readonly withdrawn?: boolean;
}

const ticketIdText = /^[A-Za-z0-9_-]{24}$/;

/** Where deny-reason tickets are kept: {@link KvSlackModalTickets} in the broker. */
export interface SlackModalTickets {
  /** Stores a ticket; returns its id (random, URL-safe) for the modal's `private_metadata`. */
  issue(ticket: Omit<SlackDenyTicket, "issuedAtMs">): Promise<string>;
  /**
   * Spends the ticket `id` for a submission by `slackUserId` naming `requestId` and returns
   * it. `permission_denied` with a {@link SlackModalRefusal} when it does not exist, was
   * opened for another request or user, was spent already, was withdrawn, or has expired; a
   * refused submission spends nothing.
   */
  spend(id: string, requestId: string, slackUserId: string): Promise<SlackDenyTicket>;
  /**
   * Voids an unspent ticket whose modal could not be opened, so a submission of it (Slack may
   * have opened the modal after all) casts nothing: `slack_modal_withdrawn`.
   * @returns false when the ticket was spent first (its denial was cast), else true.
   */
  withdraw(id: string): Promise<boolean>;
}

/**
 * Deny-reason tickets in the broker's single-use bucket (`AIRLOCK_STEPUP`, keys `s.<id>`),
 * the bucket step-up challenges use: same lifetime bound, same rights, one use each.
 */
export class KvSlackModalTickets implements SlackModalTickets {
  private constructor(
    private readonly kv: KV,
    private readonly now: () => number,
  ) {}

  /**
   * Opens the bucket, creating it or bringing its replicas up to date first ({@link ensureSingleUseBucket}).
   * @param now - the clock, injectable for tests.
   */
  static async open(nc: NatsConnection, options: { readonly now?: () => number; readonly ensure?: EnsureOptions } = {}): Promise<KvSlackModalTickets> {
    await ensureSingleUseBucket(nc, options.ensure);
    try {
      return new KvSlackModalTickets(await new Kvm(nc).open(stepUpBucket), options.now ?? Date.now);
    } catch (error) {
      throw new AirlockError(Code.Unavailable, "cannot open the single-use ticket bucket in NATS", { cause: error });
    }
  }

  async issue(ticket: Omit<SlackDenyTicket, "issuedAtMs">): Promise<string> {
    const id = randomBytes(18).toString("base64url");
    const stored: StoredTicket = { ...ticket, issuedAtMs: this.now(), purpose: "slack_deny", used: false };
    await this.kv.create(`s.${id}`, JSON.stringify(stored));
    return id;
  }

  async spend(id: string, requestId: string, slackUserId: string): Promise<SlackDenyTicket> {
    if (!ticketIdText.test(id)) throw refused("slack_modal_unknown", "this deny form was not opened by Airlock");
    const entry = await this.kv.get(`s.${id}`);
    if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) throw refused("slack_modal_unknown", "this deny form was not opened by Airlock, or has expired");
    const stored = entry.json<StoredTicket>();
    if (stored.purpose !== "slack_deny") throw refused("slack_modal_unknown", "this deny form was not opened by Airlock");
    if (stored.requestId !== requestId || stored.slackUserId !== slackUserId) throw refused("slack_modal_mismatch", "this deny form was opened for another request or another person");
    if (stored.withdrawn === true) throw refused("slack_modal_withdrawn", "this deny form could not be opened and was withdrawn; click Deny again");
    if (stored.used) throw refused("slack_modal_replayed", "this deny form was already submitted");
    if (this.now() > stored.issuedAtMs + slackDenyModalTtlMs) throw refused("slack_modal_expired", "this deny form has expired; click Deny again");
    try {
      await this.kv.update(`s.${id}`, JSON.stringify({ ...stored, used: true }), entry.revision);
    } catch {
      throw refused("slack_modal_replayed", "this deny form was already submitted");
    }
    const { purpose: _purpose, used: _used, withdrawn: _withdrawn, ...ticket } = stored;
    return ticket;
  }

  async withdraw(id: string): Promise<boolean> {
    const key = `s.${id}`;
    // Compare-and-set, tried again if a spend raced it: whichever write lands first decides.
    for (let attempt = 0; attempt < 3; attempt++) {
      const entry = await this.kv.get(key);
      if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) return true;
      const stored = entry.json<StoredTicket>();
      if (stored.withdrawn === true) return true;
      if (stored.used) return false;
      try {
        await this.kv.update(key, JSON.stringify({ ...stored, used: true, withdrawn: true }), entry.revision);
        return true;
      } catch (error) {
        if (!isWrongLastSequence(error)) throw error;
      }
    }
    throw new AirlockError(Code.Unavailable, "the deny form's ticket kept changing while it was withdrawn");
  }
}
