/**
 * Signatures on the audit trail: each event and each checkpoint is signed with
 * the Ed25519 key of the broker replica that wrote it, and verified against a
 * key ring that names every key allowed to have written the trail.
 * @module
 */
import { createPublicKey, generateKeyPairSync, type KeyObject, sign, verify } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readConfigFile } from "../../common/config.js";
import { DecisionKeyRing } from "../../common/decision.js";
import { AirlockError, Code } from "../../common/errors.js";

/**
 * What a signature is over is prefixed with its purpose, so a signature made for
 * one kind of message (an event, a checkpoint, a decision) never verifies as
 * another, even when a replica uses one key for all of them.
 */
export const signatureContexts = {
  event: "airlock.audit.event.v1\n",
  checkpoint: "airlock.audit.checkpoint.v1\n",
} as const;

/** The key a broker replica signs its audit events and checkpoints with. */
export interface AuditSigner {
  /** Travels in each event's and checkpoint's `key_id`; verifiers look the public key up by it. */
  readonly keyId: string;
  /** An Ed25519 private key. */
  readonly privateKey: KeyObject;
}

/**
 * Signs a hash for a purpose.
 * @throws AirlockError `invalid_argument` if the key is not an Ed25519 private key.
 */
export function signHash(context: keyof typeof signatureContexts, hash: Uint8Array, signer: AuditSigner): Uint8Array {
  if (signer.privateKey.type !== "private" || signer.privateKey.asymmetricKeyType !== "ed25519") {
    throw new AirlockError(Code.InvalidArgument, `audit signing key ${JSON.stringify(signer.keyId)} is not an Ed25519 private key`, { details: { keyId: signer.keyId } });
  }
  return new Uint8Array(sign(null, Buffer.concat([Buffer.from(signatureContexts[context]), hash]), signer.privateKey));
}

/** Why a signature was not accepted. */
export type SignatureProblem = "unsigned" | "unknown_key" | "retired_key" | "bad_signature";

/** One trusted key: its public half and, once rotated out, the time after which nothing it signs is accepted. */
interface RingEntry {
  readonly key: KeyObject;
  readonly retiredAt: Date | undefined;
}

/**
 * The public keys that may have written the audit trail, by key id. Rotation:
 * add the new key, switch the replica to it, and give the old key a
 * `retired_at`, so a key stolen later cannot sign events dated after it.
 */
export class AuditKeyRing {
  readonly #keys: ReadonlyMap<string, RingEntry>;

  private constructor(keys: ReadonlyMap<string, RingEntry>) {
    this.#keys = keys;
  }

  /**
   * A ring from SPKI PEM public keys by key id, with optional retirement times.
   * @throws AirlockError `invalid_argument` naming the key id for a key that is not an Ed25519 public key.
   */
  static fromPem(keys: Readonly<Record<string, string>>, retired: Readonly<Record<string, Date>> = {}): AuditKeyRing {
    const ring = DecisionKeyRing.fromPem(keys, "audit key");
    return new AuditKeyRing(new Map(ring.keyIds().map((keyId) => [keyId, { key: ring.get(keyId) as KeyObject, retiredAt: retired[keyId] }])));
  }

  /** The ring of one signer's public key: what a replica knows without a ring file. */
  static ofSigner(signer: AuditSigner): AuditKeyRing {
    return new AuditKeyRing(new Map([[signer.keyId, { key: createPublicKey(signer.privateKey), retiredAt: undefined }]]));
  }

  /**
   * Reads a key ring file:
   * ```yaml
   * keys:
   *   - key_id: broker-2026a
   *     public_key_file: broker-2026a.pub.pem   # relative to this file
   *     retired_at: 2026-12-31T00:00:00Z        # optional
   * ```
   * @throws AirlockError `invalid_argument` naming the field.
   */
  static async load(path: string): Promise<AuditKeyRing> {
    const root = await readConfigFile(path);
    const pems: Record<string, string> = {};
    const retired: Record<string, Date> = {};
    for (const entry of root.list("keys")) {
      const keyId = entry.string("key_id");
      if (pems[keyId] !== undefined) throw entry.fail(`${entry.path}.key_id`, `repeats ${JSON.stringify(keyId)}`);
      const file = entry.file("public_key_file");
      try {
        pems[keyId] = await readFile(file, "utf8");
      } catch (error) {
        throw new AirlockError(Code.InvalidArgument, `${path}: ${entry.path}.public_key_file cannot be read (${file})`, { cause: error, details: { field: `${entry.path}.public_key_file` } });
      }
      const retiredAt = entry.optionalString("retired_at");
      if (retiredAt !== undefined) {
        const at = new Date(retiredAt);
        if (Number.isNaN(at.getTime())) throw entry.fail(`${entry.path}.retired_at`, "must be an RFC 3339 time such as 2026-12-31T00:00:00Z");
        retired[keyId] = at;
      }
      entry.done();
    }
    root.done();
    return AuditKeyRing.fromPem(pems, retired);
  }

  /** The key ids in the ring. */
  keyIds(): string[] {
    return [...this.#keys.keys()];
  }

  /** Why a signature over `hash`, made at `at`, is not acceptable; `undefined` when it is. */
  check(context: keyof typeof signatureContexts, hash: Uint8Array, keyId: string, signature: Uint8Array, at: Date): SignatureProblem | undefined {
    if (keyId === "" || signature.length === 0) return "unsigned";
    const entry = this.#keys.get(keyId);
    if (entry === undefined) return "unknown_key";
    // Written so an unreadable time (NaN) counts as after retirement: a key's retirement must not be dodged by a bad date.
    if (entry.retiredAt !== undefined && !(at.getTime() <= entry.retiredAt.getTime())) return "retired_key";
    try {
      return verify(null, Buffer.concat([Buffer.from(signatureContexts[context]), hash]), entry.key, signature) ? undefined : "bad_signature";
    } catch {
      // A malformed signature can make OpenSSL throw instead of answering false.
      return "bad_signature";
    }
  }
}

/**
 * Makes a replica's audit key: `<dir>/<keyId>.pem` (PKCS#8, mode 0600, for the
 * replica alone) and `<dir>/<keyId>.pub.pem` (SPKI, for every key ring).
 * Refuses to overwrite an existing key.
 * @throws AirlockError `invalid_argument` for a key id that is not a plain name; `already_exists` if the files exist.
 */
export async function writeAuditKey(dir: string, keyId: string): Promise<{ privateKeyFile: string; publicKeyFile: string }> {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/.test(keyId)) throw new AirlockError(Code.InvalidArgument, `key id ${JSON.stringify(keyId)} must be a plain name (letters, digits, . _ -)`);
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const privateKeyFile = join(dir, `${keyId}.pem`);
  const publicKeyFile = join(dir, `${keyId}.pub.pem`);
  try {
    await writeFile(privateKeyFile, privateKey.export({ type: "pkcs8", format: "pem" }), { mode: 0o600, flag: "wx" });
    await writeFile(publicKeyFile, publicKey.export({ type: "spki", format: "pem" }), { mode: 0o644, flag: "wx" });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "EEXIST") throw new AirlockError(Code.AlreadyExists, `a key ${JSON.stringify(keyId)} already exists in ${dir}`, { cause: error });
    throw error;
  }
  return { privateKeyFile, publicKeyFile };
}
