/**
 * What an action touched, as its upstream reports it in the `airlock-touched`
 * response trailer: parsed at the sidecar, bounded again at the broker (a
 * completion comes from an agent's host), recorded in the completion event.
 * One owner for the format and its limits.
 * @module
 */

/** The response trailer an upstream reports what an action touched in: `rows=3; table=customers`. */
export const touchedTrailer = "airlock-touched";

/** Bounds on a touched report: it is evidence, not a data channel. */
export const touchedLimits = { maxBytes: 512, maxPairs: 16, maxKey: 32, maxValue: 128 } as const;

const keyPattern = new RegExp(`^[a-z0-9_]{1,${touchedLimits.maxKey}}$`);

/**
 * What an upstream says an action touched, from its `airlock-touched` trailer:
 * `key=value` pairs separated by `;`, keys of lowercase letters, digits and
 * `_` (at most 32), values trimmed and cut at 128 characters. Anything past
 * {@link touchedLimits} or not of that form is left out, and a `truncated` key says so.
 */
export function parseTouched(value: string): Record<string, string> {
  const touched: Record<string, string> = {};
  let truncated = value.length > touchedLimits.maxBytes;
  for (const part of value.slice(0, touchedLimits.maxBytes).split(";")) {
    if (part.trim() === "") continue;
    const match = /^\s*([^=]*?)\s*=\s*(.*?)\s*$/.exec(part);
    const key = match?.[1];
    if (key === undefined || !keyPattern.test(key) || key === "truncated" || Object.keys(touched).length >= touchedLimits.maxPairs) {
      truncated = true;
      continue;
    }
    touched[key] = (match?.[2] ?? "").slice(0, touchedLimits.maxValue);
  }
  if (truncated) touched.truncated = "true";
  return touched;
}

/**
 * A touched map as it arrived in a completion, bounded as {@link parseTouched}
 * bounds a trailer: keys of the allowed form, at most 16 pairs, values capped,
 * and `truncated: "true"` when anything was left out here or before (the marker
 * itself is never what gets cut).
 */
export function boundTouched(touched: Readonly<Record<string, string>>): Record<string, string> {
  const pairs = Object.entries(touched).filter(([key]) => key !== "truncated");
  const valid = pairs.filter(([key]) => keyPattern.test(key));
  const kept: Record<string, string> = Object.fromEntries(valid.slice(0, touchedLimits.maxPairs).map(([key, value]) => [key, value.slice(0, touchedLimits.maxValue)]));
  if (valid.length !== pairs.length || valid.length > touchedLimits.maxPairs || touched.truncated !== undefined) kept.truncated = "true";
  return kept;
}
