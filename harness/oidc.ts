/**
 * A real OpenID Provider for tests and the demo: panva's certified
 * `oidc-provider` on a free loopback port, with a password login page, users
 * with groups (in the ID token's `groups` claim), the authorization code flow
 * with PKCE, refresh tokens and the device authorization grant (RFC 8628).
 * Nothing is mocked: the broker and the CLI talk to it over HTTP as they would
 * to Okta or Entra ID.
 * @module
 */
import { randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { exportJWK, generateKeyPair } from "jose";
import type { Configuration, KoaContextWithOIDC } from "oidc-provider";
import { track } from "./resources.js";

/** A user of the test provider. */
export interface OidcUser {
  /** The login name and `email` claim (also the account id, `sub`). */
  readonly email: string;
  readonly password: string;
  readonly name?: string;
  /** The `groups` claim. */
  readonly groups: readonly string[];
}

/** A client (relying party) registered at the provider. */
export interface OidcClient {
  readonly clientId: string;
  /** Absent: a public client (no secret; PKCE required), as the CLI is. */
  readonly clientSecret?: string;
  /** Where authorization codes may be sent; empty for a device-flow-only client. */
  readonly redirectUris?: readonly string[];
  /** Where the provider may send the browser after sign-out. */
  readonly postLogoutRedirectUris?: readonly string[];
  /** @default ["authorization_code", "refresh_token"] (with redirect URIs) or the device grant and refresh */
  readonly grantTypes?: readonly string[];
}

/** Options of {@link startOidcProvider}. */
export interface OidcProviderOptions {
  readonly users: readonly OidcUser[];
  readonly clients: readonly OidcClient[];
  /** Port to listen on. @default a free one */
  readonly port?: number;
  /** Lifetime of ID and access tokens in seconds. @default 600 */
  readonly tokenTtlSec?: number;
  /** Whether refresh tokens are issued (to clients allowed the `refresh_token` grant). @default true */
  readonly refreshTokens?: boolean;
  /**
   * The private signing key (a JWK with `kid`); @default a fresh RS256 key. Two providers given
   * the same key are two tenants of one multi-tenant service (as Entra ID's tenants share keys).
   */
  readonly signingKey?: Readonly<Record<string, unknown>>;
}

/** Defaults of {@link OidcProviderOptions}. */
export const oidcProviderDefaults = { tokenTtlSec: 600, refreshTokens: true } as const;

/** A running provider. */
export interface OidcProviderServer {
  /** `http://127.0.0.1:<port>`: the `iss` of its tokens and the base of its discovery document. */
  readonly issuer: string;
  readonly port: number;
  /** How many times a user signed in at the login page (a silent refresh does not count). */
  readonly logins: () => number;
  /** Its private signing key (to start another tenant that shares it). */
  readonly signingKey: Readonly<Record<string, unknown>>;
  stop(): Promise<void>;
}

/** A fresh RS256 private JWK with a `kid`, for {@link OidcProviderOptions.signingKey}. */
export async function newSigningKey(): Promise<Record<string, unknown>> {
  const { privateKey } = await generateKeyPair("RS256", { extractable: true });
  return { ...(await exportJWK(privateKey)), kid: `test-${randomBytes(4).toString("hex")}`, alg: "RS256", use: "sig" };
}

const page = (title: string, body: string): string => `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title} · Airlock test IdP</title>
<style>body{font-family:system-ui,sans-serif;max-width:22rem;margin:3rem auto;padding:0 1rem}label,input,button{display:block;width:100%;margin:.4rem 0;font-size:1rem}input{padding:.5rem;box-sizing:border-box}button{padding:.6rem;background:#1d4ed8;color:#fff;border:0;border-radius:4px}.error{color:#b91c1c}</style>
</head><body><h1>${title}</h1>${body}</body></html>`;

const escapeHtml = (text: string): string => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function readForm(request: IncomingMessage): Promise<URLSearchParams> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of request) {
    size += (chunk as Buffer).length;
    if (size > 64 * 1024) throw new Error("form too large");
    chunks.push(chunk as Buffer);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString("utf8"));
}

/**
 * Starts an OpenID Provider on 127.0.0.1. Its login page (`/interaction/<uid>`)
 * asks for email and password (form fields `email`, `password`, button
 * `Sign in`); first-party clients need no consent screen. Device flow pages:
 * `/device` (field `user_code`), then the login page, then a confirmation.
 */
export async function startOidcProvider(options: OidcProviderOptions): Promise<OidcProviderServer> {
  const server: Server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, "127.0.0.1", () => resolve());
  });
  const address = server.address();
  const port = typeof address === "object" && address !== null ? address.port : 0;
  const issuer = `http://127.0.0.1:${port}`;
  const users = new Map(options.users.map((user) => [user.email.toLowerCase(), user]));
  const ttl = options.tokenTtlSec ?? oidcProviderDefaults.tokenTtlSec;
  const refresh = options.refreshTokens ?? oidcProviderDefaults.refreshTokens;
  const signingKey = options.signingKey ?? (await newSigningKey());
  let logins = 0;

  const configuration: Configuration = {
    clients: options.clients.map((client) => {
      const redirectUris = [...(client.redirectUris ?? [])];
      const grantTypes = client.grantTypes ?? (redirectUris.length > 0 ? ["authorization_code", "refresh_token"] : ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"]);
      return {
        client_id: client.clientId,
        ...(client.clientSecret === undefined ? { token_endpoint_auth_method: "none" } : { client_secret: client.clientSecret }),
        redirect_uris: redirectUris,
        post_logout_redirect_uris: [...(client.postLogoutRedirectUris ?? [])],
        grant_types: [...grantTypes],
        response_types: redirectUris.length > 0 ? ["code"] : [],
        ...(client.clientSecret === undefined && redirectUris.length === 0 ? { application_type: "native" } : {}),
      };
    }),
    jwks: { keys: [{ ...signingKey }] },
    cookies: { keys: [randomBytes(32).toString("hex")] },
    claims: { openid: ["sub"], email: ["email", "email_verified"], profile: ["name"], groups: ["groups"] },
    scopes: ["openid", "email", "profile", "groups", "offline_access"],
    // The claims of the granted scopes go into the ID token itself, as enterprise IdPs configure it.
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    ttl: { IdToken: ttl, AccessToken: ttl, RefreshToken: 24 * 3600, DeviceCode: 600, Interaction: 600, Session: 24 * 3600, Grant: 24 * 3600, AuthorizationCode: 60 },
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      rpInitiatedLogout: { enabled: true, logoutSource: (ctx: KoaContextWithOIDC, form: string) => {
        ctx.body = page("Sign out", `${form}<p>Sign out of the test identity provider?</p><button type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button>`);
      } },
      deviceFlow: {
        enabled: true,
        userCodeInputSource: (ctx: KoaContextWithOIDC, form: string, _out: unknown, error: unknown) => {
          ctx.body = page("Connect a device", `${error === undefined ? "" : '<p class="error">That code is not valid.</p>'}${form.replace("</form>", '<label for="user_code">Code shown on your device</label><input id="user_code" name="user_code" autocomplete="off"></form>')}<button type="submit" form="op.deviceInputForm">Continue</button>`);
        },
        userCodeConfirmSource: (ctx: KoaContextWithOIDC, form: string, client: { clientId: string }, _info: unknown, userCode: string) => {
          ctx.body = page("Confirm the device", `${form}<p>Sign in <strong>${escapeHtml(client.clientId)}</strong> showing the code <code data-testid="user-code">${escapeHtml(userCode)}</code>?</p><button type="submit" form="op.deviceConfirmForm">Confirm</button>`);
        },
        successSource: (ctx: KoaContextWithOIDC) => {
          ctx.body = page("Device connected", "<p>You can close this window and go back to your terminal.</p>");
        },
      },
    },
    interactions: { url: (_ctx: KoaContextWithOIDC, interaction: { uid: string }) => `/interaction/${interaction.uid}` },
    findAccount: (_ctx: KoaContextWithOIDC, sub: string) => {
      const user = users.get(sub.toLowerCase());
      if (user === undefined) return undefined;
      return {
        accountId: user.email,
        claims: () => ({ sub: user.email, email: user.email, email_verified: true, name: user.name ?? user.email, groups: [...user.groups] }),
      };
    },
    // First-party clients: every requested scope is granted without a consent screen.
    loadExistingGrant: async (ctx: KoaContextWithOIDC) => {
      const { client, session } = ctx.oidc;
      if (client === undefined || session?.accountId === undefined) return undefined;
      const existing = session.grantIdFor(client.clientId);
      if (existing !== undefined) {
        const grant = await ctx.oidc.provider.Grant.find(existing);
        if (grant !== undefined) return grant;
      }
      const grant = new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: session.accountId });
      grant.addOIDCScope("openid email profile groups offline_access");
      await grant.save();
      session.grantIdFor(client.clientId, grant.jti);
      return grant;
    },
    issueRefreshToken: (_ctx: KoaContextWithOIDC, client: { grantTypeAllowed(type: string): boolean }) => refresh && client.grantTypeAllowed("refresh_token"),
    renderError: (ctx: KoaContextWithOIDC, out: { error?: string; error_description?: string }) => {
      ctx.type = "html";
      ctx.body = page("Sign-in error", `<p class="error" data-testid="op-error">${escapeHtml(String(out.error ?? "error"))}: ${escapeHtml(String(out.error_description ?? ""))}</p>`);
    },
  } as Configuration;

  // Loaded here, not at the top: every user of the harness would otherwise load it (and its start-up warnings).
  const { default: Provider } = await import("oidc-provider");
  const provider = new Provider(issuer, configuration);
  // oidc-provider logs to stderr through its own events; silence the expected ones (bad input in attack tests).
  provider.on("server_error", () => undefined);
  const oidcHandler = provider.callback();

  const loginPage = (uid: string, error?: string): string =>
    page(
      "Sign in",
      `<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">${error === undefined ? "" : `<p class="error" role="alert">${escapeHtml(error)}</p>`}<label for="email">Email</label><input id="email" name="email" type="email" required><label for="password">Password</label><input id="password" name="password" type="password" required><button type="submit">Sign in</button></form>`,
    );

  const interaction = async (request: IncomingMessage, response: ServerResponse, path: string): Promise<void> => {
    const details = await provider.interactionDetails(request, response);
    if (details.prompt.name === "consent" && details.session?.accountId !== undefined) {
      // First-party clients (the native CLI is asked for consent by default): granted without a screen.
      const clientId = typeof details.params.client_id === "string" ? details.params.client_id : "";
      const grant = details.grantId === undefined ? new provider.Grant({ clientId, accountId: details.session.accountId }) : await provider.Grant.find(details.grantId);
      if (grant === undefined) throw new Error("the interaction's grant is gone");
      grant.addOIDCScope(typeof details.params.scope === "string" ? details.params.scope : "openid");
      await provider.interactionFinished(request, response, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
      return;
    }
    const send = (status: number, html: string) => {
      response.writeHead(status, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
      response.end(html);
    };
    if (request.method === "GET" && path === `/interaction/${details.uid}`) return send(200, loginPage(details.uid));
    if (request.method === "POST" && path === `/interaction/${details.uid}/login`) {
      const form = await readForm(request);
      const user = users.get((form.get("email") ?? "").trim().toLowerCase());
      if (user === undefined || user.password !== form.get("password")) return send(200, loginPage(details.uid, "Wrong email or password."));
      logins++;
      await provider.interactionFinished(request, response, { login: { accountId: user.email } }, { mergeWithLastSubmission: false });
      return;
    }
    send(404, page("Not found", "<p>No such page.</p>"));
  };

  server.on("request", (request: IncomingMessage, response: ServerResponse) => {
    const path = (request.url ?? "/").split("?")[0] ?? "/";
    if (path.startsWith("/interaction/")) {
      interaction(request, response, path).catch((error: unknown) => {
        if (!response.headersSent) response.writeHead(400, { "content-type": "text/html; charset=utf-8" });
        response.end(page("Sign-in error", `<p class="error">${escapeHtml(error instanceof Error ? error.message : String(error))}</p>`));
      });
      return;
    }
    void oidcHandler(request, response);
  });

  let stopped = false;
  const untrack = track("server", `oidc-provider ${issuer}`, () => stopped);
  return {
    issuer,
    port,
    logins: () => logins,
    signingKey,
    async stop() {
      if (stopped) return;
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      stopped = true;
      untrack();
    },
  };
}

/**
 * A minimal cookie-keeping HTTP client that fills and submits HTML forms: how a
 * test (or the demo's auto-approver) plays a person at the provider's pages
 * without a browser. It follows redirects itself, so it can stop at one (an
 * authorization code on its way to the relying party).
 */
export class FormBrowser {
  private readonly jar = new Map<string, Map<string, string>>();

  /** The cookies kept for `origin` (`http://host:port`), name → value. */
  cookies(origin: string): Map<string, string> {
    let cookies = this.jar.get(origin);
    if (cookies === undefined) {
      cookies = new Map();
      this.jar.set(origin, cookies);
    }
    return cookies;
  }

  private remember(url: URL, response: Response): void {
    const cookies = this.cookies(url.origin);
    for (const header of response.headers.getSetCookie()) {
      const [pair = "", ...attributes] = header.split(";");
      const eq = pair.indexOf("=");
      if (eq < 0) continue;
      const name = pair.slice(0, eq).trim();
      const expired = attributes.some((a) => /^\s*max-age=0\s*$/i.test(a) || (/^\s*expires=/i.test(a) && Date.parse(a.split("=").slice(1).join("=")) < Date.now()));
      if (expired) cookies.delete(name);
      else cookies.set(name, pair.slice(eq + 1).trim());
    }
  }

  /** One request with the kept cookies; no redirect is followed. */
  async request(url: string | URL, init: { method?: string; form?: URLSearchParams } = {}): Promise<Response> {
    const target = new URL(url);
    const cookie = [...this.cookies(target.origin)].map(([name, value]) => `${name}=${value}`).join("; ");
    const response = await fetch(target, {
      method: init.method ?? (init.form === undefined ? "GET" : "POST"),
      redirect: "manual",
      headers: { ...(cookie === "" ? {} : { cookie }), ...(init.form === undefined ? {} : { "content-type": "application/x-www-form-urlencoded" }) },
      ...(init.form === undefined ? {} : { body: init.form.toString() }),
    });
    this.remember(target, response);
    return response;
  }

  /**
   * Requests `url` and follows redirects until a page answers, or until
   * `stopAt` says a redirect target is where to stop (then that URL is
   * returned, not requested).
   */
  async follow(url: string | URL, init: { method?: string; form?: URLSearchParams } = {}, stopAt?: (next: URL) => boolean): Promise<{ url: URL; response?: Response; html: string }> {
    let current = new URL(url);
    let response = await this.request(current, init);
    for (let hops = 0; response.status >= 300 && response.status < 400; hops++) {
      const location = response.headers.get("location");
      await response.body?.cancel();
      if (location === null || hops > 20) throw new Error(`a redirect without a usable location at ${current.href}`);
      current = new URL(location, current);
      if (stopAt?.(current) === true) return { url: current, html: "" };
      response = await this.request(current);
    }
    return { url: current, response, html: await response.text() };
  }

  /**
   * Submits the first form of `html` (found at `pageUrl`) whose id or action
   * matches `which` (any form when absent), with its hidden inputs plus `fields`.
   */
  async submit(pageUrl: URL, html: string, fields: Record<string, string>, stopAt?: (next: URL) => boolean, which?: RegExp): Promise<{ url: URL; response?: Response; html: string }> {
    const forms = [...html.matchAll(/<form\b([^>]*)>([\s\S]*?)<\/form>/gi)];
    const form = forms.find((match) => which === undefined || which.test(match[1] ?? ""));
    if (form === undefined) throw new Error(`no form at ${pageUrl.href}:\n${html.slice(0, 2000)}`);
    const action = /\baction="([^"]*)"/i.exec(form[1] ?? "")?.[1]?.replace(/&amp;/g, "&") ?? pageUrl.href;
    const data = new URLSearchParams();
    for (const input of (form[2] ?? "").matchAll(/<input\b([^>]*)>/gi)) {
      const attributes = input[1] ?? "";
      const name = /\bname="([^"]*)"/i.exec(attributes)?.[1];
      if (name === undefined) continue;
      data.set(name, (/\bvalue="([^"]*)"/i.exec(attributes)?.[1] ?? "").replace(/&amp;/g, "&"));
    }
    for (const [name, value] of Object.entries(fields)) data.set(name, value);
    return this.follow(new URL(action, pageUrl), { form: data }, stopAt);
  }

  /** Signs `user` in at the provider's login page `at` (an interaction page) and follows on. */
  async logIn(at: { url: URL; html: string }, user: { email: string; password: string }, stopAt?: (next: URL) => boolean): Promise<{ url: URL; response?: Response; html: string }> {
    if (!at.url.pathname.startsWith("/interaction/")) throw new Error(`not the provider's login page: ${at.url.href}`);
    return this.submit(at.url, at.html, { email: user.email, password: user.password }, stopAt);
  }
}

/**
 * Plays the person of a device authorization: opens `verificationUriComplete`,
 * signs in as `user` and confirms the device.
 */
export async function approveDevice(verificationUriComplete: string, user: { email: string; password: string }, browser: FormBrowser = new FormBrowser()): Promise<void> {
  let step = await browser.follow(verificationUriComplete);
  // With the code in the URL the provider asks to confirm it (or for it); then for a login; then to confirm.
  for (let i = 0; i < 8; i++) {
    if (step.url.pathname.startsWith("/interaction/")) step = await browser.logIn(step, user);
    else if (step.html.includes("Device connected")) return;
    else if (step.html.includes("op.deviceConfirmForm")) step = await browser.submit(step.url, step.html, {}, undefined, /op\.deviceConfirmForm/);
    else if (step.html.includes("op.deviceInputForm")) step = await browser.submit(step.url, step.html, {}, undefined, /op\.deviceInputForm/);
    // The provider's self-submitting form (a script posts it in a browser).
    else if (/<form\b/i.test(step.html)) step = await browser.submit(step.url, step.html, {});
    else throw new Error(`unexpected page at ${step.url.href}:\n${step.html.slice(0, 1500)}`);
  }
  throw new Error("the device was not connected after eight pages");
}
