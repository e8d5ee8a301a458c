import { readFile } from "node:fs/promises";
import { dirname, isAbsolute, resolve } from "node:path";
import { parse as parseYaml } from "yaml";
import { parseDuration } from "./duration.js";
import { AirlockError, Code } from "./errors.js";

/**
 * Reads one level of a parsed YAML/JSON config and fails with an
 * `invalid_argument` AirlockError that names the exact field
 * (`upstreams[0].address`) and the file, for every kind of bad input.
 * It reads values as given: `${NAME}` references are expanded before, by
 * {@link readConfigFile} (see {@link expandConfigVariables}).
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

  /** A positive duration (`500ms`, `10s`, `1m`) in ms; `fallback` is a duration text too. */
  duration(key: string, fallback?: string): number {
    const ms = parseDuration(this.string(key, fallback));
    if (ms === undefined || ms <= 0) throw this.fail(this.field(key), "must be a positive duration such as 500ms, 10s or 1m");
    return ms;
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

/** The environment `${NAME}` references are expanded from: variable name → value (unset when undefined). */
export type ConfigEnv = Readonly<Record<string, string | undefined>>;

/** Options of {@link readConfigFile} and {@link expandConfigVariables}. */
export interface ReadConfigOptions {
  /** Where `${NAME}` references are looked up. @default process.env */
  readonly env?: ConfigEnv;
}

const variableName = /^[A-Za-z_][A-Za-z0-9_]*/;

function configFieldPath(parent: string, key: string | number): string {
  if (typeof key === "number") return `${parent}[${key}]`;
  return parent === "" ? key : `${parent}.${key}`;
}

function variableError(source: string, field: string, reason: string, variable?: string): AirlockError {
  return new AirlockError(Code.InvalidArgument, `${source}: ${field === "" ? "the file" : field} ${reason}`, {
    details: { field, source, ...(variable === undefined ? {} : { variable }) },
  });
}

/** Expands the references in one string value; `field` names it in errors. */
function expandString(text: string, env: ConfigEnv, source: string, field: string): string {
  if (!text.includes("$")) return text;
  let result = "";
  let index = 0;
  while (index < text.length) {
    const dollar = text.indexOf("$", index);
    if (dollar < 0) {
      result += text.slice(index);
      break;
    }
    result += text.slice(index, dollar);
    if (text.startsWith("$${", dollar)) {
      // The escape: `$${` is a literal `${`, never a reference.
      result += "${";
      index = dollar + 3;
      continue;
    }
    if (!text.startsWith("${", dollar)) {
      result += "$";
      index = dollar + 1;
      continue;
    }
    const close = text.indexOf("}", dollar + 2);
    if (close < 0) throw variableError(source, field, `has an unterminated \${...} (write $\${ for a literal \${)`);
    const body = text.slice(dollar + 2, close);
    const name = variableName.exec(body)?.[0];
    if (name === undefined) throw variableError(source, field, `has \${${body}}, which is not \${NAME} or \${NAME:-default} (write $\${ for a literal \${)`);
    const rest = body.slice(name.length);
    if (rest !== "" && !rest.startsWith(":-")) throw variableError(source, field, `has \${${body}}, which is not \${NAME} or \${NAME:-default}`, name);
    const fallback = rest === "" ? undefined : rest.slice(2);
    if (fallback?.includes("${") === true) throw variableError(source, field, `has a default for \${${name}} that holds another \${...}: references do not nest`, name);
    const value = env[name];
    if (fallback !== undefined) {
      result += value === undefined || value === "" ? fallback : value;
    } else {
      if (value === undefined) throw variableError(source, field, `uses \${${name}}, but the environment variable ${name} is not set (set it, or give a default: \${${name}:-value})`, name);
      result += value;
    }
    index = close + 1;
  }
  return result;
}

/**
 * Expands environment variable references in every string value of a parsed
 * config (mapping keys are left alone), returning a new value; the input is not changed.
 *
 * - `${NAME}` is the variable's value; an unset variable fails (an empty one is `""`).
 * - `${NAME:-default}` is the default when the variable is unset or empty, as in a shell.
 * - `$${` is a literal `${`; any other `$` is kept as written.
 *
 * The result is always a string, also when the whole value is a reference
 * (`port: ${PORT}` gives the string `"9465"`). References do not nest and are
 * expanded once: a variable's value is never expanded again.
 * @param source - the file the value came from, for errors
 * @throws AirlockError with `Code.InvalidArgument` and `details: { field, source, variable? }`,
 * where `field` is the path of the value (`upstreams[0].address`), for an unset variable
 * without a default and for a malformed reference.
 */
export function expandConfigVariables(value: unknown, source: string, options: ReadConfigOptions = {}): unknown {
  const env = options.env ?? process.env;
  const walk = (node: unknown, field: string): unknown => {
    if (typeof node === "string") return expandString(node, env, source, field);
    if (Array.isArray(node)) return node.map((entry: unknown, index) => walk(entry, configFieldPath(field, index)));
    if (node !== null && typeof node === "object" && [Object.prototype, null].includes(Object.getPrototypeOf(node) as object | null)) {
      const copy: Record<string, unknown> = {};
      for (const [key, entry] of Object.entries(node)) copy[key] = walk(entry, configFieldPath(field, key));
      return copy;
    }
    return node;
  };
  return walk(value, "");
}

/**
 * Reads and parses a YAML file into a {@link ConfigReader} for its top level,
 * after expanding `${NAME}` and `${NAME:-default}` in its string values from the
 * environment ({@link expandConfigVariables}; `$${` is a literal `${`).
 * @throws AirlockError with `Code.InvalidArgument` when the file cannot be read, is
 * not YAML, or references an unset variable without a default (`details.field` names the value).
 */
export async function readConfigFile(path: string, options: ReadConfigOptions = {}): Promise<ConfigReader> {
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
  return new ConfigReader(expandConfigVariables(parsed, path, options), "", path);
}
