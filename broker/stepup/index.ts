/**
 * Step-up bound to the action: an approval that needs more than a sign-in (the rule's
 * `approve.step_up`, a risk at or over `reviewers.step_up.min_risk`, any break-glass) is
 * confirmed with a passkey assertion, or a fresh OIDC sign-in, over a challenge derived
 * from the request's hash and the verdict. See docs/architecture.md.
 * @module
 */
export { type ChallengeInput, stepUpChallenge, stepUpDomain } from "./challenge.js";
export { parseStepUpConfig, type StepUpCause, type StepUpConfig, stepUpDefaults, type StepUpNeed, stepUpNeed } from "./config.js";
export { ensurePasskeyBucket, ensureSingleUseBucket, judgeReauthentication, type PasskeyView, type StepUpChallengeView, type StepUpRefusal, StepUpService } from "./service.js";
