/**
 * `airlock login` and `airlock logout`: a reviewer signs the CLI in with the
 * OAuth 2.0 device authorization grant (RFC 8628) at the identity provider the
 * broker names (`GET /api/v1/sso`). The tokens are kept in the user's config
 * directory (`$XDG_CONFIG_HOME/airlock/credentials.json`, else
 * `~/.config/airlock/`), mode 0600; `airlock requests` uses them, refreshing
 * them when they expire and the provider issued a refresh token.
 * @module
 */
import { chmod, mkdir, open, readFile, rm } from "node:fs/promises";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { parseArgs } from "node:util";
import * as oauth from "oauth4webapi";
import { AirlockError, Code } from "../common/errors.js";

/** What `airlock login` keeps. Secrets: the tokens (the file is 0600, the directory 0700). */
export interface StoredLogin {
  /** The broker it signed in for. */
  readonly url: string;
  readonly issuer: string;
  readonly clientId: string;
  /** Sent as the bearer token: the provider's ID token for the CLI's client. */
  readonly idToken: string;
  readonly refreshToken?: string;
  /** When the ID token expires (ms since the epoch). */
  readonly expiresAt: number;
  /** Who signed in, for `airlock login --status`. */
  readonly reviewer: string;
}

/** Defaults of the login commands. */
export const loginDefaults = { url: "http://127.0.0.1:9465", scopes: ["openid", "email", "profile"], refreshMarginMs: 30_000 } as const;

/** Where the credentials file is: `$XDG_CONFIG_HOME/airlock/credentials.json`, else `~/.config/airlock/credentials.json`. */
export function credentialsPath(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CONFIG_HOME !== undefined && env.XDG_CONFIG_HOME !== "" ? env.XDG_CONFIG_HOME : join(homedir(), ".config");
  return join(base, "airlock", "credentials.json");
}

function insecureOk(url: URL): { [oauth.allowInsecureRequests]?: boolean } {
  // Plain HTTP only for a provider on this machine (the test and demo provider).
  return url.protocol === "http:" && ["127.0.0.1", "localhost", "[::1]"].includes(url.hostname) ? { [oauth.allowInsecureRequests]: true } : {};
}

async function discover(issuer: string): Promise<oauth.AuthorizationServer> {
  const url = new URL(issuer);
  try {
    return await oauth.processDiscoveryResponse(url, await oauth.discoveryRequest(url, { ...insecureOk(url), algorithm: "oidc", signal: AbortSignal.timeout(10_000) }));
  } catch (error) {
    throw new AirlockError(Code.Unavailable, `cannot read the identity provider's metadata at ${issuer}`, { cause: error });
  }
}

/** Writes the credentials file with mode 0600 (its directory 0700), replacing any old one. */
export async function saveLogin(login: StoredLogin, path = credentialsPath()): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  // Remove first: an existing file keeps its old mode when opened for writing.
  await rm(path, { force: true });
  const file = await open(path, "wx", 0o600);
  try {
    await file.writeFile(`${JSON.stringify(login, null, 2)}\n`);
  } finally {
    await file.close();
  }
  await chmod(path, 0o600);
}

/** The stored login, or undefined when there is none. */
export async function loadLogin(path = credentialsPath()): Promise<StoredLogin | undefined> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch {
    return undefined;
  }
  try {
    const value = JSON.parse(text) as Partial<StoredLogin>;
    if (typeof value.idToken !== "string" || typeof value.issuer !== "string" || typeof value.clientId !== "string" || typeof value.expiresAt !== "number") return undefined;
    return value as StoredLogin;
  } catch {
    return undefined;
  }
}

function claimsOf(idToken: string): Record<string, unknown> {
  try {
    return JSON.parse(Buffer.from(idToken.split(".")[1] ?? "", "base64url").toString("utf8")) as Record<string, unknown>;
  } catch {
    return {};
  }
}

function loginFromTokens(base: { url: string; issuer: string; clientId: string }, tokens: oauth.TokenEndpointResponse, previousRefresh?: string): StoredLogin {
  if (tokens.id_token === undefined) throw new AirlockError(Code.Unauthenticated, "the identity provider sent no ID token (is openid among the scopes?)");
  const claims = claimsOf(tokens.id_token);
  const refreshToken = tokens.refresh_token ?? previousRefresh;
  return {
    ...base,
    idToken: tokens.id_token,
    ...(refreshToken === undefined ? {} : { refreshToken }),
    expiresAt: typeof claims.exp === "number" ? claims.exp * 1000 : Date.now() + 300_000,
    reviewer: typeof claims.email === "string" ? claims.email : typeof claims.sub === "string" ? claims.sub : "",
  };
}

/**
 * The bearer token of the stored login, refreshed (and saved) when it is about
 * to expire and a refresh token is there; undefined when there is no login.
 */
export async function storedToken(path = credentialsPath()): Promise<string | undefined> {
  const login = await loadLogin(path);
  if (login === undefined) return undefined;
  if (login.expiresAt - loginDefaults.refreshMarginMs > Date.now()) return login.idToken;
  if (login.refreshToken === undefined) throw new AirlockError(Code.Unauthenticated, "your airlock login has expired: run `airlock login` again");
  const as = await discover(login.issuer);
  let tokens: oauth.TokenEndpointResponse;
  try {
    const response = await oauth.refreshTokenGrantRequest(as, { client_id: login.clientId }, oauth.None(), login.refreshToken, insecureOk(new URL(login.issuer)));
    tokens = await oauth.processRefreshTokenResponse(as, { client_id: login.clientId }, response);
  } catch (error) {
    if (error instanceof oauth.ResponseBodyError) throw new AirlockError(Code.Unauthenticated, `the identity provider refused to refresh your login (${error.error}): run \`airlock login\` again`);
    throw new AirlockError(Code.Unavailable, "cannot refresh your login at the identity provider", { cause: error });
  }
  const fresh = loginFromTokens(login, tokens, login.refreshToken);
  await saveLogin(fresh, path);
  return fresh.idToken;
}

/** Runs `airlock login [--url U] [--issuer I --client-id C]`. */
export async function runLogin(args: string[], print: (line: string) => void = (line) => console.log(line)): Promise<void> {
  const { values } = parseArgs({ args, strict: true, options: { url: { type: "string" }, issuer: { type: "string" }, "client-id": { type: "string" }, scope: { type: "string" } } });
  const url = values.url ?? process.env.AIRLOCK_URL ?? loginDefaults.url;
  let issuer = values.issuer;
  let clientId = values["client-id"];
  let scopes: readonly string[] = values.scope?.split(/\s+/).filter((s) => s !== "") ?? loginDefaults.scopes;
  if (issuer === undefined || clientId === undefined) {
    // The broker names its provider and the CLI's client.
    let answer: { sso?: { issuer?: string; cliClientId?: string; scopes?: string[] } | null };
    try {
      const response = await fetch(new URL("/api/v1/sso", url), { signal: AbortSignal.timeout(10_000) });
      answer = (await response.json()) as typeof answer;
    } catch (error) {
      throw new AirlockError(Code.Unavailable, `cannot ask the broker at ${url} how to sign in (pass --issuer and --client-id instead)`, { cause: error });
    }
    issuer ??= answer.sso?.issuer;
    clientId ??= answer.sso?.cliClientId;
    if (values.scope === undefined && answer.sso?.scopes !== undefined) scopes = answer.sso.scopes;
  }
  if (issuer === undefined || clientId === undefined) {
    throw new AirlockError(Code.FailedPrecondition, `the broker at ${url} names no identity provider client for the CLI (reviewers.sso.cli_client_id); pass --issuer and --client-id`, { details: { field: "--client-id" } });
  }
  const as = await discover(issuer);
  const client: oauth.Client = { client_id: clientId };
  const options = insecureOk(new URL(issuer));
  let started: oauth.DeviceAuthorizationResponse;
  try {
    started = await oauth.processDeviceAuthorizationResponse(as, client, await oauth.deviceAuthorizationRequest(as, client, oauth.None(), new URLSearchParams({ scope: scopes.join(" ") }), options));
  } catch (error) {
    throw new AirlockError(Code.FailedPrecondition, `the identity provider refused to start a device sign-in${error instanceof oauth.ResponseBodyError ? ` (${error.error})` : ""}`, { cause: error });
  }
  print(`To sign in, open ${started.verification_uri} and enter the code ${started.user_code}`);
  if (started.verification_uri_complete !== undefined) print(`(or open ${started.verification_uri_complete})`);
  print("Waiting for you to sign in…");
  let interval = (started.interval ?? 5) * 1000;
  const deadline = Date.now() + started.expires_in * 1000;
  for (;;) {
    // RFC 8628 §3.5: poll no faster than the provider's interval.
    await new Promise((resolve) => setTimeout(resolve, interval));
    if (Date.now() > deadline) throw new AirlockError(Code.DeadlineExceeded, "the device code expired before the sign-in finished: run `airlock login` again");
    try {
      const tokens = await oauth.processDeviceCodeResponse(as, client, await oauth.deviceCodeGrantRequest(as, client, oauth.None(), started.device_code, options));
      const login = loginFromTokens({ url, issuer, clientId }, tokens);
      await saveLogin(login);
      print(`Signed in as ${login.reviewer}; the token is kept in ${credentialsPath()} (mode 0600)`);
      return;
    } catch (error) {
      if (error instanceof oauth.ResponseBodyError && error.error === "authorization_pending") continue;
      if (error instanceof oauth.ResponseBodyError && error.error === "slow_down") {
        interval += 5000;
        continue;
      }
      if (error instanceof oauth.ResponseBodyError) throw new AirlockError(Code.Unauthenticated, `the sign-in did not complete: ${error.error}`);
      throw new AirlockError(Code.Unavailable, "cannot reach the identity provider", { cause: error });
    }
  }
}

/** Runs `airlock logout`: revokes the refresh token (best effort) and deletes the credentials file. */
export async function runLogout(print: (line: string) => void = (line) => console.log(line)): Promise<void> {
  const path = credentialsPath();
  const login = await loadLogin(path);
  if (login?.refreshToken !== undefined) {
    const refreshToken = login.refreshToken;
    await discover(login.issuer)
      .then(async (as) => oauth.processRevocationResponse(await oauth.revocationRequest(as, { client_id: login.clientId }, oauth.None(), refreshToken, insecureOk(new URL(login.issuer)))))
      .catch(() => undefined);
  }
  await rm(path, { force: true });
  print(login === undefined ? "not signed in" : `signed out ${login.reviewer}`);
}
