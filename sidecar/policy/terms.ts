import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { type CredentialTemplate, CredentialTemplateSchema, type ReviewerRequirement, ReviewerRequirementSchema, Risk, type StepUpRequirement, StepUpRequirementSchema } from "../../proto/index.js";
import type { ApproveSpec } from "./types.js";

const risks: Record<ApproveSpec["risk"], Risk> = { low: Risk.LOW, medium: Risk.MEDIUM, high: Risk.HIGH, critical: Risk.CRITICAL };

/** What an `approve` rule asks for, as an ApprovalRequest carries it. */
export interface ApprovalTerms {
  readonly risk: Risk;
  /** The rule's description: why the call is held ("" when the rule has none). */
  readonly ruleDescription: string;
  readonly reviewers: ReviewerRequirement;
  readonly credential: CredentialTemplate;
  /** Whether the rule asks for step-up to approve, and the `acr` a fresh sign-in must carry. */
  readonly stepUp: StepUpRequirement;
}

/**
 * The risk, reviewer requirement and credential template of an `approve` rule,
 * as protobuf messages. The sidecar puts them in its request; the broker builds
 * them again from its own copy of the policy and uses those, never the message's.
 */
export function approvalTerms(approve: ApproveSpec): ApprovalTerms {
  const credential = approve.credential;
  return {
    risk: risks[approve.risk],
    ruleDescription: approve.description,
    reviewers: create(ReviewerRequirementSchema, {
      allOf: approve.reviewers.allOf.map((g) => ({ group: g.group, minApprovals: g.minApprovals })),
      escalationGroup: approve.reviewers.escalation?.group ?? "",
      ...(approve.reviewers.escalation === undefined ? {} : { escalateAfter: durationFromMs(approve.reviewers.escalation.afterMs) }),
      breakGlassAllowed: approve.reviewers.breakGlass,
    }),
    credential: create(CredentialTemplateSchema, {
      kind:
        credential.kind === "database"
          ? { case: "database", value: { mount: credential.mount, role: credential.role } }
          : { case: "vaultToken", value: { policies: [...credential.policies], numUses: credential.numUses } },
      ttl: durationFromMs(credential.ttlMs),
      injectHeader: credential.injectHeader,
      description: credential.description,
    }),
    stepUp: create(StepUpRequirementSchema, { required: approve.stepUp !== undefined, acr: approve.stepUp?.acr ?? "" }),
  };
}
