import { readFile } from "node:fs/promises";
import { dirname, isAbsolute, resolve } from "node:path";
import { parse as parseYaml } from "yaml";
import { AirlockError, Code } from "./errors.js";

/**
 * Reads one level of a parsed YAML/JSON config and fails with an
 * `invalid_argument` AirlockError that names the exact field
 * (`upstreams[0].address`) and the file, for every kind of bad input.
 */
export class ConfigReader {
  readonly path: string;
  readonly source: string;
  private readonly value: Readonly<Record<string, unknown>>;
  private readonly seen = new Set<string>();

  constructor(value: unknown, path: string, source: string) {
    this.path = path;
    this.source = source;
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw this.fail(path, "must be a mapping");
    this.value = value as Record<string, unknown>;
  }

  /** The error for a bad field under this reader. */
  fail(field: string, reason: string): AirlockError {
    return new AirlockError(Code.InvalidArgument, `${this.source}: ${field === "" ? "the file" : field} ${reason}`, { details: { field, source: this.source } });
  }

  private field(key: string): string {
    return this.path === "" ? key : `${this.path}.${key}`;
  }

  private raw(key: string): unknown {
    this.seen.add(key);
    return this.value[key];
  }

  /** Whether the key is present. */
  has(key: string): boolean {
    return this.value[key] !== undefined && this.value[key] !== null;
  }

  string(key: string, fallback?: string): string {
    const value = this.raw(key);
    if (value === undefined || value === null) {
      if (fallback !== undefined) return fallback;
      throw this.fail(this.field(key), "is required");
    }
    if (typeof value !== "string" || value === "") throw this.fail(this.field(key), "must be a non-empty string");
    return value;
  }

  optionalString(key: string): string | undefined {
    return this.has(key) ? this.string(key) : (this.raw(key), undefined);
  }

  integer(key: string, fallback: number, min = 0, max = Number.MAX_SAFE_INTEGER): number {
    const value = this.raw(key);
    if (value === undefined || value === null) return fallback;
    if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) throw this.fail(this.field(key), `must be a whole number from ${min} to ${max}`);
    return value;
  }

  boolean(key: string, fallback: boolean): boolean {
    const value = this.raw(key);
    if (value === undefined || value === null) return fallback;
    if (typeof value !== "boolean") throw this.fail(this.field(key), "must be true or false");
    return value;
  }

  oneOf<T extends string>(key: string, choices: readonly T[], fallback?: T): T {
    const value = fallback === undefined ? this.string(key) : this.string(key, fallback);
    if (!(choices as readonly string[]).includes(value)) throw this.fail(this.field(key), `must be one of ${choices.join(", ")}`);
    return value as T;
  }

  /** A `host:port` address. */
  address(key: string, fallback?: string): ListenAddress {
    const text = this.string(key, fallback);
    const parsed = parseAddress(text);
    if (parsed === undefined) throw this.fail(this.field(key), "must be host:port");
    return parsed;
  }

  /** A file path, resolved against the config file's directory. */
  file(key: string): string {
    const value = this.string(key);
    return isAbsolute(value) ? value : resolve(dirname(this.source), value);
  }

  /** A list of file paths, each resolved against the config file's directory. */
  files(key: string): string[] {
    return this.strings(key).map((value) => (isAbsolute(value) ? value : resolve(dirname(this.source), value)));
  }

  optionalFile(key: string): string | undefined {
    return this.has(key) ? this.file(key) : (this.raw(key), undefined);
  }

  strings(key: string, fallback?: readonly string[]): string[] {
    const value = this.raw(key);
    if ((value === undefined || value === null) && fallback !== undefined) return [...fallback];
    if (!Array.isArray(value) || value.some((entry) => typeof entry !== "string" || entry === "")) throw this.fail(this.field(key), "must be a list of non-empty strings");
    return value as string[];
  }

  object(key: string): ConfigReader {
    return new ConfigReader(this.raw(key), this.field(key), this.source);
  }

  optionalObject(key: string): ConfigReader | undefined {
    return this.has(key) ? this.object(key) : (this.raw(key), undefined);
  }

  list(key: string, required = true): ConfigReader[] {
    const value = this.raw(key);
    if ((value === undefined || value === null) && !required) return [];
    if (!Array.isArray(value) || (required && value.length === 0)) throw this.fail(this.field(key), "must be a non-empty list");
    return value.map((entry, index) => new ConfigReader(entry, `${this.field(key)}[${index}]`, this.source));
  }

  /** A mapping of names to strings. */
  stringMap(key: string): Record<string, string> {
    const reader = this.object(key);
    const result: Record<string, string> = {};
    for (const name of reader.keys()) result[name] = reader.string(name);
    return result;
  }

  keys(): string[] {
    return Object.keys(this.value);
  }

  /** Fails on any key that was never read: a typo must not be silently ignored. */
  done(): void {
    for (const key of Object.keys(this.value)) {
      if (!this.seen.has(key)) throw this.fail(this.field(key), "is not a known setting");
    }
  }
}

/** A parsed `host:port`. */
export interface ListenAddress {
  readonly host: string;
  readonly port: number;
  readonly text: string;
}

/** Parses `host:port` (IPv6 hosts in brackets); undefined when it is not one. */
export function parseAddress(text: string): ListenAddress | undefined {
  const match = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(text);
  const port = Number(match?.[2]);
  if (match === null || port > 65535) return undefined;
  return { host: (match[1] ?? "").replace(/^\[|\]$/g, ""), port, text };
}

/** Reads and parses a YAML file into a {@link ConfigReader} for its top level. */
export async function readConfigFile(path: string): Promise<ConfigReader> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `cannot read config file ${path}`, { cause: error, details: { field: "", source: path } });
  }
  let parsed: unknown;
  try {
    parsed = parseYaml(text);
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `${path} is not valid YAML: ${(error as Error).message}`, { cause: error, details: { field: "", source: path } });
  }
  return new ConfigReader(parsed, "", path);
}
