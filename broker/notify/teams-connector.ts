import { AirlockError, Code } from "../../common/errors.js";
import type { TeamsBotSending } from "./config.js";
import { postJson } from "./http.js";
import type { AdaptiveCard } from "./teams.js";

/** The scope of the app token the Bot Connector API takes. */
export const botConnectorScope = "https://api.botframework.com/.default";

/** A message the bot posted: where, and its activity id (to update it). */
export interface PostedCard {
  readonly conversationId: string;
  readonly activityId: string;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function messageOf(card: AdaptiveCard): Record<string, unknown> {
  return { type: "message", attachments: [{ contentType: "application/vnd.microsoft.card.adaptive", content: card }] };
}

/**
 * The Bot Connector API as the bot: an app token by client credentials (cached until
 * five minutes before it expires), `POST v3/conversations/{id}/activities` to post a
 * card and `PUT …/activities/{activityId}` to update it in place. The password and
 * tokens travel only in request bodies and the authorization header; errors never
 * carry them.
 */
export class BotConnectorClient {
  private readonly appId: string;
  private readonly sending: TeamsBotSending;
  private token: { readonly value: string; readonly until: number } | undefined;

  constructor(appId: string, sending: TeamsBotSending) {
    this.appId = appId;
    this.sending = sending;
  }

  /** Posts a card to a conversation. */
  async post(conversationId: string, card: AdaptiveCard, signal: AbortSignal): Promise<PostedCard> {
    const reply = await postJson(`${this.sending.serviceUrl}v3/conversations/${encodeURIComponent(conversationId)}/activities`, messageOf(card), {
      what: "teams bot post",
      signal,
      headers: { authorization: `Bearer ${await this.appToken(signal)}` },
    });
    let answer: unknown;
    try {
      answer = JSON.parse(reply.text);
    } catch {
      answer = undefined;
    }
    const activityId = isRecord(answer) && typeof answer.id === "string" ? answer.id : undefined;
    if (activityId === undefined) throw new AirlockError(Code.FailedPrecondition, "teams bot post: the answer names no activity id");
    return { conversationId, activityId };
  }

  /** Replaces a posted card. */
  async update(posted: PostedCard, card: AdaptiveCard, signal: AbortSignal): Promise<void> {
    const url = `${this.sending.serviceUrl}v3/conversations/${encodeURIComponent(posted.conversationId)}/activities/${encodeURIComponent(posted.activityId)}`;
    const headers = { "content-type": "application/json; charset=utf-8", authorization: `Bearer ${await this.appToken(signal)}` };
    let response: Response;
    try {
      response = await fetch(url, { method: "PUT", headers, body: JSON.stringify({ ...messageOf(card), id: posted.activityId }), redirect: "manual", signal });
      await response.text();
    } catch {
      if (signal.aborted) throw new AirlockError(Code.DeadlineExceeded, "teams bot update: no answer in time (or shutting down)");
      throw new AirlockError(Code.Unavailable, "teams bot update: network error");
    }
    if (response.status >= 500 || response.status === 429 || response.status === 408) throw new AirlockError(Code.Unavailable, `teams bot update: HTTP ${response.status}`);
    if (response.status < 200 || response.status >= 300) throw new AirlockError(Code.FailedPrecondition, `teams bot update: HTTP ${response.status}`);
  }

  private async appToken(signal: AbortSignal): Promise<string> {
    const cached = this.token;
    if (cached !== undefined && Date.now() < cached.until) return cached.value;
    const form = new URLSearchParams({ grant_type: "client_credentials", client_id: this.appId, client_secret: this.sending.appPassword, scope: botConnectorScope });
    const reply = await postJson(this.sending.tokenUrl, form.toString(), { what: "teams bot token", signal, headers: { "content-type": "application/x-www-form-urlencoded" } });
    let answer: unknown;
    try {
      answer = JSON.parse(reply.text);
    } catch {
      answer = undefined;
    }
    if (!isRecord(answer) || typeof answer.access_token !== "string") throw new AirlockError(Code.Unavailable, "teams bot token: the answer holds no access_token");
    const lifetime = typeof answer.expires_in === "number" ? answer.expires_in : Number(answer.expires_in ?? 0);
    this.token = { value: answer.access_token, until: Date.now() + Math.max(0, (Number.isFinite(lifetime) ? lifetime : 0) - 300) * 1000 };
    return answer.access_token;
  }
}
