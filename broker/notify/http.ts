import { AirlockError, Code } from "../../common/errors.js";

/** HTTP headers as Node and Fastify give them (names lower-case). */
export type HeaderMap = Readonly<Record<string, string | string[] | undefined>>;

/** One header's single value; a repeated header is refused rather than guessed at. */
export function headerValue(headers: HeaderMap, name: string): string | undefined {
  const value = headers[name] ?? Object.entries(headers).find(([key]) => key.toLowerCase() === name)?.[1];
  if (Array.isArray(value)) return value.length === 1 ? value[0] : undefined;
  return value;
}

/** The answer of a receiver that accepted a POST (2xx). */
export interface HttpReply {
  readonly status: number;
  /** The body as text (already read, so the connection is free for reuse). */
  readonly text: string;
}

/** Options of {@link postJson}. */
export interface PostOptions {
  /**
   * What is being called, for error messages, e.g. `slack chat.postMessage`. Error
   * messages never contain the URL: a webhook URL's path is a secret.
   */
  readonly what: string;
  /** Aborts the request (the delivery queue's per-attempt timeout and `close()`). */
  readonly signal: AbortSignal;
  /** Extra headers; `content-type: application/json` is set unless given. */
  readonly headers?: Readonly<Record<string, string>>;
}

/** Whether a delivery error is worth another attempt (the receiver or the network may recover). */
export function isRetryable(error: AirlockError): boolean {
  return error.code === Code.Unavailable || error.code === Code.ResourceExhausted || error.code === Code.DeadlineExceeded;
}

/** Milliseconds a `Retry-After` header asks for (seconds or an HTTP date), or undefined. */
function retryAfterMs(header: string | null, now: number): number | undefined {
  if (header === null) return undefined;
  if (/^\d+$/.test(header.trim())) return Number(header.trim()) * 1000;
  const date = Date.parse(header);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

function snippet(text: string): string {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > 200 ? `${flat.slice(0, 200)}…` : flat;
}

/**
 * POSTs a body (JSON-encoded unless already a string) and classifies failure as an
 * AirlockError: network errors and 5xx / 408 are `unavailable`, 429 is
 * `resource_exhausted` (with `details.retryAfterMs`), an aborted request is
 * `deadline_exceeded` (all three retryable, see {@link isRetryable}); any other
 * non-2xx, redirects included, is `failed_precondition`. Redirects are not followed:
 * a signed body or a token must not be replayed to a host nobody configured.
 */
export async function postJson(url: string, body: unknown, options: PostOptions): Promise<HttpReply> {
  let response: Response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json; charset=utf-8", ...options.headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
      redirect: "manual",
      signal: options.signal,
    });
  } catch (error) {
    if (options.signal.aborted) throw new AirlockError(Code.DeadlineExceeded, `${options.what}: no answer in time (or shutting down)`);
    // Only the error code (ECONNREFUSED, …) is kept: the cause could mention the URL.
    const cause = (error as { cause?: { code?: unknown } }).cause;
    const code = typeof cause?.code === "string" ? cause.code : "network error";
    throw new AirlockError(Code.Unavailable, `${options.what}: ${code}`);
  }
  let text: string;
  try {
    text = await response.text();
  } catch {
    if (options.signal.aborted) throw new AirlockError(Code.DeadlineExceeded, `${options.what}: no answer in time (or shutting down)`);
    throw new AirlockError(Code.Unavailable, `${options.what}: the connection broke while reading the answer`);
  }
  const { status } = response;
  if (status >= 200 && status < 300) return { status, text };
  const message = `${options.what}: HTTP ${status}${text === "" ? "" : ` ${snippet(text)}`}`;
  if (status === 429) {
    const wait = retryAfterMs(response.headers.get("retry-after"), Date.now());
    throw new AirlockError(Code.ResourceExhausted, message, { details: wait === undefined ? { status } : { status, retryAfterMs: wait } });
  }
  if (status >= 500 || status === 408) throw new AirlockError(Code.Unavailable, message, { details: { status } });
  throw new AirlockError(Code.FailedPrecondition, message, { details: { status } });
}

/** What a URL may show in a log: its origin, never its path (where webhook secrets live). */
export function originOf(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return "(invalid URL)";
  }
}
