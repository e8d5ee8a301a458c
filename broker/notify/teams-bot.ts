import { createRemoteJWKSet, type JWTPayload, jwtVerify } from "jose";
import { joseFailure } from "../../common/jose-errors.js";
import { AirlockError, Code, codeName } from "../../common/errors.js";
import type { Logger } from "../../common/logger.js";
import type { RequestRecord } from "../../proto/index.js";
import type { TeamsBotConfig } from "./config.js";
import { type HeaderMap, headerValue } from "./http.js";
import { type AdaptiveCard, chatApprovable, noStepUp, type StepUpPredicate, type TeamsCardOptions, type TeamsNotice, teamsNoticeCard, teamsReasonInput, teamsRecordCard, teamsVerbs } from "./teams.js";
import { isRecord, stringAt } from "./json.js";

/** The issuer of every token the Bot Framework sends a bot (public cloud). */
export const botFrameworkIssuer = "https://api.botframework.com";

/** Clock skew allowed on a Bot Framework token's `exp` and `nbf`, in seconds (what the Bot Framework SDKs allow). */
export const botFrameworkClockSkewSeconds = 300;

/** Algorithms the Bot Framework signs with; anything else is refused. */
export const botFrameworkAlgorithms: readonly string[] = ["RS256", "RS384", "RS512"];

/** The `name` of the invoke activity Teams sends for an `Action.Execute`. */
export const adaptiveCardActionInvoke = "adaptiveCard/action";

/** Defaults of {@link BotFrameworkVerifierOptions}. */
export const botFrameworkVerifierDefaults = {
  /** How long the OpenID metadata document is used before it is fetched again, in ms (a day). */
  metadataMaxAgeMs: 24 * 3600 * 1000,
  /** Time limit of one fetch of the metadata or the key set, in ms. */
  fetchTimeoutMs: 5_000,
} as const;

/** Options of {@link BotFrameworkVerifier}. */
export interface BotFrameworkVerifierOptions {
  /** The bot's Microsoft App ID: the tokens' audience. */
  readonly appId: string;
  /** The Bot Framework's OpenID metadata URL; its `jwks_uri` names the signing keys. */
  readonly openIdMetadataUrl: string;
  /** @default {@link botFrameworkVerifierDefaults}.metadataMaxAgeMs */
  readonly metadataMaxAgeMs?: number;
  /** @default {@link botFrameworkVerifierDefaults}.fetchTimeoutMs */
  readonly fetchTimeoutMs?: number;
}

/** What a verified activity claims about where it came from. */
export interface ActivityOrigin {
  /** The activity's `serviceUrl`: must equal the token's `serviceurl` claim. */
  readonly serviceUrl: string;
  /** The activity's `channelId` (`msteams`): must be among the signing key's endorsements, when it has any. */
  readonly channelId: string;
}

function refused(reason: string, message: string): AirlockError {
  return new AirlockError(Code.Unauthenticated, message, { details: { reason } });
}

function isLoopback(hostname: string): boolean {
  return hostname === "localhost" || hostname === "[::1]" || /^127(?:\.\d{1,3}){3}$/.test(hostname);
}

/**
 * Verifies the token the Bot Framework puts on every activity it sends a bot, the
 * way the Bot Framework SDKs do (channel → bot): `Authorization: Bearer <JWT>`,
 * signed (RS256/384/512) by a key of the JWKS that the OpenID metadata's `jwks_uri`
 * names, issuer {@link botFrameworkIssuer}, audience the bot's app id, `exp` (and
 * `nbf`) within {@link botFrameworkClockSkewSeconds}, the signing key endorsed for the
 * activity's channel when the key lists endorsements, and the `serviceurl` claim
 * equal to the activity's `serviceUrl`. The metadata is fetched on first use and
 * after `metadataMaxAgeMs`; keys through jose's `createRemoteJWKSet` (an unknown
 * `kid` refetches them, with a cooldown).
 */
export class BotFrameworkVerifier {
  private readonly options: Required<BotFrameworkVerifierOptions>;
  private keys: { readonly set: ReturnType<typeof createRemoteJWKSet>; readonly fetchedAt: number } | undefined;
  private loading: Promise<ReturnType<typeof createRemoteJWKSet>> | undefined;

  constructor(options: BotFrameworkVerifierOptions) {
    this.options = {
      metadataMaxAgeMs: botFrameworkVerifierDefaults.metadataMaxAgeMs,
      fetchTimeoutMs: botFrameworkVerifierDefaults.fetchTimeoutMs,
      ...options,
    };
  }

  /**
   * Verifies `authorization` for an activity.
   * @returns the token's claims.
   * @throws AirlockError `unauthenticated` with `details.reason` (`missing_token`, `malformed_token`,
   *   `bad_signature`, `no_matching_key`, `algorithm_not_allowed`, `wrong_issuer`, `wrong_audience`,
   *   `token_expired`, `token_not_yet_valid`, `not_endorsed`, `service_url_mismatch`), or
   *   `unavailable` (`metadata_unavailable`, `keys_unavailable`) when the keys cannot be had.
   */
  async verify(authorization: string | undefined, origin: ActivityOrigin, now: Date = new Date()): Promise<JWTPayload> {
    const match = /^Bearer\s+(\S+)$/i.exec(authorization?.trim() ?? "");
    const token = match?.[1];
    if (token === undefined) throw refused("missing_token", "the activity carries no Bot Framework token (Authorization: Bearer …)");
    const keys = await this.keySet();
    let verified;
    try {
      verified = await jwtVerify(token, keys, {
        issuer: botFrameworkIssuer,
        audience: this.options.appId,
        algorithms: [...botFrameworkAlgorithms],
        clockTolerance: botFrameworkClockSkewSeconds,
        requiredClaims: ["exp"],
        currentDate: now,
      });
    } catch (error) {
      throw joseFailure(error, { token: "the Bot Framework token", keys: "the Bot Framework's signing keys", keysReason: "keys_unavailable" });
    }
    const kid = verified.protectedHeader.kid;
    const jwk = keys.jwks()?.keys.find((key) => key.kid === kid) as { endorsements?: unknown } | undefined;
    const endorsements = jwk?.endorsements;
    if (Array.isArray(endorsements) && endorsements.length > 0 && !endorsements.includes(origin.channelId)) {
      throw refused("not_endorsed", `the signing key is not endorsed for the channel ${JSON.stringify(origin.channelId)}`);
    }
    const claimed = verified.payload.serviceurl ?? verified.payload.serviceUrl;
    if (typeof claimed !== "string" || claimed !== origin.serviceUrl) {
      throw refused("service_url_mismatch", "the token was issued for another serviceUrl than the activity's");
    }
    return verified.payload;
  }

  private async keySet(): Promise<ReturnType<typeof createRemoteJWKSet>> {
    const keys = this.keys;
    if (keys !== undefined && Date.now() - keys.fetchedAt < this.options.metadataMaxAgeMs) return keys.set;
    this.loading ??= this.loadMetadata().finally(() => (this.loading = undefined));
    try {
      return await this.loading;
    } catch (error) {
      // Stale keys beat none: a metadata outage does not stop votes signed with known keys.
      if (keys !== undefined) return keys.set;
      throw error;
    }
  }

  private async loadMetadata(): Promise<ReturnType<typeof createRemoteJWKSet>> {
    const unavailable = (message: string) => new AirlockError(Code.Unavailable, `the Bot Framework's OpenID metadata ${message}`, { details: { reason: "metadata_unavailable" } });
    let document: unknown;
    try {
      const response = await fetch(this.options.openIdMetadataUrl, { redirect: "error", signal: AbortSignal.timeout(this.options.fetchTimeoutMs) });
      if (!response.ok) throw unavailable(`answered HTTP ${response.status}`);
      document = await response.json();
    } catch (error) {
      if (error instanceof AirlockError) throw error;
      throw unavailable("cannot be fetched");
    }
    const jwksUri = typeof document === "object" && document !== null ? (document as Record<string, unknown>).jwks_uri : undefined;
    if (typeof jwksUri !== "string" || !URL.canParse(jwksUri)) throw unavailable("has no jwks_uri");
    const url = new URL(jwksUri);
    if (url.protocol !== "https:" && !(url.protocol === "http:" && isLoopback(url.hostname))) throw unavailable("names a jwks_uri that is not https");
    const set = createRemoteJWKSet(url, { timeoutDuration: this.options.fetchTimeoutMs, cooldownDuration: 30_000 });
    this.keys = { set, fetchedAt: Date.now() };
    return set;
  }
}

/** A vote cast from a Teams card; assignable to the broker's `Ballot`. */
export interface TeamsBallot {
  readonly reviewer: string;
  readonly approve: boolean;
  /** The reason typed on the card; for an approval without one, `approved in Teams by <reviewer>`. */
  readonly reason: string;
}

/** What the bot needs of the broker: read a request, and cast a vote through the normal decide path. */
export interface TeamsVoteTarget {
  get(requestId: string): Promise<RequestRecord>;
  decide(requestId: string, ballot: TeamsBallot): Promise<RequestRecord>;
}

/** What `POST /api/teams/messages` answers: the HTTP status and a JSON body. */
export interface TeamsActivityReply {
  /** 200 (an invoke response, refusals included), 400 (not an activity), 401 (bad token) or 503 (keys unavailable). */
  readonly status: number;
  readonly body: unknown;
}

/** The invoke response that refreshes the card in place. */
export interface TeamsInvokeResponse {
  readonly statusCode: 200;
  readonly type: "application/vnd.microsoft.card.adaptive";
  readonly value: AdaptiveCard;
}

/** Options of {@link TeamsBot}. */
export interface TeamsBotOptions {
  readonly log: Logger;
  /** The console base URL (ends with `/`). */
  readonly consoleUrl: string;
  /** Requests that need a step-up to approve (no Approve from Teams). @default {@link noStepUp} */
  readonly requiresStepUp?: StepUpPredicate;
  /** @default a {@link BotFrameworkVerifier} for the config's app id and metadata URL */
  readonly verifier?: BotFrameworkVerifier;
}

/** The stable code of a refused vote: the refusal's own `details.reason` when it has one, else the reviewers' API's name for its code. */
function refusalCode(error: AirlockError): string {
  if (typeof error.details.reason === "string") return error.details.reason;
  switch (error.code) {
    case Code.FailedPrecondition:
      return "already_decided";
    case Code.AlreadyExists:
      return "already_voted";
    default:
      return codeName(error.code);
  }
}

function refusalText(error: AirlockError): string {
  switch (error.code) {
    case Code.FailedPrecondition:
      return "this request is no longer pending.";
    case Code.AlreadyExists:
      return "you already voted on this request; each reviewer counts once.";
    case Code.NotFound:
      return "this request no longer exists.";
    case Code.PermissionDenied:
    case Code.InvalidArgument:
      return `you may not vote on this request: ${error.rawMessage}`;
    default:
      return "your vote could not be recorded. Try again, or use the console.";
  }
}

/** Longest reason a card may send. */
const maxReason = 2000;

/**
 * The Teams bot endpoint (`POST /api/teams/messages`): verifies the Bot Framework's
 * token ({@link BotFrameworkVerifier}), takes `adaptiveCard/action` invokes whose
 * `Action.Execute` verb is `approve` or `deny`, maps `from.aadObjectId` to a reviewer
 * through `notifications.teams.bot.users`, and casts the vote through the broker's
 * normal decide path (every rule applies: no self-approval, N of M, …). The answer
 * is the request's refreshed card, with a notice saying whether the vote counted or
 * why not (a stable code). Approving a request that needs a step-up, or one a
 * break-glass approval touched, is refused with `step_up_required`; a denial needs a
 * reason (`reason_required`). Other activities are acknowledged and ignored.
 */
export class TeamsBot {
  private readonly config: TeamsBotConfig;
  private readonly options: TeamsBotOptions;
  private readonly verifier: BotFrameworkVerifier;
  private readonly cardOptions: TeamsCardOptions;

  constructor(config: TeamsBotConfig, options: TeamsBotOptions) {
    this.config = config;
    this.options = options;
    this.verifier = options.verifier ?? new BotFrameworkVerifier({ appId: config.appId, openIdMetadataUrl: config.openIdMetadataUrl });
    this.cardOptions = { consoleUrl: options.consoleUrl, bot: true, requiresStepUp: options.requiresStepUp ?? noStepUp };
  }

  /** The options cards of this bot are built with (Approve / Deny through `Action.Execute`). */
  get cards(): TeamsCardOptions {
    return this.cardOptions;
  }

  /** The reviewer an Entra object id is, from `users`. */
  reviewerFor(aadObjectId: string): string | undefined {
    return this.config.users.get(aadObjectId.trim().toLowerCase());
  }

  /**
   * Handles one activity POSTed by the Bot Framework. Never throws. A bad token
   * changes nothing and is answered 401 with `details.reason`; a refused vote is
   * answered 200 with the card saying why.
   * @param body - the activity (parsed JSON).
   * @param now - the clock the token is checked against. @default new Date()
   */
  async handleActivity(body: unknown, headers: HeaderMap, target: TeamsVoteTarget, now: Date = new Date()): Promise<TeamsActivityReply> {
    const log = this.options.log;
    if (!isRecord(body)) return { status: 400, body: new AirlockError(Code.InvalidArgument, "the body is not a Bot Framework activity", { details: { reason: "bad_activity" } }).toJSON() };
    const serviceUrl = stringAt(body, "serviceUrl") ?? "";
    const channelId = stringAt(body, "channelId") ?? "";
    try {
      await this.verifier.verify(headerValue(headers, "authorization"), { serviceUrl, channelId }, now);
    } catch (error) {
      const failure = AirlockError.from(error, Code.Unauthenticated);
      const status = failure.code === Code.Unavailable ? 503 : 401;
      log.warn({ reason: failure.details.reason, message: failure.rawMessage }, "Teams activity refused");
      return { status, body: failure.toJSON() };
    }
    if (stringAt(body, "type") !== "invoke" || stringAt(body, "name") !== adaptiveCardActionInvoke) return { status: 200, body: {} };
    const action = isRecord(body.value) ? body.value.action : undefined;
    const data = isRecord(action) && isRecord(action.data) ? action.data : {};
    const requestId = typeof data.requestId === "string" ? data.requestId : "";
    const verb = stringAt(action, "verb");
    if (stringAt(action, "type") !== "Action.Execute" || (verb !== teamsVerbs.approve && verb !== teamsVerbs.deny) || requestId === "" || requestId.length > 255) {
      log.warn({ verb, requestId: requestId.slice(0, 64) }, "Teams card action is not an Airlock vote");
      return this.answer(requestId.length > 255 ? "" : requestId, { code: "bad_action", text: "this card action is not an Airlock vote." });
    }
    const approve = verb === teamsVerbs.approve;
    const tenant = stringAt(body, "conversation", "tenantId") ?? stringAt(body, "channelData", "tenant", "id");
    if (this.config.tenantId !== undefined && tenant?.toLowerCase() !== this.config.tenantId) {
      log.warn({ requestId, tenant }, "Teams vote from another tenant refused");
      return this.answer(requestId, { code: "wrong_tenant", text: "this bot takes votes from its own organisation only." });
    }
    const objectId = stringAt(body, "from", "aadObjectId") ?? "";
    const reviewer = this.reviewerFor(objectId);
    let record: RequestRecord | undefined;
    try {
      record = await target.get(requestId);
    } catch (error) {
      const failure = AirlockError.from(error);
      return this.answer(requestId, { code: refusalCode(failure), text: refusalText(failure) });
    }
    if (reviewer === undefined) {
      log.warn({ aadObjectId: objectId, requestId }, "Teams vote from a user with no reviewer mapping refused");
      return this.answer(requestId, { code: "unknown_user", text: "your Teams account is not linked to an Airlock reviewer (notifications.teams.bot.users)." }, record);
    }
    if (approve && !chatApprovable(record, this.cardOptions.requiresStepUp)) {
      log.info({ requestId, reviewer }, "Teams approval of a step-up request refused");
      return this.answer(requestId, { code: "step_up_required", text: "approving this request needs a step-up: use Review and approve in the console." }, record);
    }
    const input = data[teamsReasonInput];
    const typed = typeof input === "string" ? input.trim() : "";
    if (typed.length > maxReason) return this.answer(requestId, { code: "reason_too_long", text: `a reason has at most ${maxReason} characters.` }, record);
    if (!approve && typed === "") return this.answer(requestId, { code: "reason_required", text: "a denial needs a reason: type it in the Reason box, then Deny." }, record);
    const ballot: TeamsBallot = { reviewer, approve, reason: typed === "" ? `approved in Teams by ${reviewer}` : typed };
    try {
      record = await target.decide(requestId, ballot);
    } catch (error) {
      const failure = AirlockError.from(error);
      log.info({ requestId, reviewer, code: codeName(failure.code), reason: failure.rawMessage }, "Teams vote refused");
      const current = await target.get(requestId).catch(() => record);
      return this.answer(requestId, { code: refusalCode(failure), text: refusalText(failure) }, current);
    }
    log.info({ requestId, reviewer, approve }, "Teams vote recorded");
    return this.answer(requestId, { code: "recorded", text: `Your ${approve ? "approval" : "denial"} was recorded, ${reviewer}.` }, record);
  }

  private answer(requestId: string, notice: TeamsNotice, record?: RequestRecord): TeamsActivityReply {
    const card = record === undefined ? teamsNoticeCard(requestId, this.cardOptions, notice) : teamsRecordCard(record, this.cardOptions, notice);
    const response: TeamsInvokeResponse = { statusCode: 200, type: "application/vnd.microsoft.card.adaptive", value: card };
    return { status: 200, body: response };
  }
}
