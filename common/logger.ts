import { type Logger, type LoggerOptions, pino } from "pino";

/**
 * Field paths pino removes from every log line, whatever the caller logs:
 * secrets must never reach a log.
 */
export const defaultRedactPaths: readonly string[] = [
  "password",
  "*.password",
  "token",
  "*.token",
  "secret",
  "*.secret",
  "secret_id",
  "*.secret_id",
  "wrapping_token",
  "*.wrapping_token",
  "wrappingToken",
  "*.wrappingToken",
  "client_token",
  "*.client_token",
  "authorization",
  "*.authorization",
  "*.headers.authorization",
  "*.headers.cookie",
];

/** Options of {@link createLogger}. */
export interface CreateLoggerOptions {
  /** The part that logs, e.g. `sidecar`: the `name` field of every line. */
  readonly name: string;
  /** @default process.env.AIRLOCK_LOG_LEVEL ?? "info" */
  readonly level?: string;
  /** Extra paths to redact, on top of {@link defaultRedactPaths}. */
  readonly redact?: readonly string[];
  /** Where lines go. @default standard output */
  readonly destination?: NodeJS.WritableStream;
}

/** A pino logger with Airlock's redaction of secret fields. */
export function createLogger(options: CreateLoggerOptions): Logger {
  const pinoOptions: LoggerOptions = {
    name: options.name,
    level: options.level ?? process.env.AIRLOCK_LOG_LEVEL ?? "info",
    redact: { paths: [...defaultRedactPaths, ...(options.redact ?? [])], censor: "[redacted]" },
  };
  return options.destination === undefined ? pino(pinoOptions) : pino(pinoOptions, options.destination);
}

export type { Logger } from "pino";
