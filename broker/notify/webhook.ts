import { createHmac, timingSafeEqual } from "node:crypto";
import { toJson } from "@bufbuild/protobuf";
import { AirlockError, Code } from "../../common/errors.js";
import { RequestRecordSchema } from "../../proto/index.js";
import type { Notification, NotificationKind } from "./events.js";
import { type HeaderMap, headerValue } from "./http.js";

/** How far `x-airlock-timestamp` may be from the receiver's clock, either way, by default, in seconds. */
export const webhookSignatureMaxSkewSeconds = 300;

/**
 * The JSON a generic webhook receives. `request` is the `airlock.v1.RequestRecord` in
 * canonical protobuf JSON (decode it with `fromJson(RequestRecordSchema, …)`); `details`
 * holds the event's own facts (groups and reviewers to notify, the break-glass
 * reviewer and reason, the outcome with who and why).
 */
export interface WebhookPayload {
  readonly event: NotificationKind;
  readonly request: unknown;
  /** When the event happened, RFC 3339. */
  readonly at: string;
  /** True for break-glass: security must look. */
  readonly flagged: boolean;
  readonly details: Readonly<Record<string, unknown>>;
}

/** The payload of a notification, see {@link WebhookPayload}. */
export function webhookPayload(notification: Notification): WebhookPayload {
  let details: Record<string, unknown>;
  switch (notification.kind) {
    case "review_requested":
      details = { groups: notification.groups, reviewers: notification.reviewers };
      break;
    case "escalated":
      details = { group: notification.group, reviewers: notification.reviewers };
      break;
    case "break_glass":
      details = { reviewer: notification.reviewer, reason: notification.reason, groups: notification.groups, reviewers: notification.reviewers };
      break;
    case "decided":
      details = { outcome: notification.outcome, by: notification.by, reason: notification.reason, ...(notification.autoRule === undefined ? {} : { autoRule: notification.autoRule }) };
      break;
  }
  return { event: notification.kind, request: toJson(RequestRecordSchema, notification.record), at: notification.at.toISOString(), flagged: notification.kind === "break_glass", details };
}

/**
 * The `x-airlock-signature` value of a body sent at `timestamp` (Unix seconds):
 * `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`. Signing the timestamp
 * with the body lets a receiver refuse replays of an old delivery.
 */
export function signWebhookBody(secret: string, timestamp: number | string, body: string | Uint8Array): string {
  return `sha256=${createHmac("sha256", secret).update(`${timestamp}.`).update(body).digest("hex")}`;
}

/** Options of {@link verifyWebhookSignature}. */
export interface VerifyWebhookOptions {
  /** @default new Date() */
  readonly now?: Date;
  /** @default webhookSignatureMaxSkewSeconds (300) */
  readonly maxSkewSeconds?: number;
}

/**
 * For receivers of Airlock's webhooks: checks that `x-airlock-signature` is the
 * HMAC-SHA256 of `x-airlock-timestamp + "." + rawBody` under the shared secret
 * (compared in constant time) and that the timestamp is recent. `rawBody` must be the
 * body exactly as received, before JSON parsing.
 * @throws AirlockError `unauthenticated` saying what is wrong.
 */
export function verifyWebhookSignature(secret: string, rawBody: string | Uint8Array, headers: HeaderMap, options: VerifyWebhookOptions = {}): void {
  const signature = headerValue(headers, "x-airlock-signature");
  const timestamp = headerValue(headers, "x-airlock-timestamp");
  if (signature === undefined || timestamp === undefined) throw new AirlockError(Code.Unauthenticated, "x-airlock-signature and x-airlock-timestamp are required");
  if (!/^\d{1,12}$/.test(timestamp)) throw new AirlockError(Code.Unauthenticated, "x-airlock-timestamp is not a Unix time in seconds");
  const maxSkew = options.maxSkewSeconds ?? webhookSignatureMaxSkewSeconds;
  const skew = Math.floor((options.now ?? new Date()).getTime() / 1000) - Number(timestamp);
  if (Math.abs(skew) > maxSkew) throw new AirlockError(Code.Unauthenticated, `x-airlock-timestamp is ${Math.abs(skew)} s ${skew > 0 ? "old" : "in the future"} (at most ${maxSkew} s allowed)`);
  const match = /^sha256=([0-9a-fA-F]{64})$/.exec(signature);
  if (match?.[1] === undefined) throw new AirlockError(Code.Unauthenticated, "x-airlock-signature is not sha256=<hex>");
  const expected = Buffer.from(signWebhookBody(secret, timestamp, rawBody).slice("sha256=".length), "hex");
  if (!timingSafeEqual(expected, Buffer.from(match[1], "hex"))) throw new AirlockError(Code.Unauthenticated, "x-airlock-signature does not match the body");
}
