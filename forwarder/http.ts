import { readFile } from "node:fs/promises";
import { Agent as HttpAgent, request as httpRequest } from "node:http";
import { Agent as HttpsAgent, request as httpsRequest } from "node:https";
import type { ConnectionOptions } from "node:tls";
import { AirlockError, Code } from "../common/errors.js";
import type { SinkTlsConfig } from "./config.js";

/** The TLS options of a sink, with its files read. */
export async function loadTlsOptions(tls: SinkTlsConfig | undefined, field: string): Promise<ConnectionOptions> {
  if (tls === undefined) return {};
  const read = async (file: string | undefined, key: string) => {
    if (file === undefined) return undefined;
    try {
      return await readFile(file);
    } catch (error) {
      throw new AirlockError(Code.FailedPrecondition, `cannot read ${file}`, { cause: error, details: { field: `${field}.tls.${key}` } });
    }
  };
  const [ca, cert, key] = await Promise.all([read(tls.caFile, "ca_file"), read(tls.certFile, "cert_file"), read(tls.keyFile, "key_file")]);
  return { ...(ca === undefined ? {} : { ca }), ...(cert === undefined ? {} : { cert }), ...(key === undefined ? {} : { key }), ...(tls.serverName === undefined ? {} : { servername: tls.serverName }) };
}

/** An HTTP answer: the status and the body as text. */
export interface HttpAnswer {
  readonly status: number;
  readonly text: string;
}

/**
 * POSTs to one receiver over a keep-alive connection pool of its own, with the
 * sink's CA (Node's `fetch` takes no CA without another dependency). Redirects
 * are not followed: a token or a signed body goes only where it was configured.
 */
export class HttpPoster {
  private readonly url: URL;
  private readonly agent: HttpAgent | HttpsAgent;
  /** What is being called, for errors: the sink's name and the URL's origin, never its path or a token. */
  readonly what: string;

  constructor(url: string, tls: ConnectionOptions, what: string) {
    this.url = new URL(url);
    this.agent = this.url.protocol === "https:" ? new HttpsAgent({ keepAlive: true, ...tls }) : new HttpAgent({ keepAlive: true });
    this.what = `${what} (${this.url.origin})`;
  }

  /**
   * Sends `body`; resolves with any answer (the caller judges the status).
   * @throws AirlockError `unavailable` when no answer came (refused, reset:
   * only the error code is kept), `deadline_exceeded` when `signal` aborted it.
   */
  post(body: string, headers: Readonly<Record<string, string>>, signal: AbortSignal): Promise<HttpAnswer> {
    const send = this.url.protocol === "https:" ? httpsRequest : httpRequest;
    return new Promise((resolve, reject) => {
      const fail = (error: unknown) => {
        if (signal.aborted) return reject(new AirlockError(Code.DeadlineExceeded, `${this.what}: no answer in time (or shutting down)`));
        const code = (error as { code?: unknown }).code;
        reject(new AirlockError(Code.Unavailable, `${this.what}: ${typeof code === "string" ? code : "network error"}`));
      };
      const request = send(
        this.url,
        { method: "POST", agent: this.agent, signal, headers: { "content-type": "application/json; charset=utf-8", "content-length": String(Buffer.byteLength(body)), ...headers } },
        (response) => {
          // A receiver's answer is read to its end (the connection is reused) but kept only up to a bound.
          const chunks: Buffer[] = [];
          let kept = 0;
          response.on("data", (chunk: Buffer) => {
            if (kept >= httpAnswerLimitBytes) return;
            chunks.push(chunk.subarray(0, httpAnswerLimitBytes - kept));
            kept += Math.min(chunk.length, httpAnswerLimitBytes - kept);
          });
          response.once("error", fail);
          response.once("end", () => resolve({ status: response.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }));
        },
      );
      request.once("error", fail);
      request.end(body);
    });
  }

  /** Closes the pooled connections. */
  close(): void {
    this.agent.destroy();
  }
}

/** How much of a receiver's answer is kept (its status and a short excerpt are all that are used). */
export const httpAnswerLimitBytes = 64 * 1024;

/** A short, one-line excerpt of a receiver's answer for an error message. */
export function excerpt(text: string): string {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > 200 ? `${flat.slice(0, 200)}…` : flat;
}

/**
 * The error for a non-2xx answer: 5xx, 408 and 429 are retryable (`unavailable`,
 * `resource_exhausted`); 401 is `unauthenticated`, 403 `permission_denied`, 400
 * `invalid_argument`, any other `failed_precondition`: none of those gets better
 * by sending the same batch again, so the sink stops rather than skip it.
 */
export function httpFailure(what: string, answer: HttpAnswer, extra: Readonly<Record<string, unknown>> = {}): AirlockError {
  const message = `${what}: HTTP ${answer.status}${answer.text === "" ? "" : ` ${excerpt(answer.text)}`}`;
  const details = { status: answer.status, ...extra };
  if (answer.status === 429) return new AirlockError(Code.ResourceExhausted, message, { details });
  if (answer.status >= 500 || answer.status === 408) return new AirlockError(Code.Unavailable, message, { details });
  if (answer.status === 401) return new AirlockError(Code.Unauthenticated, message, { details });
  if (answer.status === 403) return new AirlockError(Code.PermissionDenied, message, { details });
  if (answer.status === 400) return new AirlockError(Code.InvalidArgument, message, { details });
  return new AirlockError(Code.FailedPrecondition, message, { details });
}
