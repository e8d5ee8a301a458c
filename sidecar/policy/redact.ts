import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { AirlockError, Code } from "../../common/errors.js";
import { policyDefaults } from "./types.js";

function copyJson(value: JsonValue): JsonValue {
  if (Array.isArray(value)) return value.map(copyJson);
  if (value === null || typeof value !== "object") return value;
  // fromEntries defines own properties, so a "__proto__" key stays a key and never becomes a prototype.
  return Object.fromEntries(Object.entries(value).map(([key, field]) => [key, copyJson(field)]));
}

function replaceAt(value: JsonValue | undefined, segments: readonly string[], index: number): boolean {
  if (Array.isArray(value)) {
    let found = false;
    for (const element of value) found = replaceAt(element, segments, index) || found;
    return found;
  }
  const key = segments[index];
  if (value === null || value === undefined || typeof value !== "object" || key === undefined || !Object.hasOwn(value, key)) return false;
  if (index === segments.length - 1) {
    // defineProperty, not assignment: assigning to "__proto__" would leave the own field unredacted.
    Object.defineProperty(value, key, { value: policyDefaults.redactedValue, writable: true, enumerable: true, configurable: true });
    return true;
  }
  return replaceAt(value[key], segments, index + 1);
}

/**
 * A deep copy of `request` with the value at each dotted path replaced by
 * `"[redacted]"`. A path goes through arrays: `items.secret` redacts `secret` in
 * every element of `items` (and of nested arrays). A path naming an object or a list
 * replaces it whole. `request` is not modified.
 *
 * Paths name the keys of the JSON as given (protobuf JSON uses lowerCamelCase names
 * unless the decoder kept the proto names).
 *
 * @returns the copy, and in `removed` each of `paths` that matched at least once, in
 * the order given (so a reviewer sees which redactions applied).
 * @throws AirlockError with `Code.InvalidArgument` for a path with an empty segment.
 */
export function redact(request: JsonObject, paths: readonly string[]): { redacted: JsonObject; removed: string[] } {
  const redacted = copyJson(request) as JsonObject;
  const removed: string[] = [];
  for (const path of paths) {
    const segments = path.split(".");
    if (segments.some((segment) => segment === "")) {
      throw new AirlockError(Code.InvalidArgument, `redaction path ${JSON.stringify(path)} has an empty segment`, { details: { field: path } });
    }
    if (replaceAt(redacted, segments, 0) && !removed.includes(path)) removed.push(path);
  }
  return { redacted, removed };
}
