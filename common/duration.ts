const unitMs = { h: 3_600_000, m: 60_000, s: 1_000, ms: 1 } as const;

// Units must appear largest first and at most once ("1h30m", not "30m1h" or "1m1m"):
// an odd spelling in a security policy is more likely a typo than an intent.
const durationPattern = /^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$/;

/**
 * Milliseconds in a duration (policy timeouts and TTLs, broker expiry) such as `90s`, `5m`, `1h`, `1h30m` or `250ms`,
 * or `undefined` when the text is not one (no unit, unknown unit, units out of order, empty).
 */
export function parseDuration(text: string): number | undefined {
  const match = durationPattern.exec(text);
  if (match === null || text.length === 0) return undefined;
  const [, hours, minutes, seconds, millis] = match;
  let total = 0;
  for (const [digits, unit] of [
    [hours, unitMs.h],
    [minutes, unitMs.m],
    [seconds, unitMs.s],
    [millis, unitMs.ms],
  ] as const) {
    if (digits !== undefined) total += Number(digits) * unit;
  }
  return Number.isSafeInteger(total) ? total : undefined;
}
