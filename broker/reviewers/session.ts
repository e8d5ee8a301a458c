/**
 * Browser sessions that any broker replica can read without shared state:
 * the session is a sealed cookie, AES-256-GCM under a key every replica loads
 * from the same file (`reviewers.sessions.key_file`). Tampering, forging, a
 * cookie of another purpose and an expired session are each refused with a
 * stable `details.reason`.
 * @module
 */
import { createCipheriv, createDecipheriv, createHash, hkdfSync, randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { ConfigReader } from "../../common/config.js";
import { parseDuration } from "../../common/duration.js";
import { AirlockError, Code } from "../../common/errors.js";

/** The `reviewers.sessions` section: how browser sessions are sealed and how long they live. */
export interface SessionConfig {
  /** The file with the sealing key every replica shares (32+ random bytes; hex or base64 text, or raw). */
  readonly keyFile: string;
  /** Older keys still accepted for reading (rotation); sessions are always sealed with `keyFile`. */
  readonly previousKeyFiles: readonly string[];
  /** How long a session lives after sign-in, whatever the provider's tokens say. @default 8h */
  readonly maxAgeMs: number;
}

/** Defaults of {@link SessionConfig}. */
export const sessionDefaults = { maxAge: "8h", minKeyBytes: 32 } as const;

/** Validates a `reviewers.sessions` section; every error names the field. */
export function parseSessionConfig(reader: ConfigReader): SessionConfig {
  const keyFile = reader.file("key_file");
  const previousKeyFiles = reader.has("previous_key_files") ? reader.files("previous_key_files") : (reader.optionalString("previous_key_files"), []);
  const maxAgeText = reader.string("max_age", sessionDefaults.maxAge);
  const maxAgeMs = parseDuration(maxAgeText);
  if (maxAgeMs === undefined || maxAgeMs < 1000 || maxAgeMs > 30 * 24 * 3_600_000) throw reader.fail(`${reader.path}.max_age`, "must be a duration from 1s to 720h, such as 8h");
  reader.done();
  return { keyFile, previousKeyFiles, maxAgeMs };
}

/** Reads a key file: hex or base64 text, else raw bytes; at least 32 bytes. Errors name `field`, never the key. */
export async function readSessionKey(file: string, field: string): Promise<Buffer> {
  let raw: Buffer;
  try {
    raw = await readFile(file);
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `cannot read the session key file ${file}`, { cause: error, details: { field } });
  }
  const text = raw.toString("utf8").trim();
  const key = /^[0-9a-fA-F]+$/.test(text) && text.length % 2 === 0 ? Buffer.from(text, "hex") : /^[A-Za-z0-9+/_=-]+$/.test(text) ? Buffer.from(text, "base64") : raw;
  if (key.length < sessionDefaults.minKeyBytes) throw new AirlockError(Code.InvalidArgument, `the session key in ${file} is shorter than ${sessionDefaults.minKeyBytes} bytes (make one with: openssl rand -hex 32)`, { details: { field } });
  return key;
}

function unauthenticated(reason: string, message: string): AirlockError {
  return new AirlockError(Code.Unauthenticated, message, { details: { reason } });
}

/**
 * Seals and opens small JSON values with AES-256-GCM. Each purpose (the
 * session, the sign-in transaction) gets its own subkey (HKDF) and is bound
 * as additional data, so a value sealed for one cannot be used as the other.
 */
export class Sealer {
  private readonly keys: readonly Buffer[];

  /** @param keys - the current key first, then older keys still accepted for opening */
  constructor(keys: readonly Buffer[]) {
    if (keys.length === 0) throw new AirlockError(Code.InvalidArgument, "no session key");
    this.keys = keys;
  }

  private subkey(key: Buffer, purpose: string): Buffer {
    return Buffer.from(hkdfSync("sha256", key, Buffer.alloc(0), `airlock ${purpose} v1`, 32));
  }

  /** `v1.<base64url(iv | ciphertext | tag)>`. */
  seal(purpose: string, value: unknown): string {
    const iv = randomBytes(12);
    const cipher = createCipheriv("aes-256-gcm", this.subkey(this.keys[0] as Buffer, purpose), iv);
    cipher.setAAD(Buffer.from(purpose));
    const body = Buffer.concat([cipher.update(JSON.stringify(value), "utf8"), cipher.final()]);
    return `v1.${Buffer.concat([iv, body, cipher.getAuthTag()]).toString("base64url")}`;
  }

  /** The value sealed for `purpose`, or an `unauthenticated` error with reason `bad_session` (forged, tampered, other purpose, unknown key). */
  open(purpose: string, sealed: string): unknown {
    const bad = () => unauthenticated("bad_session", "the session cookie is not valid; sign in again");
    if (!sealed.startsWith("v1.")) throw bad();
    const bytes = Buffer.from(sealed.slice(3), "base64url");
    if (bytes.length < 12 + 16 + 2) throw bad();
    const iv = bytes.subarray(0, 12);
    const tag = bytes.subarray(bytes.length - 16);
    const body = bytes.subarray(12, bytes.length - 16);
    for (const key of this.keys) {
      try {
        const decipher = createDecipheriv("aes-256-gcm", this.subkey(key, purpose), iv);
        decipher.setAAD(Buffer.from(purpose));
        decipher.setAuthTag(tag);
        const text = Buffer.concat([decipher.update(body), decipher.final()]).toString("utf8");
        return JSON.parse(text) as unknown;
      } catch {
        // Try the next (older) key.
      }
    }
    throw bad();
  }
}

/** A signed-in reviewer's browser session, as sealed in the cookie. */
export interface BrowserSession {
  /** Random id: the CSRF token is derived from it. */
  readonly sid: string;
  /** The reviewer id (the provider's reviewer claim). */
  readonly reviewer: string;
  readonly groups: readonly string[];
  /** Signed in at (ms since the epoch). */
  readonly iat: number;
  /** Ends at (ms), fixed at sign-in from `sessions.max_age`; a refresh never moves it. */
  readonly exp: number;
  /** When the provider's tokens expire and a refresh is due (ms); absent when there is nothing to refresh. */
  readonly refreshAt?: number;
  /** The provider's refresh token, when it issued one (sealed with the rest, never readable by the browser). */
  readonly refreshToken?: string;
  /**
   * When the person last entered their credentials at the provider (ms): the ID token's
   * `auth_time`, else the sign-in's time. Absent in sessions sealed before it existed.
   */
  readonly authAt?: number;
  /** How this session was made: `sso`, or `dev_token` (dev mode's pasted token). */
  readonly via: "sso" | "dev_token";
}

/** The sealing purpose of the session cookie. */
export const sessionPurpose = "session";

/** Opens and checks a session cookie: `bad_session` when not ours or malformed, `session_expired` past its end. */
export function openSession(sealer: Sealer, sealed: string, now = Date.now()): BrowserSession {
  const value = sealer.open(sessionPurpose, sealed) as Partial<BrowserSession> | null;
  if (value === null || typeof value !== "object" || typeof value.sid !== "string" || typeof value.reviewer !== "string" || typeof value.exp !== "number" || typeof value.iat !== "number" || !Array.isArray(value.groups)) {
    throw unauthenticated("bad_session", "the session cookie is not valid; sign in again");
  }
  if (value.exp <= now) throw unauthenticated("session_expired", "your session has ended; sign in again");
  return value as BrowserSession;
}

/** The CSRF token of a sealed session: derived from its secret id, so any replica can check it. */
export function sessionCsrfToken(session: BrowserSession): string {
  return createHash("sha256").update(`airlock csrf ${session.sid}`).digest("hex");
}

/** A new session id. */
export function newSessionId(): string {
  return randomBytes(18).toString("base64url");
}
