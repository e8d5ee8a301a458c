/**
 * The demo's identity provider, separate from the agent: it signs tokens, and
 * the agent holds no signing key. A human's sign-in gives a session token; the
 * agent, authenticated as an OAuth client, exchanges that token (RFC 8693 token
 * exchange) for one the sidecar accepts, whose subject is the human and whose
 * `act` claim names the agent. So the human an agent acts for is attested by
 * the provider, not claimed by the agent.
 *
 * Run by `npm run demo` in-process, or on its own (docker compose):
 * `AIRLOCK_DIR` (holding `idp.pem`), `AIRLOCK_ISSUER_LISTEN`, `AIRLOCK_AGENT_CLIENT_SECRET`,
 * and `AIRLOCK_ISSUER_SESSION_DIR`, where the demo human's session token is written for the agent.
 * @module
 */
import { createHash, createPublicKey, type KeyObject, timingSafeEqual } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { createPrivateKey } from "node:crypto";
import { jwtVerify, SignJWT } from "jose";
import { parseAddress } from "../common/config.js";
import { AirlockError, Code } from "../common/errors.js";
import { demoKeyFileNames } from "./setup.js";

/** RFC 8693's names for the grant and the token type. */
export const tokenExchange = {
  grantType: "urn:ietf:params:oauth:grant-type:token-exchange",
  jwtTokenType: "urn:ietf:params:oauth:token-type:jwt",
  accessTokenType: "urn:ietf:params:oauth:token-type:access_token",
} as const;

/** An OAuth client allowed to exchange tokens: an agent. */
export interface DemoIssuerClient {
  readonly secret: string;
  /** The agent identity its exchanged tokens name in `act.sub`. */
  readonly agent: string;
}

/** Options of {@link startDemoIssuer}. */
export interface DemoIssuerOptions {
  /** The provider's Ed25519 signing key; the sidecar trusts its public half. */
  readonly privateKey: KeyObject;
  /** The `iss` of every token. */
  readonly issuer: string;
  /** The audiences exchanged tokens may be issued for (the sidecar's). */
  readonly audiences: readonly string[];
  /** Agents, by client id. */
  readonly clients: Readonly<Record<string, DemoIssuerClient>>;
  /** @default "127.0.0.1:0" */
  readonly listen?: string;
}

/** A running demo provider. */
export interface RunningDemoIssuer {
  /** The token endpoint (`POST`, form-encoded). */
  readonly tokenUrl: string;
  /** The human's sign-in, as the provider would do it after a login: their session token. */
  signIn(human: string): Promise<string>;
  close(): Promise<void>;
}

/** Defaults of the demo provider. */
export const demoIssuerDefaults = {
  issuer: "airlock-demo",
  audience: "airlock-sidecar",
  clientId: "ops-assistant",
  agent: "spiffe://demo/agent/ops-assistant",
  human: "alice@example.com",
  /** The audience of session tokens: only this provider's token endpoint takes them. */
  sessionAudience: "airlock-demo-token-endpoint",
  exchangedTtl: "15m",
  sessionTtl: "8h",
} as const;

function same(a: string, b: string): boolean {
  // Hashing first makes the comparison constant-time whatever the lengths.
  return timingSafeEqual(createHash("sha256").update(a).digest(), createHash("sha256").update(b).digest());
}

/** An OAuth error answer (RFC 6749 section 5.2). */
function oauthError(response: ServerResponse, status: number, error: string, description: string): void {
  response.writeHead(status, { "content-type": "application/json", "cache-control": "no-store", ...(status === 401 ? { "www-authenticate": 'Basic realm="airlock-demo"' } : {}) });
  response.end(JSON.stringify({ error, error_description: description }));
}

async function formOf(request: IncomingMessage): Promise<URLSearchParams> {
  let body = "";
  for await (const chunk of request) {
    body += String(chunk);
    if (body.length > 64 * 1024) throw new AirlockError(Code.InvalidArgument, "request too large");
  }
  return new URLSearchParams(body);
}

/** Starts the provider's token endpoint on loopback (or `listen`). */
export async function startDemoIssuer(options: DemoIssuerOptions): Promise<RunningDemoIssuer> {
  const publicKey = createPublicKey(options.privateKey);
  const sign = (claims: Record<string, unknown>, subject: string, audience: string, ttl: string) =>
    new SignJWT(claims).setProtectedHeader({ alg: "EdDSA" }).setSubject(subject).setIssuer(options.issuer).setAudience(audience).setIssuedAt().setExpirationTime(ttl).sign(options.privateKey);

  const exchange = async (request: IncomingMessage, response: ServerResponse): Promise<void> => {
    const basic = /^Basic ([A-Za-z0-9+/=]+)$/.exec(request.headers.authorization ?? "");
    const [clientId = "", secret = ""] = basic?.[1] === undefined ? [] : Buffer.from(basic[1], "base64").toString("utf8").split(":");
    const id = decodeURIComponent(clientId);
    // Own properties only: a client id such as "__proto__" or "constructor" is no client.
    const client = Object.hasOwn(options.clients, id) ? options.clients[id] : undefined;
    if (client === undefined || !same(client.secret, decodeURIComponent(secret))) return oauthError(response, 401, "invalid_client", "client authentication failed");
    const form = await formOf(request);
    if (form.get("grant_type") !== tokenExchange.grantType) return oauthError(response, 400, "unsupported_grant_type", "only token exchange is supported");
    if (form.get("subject_token_type") !== tokenExchange.jwtTokenType) return oauthError(response, 400, "invalid_request", "subject_token_type must be a JWT");
    const audience = form.get("audience") ?? "";
    if (!options.audiences.includes(audience)) return oauthError(response, 400, "invalid_target", "that audience is not served");
    let human: string;
    try {
      // The human's own session token, signed by this provider: the agent cannot make one up.
      const { payload } = await jwtVerify(form.get("subject_token") ?? "", publicKey, { issuer: options.issuer, audience: demoIssuerDefaults.sessionAudience, requiredClaims: ["exp", "sub"] });
      human = String(payload.sub);
    } catch {
      return oauthError(response, 400, "invalid_grant", "the subject token is not a valid session of this provider");
    }
    const token = await sign({ act: { sub: client.agent }, client_id: clientId }, human, audience, demoIssuerDefaults.exchangedTtl);
    response.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
    response.end(JSON.stringify({ access_token: token, issued_token_type: tokenExchange.accessTokenType, token_type: "Bearer", expires_in: 900 }));
  };

  const server: Server = createServer((request, response) => {
    if (request.method !== "POST" || request.url !== "/token") return oauthError(response, 404, "invalid_request", "POST /token only");
    exchange(request, response).catch(() => oauthError(response, 400, "invalid_request", "the request could not be read"));
  });
  const listen = parseAddress(options.listen ?? "127.0.0.1:0");
  if (listen === undefined) throw new AirlockError(Code.InvalidArgument, `listen ${options.listen ?? ""} is not host:port`);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(listen.port, listen.host, resolve);
  });
  const { port } = server.address() as AddressInfo;
  const host = listen.host.includes(":") ? `[${listen.host}]` : listen.host;
  return {
    tokenUrl: `http://${host === "0.0.0.0" ? "127.0.0.1" : host}:${port}/token`,
    signIn: (human) => sign({}, human, demoIssuerDefaults.sessionAudience, demoIssuerDefaults.sessionTtl),
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/**
 * The agent's side of the exchange: its client credential and the human's
 * session token in, a token for `audience` out.
 * @throws AirlockError `unauthenticated` with the provider's OAuth error when it refuses.
 */
export async function exchangeToken(options: { tokenUrl: string; clientId: string; clientSecret: string; subjectToken: string; audience: string }): Promise<string> {
  const response = await fetch(options.tokenUrl, {
    method: "POST",
    headers: {
      authorization: `Basic ${Buffer.from(`${encodeURIComponent(options.clientId)}:${encodeURIComponent(options.clientSecret)}`).toString("base64")}`,
      "content-type": "application/x-www-form-urlencoded",
    },
    body: new URLSearchParams({ grant_type: tokenExchange.grantType, subject_token: options.subjectToken, subject_token_type: tokenExchange.jwtTokenType, audience: options.audience }),
  });
  const body = (await response.json().catch(() => ({}))) as { access_token?: string; error?: string; error_description?: string };
  if (!response.ok || typeof body.access_token !== "string") {
    throw new AirlockError(Code.Unauthenticated, `the identity provider refused the token exchange: ${body.error ?? response.status} ${body.error_description ?? ""}`.trim(), { details: { error: body.error ?? "" } });
  }
  return body.access_token;
}

async function main(): Promise<void> {
  const dir = process.env.AIRLOCK_DIR;
  const secret = process.env.AIRLOCK_AGENT_CLIENT_SECRET;
  const sessionDir = process.env.AIRLOCK_ISSUER_SESSION_DIR;
  if (dir === undefined || secret === undefined || sessionDir === undefined) throw new AirlockError(Code.InvalidArgument, "set AIRLOCK_DIR (holding idp.pem), AIRLOCK_AGENT_CLIENT_SECRET and AIRLOCK_ISSUER_SESSION_DIR");
  const issuer = await startDemoIssuer({
    privateKey: createPrivateKey(await readFile(join(dir, demoKeyFileNames.idpPrivateKey), "utf8")),
    issuer: demoIssuerDefaults.issuer,
    audiences: [demoIssuerDefaults.audience],
    clients: { [demoIssuerDefaults.clientId]: { secret, agent: demoIssuerDefaults.agent } },
    listen: process.env.AIRLOCK_ISSUER_LISTEN ?? "0.0.0.0:8080",
  });
  // The demo human's sign-in, handed to the agent as a delegated session (a file only it mounts).
  await writeFile(join(sessionDir, "human.session"), await issuer.signIn(demoIssuerDefaults.human), { mode: 0o600 });
  console.log(`issuer: token endpoint ${issuer.tokenUrl}; session of ${demoIssuerDefaults.human} written for the agent`);
  const stop = () => void issuer.close().then(() => process.exit(0));
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main().catch((error: unknown) => {
    console.error(`issuer: ${AirlockError.from(error).rawMessage}`);
    process.exitCode = 1;
  });
}
