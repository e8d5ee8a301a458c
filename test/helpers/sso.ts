/**
 * The stack with single sign-on: a real OpenID Provider (harness/oidc.ts) with
 * the console's client and the CLI's public client, and a broker whose
 * reviewers sign in through it (`reviewers.sso`, sealed sessions) and whose
 * API takes the provider's ID tokens for the CLI as bearer tokens.
 */
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Test } from "tap";
import { FormBrowser, freePort, type OidcProviderServer, type OidcUser, startOidcProvider } from "../../harness/index.js";
import { type Stack, type StackOptions, startStack } from "./stack.js";

/** The provider's users: the stack's reviewers, with passwords. */
export const ssoUsers = {
  dana: { email: "dana@example.com", password: "dana-password-1", groups: ["data-owners"] },
  sam: { email: "sam@example.com", password: "sam-password-1", groups: ["security"] },
  alice: { email: "alice@example.com", password: "alice-password-1", groups: ["data-owners"] },
  /** In Entra ID style: her groups claim holds a group's object id, which the broker maps to `security`. */
  erin: { email: "erin@example.com", password: "erin-password-1", groups: ["8a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"] },
  /** Known to the provider, in no reviewer group of the broker. */
  mallory: { email: "mallory@example.com", password: "mallory-password-1", groups: ["contractors"] },
} as const satisfies Record<string, OidcUser>;

/** The clients registered at the provider. */
export const ssoClients = { console: "airlock-console", cli: "airlock-cli", other: "some-other-app" } as const;

/** A stack with SSO. */
export interface SsoStack extends Stack {
  readonly op: OidcProviderServer;
  /** The file holding the broker's session sealing key. */
  readonly sessionKeyFile: string;
  /** The name on the sign-in button. */
  readonly providerName: string;
}

/** Options of {@link startSsoStack}. */
export interface SsoStackOptions {
  /** `reviewers.sessions.max_age`. @default "8h" */
  readonly maxAge?: string;
  /** Lifetime of the provider's tokens, in seconds. @default 600 */
  readonly tokenTtlSec?: number;
  /** Start a second broker replica with the same config and session key. @default false */
  readonly secondReplica?: boolean;
  /** `reviewers.step_up`; absent: no step-up. */
  readonly stepUp?: Record<string, unknown>;
  /** The host name browsers use for the broker (WebAuthn needs `localhost`, not an IP). @default "127.0.0.1" */
  readonly host?: "127.0.0.1" | "localhost";
  /** The tests' policy options ({@link startStack}'s `policy`). */
  readonly policy?: StackOptions["policy"];
}

/** Starts the provider and the stack; everything stops in `t`'s teardown. */
export async function startSsoStack(t: Test, options: SsoStackOptions = {}): Promise<SsoStack> {
  const brokerPort = await freePort();
  const brokerUrl = `http://${options.host ?? "127.0.0.1"}:${brokerPort}`;
  const consoleSecret = randomBytes(16).toString("hex");
  // The broker reads the provider's metadata on first use, so the provider may start after it
  // (and stops before the stack's leak check, teardowns being last in, first out).
  const opPort = await freePort();
  const issuer = `http://127.0.0.1:${opPort}`;
  const dir = await mkdtemp(join(tmpdir(), "airlock-sso-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const sessionKeyFile = join(dir, "session.key");
  await writeFile(sessionKeyFile, randomBytes(32).toString("hex"), { mode: 0o600 });
  const providerName = "Test IdP";
  const stack = await startStack(t, {
    brokerConfig: {
      http: `127.0.0.1:${brokerPort}`,
      reviewers: {
        auth: { kind: "oidc", issuer: issuer, audience: ssoClients.cli, jwks_url: `${issuer}/jwks` },
        sso: {
          provider_name: providerName,
          issuer: issuer,
          client_id: ssoClients.console,
          client_secret: consoleSecret,
          scopes: ["openid", "email", "profile", "groups", "offline_access"],
          cli_client_id: ssoClients.cli,
          group_map: { "8a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d": "security" },
          // Pinned, as behind a load balancer: every replica sends the provider back to the one public address.
          redirect_uri: `${brokerUrl}/api/v1/sso/callback`,
        },
        sessions: { key_file: sessionKeyFile, ...(options.maxAge === undefined ? {} : { max_age: options.maxAge }) },
        ...(options.stepUp === undefined ? {} : { step_up: options.stepUp }),
      },
    },
    ...(options.policy === undefined ? {} : { policy: options.policy }),
    ...(options.secondReplica === true ? { secondReplica: true } : {}),
  });
  const op = await startOidcProvider({
    users: Object.values(ssoUsers),
    clients: [
      { clientId: ssoClients.console, clientSecret: consoleSecret, redirectUris: [`${brokerUrl}/api/v1/sso/callback`] },
      { clientId: ssoClients.cli },
      { clientId: ssoClients.other },
    ],
    ...(options.tokenTtlSec === undefined ? {} : { tokenTtlSec: options.tokenTtlSec }),
    port: opPort,
  });
  t.teardown(() => op.stop());
  return { ...stack, op, sessionKeyFile, providerName };
}

/**
 * Signs `user` in to the console's SSO without a browser, stopping at the
 * callback: returns the callback URL (code and state) and the browser whose
 * cookies hold the sealed sign-in.
 */
export async function signInUntilCallback(stack: SsoStack, user: { email: string; password: string }, browser = new FormBrowser(), startAt = stack.brokerUrl): Promise<{ browser: FormBrowser; callback: URL }> {
  const atCallback = (url: URL) => url.pathname === "/api/v1/sso/callback";
  const loginPage = await browser.follow(`${startAt}/api/v1/sso/login?return=${encodeURIComponent("#/inbox")}`, {}, atCallback);
  const done = loginPage.url.pathname.startsWith("/interaction/") ? await browser.logIn(loginPage, user, atCallback) : loginPage;
  if (!atCallback(done.url)) throw new Error(`the sign-in did not come back to the broker: ${done.url.href}\n${done.html.slice(0, 1000)}`);
  return { browser, callback: done.url };
}

/** The full sign-in without a browser: the session cookie's value, and the browser holding it. */
export async function signInWithoutBrowser(stack: SsoStack, user: { email: string; password: string }): Promise<{ browser: FormBrowser; session: string; location: string }> {
  const { browser, callback } = await signInUntilCallback(stack, user);
  const response = await browser.request(callback);
  await response.body?.cancel();
  const session = browser.cookies(stack.brokerUrl).get("airlock_session");
  if (response.status !== 303 || session === undefined) throw new Error(`the callback answered ${response.status} ${response.headers.get("location") ?? ""}`);
  return { browser, session, location: response.headers.get("location") ?? "" };
}
