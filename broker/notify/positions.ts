/**
 * Where a request's chat messages are: the (channel, ts) of each Slack message and the
 * (conversation, activity) of each Teams card the broker posted for it, so the message can
 * be updated with the outcome when the request is decided. In the broker they live in the
 * JetStream KV bucket `AIRLOCK_CHAT` ({@link KvChatPositions}), shared by every replica: the
 * replica that decides need not be the one that posted.
 *
 * Keys are `<kind>.<request>.<position>`: `slack` or `teams`, then SHA-256 (hex, 32 characters)
 * of the request id the broker wrote, then of the position itself. Nothing an agent or a chat
 * user sends becomes key material; the same position is one key, so storing it twice is a no-op.
 * Each entry carries its own time to live (`Nats-TTL`): until the request's deadline plus
 * {@link chatPositionLimits}`.marginMs`, so a position outlives any wait for a decision and then
 * goes by itself.
 * @module
 */
import { createHash } from "node:crypto";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { jetstreamManager } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { AirlockError, Code } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import { bucketStream, chatBucket, type EnsureOptions, ensureDefaults, ensureStream } from "../../common/subjects.js";
import type { RequestRecord } from "../../proto/index.js";
import { isRequestKey, isWrongLastSequence } from "../store.js";

/** A Slack message the bot posted (Web API). */
export interface SlackPosition {
  readonly kind: "slack";
  readonly channel: string;
  readonly ts: string;
}

/** A Teams card the bot posted (Bot Connector API). */
export interface TeamsPosition {
  readonly kind: "teams";
  readonly conversationId: string;
  readonly activityId: string;
}

/** Where one chat message of a request is. */
export type ChatPosition = SlackPosition | TeamsPosition;

/** The chat a position is in. */
export type ChatKind = ChatPosition["kind"];

/** The position type of a chat. */
export type PositionOf<K extends ChatKind> = Extract<ChatPosition, { readonly kind: K }>;

/** Bounds of stored positions. */
export const chatPositionLimits = {
  /** Bytes of one stored position (its JSON) at most; the bucket refuses larger values too (`max_msg_size`). */
  maxValueBytes: 1024,
  /** Characters of one field (channel, ts, conversation id, activity id) at most. */
  maxFieldLength: 400,
  /** Positions of one request in one chat read at most. */
  maxPerRequest: 64,
  /** How long a position is kept past its request's deadline, in ms: a decision notified late (replicas down, retries) still finds it. */
  marginMs: 24 * 3_600_000,
  /** How long a request without a deadline is taken to stay pending, in ms (a vetted request always has one). */
  undatedPendingMs: 7 * 24 * 3_600_000,
  /** How long the server's marker of an expired entry stays, in ms. */
  expiryMarkerMs: 60_000,
} as const;

/**
 * Where a request's chat messages are remembered. Storing a position twice is harmless;
 * implementations never keep a position longer than its request can be pending plus a margin.
 */
export interface ChatPositions {
  /**
   * Remembers a posted message of `requestId` until `pendingUntilMs` (the request's deadline) plus the margin.
   * @throws AirlockError `invalid_argument` for a request id no request has or a position over the bounds; `unavailable` when it cannot be stored.
   */
  remember(requestId: string, position: ChatPosition, pendingUntilMs: number): Promise<void>;
  /**
   * The remembered positions of `requestId` in chat `kind` (at most {@link chatPositionLimits}`.maxPerRequest`).
   * @throws AirlockError `invalid_argument` for a request id no request has; `unavailable` when they cannot be read.
   */
  recall<K extends ChatKind>(requestId: string, kind: K): Promise<Array<PositionOf<K>>>;
}

/** Until when a request can be pending: its deadline, or {@link chatPositionLimits}`.undatedPendingMs` from `nowMs` without one. */
export function pendingUntilMs(record: RequestRecord, nowMs: number = Date.now()): number {
  const deadline = record.request?.deadline;
  return deadline === undefined ? nowMs + chatPositionLimits.undatedPendingMs : timestampDate(deadline).getTime();
}

function hash(text: string): string {
  return createHash("sha256").update(text).digest("hex").slice(0, 32);
}

function fieldsOf(position: ChatPosition): readonly [string, string] {
  return position.kind === "slack" ? [position.channel, position.ts] : [position.conversationId, position.activityId];
}

function requestKey(requestId: string): string {
  if (!isRequestKey(requestId)) throw new AirlockError(Code.InvalidArgument, "not a request id: its chat positions are not kept", { details: { field: "requestId" } });
  return hash(requestId);
}

/** The KV key of a position: `<kind>.<hash of the request id>.<hash of the position>`. */
export function chatPositionKey(requestId: string, position: ChatPosition): string {
  const [first, second] = fieldsOf(position);
  return `${position.kind}.${requestKey(requestId)}.${hash(`${position.kind}\n${first}\n${second}`)}`;
}

function validField(value: unknown): value is string {
  return typeof value === "string" && value !== "" && value.length <= chatPositionLimits.maxFieldLength;
}

/**
 * The stored form of a position (its JSON), checked against the bounds.
 * @throws AirlockError `invalid_argument` naming the field for an empty or overlong field or value.
 */
export function encodeChatPosition(position: ChatPosition): string {
  const fields = position.kind === "slack" ? { channel: position.channel, ts: position.ts } : { conversationId: position.conversationId, activityId: position.activityId };
  for (const [field, value] of Object.entries(fields)) {
    if (!validField(value)) throw new AirlockError(Code.InvalidArgument, `a chat position's ${field} must be 1 to ${chatPositionLimits.maxFieldLength} characters`, { details: { field } });
  }
  const text = JSON.stringify({ kind: position.kind, ...fields });
  if (Buffer.byteLength(text) > chatPositionLimits.maxValueBytes) throw new AirlockError(Code.InvalidArgument, `a chat position is over ${chatPositionLimits.maxValueBytes} bytes`, { details: { field: "position" } });
  return text;
}

/** A stored position read back: undefined unless it is well formed, of `kind`, and stored under its own key. */
function decodeChatPosition<K extends ChatKind>(kind: K, key: string, requestId: string, text: string): PositionOf<K> | undefined {
  if (Buffer.byteLength(text) > chatPositionLimits.maxValueBytes) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null) return undefined;
  const stored = value as Record<string, unknown>;
  let position: ChatPosition;
  if (kind === "slack" && stored.kind === "slack" && validField(stored.channel) && validField(stored.ts)) position = { kind: "slack", channel: stored.channel, ts: stored.ts };
  else if (kind === "teams" && stored.kind === "teams" && validField(stored.conversationId) && validField(stored.activityId)) position = { kind: "teams", conversationId: stored.conversationId, activityId: stored.activityId };
  else return undefined;
  return chatPositionKey(requestId, position) === key ? (position as PositionOf<K>) : undefined;
}

/**
 * The chat position bucket's settings (`AIRLOCK_CHAT`): one revision per key, values of at
 * most {@link chatPositionLimits}`.maxValueBytes`, per-entry time to live on, `replicas`
 * copies ({@link ensureStream}).
 */
export async function ensureChatPositionsBucket(nc: NatsConnection, ensure: EnsureOptions = {}): Promise<void> {
  const replicas = ensure.replicas ?? ensureDefaults.replicas;
  await ensureStream(
    await jetstreamManager(nc),
    { name: bucketStream(chatBucket), max_msgs_per_subject: 1, max_msg_size: chatPositionLimits.maxValueBytes, allow_msg_ttl: true },
    // markerTTL turns on the stream's per-message TTL (what each entry's lifetime needs); the markers themselves go after a minute.
    { ...ensure, create: () => new Kvm(nc).create(chatBucket, { history: 1, replicas, maxValueSize: chatPositionLimits.maxValueBytes, markerTTL: chatPositionLimits.expiryMarkerMs }) },
  );
}

/** Options of {@link KvChatPositions.open}. */
export interface KvChatPositionsOptions {
  readonly ensure?: EnsureOptions;
  /** Told of stored entries that are not positions this broker wrote (skipped). */
  readonly log?: Logger;
  /** The clock, injectable for tests. @default Date.now */
  readonly now?: () => number;
  /** How long past the deadline a position is kept, in ms. @default {@link chatPositionLimits}`.marginMs` */
  readonly marginMs?: number;
}

/**
 * Chat positions in the broker's KV bucket `AIRLOCK_CHAT`, shared by every replica. Each
 * position is its own key, created once (`create`, so two writers of one position are one
 * write) with a time to live of the request's deadline plus the margin.
 */
export class KvChatPositions implements ChatPositions {
  private constructor(
    private readonly kv: KV,
    private readonly options: KvChatPositionsOptions,
  ) {}

  /** Opens the bucket, creating it or bringing its settings up to date first ({@link ensureChatPositionsBucket}). */
  static async open(nc: NatsConnection, options: KvChatPositionsOptions = {}): Promise<KvChatPositions> {
    await ensureChatPositionsBucket(nc, options.ensure);
    try {
      return new KvChatPositions(await new Kvm(nc).open(chatBucket), options);
    } catch (error) {
      throw new AirlockError(Code.Unavailable, "cannot open the chat position bucket in NATS", { cause: error });
    }
  }

  async remember(requestId: string, position: ChatPosition, pendingUntilMs: number): Promise<void> {
    const key = chatPositionKey(requestId, position);
    const value = encodeChatPosition(position);
    const now = (this.options.now ?? Date.now)();
    const ttlSeconds = Math.max(1, Math.ceil((Math.max(0, pendingUntilMs - now) + (this.options.marginMs ?? chatPositionLimits.marginMs)) / 1000));
    try {
      await this.kv.create(key, value, `${ttlSeconds}s`);
    } catch (error) {
      // The same position is there already (another attempt, or another replica): nothing to do.
      if (isWrongLastSequence(error)) return;
      throw new AirlockError(Code.Unavailable, "cannot store a chat message's position in NATS", { cause: error });
    }
  }

  async recall<K extends ChatKind>(requestId: string, kind: K): Promise<Array<PositionOf<K>>> {
    const prefix = `${kind}.${requestKey(requestId)}`;
    const found: Array<PositionOf<K>> = [];
    try {
      const keys: string[] = [];
      for await (const key of await this.kv.keys(`${prefix}.*`)) if (keys.length < chatPositionLimits.maxPerRequest) keys.push(key);
      for (const key of keys) {
        const entry = await this.kv.get(key);
        if (entry === null || entry.operation !== "PUT" || entry.value.length === 0) continue;
        const position = decodeChatPosition(kind, key, requestId, entry.string());
        if (position === undefined) {
          this.options.log?.warn({ requestId, key }, "a stored chat position is not one this broker wrote; skipped");
          continue;
        }
        found.push(position);
      }
    } catch (error) {
      throw new AirlockError(Code.Unavailable, "cannot read chat message positions from NATS", { cause: error });
    }
    return found;
  }
}

/**
 * Positions in this process's memory, for a notifier without NATS (library use, tests): a
 * second replica does not see them. Bounded: past `maxRequests` requests the oldest are forgotten.
 */
export class MemoryChatPositions implements ChatPositions {
  private readonly byRequest = new Map<string, { untilMs: number; positions: ChatPosition[] }>();
  private readonly maxRequests: number;
  private readonly now: () => number;

  constructor(options: { readonly maxRequests?: number; readonly now?: () => number } = {}) {
    this.maxRequests = options.maxRequests ?? 10_000;
    this.now = options.now ?? Date.now;
  }

  remember(requestId: string, position: ChatPosition, pendingUntilMs: number): Promise<void> {
    return settled(() => {
      const key = chatPositionKey(requestId, position);
      encodeChatPosition(position);
      const known = this.byRequest.get(requestId) ?? { untilMs: 0, positions: [] };
      if (!known.positions.some((other) => chatPositionKey(requestId, other) === key)) known.positions.push(position);
      known.untilMs = Math.max(known.untilMs, pendingUntilMs + chatPositionLimits.marginMs);
      this.byRequest.set(requestId, known);
      while (this.byRequest.size > this.maxRequests) {
        const oldest = this.byRequest.keys().next();
        if (oldest.done === true) break;
        this.byRequest.delete(oldest.value);
      }
    });
  }

  recall<K extends ChatKind>(requestId: string, kind: K): Promise<Array<PositionOf<K>>> {
    return settled(() => {
      requestKey(requestId);
      const known = this.byRequest.get(requestId);
      if (known === undefined || known.untilMs < this.now()) return [];
      return known.positions.filter((position): position is PositionOf<K> => position.kind === kind).slice(0, chatPositionLimits.maxPerRequest);
    });
  }
}

/** `work`'s result as a promise, or its throw as a rejection. */
function settled<T>(work: () => T): Promise<T> {
  try {
    return Promise.resolve(work());
  } catch (error) {
    return Promise.reject(error instanceof Error ? error : new Error(String(error)));
  }
}

/**
 * The record of a request decided since its chat message was posted, if it was: what the poster
 * reads after storing the message's position, so a decision another replica made while the post
 * was in flight (and so found no position) still reaches the message.
 */
export type DecidedSince = (requestId: string) => Promise<RequestRecord | undefined>;
