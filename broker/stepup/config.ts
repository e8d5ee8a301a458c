import type { ConfigReader } from "../../common/config.js";
import { parseDuration } from "../../common/duration.js";
import { type ApprovalRequest, Risk } from "../../proto/index.js";
import { type RiskLevel, riskLevels } from "../rules.js";

/**
 * The `reviewers.step_up` section of the broker config: when approving needs a step-up
 * beyond the sign-in, and how passkeys are checked.
 *
 * ```yaml
 * reviewers:
 *   step_up:
 *     min_risk: high                 # approvals of requests this risky or more need step-up; default: none by risk
 *     rp_id: airlock.example.com     # the WebAuthn relying party id: the console's host name or a parent domain
 *     rp_name: Airlock               # default Airlock
 *     origins: [https://airlock.example.com]   # default: https://<rp_id> on any port (http too for localhost)
 *     challenge_ttl: 5m              # how long a step-up challenge can be answered; default 5m, at most 30m
 *     max_auth_age: 5m               # the OIDC fallback: how long before the challenge a fresh sign-in may be; default 5m
 *     enrol_max_age: 10m             # registering a passkey without confirming with another needs a sign-in this recent; default 10m
 * ```
 */
export interface StepUpConfig {
  /** Approvals of requests at this risk or above need step-up. Absent: risk alone never asks for it. */
  readonly minRisk?: RiskLevel;
  /** The WebAuthn relying party id passkeys are bound to. */
  readonly rpId: string;
  /** The relying party's name shown by authenticators. @default "Airlock" */
  readonly rpName: string;
  /** Origins an assertion may come from. Absent: `https://<rpId>` on any port, and `http://localhost` when the RP id is localhost. */
  readonly origins?: readonly string[];
  /** How long an issued challenge can be answered, in ms. @default 300000 */
  readonly challengeTtlMs: number;
  /** The OIDC fallback: how long before its challenge a re-authentication (`auth_time`) may have happened, in ms. @default 300000 */
  readonly maxAuthAgeMs: number;
  /**
   * Registering a passkey without confirming it with an existing one (the first, or a further one)
   * needs the reviewer's sign-in at the provider at most this old, in ms. @default 600000
   */
  readonly enrolMaxAgeMs: number;
}

/** Defaults and bounds of {@link StepUpConfig}. */
export const stepUpDefaults = {
  rpName: "Airlock",
  challengeTtlMs: 300_000,
  maxAuthAgeMs: 300_000,
  enrolMaxAgeMs: 600_000,
  /** The challenge bucket keeps entries this long; a challenge may not live longer. */
  maxChallengeTtlMs: 30 * 60_000,
  /** Clock skew allowed between the broker and the identity provider, in seconds. */
  clockToleranceSec: 30,
} as const;

function durationOf(reader: ConfigReader, key: string, fallback: number, max: number): number {
  const text = reader.optionalString(key);
  if (text === undefined) return fallback;
  const ms = parseDuration(text);
  const field = reader.path === "" ? key : `${reader.path}.${key}`;
  if (ms === undefined || ms <= 0 || ms > max) throw reader.fail(field, `must be a duration from 1s to ${max / 60_000}m, such as 5m`);
  return ms;
}

/** Validates a `reviewers.step_up` section; every error names the field. */
export function parseStepUpConfig(reader: ConfigReader): StepUpConfig {
  const minRisk = reader.optionalString("min_risk");
  if (minRisk !== undefined && !(riskLevels as readonly string[]).includes(minRisk)) throw reader.fail(`${reader.path}.min_risk`, `must be one of ${riskLevels.join(", ")}`);
  const rpId = reader.string("rp_id");
  if (!/^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$/.test(rpId)) throw reader.fail(`${reader.path}.rp_id`, "must be a host name such as airlock.example.com (no scheme, port or path)");
  const origins = reader.has("origins") ? reader.strings("origins") : (reader.optionalString("origins"), undefined);
  for (const [index, origin] of (origins ?? []).entries()) {
    if (!URL.canParse(origin) || new URL(origin).origin !== origin) throw reader.fail(`${reader.path}.origins[${index}]`, "must be an origin such as https://airlock.example.com");
  }
  const config: StepUpConfig = {
    ...(minRisk === undefined ? {} : { minRisk: minRisk as RiskLevel }),
    rpId,
    rpName: reader.string("rp_name", stepUpDefaults.rpName),
    ...(origins === undefined ? {} : { origins }),
    challengeTtlMs: durationOf(reader, "challenge_ttl", stepUpDefaults.challengeTtlMs, stepUpDefaults.maxChallengeTtlMs),
    maxAuthAgeMs: durationOf(reader, "max_auth_age", stepUpDefaults.maxAuthAgeMs, 24 * 3600_000),
    enrolMaxAgeMs: durationOf(reader, "enrol_max_age", stepUpDefaults.enrolMaxAgeMs, 24 * 3600_000),
  };
  reader.done();
  return config;
}

const riskOrder: Readonly<Record<RiskLevel, Risk>> = { low: Risk.LOW, medium: Risk.MEDIUM, high: Risk.HIGH, critical: Risk.CRITICAL };

/** Why an approval needs step-up: the rule asks, the risk is at or over `min_risk`, or it breaks glass. */
export type StepUpCause = "rule" | "risk" | "break_glass";

/** Whether approving needs step-up, why, and the `acr` a fresh sign-in must carry. */
export interface StepUpNeed {
  readonly required: boolean;
  readonly causes: readonly StepUpCause[];
  /** From the rule (`step_up: { acr }`); `""`: any. */
  readonly acr: string;
}

/**
 * Whether a vote on `request` needs step-up. Only approvals do. The request is the
 * broker's stored copy, whose `step_up` and `risk` the broker set from its own policy
 * at intake; break-glass always needs it.
 */
export function stepUpNeed(request: ApprovalRequest, vote: { readonly approve: boolean; readonly breakGlass?: boolean }, minRisk: RiskLevel | undefined): StepUpNeed {
  if (!vote.approve) return { required: false, causes: [], acr: "" };
  const causes: StepUpCause[] = [];
  if (request.stepUp?.required === true) causes.push("rule");
  if (minRisk !== undefined && request.risk !== Risk.UNSPECIFIED && request.risk >= riskOrder[minRisk]) causes.push("risk");
  if (vote.breakGlass === true) causes.push("break_glass");
  return { required: causes.length > 0, causes, acr: request.stepUp?.acr ?? "" };
}
