import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import t from "tap";
import { parseBrokerConfig, startBroker } from "../../broker/index.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { type AirlockError, Code, createLogger } from "../../common/index.js";
import { useInfra } from "../../harness/index.js";
import { natsSection } from "../helpers/stack.js";

const { nats, vault } = await useInfra(t, { nats: true, vault: true });
const dir = await mkdtemp(join(tmpdir(), "airlock-reviewer-config-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const key = generateDecisionKey("k1");
await writeFile(join(dir, "signing.pem"), key.signing.privateKey.export({ type: "pkcs8", format: "pem" }));
await writeFile(join(dir, "policy.yaml"), "version: 1\ndefault: deny\nrules: []\n");
const brokerNats = natsSection(await nats.credentials({ kind: "broker" }));

function config(reviewers: unknown, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    nats: brokerNats,
    vault: { address: vault.address, auth: { kind: "token", token: vault.rootToken } },
    signing_key: { key_id: "k1", file: "signing.pem" },
    policy: "policy.yaml",
    approvals: { groups: { security: ["sam@example.com"] } },
    http: "127.0.0.1:0",
    ...(reviewers === undefined ? {} : { reviewers }),
    log_level: "silent",
    ...extra,
  };
}

function parse(value: Record<string, unknown>) {
  return parseBrokerConfig(new ConfigReader(value, "", join(dir, "broker.yaml")));
}

const oidcAuth = { kind: "oidc", issuer: "https://idp.example.com", audience: "airlock-cli", jwks_url: "https://idp.example.com/keys" };
const sso = { provider_name: "Okta", issuer: "https://idp.example.com", client_id: "airlock-console", client_secret: "s" };
const sessions = { key_file: "session.key" };

await t.test("the reviewers section is validated; each error names its field", async (t) => {
  const cases: [unknown, string][] = [
    [{ auth: { kind: "saml" } }, "reviewers.auth.kind"],
    [{ auth: { kind: "oidc", issuer: "https://idp", audience: "a" } }, "reviewers.auth.jwks_url"],
    [{ auth: { kind: "oidc", issuer: "https://idp", audience: "a", jwks_url: "ftp://idp/keys" } }, "reviewers.auth.jwks_url"],
    [{ auth: { kind: "static", tokens: [{ token: "short", reviewer: "sam@example.com" }] } }, "reviewers.auth.tokens[0].token"],
    [
      {
        auth: {
          kind: "static",
          tokens: [
            { token: "same-token-twice", reviewer: "a@example.com" },
            { token: "same-token-twice", reviewer: "b@example.com" },
          ],
        },
      },
      "reviewers.auth.tokens[1].token",
    ],
    [{ auth: { kind: "static", tokens: [{ token: "long-enough-token", reviewer: "a@example.com" }] }, rate_limit_per_minute: 0 }, "reviewers.rate_limit_per_minute"],
    [{ auth: { kind: "static", tokens: [{ token: "long-enough-token", reviewer: "a@example.com" }] }, extra: 1 }, "reviewers.extra"],
    [{ auth: { kind: "static", tokens: [{ token: "long-enough-token", reviewer: "a@example.com" }] }, public_origin: "https://airlock.example.com/console" }, "reviewers.public_origin"],
    // Single sign-on and sealed sessions.
    [{ auth: oidcAuth, sso: { ...sso } }, "reviewers.sessions"],
    [{ auth: oidcAuth, sso: { ...sso, issuer: "http://idp.example.com" }, sessions }, "reviewers.sso.issuer"],
    [{ auth: oidcAuth, sso: { ...sso, provider_name: undefined }, sessions }, "reviewers.sso.provider_name"],
    [{ auth: oidcAuth, sso: { ...sso, scopes: ["email"] }, sessions }, "reviewers.sso.scopes"],
    [{ auth: oidcAuth, sso: { ...sso, redirect_uri: "http://airlock.example.com/cb" }, sessions }, "reviewers.sso.redirect_uri"],
    [{ auth: oidcAuth, sso: { ...sso, group_map: { abc: 1 } }, sessions }, "reviewers.sso.group_map.abc"],
    [{ auth: oidcAuth, sso: { ...sso, client_secret_file: "x" }, sessions }, "reviewers.sso.client_secret_file"],
    [{ auth: oidcAuth, sso, sessions: { key_file: "session.key", max_age: "forever" } }, "reviewers.sessions.max_age"],
    [{ auth: oidcAuth, sso, sessions: {} }, "reviewers.sessions.key_file"],
  ];
  for (const [reviewers, field] of cases) {
    const error = (() => {
      try {
        parse(config(reviewers));
        return undefined;
      } catch (caught) {
        return caught as AirlockError;
      }
    })();
    t.equal(error?.code, Code.InvalidArgument, `refused: ${JSON.stringify(reviewers)}`);
    t.equal(error?.details.field, field);
  }
  t.throws(() => parse(config(undefined, { takeover_after: "soon" })), new RegExp("takeover_after must be a positive duration"));
  const parsed = parse(config({ auth: { kind: "oidc", issuer: "https://idp", audience: "airlock", jwks_url: "https://idp/keys" } }));
  t.match(parsed.reviewers?.auth, { kind: "oidc", reviewerClaim: "email", groupsClaim: "groups", clockToleranceSec: 30 }, "OIDC defaults");
  t.equal(parsed.reviewers?.ratePerMinute, 300);
  t.equal(parsed.takeoverAfterMs, 10_000);
  const withSso = parse(config({ auth: oidcAuth, sso: { ...sso, group_map: { "3f2c9a10-5b7e-4c61-9a0d-2e8f7b6c4d11": "data-owners" } }, sessions }));
  t.match(withSso.reviewers?.sso, { scopes: ["openid", "email", "profile"], reviewerClaim: "email", groupsClaim: "groups", groupMap: { "3f2c9a10-5b7e-4c61-9a0d-2e8f7b6c4d11": "data-owners" } }, "SSO defaults");
  t.equal(withSso.reviewers?.sessions?.maxAgeMs, 8 * 3_600_000, "sessions last 8 h by default");
  t.equal(withSso.reviewers?.sessions?.keyFile, join(dir, "session.key"), "the key file is resolved against the config's directory");
});

await t.test("a session key file that is missing or short stops the broker at start, naming the field", async (t) => {
  await writeFile(join(dir, "short.key"), "abcd");
  for (const [file, pattern] of [
    ["missing.key", /cannot read the session key file/],
    ["short.key", /shorter than 32 bytes/],
  ] as const) {
    const error = await startBroker(parse(config({ auth: oidcAuth, sso, sessions: { key_file: file } })), { log: createLogger({ name: "t", level: "silent" }) }).then(
      async (broker) => {
        await broker.close();
        return undefined;
      },
      (caught: unknown) => caught as AirlockError,
    );
    t.equal(error?.details.field, "reviewers.sessions.key_file", file);
    t.match(error?.rawMessage, pattern);
    t.notMatch(error?.rawMessage, /abcd/, "the key is never in the message");
  }
});

await t.test("dev mode (static tokens) logs a warning at start; without a reviewers section the API answers 404", async (t) => {
  const lines: string[] = [];
  const log = createLogger({
    name: "broker",
    level: "info",
    destination: new Writable({
      write(chunk: Buffer, _encoding, done) {
        lines.push(chunk.toString());
        done();
      },
    }),
  });
  const dev = await startBroker(parse(config({ auth: { kind: "static", tokens: [{ token: "dev-token-for-sam", reviewer: "sam@example.com", groups: ["security"] }] } })), { log });
  t.teardown(() => dev.close());
  const warning = lines.map((line) => JSON.parse(line) as { level: number; msg: string }).find((line) => /DEV MODE/.test(line.msg));
  t.equal(warning?.level, 40, "a warn-level line says dev mode is on");
  t.notMatch(lines.join(""), /dev-token-for-sam/, "the token itself is never logged");
  const me = await fetch(`${dev.httpUrl}/api/v1/me`, { headers: { authorization: "Bearer dev-token-for-sam" } });
  t.same(await me.json(), { reviewer: "sam@example.com", groups: ["security"], breakGlass: false });

  const plain = await startBroker(parse(config(undefined, { replica_id: "no-api" })), { log: createLogger({ name: "broker", level: "silent" }) });
  t.teardown(() => plain.close());
  const none = await fetch(`${plain.httpUrl}/api/v1/me`, { headers: { authorization: "Bearer dev-token-for-sam" } });
  t.equal(none.status, 404);
  t.match(await none.json(), { code: "not_found" });
  t.equal((await fetch(`${plain.httpUrl}/healthz`)).status, 200, "health is served either way");
});

await t.test("vault.token_role: written at start when asked, confining per-action tokens", async (t) => {
  t.throws(() => parse(config(undefined, { vault: { address: vault.address, auth: { kind: "token", token: vault.rootToken }, token_role: { name: "bad name", allowed_policies_glob: ["x-*"] } } })), /vault\.token_role\.name/);
  const withRole = parse(
    config(undefined, {
      replica_id: "role-writer",
      vault: { address: vault.address, auth: { kind: "token", token: vault.rootToken }, token_role: { name: "airlock-action", allowed_policies_glob: ["airlock-action-*"], max_ttl: "30m", configure: true } },
    }),
  );
  t.match(withRole.vault.tokenRole, { name: "airlock-action", allowedPoliciesGlob: ["airlock-action-*"], maxTtlSeconds: 1800, configure: true });
  const running = await startBroker(withRole, { log: createLogger({ name: "broker", level: "silent" }) });
  t.teardown(() => running.close());
  const role = (await (await fetch(`${vault.address}/v1/auth/token/roles/airlock-action`, { headers: { "x-vault-token": vault.rootToken } })).json()) as { data?: Record<string, unknown> };
  t.match(role.data, { orphan: true, renewable: false, allowed_policies_glob: ["airlock-action-*"], disallowed_policies: ["root"], token_explicit_max_ttl: 1800 }, "the role Vault now holds");
});
