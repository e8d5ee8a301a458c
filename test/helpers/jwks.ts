import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { type CryptoKey, exportJWK, generateKeyPair, type JWK } from "jose";
import type { Test } from "tap";

/** A test identity provider's signing key and the JWKS URL it is served at. */
export interface TestJwks {
  /** Signs the provider's tokens (ES256, kid `idp-1`). */
  readonly privateKey: CryptoKey;
  /** `http://127.0.0.1:<port>/jwks.json`. */
  readonly url: string;
}

/**
 * A real HTTP server serving one fresh ES256 key (kid `idp-1`) as a JWKS, the way an OIDC
 * provider's `jwks_uri` does; closed at `t`'s teardown.
 */
export async function startTestJwks(t: Test): Promise<TestJwks> {
  const keys = await generateKeyPair("ES256");
  const jwk: JWK = { ...(await exportJWK(keys.publicKey)), kid: "idp-1", alg: "ES256", use: "sig" };
  const server = createServer((_request, response) => {
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({ keys: [jwk] }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return { privateKey: keys.privateKey, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/jwks.json` };
}
