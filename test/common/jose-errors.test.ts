// jose's failures as Airlock errors: the token's faults are unauthenticated with a stable reason;
// an issuer whose keys cannot be fetched (refused, a non-200 answer) is unavailable, not a bad token.
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { createRemoteJWKSet, exportJWK, generateKeyPair, jwtVerify, SignJWT } from "jose";
import t from "tap";
import { Code } from "../../common/errors.js";
import { joseFailure } from "../../common/jose-errors.js";
import { freePort } from "../../harness/index.js";

const words = { token: "the test token", keys: "the test issuer's keys" };
const keys = await generateKeyPair("ES256");
const jwk = { ...(await exportJWK(keys.publicKey)), kid: "k1", alg: "ES256" };
let answer: "keys" | "error" = "keys";
const server = createServer((_request, response) => {
  if (answer === "error") {
    response.writeHead(500).end("down");
    return;
  }
  response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ keys: [jwk] }));
});
await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
const url = new URL(`http://127.0.0.1:${(server.address() as AddressInfo).port}/jwks`);

const sign = (claims: { exp?: number; iss?: string } = {}) =>
  new SignJWT({}).setProtectedHeader({ alg: "ES256", kid: "k1" }).setSubject("x").setIssuer(claims.iss ?? "https://issuer.test").setAudience("aud").setExpirationTime(claims.exp ?? Math.floor(Date.now() / 1000) + 60).sign(keys.privateKey);
/** Verifies `token` against a fresh key set at `at`, returning the classified failure. */
async function failure(token: string, at: URL = url) {
  return jwtVerify(token, createRemoteJWKSet(at), { issuer: "https://issuer.test", audience: "aud" }).then(
    () => undefined,
    (error: unknown) => joseFailure(error, words),
  );
}

await t.test("the token's faults are unauthenticated, each with its reason", async (t) => {
  t.equal(await failure(await sign()), undefined, "a good token verifies");
  t.match(await failure(await sign({ exp: Math.floor(Date.now() / 1000) - 3600 })), { code: Code.Unauthenticated, details: { reason: "token_expired" } });
  t.match(await failure(await sign({ iss: "https://elsewhere.test" })), { code: Code.Unauthenticated, details: { reason: "wrong_issuer" } });
  t.match(await failure("not.a.jwt"), { code: Code.Unauthenticated, details: { reason: "malformed_token" } });
  const forged = await new SignJWT({}).setProtectedHeader({ alg: "ES256", kid: "k1" }).setIssuer("https://issuer.test").setAudience("aud").setExpirationTime("1m").sign((await generateKeyPair("ES256")).privateKey);
  t.match(await failure(forged), { code: Code.Unauthenticated, details: { reason: "bad_signature" } });
});

await t.test("keys that cannot be fetched are unavailable, not a bad token", async (t) => {
  answer = "error";
  t.match(await failure(await sign()), { code: Code.Unavailable, details: { reason: "jwks_unavailable" } }, "the issuer answers 500");
  answer = "keys";
  const closed = new URL(`http://127.0.0.1:${await freePort()}/jwks`);
  t.match(await failure(await sign(), closed), { code: Code.Unavailable, details: { reason: "jwks_unavailable" } }, "nothing listens");
  t.match(joseFailure(new TypeError("fetch failed"), { ...words, keysReason: "keys_unavailable" }), { code: Code.Unavailable, details: { reason: "keys_unavailable" } }, "the reason can be named per caller");
});
