/** A per-key token bucket: `perMinute` requests a minute, with bursts up to the same number. */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(private readonly perMinute: number) {}

  /**
   * Takes one token for `key`; undefined when allowed, else the seconds to wait.
   * Idle buckets are forgotten, so memory stays bounded by active reviewers.
   */
  take(key: string, now = Date.now()): number | undefined {
    const rate = this.perMinute / 60_000;
    const bucket = this.buckets.get(key) ?? { tokens: this.perMinute, at: now };
    bucket.tokens = Math.min(this.perMinute, bucket.tokens + (now - bucket.at) * rate);
    bucket.at = now;
    if (this.buckets.size > 10_000) this.forgetFull(now);
    this.buckets.set(key, bucket);
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return undefined;
    }
    return Math.max(1, Math.ceil((1 - bucket.tokens) / rate / 1000));
  }

  private forgetFull(now: number): void {
    const rate = this.perMinute / 60_000;
    for (const [key, bucket] of this.buckets) if (bucket.tokens + (now - bucket.at) * rate >= this.perMinute) this.buckets.delete(key);
  }
}
