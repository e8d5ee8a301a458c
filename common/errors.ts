/**
 * The one closed set of error codes every Airlock part uses. The numbers are
 * the gRPC status codes, so an error crosses a gRPC boundary unchanged.
 */
export const Code = {
  Canceled: 1,
  Unknown: 2,
  InvalidArgument: 3,
  DeadlineExceeded: 4,
  NotFound: 5,
  AlreadyExists: 6,
  PermissionDenied: 7,
  ResourceExhausted: 8,
  FailedPrecondition: 9,
  Aborted: 10,
  OutOfRange: 11,
  Unimplemented: 12,
  Internal: 13,
  Unavailable: 14,
  DataLoss: 15,
  Unauthenticated: 16,
} as const;

/** One of the values of {@link Code}. */
export type Code = (typeof Code)[keyof typeof Code];

const codeNames: ReadonlyMap<Code, string> = new Map(
  Object.entries(Code).map(([key, value]) => [value, key.replace(/[A-Z]/g, (c, i: number) => (i === 0 ? c : `_${c}`)).toLowerCase()]),
);

/** The stable, machine-readable name of a code, e.g. `permission_denied`: what HTTP error bodies carry. */
export function codeName(code: Code): string {
  return codeNames.get(code) ?? "unknown";
}

/** The code with the given stable name, or `undefined` if there is none. */
export function codeFromName(name: string): Code | undefined {
  for (const [code, candidate] of codeNames) if (candidate === name) return code;
  return undefined;
}

/** Whether a number is one of the codes in {@link Code}. */
export function isCode(value: unknown): value is Code {
  return typeof value === "number" && codeNames.has(value as Code);
}

const httpStatuses: Readonly<Record<Code, number>> = {
  [Code.Canceled]: 499,
  [Code.Unknown]: 500,
  [Code.InvalidArgument]: 422,
  [Code.DeadlineExceeded]: 504,
  [Code.NotFound]: 404,
  [Code.AlreadyExists]: 409,
  [Code.PermissionDenied]: 403,
  [Code.ResourceExhausted]: 429,
  [Code.FailedPrecondition]: 409,
  [Code.Aborted]: 409,
  [Code.OutOfRange]: 400,
  [Code.Unimplemented]: 501,
  [Code.Internal]: 500,
  [Code.Unavailable]: 503,
  [Code.DataLoss]: 500,
  [Code.Unauthenticated]: 401,
};

/** The HTTP status an HTTP API answers with for a code. */
export function httpStatusFor(code: Code): number {
  return httpStatuses[code];
}

const retryableCodes: ReadonlySet<Code> = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Aborted, Code.ResourceExhausted, Code.Unknown]);

/** Options of {@link AirlockError}. */
export interface AirlockErrorOptions {
  /** The error that caused this one. */
  readonly cause?: unknown;
  /** Structured facts for callers and logs (a request id, a field name). Never a secret. */
  readonly details?: Readonly<Record<string, unknown>>;
}

/**
 * The one error class of Airlock: a {@link Code}, a human message, the cause, and
 * structured details. Modelled on connect-es `ConnectError`: `message` carries the
 * code's name as a prefix, `rawMessage` the message alone.
 */
export class AirlockError extends Error {
  /** The status code; the gRPC code when the error crosses gRPC. */
  readonly code: Code;
  /** The message without the `[code]` prefix. */
  readonly rawMessage: string;
  /** Structured facts about the failure. Never a secret. */
  readonly details: Readonly<Record<string, unknown>>;
  override readonly cause: unknown;
  override name = "AirlockError";

  constructor(code: Code, message: string, options: AirlockErrorOptions = {}) {
    super(message.length > 0 ? `[${codeName(code)}] ${message}` : `[${codeName(code)}]`);
    Object.setPrototypeOf(this, new.target.prototype);
    this.code = code;
    this.rawMessage = message;
    this.cause = options.cause;
    this.details = options.details ?? {};
  }

  /**
   * Turns any thrown value into an AirlockError. An AirlockError is returned as
   * is; anything else is wrapped with `fallbackCode` and kept as the cause.
   * @param fallbackCode - @default Code.Unknown
   */
  static from(reason: unknown, fallbackCode: Code = Code.Unknown): AirlockError {
    if (reason instanceof AirlockError) return reason;
    if (reason instanceof Error) return new AirlockError(fallbackCode, reason.message, { cause: reason });
    return new AirlockError(fallbackCode, String(reason), { cause: reason });
  }

  /**
   * Whether trying the same thing again can help: the failure was in reaching or
   * waiting for something (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED,
   * RESOURCE_EXHAUSTED), or it is not classified (UNKNOWN). Bad input, refused
   * rights and broken invariants fail the same way every time.
   */
  get retryable(): boolean {
    return retryableCodes.has(this.code);
  }

  /** A plain JSON form for HTTP bodies and logs: code name, message, details. */
  toJSON(): { code: string; message: string; details: Readonly<Record<string, unknown>> } {
    return { code: codeName(this.code), message: this.rawMessage, details: this.details };
  }
}
