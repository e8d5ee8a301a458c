/**
 * Reading untrusted JSON payloads (Slack interactions, Teams activities) without
 * trusting their shape.
 * @module
 */

/** Whether `value` is a plain JSON object (not null, not an array). */
export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The string at `path` inside `value`; undefined when a step is missing or not an object, or the leaf is not a string. */
export function stringAt(value: unknown, ...path: string[]): string | undefined {
  let current = value;
  for (const key of path) {
    if (!isRecord(current)) return undefined;
    current = current[key];
  }
  return typeof current === "string" ? current : undefined;
}
