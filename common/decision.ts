/**
 * Signed decisions: the broker signs a {@link DecisionBody} with Ed25519, the
 * sidecar verifies the signature, that the decision binds the exact request it
 * holds, that it has not expired, and that it is not a replay.
 *
 * The signature covers the body's bytes exactly as they travel in
 * `Decision.body`: the verifier checks those bytes and only then parses them, so
 * nothing depends on protobuf re-encoding a message byte for byte the same way.
 * @module
 */
import { createPublicKey, generateKeyPairSync, type KeyObject, sign, timingSafeEqual, verify } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Decision, type DecisionBody, DecisionBodySchema, DecisionSchema, Verdict } from "../proto/index.js";
import { AirlockError, Code } from "./errors.js";

/**
 * Every reason a sidecar refuses a decision, as it appears in
 * `AirlockError.details.reason`. The strings are stable: metrics, logs and
 * tests key on them.
 */
export const decisionRejections = [
  /** The decision's key id is not in the sidecar's key ring. */
  "unknown_key",
  /** The signature does not verify over the body bytes with the named key. */
  "bad_signature",
  /** The signed bytes are not a DecisionBody, or lack a decision id. */
  "malformed_body",
  /** The decision is for another request id. */
  "request_mismatch",
  /** The decision binds other request bytes (SHA-256 differs). */
  "hash_mismatch",
  /** `expires_at` is missing or not after now. */
  "expired",
  /** APPROVED, but no credential delivery (wrapping token) in the body. */
  "missing_credential",
  /** A decision id the sidecar already accepted. */
  "replayed",
] as const;

/** One of {@link decisionRejections}: why a decision was refused. */
export type DecisionRejection = (typeof decisionRejections)[number];

function rejection(reason: DecisionRejection, requestId: string, message: string, cause?: unknown): AirlockError {
  return new AirlockError(Code.PermissionDenied, `decision rejected (${reason}): ${message}`, {
    ...(cause === undefined ? {} : { cause }),
    details: { reason, requestId },
  });
}

/** A broker's signing key: the Ed25519 private key and the id verifiers know its public half by. */
export interface DecisionSigningKey {
  /** Travels in `Decision.key_id`; selects the public key in the verifier's {@link DecisionKeyRing}. */
  readonly keyId: string;
  /** An Ed25519 private key. */
  readonly privateKey: KeyObject;
}

/**
 * Signs a decision body. The body is serialized once and the Ed25519 signature
 * covers exactly those bytes, which travel unchanged in `Decision.body`.
 * @throws AirlockError `invalid_argument` if the key is not an Ed25519 private key.
 */
export function signDecision(body: DecisionBody, key: DecisionSigningKey): Decision {
  if (key.privateKey.type !== "private" || key.privateKey.asymmetricKeyType !== "ed25519") {
    throw new AirlockError(Code.InvalidArgument, `decision signing key ${JSON.stringify(key.keyId)} is not an Ed25519 private key`, {
      details: { keyId: key.keyId },
    });
  }
  const bytes = toBinary(DecisionBodySchema, body);
  const signature = sign(null, bytes, key.privateKey);
  return create(DecisionSchema, { body: bytes, signature: new Uint8Array(signature), keyId: key.keyId });
}

/**
 * The public keys a sidecar trusts, by key id. Holding several at once lets the
 * broker rotate its signing key without downtime: add the new public key to
 * every ring, switch the broker to the new private key, then remove the old one.
 */
export class DecisionKeyRing {
  readonly #keys = new Map<string, KeyObject>();

  /**
   * @param keys - Ed25519 public keys by key id.
   * @param label - What the keys are, for error messages. @default "decision key"
   * @throws AirlockError `invalid_argument` naming the key id if a key is not an
   * Ed25519 public key (a private key is refused too: sidecars must never hold
   * the broker's signing key), or if a key id is empty.
   */
  constructor(keys: Readonly<Record<string, KeyObject>>, label = "decision key") {
    for (const [keyId, key] of Object.entries(keys)) {
      if (keyId.length === 0) throw new AirlockError(Code.InvalidArgument, `${label} id must not be empty`);
      if (key.type !== "public" || key.asymmetricKeyType !== "ed25519") {
        const what = key.type === "public" ? `a ${key.asymmetricKeyType ?? "unknown"} key` : `a ${key.type} key`;
        throw new AirlockError(Code.InvalidArgument, `${label} ${JSON.stringify(keyId)} must be an Ed25519 public key, got ${what}`, {
          details: { keyId },
        });
      }
      this.#keys.set(keyId, key);
    }
  }

  /**
   * A ring from PEM-encoded SPKI public keys by key id.
   * @param label - What the keys are, for error messages. @default "decision key"
   * @throws AirlockError `invalid_argument` naming the key id if a PEM does not
   * parse or is not an Ed25519 public key.
   */
  static fromPem(keys: Readonly<Record<string, string>>, label = "decision key"): DecisionKeyRing {
    const parsed: Record<string, KeyObject> = {};
    for (const [keyId, pem] of Object.entries(keys)) {
      // createPublicKey also derives a public key from a *private* PEM; refuse that
      // so a misconfigured sidecar does not end up holding the signing key.
      if (/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(pem)) {
        throw new AirlockError(Code.InvalidArgument, `${label} ${JSON.stringify(keyId)} is a private key; configure its public key (SPKI PEM)`, {
          details: { keyId },
        });
      }
      try {
        parsed[keyId] = createPublicKey({ key: pem, format: "pem" });
      } catch (cause) {
        throw new AirlockError(Code.InvalidArgument, `${label} ${JSON.stringify(keyId)} is not a parsable SPKI PEM public key`, {
          cause,
          details: { keyId },
        });
      }
    }
    return new DecisionKeyRing(parsed, label);
  }

  /** The key ids in the ring. */
  keyIds(): string[] {
    return [...this.#keys.keys()];
  }

  /** The public key with the given id, or `undefined`. */
  get(keyId: string): KeyObject | undefined {
    return this.#keys.get(keyId);
  }
}

/** What a decision must bind: the request the sidecar holds. */
export interface DecisionExpectation {
  /** The id of the held ApprovalRequest. */
  readonly requestId: string;
  /** SHA-256 of the held request's bytes, as sent in `ApprovalRequest.request_sha256` (32 bytes). */
  readonly requestSha256: Uint8Array;
  /** The instant expiry is judged at. @default new Date() */
  readonly now?: Date;
}

/**
 * Verifies a signed decision against the trusted keys and the held request and
 * returns its body. Checks, in order: the key id is in the ring, the signature
 * verifies over the body bytes as received, the bytes parse as a DecisionBody
 * with a decision id, the request id and request SHA-256 (compared in constant
 * time) match, `expires_at` is set and after now, and an APPROVED verdict
 * carries a credential delivery with a wrapping token. Replays are not checked
 * here: pass the body to {@link ReplayGuard.accept}.
 *
 * The verdict is returned as signed; only APPROVED lets a call through.
 * @throws AirlockError `permission_denied` with `details: { reason, requestId }`,
 * `reason` one of {@link DecisionRejection}; `invalid_argument` if
 * `expect.requestSha256` is not 32 bytes (a caller bug, refused rather than
 * letting an empty hash match an empty hash).
 */
export function verifyDecision(decision: Decision, ring: DecisionKeyRing, expect: DecisionExpectation): DecisionBody {
  const { requestId } = expect;
  if (expect.requestSha256.length !== 32) {
    throw new AirlockError(Code.InvalidArgument, `expected request SHA-256 must be 32 bytes, got ${expect.requestSha256.length}`, {
      details: { requestId },
    });
  }
  const key = ring.get(decision.keyId);
  if (key === undefined) throw rejection("unknown_key", requestId, `key id ${JSON.stringify(decision.keyId)} is not trusted`);

  let valid: boolean;
  try {
    valid = verify(null, decision.body, key, decision.signature);
  } catch (cause) {
    // A malformed signature can make OpenSSL throw instead of answering false.
    throw rejection("bad_signature", requestId, `signature does not verify with key ${JSON.stringify(decision.keyId)}`, cause);
  }
  if (!valid) throw rejection("bad_signature", requestId, `signature does not verify with key ${JSON.stringify(decision.keyId)}`);

  let body: DecisionBody;
  try {
    body = fromBinary(DecisionBodySchema, decision.body);
  } catch (cause) {
    throw rejection("malformed_body", requestId, "body is not a DecisionBody", cause);
  }
  // Without an id the replay guard could not tell two uses of the decision apart.
  if (body.decisionId.length === 0) throw rejection("malformed_body", requestId, "body has no decision id");

  if (body.requestId !== requestId) {
    throw rejection("request_mismatch", requestId, `decision is for request ${JSON.stringify(body.requestId)}`);
  }
  // Lengths are public (always 32 for a real hash); only the content needs a constant-time compare.
  if (body.requestSha256.length !== expect.requestSha256.length || !timingSafeEqual(body.requestSha256, expect.requestSha256)) {
    throw rejection("hash_mismatch", requestId, "decision binds different request bytes");
  }
  const now = (expect.now ?? new Date()).getTime();
  if (body.expiresAt === undefined) throw rejection("expired", requestId, "decision has no expiry");
  const expiresAt = timestampMs(body.expiresAt);
  if (!(expiresAt > now)) throw rejection("expired", requestId, `decision expired at ${new Date(expiresAt).toISOString()}`);

  if (body.verdict === Verdict.APPROVED && (body.credential === undefined || body.credential.wrappingToken.length === 0)) {
    throw rejection("missing_credential", requestId, "approval carries no credential delivery");
  }
  return body;
}

/** Options of {@link ReplayGuard}. */
export interface ReplayGuardOptions {
  /**
   * Most decision ids remembered at once; past it the oldest accepted is
   * forgotten first. Each entry costs roughly 100 bytes plus the id.
   * @default 100_000
   */
  readonly maxEntries?: number;
  /** The clock expiry is judged by (tests inject one). @default () => new Date() */
  readonly now?: () => Date;
}

/** Defaults of {@link ReplayGuardOptions}. */
export const replayGuardDefaults = { maxEntries: 100_000 } as const;

/**
 * Remembers the decision ids a sidecar accepted until each one's `expires_at`,
 * so a decision is accepted once. After its expiry a decision fails
 * {@link verifyDecision} anyway, so the guard forgets it then; memory stays
 * bounded by the number of decisions live at once, and is capped at
 * `maxEntries` (oldest accepted evicted first: under a flood of live
 * decisions, the guard degrades to remembering the newest `maxEntries`).
 *
 * One guard per process: it is in memory, so it protects one sidecar, which is
 * enough because a decision binds one request held by one sidecar.
 */
export class ReplayGuard {
  /** decision id → expiry (ms). Map iteration order is insertion order: the first key is the oldest. */
  readonly #entries = new Map<string, number>();
  /** Min-heap of [expiry ms, decision id], so expired entries are found without scanning the map. */
  #heap: [number, string][] = [];
  readonly #maxEntries: number;
  readonly #now: () => Date;

  /** @throws AirlockError `invalid_argument` if `maxEntries` is not a positive integer. */
  constructor(options: ReplayGuardOptions = {}) {
    const maxEntries = options.maxEntries ?? replayGuardDefaults.maxEntries;
    if (!Number.isInteger(maxEntries) || maxEntries < 1) {
      throw new AirlockError(Code.InvalidArgument, `maxEntries must be a positive integer, got ${maxEntries}`);
    }
    this.#maxEntries = maxEntries;
    this.#now = options.now ?? (() => new Date());
  }

  /** How many decision ids are remembered now (expired ones dropped first). */
  get size(): number {
    this.#prune(this.#now().getTime());
    return this.#entries.size;
  }

  /** Whether a decision id is remembered (accepted and not yet expired). */
  has(decisionId: string): boolean {
    this.#prune(this.#now().getTime());
    return this.#entries.has(decisionId);
  }

  /**
   * Records a verified decision as used.
   * @throws AirlockError `permission_denied` with `details: { reason: "replayed", requestId }`
   * if the decision id was accepted before and has not expired; with reason
   * `expired` if the body has no expiry or it has passed (the guard would
   * otherwise have nothing to bound how long to remember it).
   */
  accept(body: DecisionBody): void {
    const now = this.#now().getTime();
    this.#prune(now);
    if (this.#entries.has(body.decisionId)) {
      throw rejection("replayed", body.requestId, `decision ${JSON.stringify(body.decisionId)} was already used`);
    }
    if (body.expiresAt === undefined) throw rejection("expired", body.requestId, "decision has no expiry");
    const expiresAt = timestampMs(body.expiresAt);
    if (!(expiresAt > now)) throw rejection("expired", body.requestId, `decision expired at ${new Date(expiresAt).toISOString()}`);

    while (this.#entries.size >= this.#maxEntries) {
      const oldest = this.#entries.keys().next();
      if (oldest.done === true) break;
      this.#entries.delete(oldest.value);
    }
    this.#entries.set(body.decisionId, expiresAt);
    this.#push([expiresAt, body.decisionId]);
    // Evicted entries leave stale heap items behind until their expiry; rebuild
    // when they dominate so the heap, too, stays bounded.
    if (this.#heap.length > 2 * this.#maxEntries) this.#rebuildHeap();
  }

  #prune(now: number): void {
    for (let top = this.#heap[0]; top !== undefined && top[0] <= now; top = this.#heap[0]) {
      this.#pop();
      // Only delete if the map still holds this very entry (not evicted and re-added since).
      if (this.#entries.get(top[1]) === top[0]) this.#entries.delete(top[1]);
    }
  }

  #rebuildHeap(): void {
    this.#heap = [];
    for (const [id, expiresAt] of this.#entries) this.#push([expiresAt, id]);
  }

  #push(item: [number, string]): void {
    const heap = this.#heap;
    heap.push(item);
    let i = heap.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      const p = heap[parent] as [number, string];
      if (p[0] <= item[0]) break;
      heap[i] = p;
      i = parent;
    }
    heap[i] = item;
  }

  #pop(): void {
    const heap = this.#heap;
    const last = heap.pop();
    if (last === undefined || heap.length === 0) return;
    let i = 0;
    for (;;) {
      const left = 2 * i + 1;
      if (left >= heap.length) break;
      const right = left + 1;
      const l = heap[left] as [number, string];
      const r = heap[right];
      const [child, c] = r !== undefined && r[0] < l[0] ? [right, r] : [left, l];
      if (last[0] <= c[0]) break;
      heap[i] = c;
      i = child;
    }
    heap[i] = last;
  }
}

/**
 * A fresh Ed25519 decision key: the signing half for a broker and the public
 * half as SPKI PEM for sidecars' {@link DecisionKeyRing.fromPem}. For tests,
 * the demo, and key rotation.
 */
export function generateDecisionKey(keyId: string): { signing: DecisionSigningKey; publicKeyPem: string } {
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  return { signing: { keyId, privateKey }, publicKeyPem: publicKey.export({ type: "spki", format: "pem" }).toString() };
}
