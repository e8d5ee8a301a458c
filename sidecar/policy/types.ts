import type { JsonObject } from "@bufbuild/protobuf";

/**
 * What the sidecar does with a call: `allow` forwards it, `deny` answers
 * PERMISSION_DENIED with the rule and reason, `approve` holds it until a human decides.
 */
export type Effect = "allow" | "deny" | "approve";

/** Who is making a call, as the sidecar authenticated it. */
export interface CallIdentity {
  /** The agent's own identity (mTLS subject or token subject). */
  readonly agent: string;
  /** The human the agent acts for; `""` when it acts for nobody. */
  readonly onBehalfOf: string;
  /** The delegation chain, outermost first (e.g. `["alice", "planner-agent", "sql-agent"]`). */
  readonly chain: readonly string[];
  /** How the agent proved its identity. */
  readonly authenticatedBy: "mtls" | "jwt";
}

/** One gRPC call, as policy sees it. */
export interface PolicyCall {
  /** Fully qualified service name, e.g. `demo.v1.OpsService`. */
  readonly service: string;
  /** Method name without the service, e.g. `ExportTable`. */
  readonly method: string;
  /** The host the sidecar runs on. */
  readonly host: string;
  /**
   * The caller. Without one, CEL sees an identity whose strings are `""` and whose
   * chain is empty, so conditions like `identity.on_behalf_of != ""` stay false.
   */
  readonly identity?: CallIdentity | undefined;
  /** The time conditions see as `now`. @default new Date() at evaluation */
  readonly now?: Date | undefined;
  /**
   * The decoded request message as protobuf JSON. Called at most once per
   * evaluation and only when a rule that is reached needs it, so the fast path never
   * decodes. An exception it throws (a malformed message) propagates out of
   * `evaluate`: the caller must answer it as bad input, never forward the call.
   */
  readonly request: () => JsonObject;
}

/** Who must approve an `approve` rule's call. */
export interface ReviewerSpec {
  /** Every group must approve (AND across groups), each with its own number of distinct approvers. */
  readonly allOf: { readonly group: string; readonly minApprovals: number }[];
  /** Who is notified when nobody decided after `afterMs`. */
  readonly escalation?: { readonly group: string; readonly afterMs: number };
  /** Whether an emergency override may approve alone. @default false */
  readonly breakGlass: boolean;
}

/**
 * The per-action credential an approval buys, picked by `kind`:
 * a dynamic database user, or a Vault token with the given policies.
 */
export type CredentialSpec =
  | {
      readonly kind: "database";
      /** Vault database secrets engine mount. */
      readonly mount: string;
      /** Role in that mount. */
      readonly role: string;
      /** Lifetime of the credential. @default 300000 (5m) */
      readonly ttlMs: number;
      /** Metadata header the sidecar puts the credential in. @default "x-airlock-credential" */
      readonly injectHeader: string;
      /** What the credential allows, in plain words (`SELECT on customers`). @default "" */
      readonly description: string;
    }
  | {
      readonly kind: "vault_token";
      /** Vault policies the token carries. */
      readonly policies: string[];
      /** How many Vault requests the token may make. @default 1 */
      readonly numUses: number;
      /** Lifetime of the token. @default 300000 (5m) */
      readonly ttlMs: number;
      /** Metadata header the sidecar puts the token in. @default "x-airlock-credential" */
      readonly injectHeader: string;
      /** What the token allows, in plain words (`rotate the signing keys`). @default "" */
      readonly description: string;
    };

/**
 * What an `approve` rule asks of reviewers and what an approval yields.
 * Shared by every verdict of the rule and frozen: copy before changing. (The arrays
 * are typed mutable so they can initialise protobuf messages directly; protobuf-es
 * keeps such arrays by reference, so a message built from them must not be changed
 * in place either.)
 */
export interface ApproveSpec {
  readonly risk: "low" | "medium" | "high" | "critical";
  /**
   * The rule's `description`: why the call is held, its risk in the policy author's words.
   * Reviewers see it next to the risk. @default ""
   */
  readonly description: string;
  readonly reviewers: ReviewerSpec;
  readonly credential: CredentialSpec;
  /** Dotted request field paths replaced before the request leaves the host (see `redact`). @default [] */
  readonly redact: string[];
  /** Whether the agent must state a reason in the `x-airlock-reason` metadata. @default false */
  readonly requireReason: boolean;
  /** How long the call may wait for a decision. @default 3600000 (1h) */
  readonly timeoutMs: number;
  /**
   * Present when the rule asks for step-up to approve (`step_up: true`, or
   * `step_up: { acr: <value> }`): an approver confirms with a passkey assertion bound to
   * the request and the verdict, or with a fresh sign-in (carrying `acr` when given).
   */
  readonly stepUp?: StepUpSpec;
}

/** A rule's step-up requirement (`approve.step_up`). */
export interface StepUpSpec {
  /** The `acr` a fresh sign-in must carry when it stands in for a passkey; `""`: any. */
  readonly acr: string;
}

/** The outcome of evaluating policy for one call. */
export interface PolicyVerdict {
  readonly effect: Effect;
  /** The rule that decided, or `"default"` when no rule matched. */
  readonly ruleId: string;
  /** Why, for humans (the deny message, the approval's context, logs). */
  readonly reason: string;
  /** Present exactly when `effect` is `approve`. */
  readonly approve?: ApproveSpec;
  /**
   * Present (and true) only when the deciding rule has `anonymous: true`: the
   * call may go ahead without an authenticated agent. Every other verdict,
   * the default's included, needs one (the sidecar answers UNAUTHENTICATED).
   */
  readonly anonymous?: true;
  /** Present (and true) only when the deciding allow rule has `audit: true`: the call is reported to the audit trail. */
  readonly audit?: true;
}

/** A rule as loaded, for listing and dry runs. */
export interface RuleSummary {
  readonly id: string;
  /** Fully qualified service name, or `"*"` for any. */
  readonly service: string;
  /** Method name, or `"*"` for any. */
  readonly method: string;
  /**
   * The hosts whose calls the rule applies to (`match.hosts`); absent: every host. The broker
   * also enforces it: a request naming this rule from another host is refused.
   */
  readonly hosts?: readonly string[];
  /** The CEL condition as written, when the rule has one. */
  readonly when?: string;
  readonly effect: Effect;
  /** The reason as written, when the rule has one. */
  readonly reason?: string;
  /** The description as written, when the rule has one. */
  readonly description?: string;
  readonly approve?: ApproveSpec;
  /** Whether firing or even considering this rule needs the decoded request. */
  readonly needsRequest: boolean;
  /** Whether callers without an agent identity may pass this rule (`anonymous: true`). */
  readonly anonymous: boolean;
  /** Whether the calls it allows are reported to the audit trail (`audit: true`). */
  readonly audit: boolean;
}

/** The defaults the policy file falls back to. */
export const policyDefaults = Object.freeze({
  /** Effect of calls no rule matches. @default "deny" */
  defaultEffect: "deny",
  /** Metadata header carrying the injected credential. @default "x-airlock-credential" */
  injectHeader: "x-airlock-credential",
  /** Metadata header carrying the agent's stated reason. @default "x-airlock-reason" */
  reasonHeader: "x-airlock-reason",
  /** How long an approval request may wait for a decision, in ms. @default 3600000 (1h) */
  timeoutMs: 3_600_000,
  /** Lifetime of an issued credential, in ms. @default 300000 (5m) */
  credentialTtlMs: 300_000,
  /** Uses of a `vault_token` credential. @default 1 */
  vaultTokenNumUses: 1,
  /** Distinct approvers per reviewer group. @default 1 */
  minApprovals: 1,
  /** Whether break-glass approval is allowed. @default false */
  breakGlass: false,
  /** Whether the agent must state a reason. @default false */
  requireReason: false,
  /** What `redact` puts in place of a removed field. @default "[redacted]" */
  redactedValue: "[redacted]",
  /** Quiet time after a file change before `PolicyWatcher` reloads, in ms. @default 100 */
  watchDebounceMs: 100,
} as const);
