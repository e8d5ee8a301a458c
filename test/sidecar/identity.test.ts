import { generateKeyPairSync } from "node:crypto";
import { createServer as createHttpServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { connect as tlsConnect, createServer as createTlsServer, type PeerCertificate } from "node:tls";
import { exportJWK, exportSPKI, generateKeyPair, type JWK, type JWTPayload, SignJWT } from "jose";
import t, { type Test } from "tap";
import { makeTestPki } from "../helpers/pki.js";
import { AirlockError, Code } from "../../common/errors.js";
import {
  AgentAuthenticator,
  type AgentAuthOptions,
  type AuthFailureReason,
  agentAuthDefaults,
  parseSubjectAltName,
} from "../../sidecar/identity.js";

const issuer = "https://idp.corp.example";
const audience = "airlock-sidecar";

const ed = await generateKeyPair("EdDSA", { extractable: true });
const es = await generateKeyPair("ES256", { extractable: true });
const stranger = await generateKeyPair("EdDSA", { extractable: true });
const edPem = await exportSPKI(ed.publicKey);
const esJwk: JWK = { ...(await exportJWK(es.publicKey)), kid: "es-1" };

type SigningKey = Awaited<ReturnType<typeof generateKeyPair>>["privateKey"];

interface TokenOptions {
  alg?: string;
  key?: SigningKey;
  kid?: string;
  claims?: JWTPayload;
  iss?: string;
  aud?: string;
  exp?: number | null;
  nbf?: number;
}

const nowSec = () => Math.floor(Date.now() / 1000);

async function token(options: TokenOptions = {}): Promise<string> {
  const jwt = new SignJWT({ act_for: "alice@corp.com", chain: ["etl-scheduler", "alice@corp.com", ""], ...options.claims })
    .setProtectedHeader({ alg: options.alg ?? "EdDSA", ...(options.kid === undefined ? {} : { kid: options.kid }) })
    .setSubject("spiffe://corp/agent/etl")
    .setIssuer(options.iss ?? issuer)
    .setAudience(options.aud ?? audience)
    .setIssuedAt();
  if (options.exp !== null) jwt.setExpirationTime(options.exp ?? nowSec() + 300);
  if (options.nbf !== undefined) jwt.setNotBefore(options.nbf);
  return jwt.sign(options.key ?? ed.privateKey);
}

const staticJwt: AgentAuthOptions = { kind: "jwt", issuer, audience, keys: { kind: "static", publicKeys: [edPem, JSON.stringify(esJwk)] } };
const auth = await AgentAuthenticator.create([staticJwt, { kind: "mtls" }]);

const bearer = (jwt: string) => ({ headers: { authorization: `Bearer ${jwt}` } });

/** Asserts an authentication failure: code, stable reason, and a message and JSON form free of the token. */
async function fails(t: Test, attempt: Promise<unknown>, reason: AuthFailureReason, secret?: string): Promise<void> {
  try {
    await attempt;
    t.fail(`expected ${reason}`);
  } catch (error) {
    t.type(error, AirlockError);
    const e = error as AirlockError;
    t.equal(e.code, Code.Unauthenticated, `${reason}: unauthenticated (${e.rawMessage})`);
    t.equal(e.details["reason"], reason);
    if (secret !== undefined) {
      // The signature part alone would be enough to spot a leak; check every part.
      for (const part of secret.split(".").filter((p) => p.length > 0)) {
        t.notOk(e.message.includes(part), `${reason}: message does not carry the token`);
        t.notOk(JSON.stringify(e).includes(part), `${reason}: JSON form does not carry the token`);
      }
      t.equal(e.cause, undefined, `${reason}: no cause that could carry the payload`);
    }
  }
}

await t.test("a valid token gives the agent, the human and the deduplicated chain", async (t) => {
  const identity = await auth.authenticate(bearer(await token()));
  t.same(identity, {
    agent: "spiffe://corp/agent/etl",
    onBehalfOf: "alice@corp.com",
    chain: ["spiffe://corp/agent/etl", "alice@corp.com", "etl-scheduler"],
    authenticatedBy: "jwt",
    attestation: { agent: `jwt:${issuer}`, human: `claim:${issuer}:act_for` },
  });
  // ES256 against the JSON JWK (with kid), in the fallback header, header name in any case.
  const es256 = await token({ alg: "ES256", key: es.privateKey, kid: "es-1", claims: { act_for: "bob@corp.com", chain: undefined } });
  t.same(await auth.authenticate({ headers: { "X-Airlock-Agent-Token": es256 } }), {
    agent: "spiffe://corp/agent/etl",
    onBehalfOf: "bob@corp.com",
    chain: ["spiffe://corp/agent/etl", "bob@corp.com"],
    authenticatedBy: "jwt",
    attestation: { agent: `jwt:${issuer}`, human: `claim:${issuer}:act_for` },
  });
  // A kid the PEM key does not name still verifies against it (the PEM has no kid).
  t.equal((await auth.authenticate(bearer(await token({ kid: "whatever" }))))?.agent, "spiffe://corp/agent/etl");
  // No human: an unattended pipeline.
  const alone = await auth.authenticate({ headers: { authorization: `bearer ${await token({ claims: { act_for: undefined, chain: undefined } })}` } });
  t.same(alone, { agent: "spiffe://corp/agent/etl", onBehalfOf: "", chain: ["spiffe://corp/agent/etl"], authenticatedBy: "jwt", attestation: { agent: `jwt:${issuer}`, human: "" } });
  // A custom human claim.
  const custom = await AgentAuthenticator.create([{ ...staticJwt, humanClaim: "on_behalf_of" }]);
  t.equal((await custom.authenticate(bearer(await token({ claims: { on_behalf_of: "carol@corp.com" } }))))?.onBehalfOf, "carol@corp.com");
});

await t.test("no credential at all is undefined, not an error", async (t) => {
  t.equal(await auth.authenticate({ headers: {} }), undefined);
  t.equal(await auth.authenticate({ headers: { authorization: undefined, "content-type": "application/grpc" } }), undefined);
  // An upstream's own Basic credentials are not an agent token.
  t.equal(await auth.authenticate({ headers: { authorization: "Basic dXNlcjpwdw==" } }), undefined);
  // getPeerCertificate() answers {} when the client sent no certificate.
  t.equal(await auth.authenticate({ headers: {}, peerCertificate: {} as PeerCertificate }), undefined);
});

await t.test("invalid tokens are unauthenticated with a clear message that never carries the token", async (t) => {
  const cases: [string, Promise<string> | string, AuthFailureReason, RegExp][] = [
    ["expired beyond the tolerance", token({ exp: nowSec() - 120 }), "token_expired", /expired/],
    ["not valid yet", token({ nbf: nowSec() + 600 }), "token_not_yet_valid", /not valid yet/],
    ["wrong issuer", token({ iss: "https://evil.example" }), "wrong_issuer", /issuer "https:\/\/evil\.example" is not trusted/],
    ["wrong audience", token({ aud: "another-service" }), "wrong_audience", /audience does not include "airlock-sidecar"/],
    ["wrong key", token({ key: stranger.privateKey }), "bad_signature", /signature is invalid/],
    ["wrong key, with a kid no key has", token({ alg: "ES256", key: (await generateKeyPair("ES256")).privateKey, kid: "nope" }), "no_matching_key", /no trusted key/],
    ["algorithm not allowed", token({ alg: "ES384", key: (await generateKeyPair("ES384")).privateKey }), "algorithm_not_allowed", /algorithm is not one of EdDSA, ES256, RS256/],
    ["no expiry", token({ exp: null }), "invalid_claim", /lacks the "exp" claim/],
    ["human claim not a string", token({ claims: { act_for: 42 } }), "invalid_claim", /"act_for" must be a string/],
    ["chain claim not strings", token({ claims: { chain: ["a", 1] } }), "invalid_claim", /"chain" must be an array of strings/],
    ["not a JWT", "not-a-jwt", "malformed_token", /not a well-formed/],
    ["two parts", "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0", "malformed_token", /not a well-formed/],
  ];
  for (const [label, pending, reason, message] of cases) {
    const jwt = await pending;
    await t.test(label, async (t) => {
      await fails(t, auth.authenticate(bearer(jwt)), reason, jwt);
      await t.rejects(auth.authenticate(bearer(jwt)), { message });
    });
  }

  await t.test("tampered payload and tampered signature", async (t) => {
    const jwt = await token();
    const [header, payload, signature] = jwt.split(".") as [string, string, string];
    const claims = JSON.parse(Buffer.from(payload, "base64url").toString()) as JWTPayload;
    const forged = `${header}.${Buffer.from(JSON.stringify({ ...claims, sub: "spiffe://corp/agent/admin" })).toString("base64url")}.${signature}`;
    await fails(t, auth.authenticate(bearer(forged)), "bad_signature", forged);
    const flipped = Buffer.from(signature, "base64url");
    flipped[0] = (flipped[0] ?? 0) ^ 0xff;
    const badSig = `${header}.${payload}.${flipped.toString("base64url")}`;
    await fails(t, auth.authenticate(bearer(badSig)), "bad_signature", badSig);
    // alg switched to HS256 with the public key as HMAC secret: the classic confusion attack.
    const hs = `${Buffer.from(JSON.stringify({ alg: "HS256" })).toString("base64url")}.${payload}.${signature}`;
    await fails(t, auth.authenticate(bearer(hs)), "algorithm_not_allowed", hs);
    const none = `${Buffer.from(JSON.stringify({ alg: "none" })).toString("base64url")}.${payload}.`;
    await fails(t, auth.authenticate(bearer(none)), "algorithm_not_allowed", none);
  });

  await t.test("within the clock tolerance is still valid; the tolerance is configurable", async (t) => {
    const recent = await token({ exp: nowSec() - 10 });
    t.ok(await auth.authenticate(bearer(recent)), `default tolerance ${agentAuthDefaults.clockToleranceSec}s`);
    const strict = await AgentAuthenticator.create([{ ...staticJwt, clockToleranceSec: 0 }]);
    await fails(t, strict.authenticate(bearer(recent)), "token_expired", recent);
  });

  await t.test("a verified token is reused until its own exp and never past it; one valid only by the tolerance is not kept", async (t) => {
    const strict = await AgentAuthenticator.create([{ ...staticJwt, clockToleranceSec: 0 }]);
    const expiresAt = nowSec() + 2;
    const jwt = await token({ exp: expiresAt });
    const first = await strict.authenticate(bearer(jwt));
    t.ok(Object.isFrozen(first) && Object.isFrozen(first?.chain), "the shared identity cannot be changed by a caller");
    t.equal(await strict.authenticate(bearer(jwt)), first, "the second call is answered from the cache (the same identity object)");
    while (Date.now() <= expiresAt * 1000 + 50) await new Promise((resolve) => setTimeout(resolve, 100));
    await fails(t, strict.authenticate(bearer(jwt)), "token_expired", jwt);

    // Not yet valid, accepted within the default tolerance: verified again each time.
    const early = await token({ nbf: nowSec() + 5 });
    const once = await auth.authenticate(bearer(early));
    t.ok(once);
    t.not(await auth.authenticate(bearer(early)), once, "not answered from the cache");
  });

  await t.test("ambiguous or empty tokens", async (t) => {
    const jwt = await token();
    await fails(t, auth.authenticate({ headers: { authorization: [`Bearer ${jwt}`, `Bearer ${jwt}`] } }), "malformed_token", jwt);
    await fails(t, auth.authenticate({ headers: { authorization: "Bearer " } }), "malformed_token");
    await fails(t, auth.authenticate({ headers: { "x-airlock-agent-token": "" } }), "malformed_token");
  });

  await t.test("a sidecar without jwt refuses tokens rather than ignoring them", async (t) => {
    const mtlsOnly = await AgentAuthenticator.create([{ kind: "mtls" }]);
    const jwt = await token();
    await fails(t, mtlsOnly.authenticate(bearer(jwt)), "tokens_not_accepted", jwt);
  });
});

await t.test("several issuers: each token is checked by its own issuer's keys", async (t) => {
  const other = await generateKeyPair("EdDSA");
  const two = await AgentAuthenticator.create([
    staticJwt,
    { kind: "jwt", issuer: "https://ci.corp.example", audience, keys: { kind: "static", publicKeys: [await exportSPKI(other.publicKey)] } },
  ]);
  t.equal((await two.authenticate(bearer(await token())))?.agent, "spiffe://corp/agent/etl");
  t.equal((await two.authenticate(bearer(await token({ iss: "https://ci.corp.example", key: other.privateKey }))))?.agent, "spiffe://corp/agent/etl");
  // The CI issuer's name on a token signed by the IdP's key: CI's keys do not verify it.
  await fails(t, two.authenticate(bearer(await token({ iss: "https://ci.corp.example" }))), "bad_signature");
});

async function serveJwks(t: Test, jwks: { keys: JWK[] }): Promise<{ url: string; hits: () => number }> {
  let hits = 0;
  const server: Server = createHttpServer((_req, res) => {
    hits++;
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(jwks));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        // fetch keeps connections alive; drop them so close() does not wait for their idle timeout.
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  );
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/jwks.json`, hits: () => hits };
}

await t.test("JWKS URL: keys fetched from a real HTTP server", async (t) => {
  const edJwk: JWK = { ...(await exportJWK(ed.publicKey)), kid: "ed-1", alg: "EdDSA", use: "sig" };
  const jwks = await serveJwks(t, { keys: [edJwk, esJwk] });
  const remote = await AgentAuthenticator.create([{ kind: "jwt", issuer, audience, keys: { kind: "jwks_url", url: jwks.url } }]);
  t.equal(jwks.hits(), 0, "fetched lazily, not at start-up");

  t.same(await remote.authenticate(bearer(await token({ kid: "ed-1" }))), {
    agent: "spiffe://corp/agent/etl",
    onBehalfOf: "alice@corp.com",
    chain: ["spiffe://corp/agent/etl", "alice@corp.com", "etl-scheduler"],
    authenticatedBy: "jwt",
    attestation: { agent: `jwt:${issuer}`, human: `claim:${issuer}:act_for` },
  });
  t.equal((await remote.authenticate(bearer(await token({ alg: "ES256", key: es.privateKey, kid: "es-1" }))))?.agent, "spiffe://corp/agent/etl");
  // Without a kid, the one EdDSA key in the set is used.
  t.ok(await remote.authenticate(bearer(await token())));
  t.equal(jwks.hits(), 1, "the JWKS is cached");

  const wrongKey = await token({ key: stranger.privateKey, kid: "ed-1" });
  await fails(t, remote.authenticate(bearer(wrongKey)), "bad_signature", wrongKey);
  const unknownKid = await token({ key: stranger.privateKey, kid: "ed-2" });
  await fails(t, remote.authenticate(bearer(unknownKid)), "no_matching_key", unknownKid);
  const expired = await token({ kid: "ed-1", exp: nowSec() - 300 });
  await fails(t, remote.authenticate(bearer(expired)), "token_expired", expired);
});

await t.test("JWKS URL: several keys without kid are each tried", async (t) => {
  const second = await generateKeyPair("EdDSA", { extractable: true });
  const jwks = await serveJwks(t, { keys: [await exportJWK(stranger.publicKey), await exportJWK(second.publicKey), await exportJWK(ed.publicKey)] });
  const remote = await AgentAuthenticator.create([{ kind: "jwt", issuer, audience, keys: { kind: "jwks_url", url: jwks.url } }]);
  t.ok(await remote.authenticate(bearer(await token())), "the third key verifies");
  const nobody = await token({ key: (await generateKeyPair("EdDSA")).privateKey });
  await fails(t, remote.authenticate(bearer(nobody)), "bad_signature", nobody);
});

await t.test("JWKS URL unreachable: unavailable, fail closed, token not in the error", async (t) => {
  const server = createHttpServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  const remote = await AgentAuthenticator.create([{ kind: "jwt", issuer, audience, keys: { kind: "jwks_url", url: `http://127.0.0.1:${port}/jwks` } }]);
  const jwt = await token();
  try {
    await remote.authenticate(bearer(jwt));
    t.fail("should fail");
  } catch (error) {
    const e = error as AirlockError;
    t.equal(e.code, Code.Unavailable, e.message);
    t.notOk(e.message.includes(jwt.split(".")[2] ?? "?"));
    t.notOk(JSON.stringify(e).includes(jwt.split(".")[2] ?? "?"));
  }
});

await t.test("mTLS with a PeerCertificate-shaped object", async (t) => {
  const peer = (subjectaltname?: string) => ({ subject: { CN: "etl" }, ...(subjectaltname === undefined ? {} : { subjectaltname }) }) as PeerCertificate;
  const identity = await auth.authenticate({
    headers: {},
    peerCertificate: peer("URI:spiffe://corp/agent/etl, URI:airlock://on-behalf-of/alice%40corp.com, DNS:etl.corp"),
  });
  t.same(identity, {
    agent: "spiffe://corp/agent/etl",
    onBehalfOf: "alice@corp.com",
    chain: ["spiffe://corp/agent/etl", "alice@corp.com"],
    authenticatedBy: "mtls",
    attestation: { agent: "mtls", human: "mtls_san" },
  });
  // Order does not matter: the human's URI is recognised by its prefix.
  t.same(await auth.authenticate({ headers: {}, peerCertificate: peer("DNS:x, URI:airlock://on-behalf-of/bob@corp.com, URI:spiffe://corp/agent/etl") }), {
    agent: "spiffe://corp/agent/etl",
    onBehalfOf: "bob@corp.com",
    chain: ["spiffe://corp/agent/etl", "bob@corp.com"],
    authenticatedBy: "mtls",
    attestation: { agent: "mtls", human: "mtls_san" },
  });
  // mTLS wins over a token presented on the same call (here, an invalid one: it is not even looked at).
  t.equal((await auth.authenticate({ headers: { authorization: "Bearer junk" }, peerCertificate: peer("URI:spiffe://corp/agent/etl") }))?.authenticatedBy, "mtls");
  // A certificate without a URI SAN identifies nobody.
  await fails(t, auth.authenticate({ headers: {}, peerCertificate: peer("DNS:etl.corp, IP Address:10.0.0.1") }), "certificate_without_uri_san");
  await fails(t, auth.authenticate({ headers: {}, peerCertificate: peer() }), "certificate_without_uri_san");
  await fails(t, auth.authenticate({ headers: {}, peerCertificate: peer("URI:airlock://on-behalf-of/alice@corp.com") }), "certificate_without_uri_san");
  // ...but a token on the same call decides then.
  t.equal((await auth.authenticate({ ...bearer(await token()), peerCertificate: peer("DNS:etl.corp") }))?.authenticatedBy, "jwt");
  // A certificate the TLS layer did not verify is refused, token or not.
  await fails(t, auth.authenticate({ headers: {}, peerCertificate: peer("URI:spiffe://corp/agent/etl"), peerAuthorized: false }), "certificate_not_verified");
  await fails(t, auth.authenticate({ ...bearer(await token()), peerCertificate: peer("URI:spiffe://corp/agent/etl"), peerAuthorized: false }), "certificate_not_verified");
  // Without an mtls method, certificates are ignored.
  const jwtOnly = await AgentAuthenticator.create([staticJwt]);
  t.equal(await jwtOnly.authenticate({ headers: {}, peerCertificate: peer("URI:spiffe://corp/agent/etl") }), undefined);
  // A custom prefix.
  const custom = await AgentAuthenticator.create([{ kind: "mtls", onBehalfOfPrefix: "urn:human:" }]);
  t.equal((await custom.authenticate({ headers: {}, peerCertificate: peer("URI:spiffe://corp/agent/etl, URI:urn:human:dave") }))?.onBehalfOf, "dave");
});

await t.test("subjectaltname parsing is robust to Node's quoting", async (t) => {
  t.same(parseSubjectAltName("URI:spiffe://corp/agent/etl, URI:airlock://on-behalf-of/alice, DNS:x"), [
    { type: "URI", value: "spiffe://corp/agent/etl" },
    { type: "URI", value: "airlock://on-behalf-of/alice" },
    { type: "DNS", value: "x" },
  ]);
  // A SAN containing ", URI:" is one quoted value, not a smuggled second entry.
  t.same(parseSubjectAltName('URI:"spiffe://corp/a, URI:spiffe://corp/admin", DNS:x'), [
    { type: "URI", value: "spiffe://corp/a, URI:spiffe://corp/admin" },
    { type: "DNS", value: "x" },
  ]);
  t.same(parseSubjectAltName('URI:"a\\"b", IP Address:127.0.0.1'), [
    { type: "URI", value: 'a"b' },
    { type: "IP Address", value: "127.0.0.1" },
  ]);
  t.same(parseSubjectAltName(""), []);
  t.same(parseSubjectAltName("garbage"), []);
  const smuggled = await auth.authenticate({ headers: {}, peerCertificate: { subjectaltname: 'URI:"spiffe://corp/a, URI:spiffe://corp/admin"' } as PeerCertificate });
  t.equal(smuggled?.agent, "spiffe://corp/a, URI:spiffe://corp/admin", "the whole quoted value, never the smuggled admin URI alone");
});

await t.test("create() refuses unusable configuration", async (t) => {
  const invalid = async (methods: AgentAuthOptions[], message: RegExp) => t.rejects(AgentAuthenticator.create(methods), { code: Code.InvalidArgument, message });
  const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
  await invalid([], /no agent authentication method/);
  await invalid([{ kind: "mtls" }, { kind: "mtls" }], /mtls is configured twice/);
  await invalid([staticJwt, staticJwt], /configured twice/);
  await invalid([{ ...staticJwt, algorithms: ["HS256"] }], /"HS256" is not supported/);
  await invalid([{ ...staticJwt, algorithms: ["none"] }], /"none" is not supported/);
  await invalid([{ ...staticJwt, algorithms: [] }], /algorithms must not be empty/);
  await invalid([{ ...staticJwt, keys: { kind: "static", publicKeys: [] } }], /at least one public key/);
  await invalid([{ ...staticJwt, keys: { kind: "static", publicKeys: ["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"] } }], /static key #0 is not a parsable/);
  await invalid([{ ...staticJwt, keys: { kind: "static", publicKeys: [rsa.privateKey.export({ type: "pkcs8", format: "pem" }).toString()] } }], /#0 is a private key/);
  await invalid([{ ...staticJwt, keys: { kind: "static", publicKeys: [JSON.stringify(await exportJWK(es.privateKey))] } }], /#0 is a private or symmetric key/);
  await invalid([{ ...staticJwt, keys: { kind: "static", publicKeys: ["{not json"] } }], /#0 is neither PEM nor JSON/);
  await invalid(
    [{ ...staticJwt, algorithms: ["EdDSA"], keys: { kind: "static", publicKeys: [edPem, rsa.publicKey.export({ type: "spki", format: "pem" }).toString()] } }],
    /static key #1 \(RSA\) fits none of the allowed algorithms EdDSA/,
  );
  await invalid([{ ...staticJwt, keys: { kind: "jwks_url", url: "not a url" } }], /is not a URL/);
  await invalid([{ ...staticJwt, keys: { kind: "jwks_url", url: "file:///etc/passwd" } }], /must be http\(s\)/);
  await invalid([{ ...staticJwt, issuer: "" }], /issuer must not be empty/);
  await invalid([{ ...staticJwt, clockToleranceSec: -1 }], /clockToleranceSec/);
  await invalid([{ kind: "mtls", onBehalfOfPrefix: "" }], /onBehalfOfPrefix/);
  // An RSA public key is fine where RS256 is allowed (the default set).
  t.ok(await AgentAuthenticator.create([{ ...staticJwt, keys: { kind: "static", publicKeys: [rsa.publicKey.export({ type: "spki", format: "pem" }).toString()] } }]));
});

await t.test("mTLS over a real TLS handshake with openssl-issued certificates", async (t) => {
  const pki = makeTestPki();
  t.teardown(() => pki.remove());
  const file = (name: string) => pki.file(name);

  // rejectUnauthorized: false, as a sidecar that also admits token-only agents runs;
  // the authenticator is told socket.authorized.
  const seen: { cert: PeerCertificate; authorized: boolean }[] = [];
  const server = createTlsServer({ key: file("server.key"), cert: file("server.crt"), ca: file("ca.crt"), requestCert: true, rejectUnauthorized: false }, (socket) => {
    seen.push({ cert: socket.getPeerCertificate(), authorized: socket.authorized });
    socket.end("ok");
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const port = (server.address() as AddressInfo).port;

  const handshake = async (client?: string): Promise<{ cert: PeerCertificate; authorized: boolean }> => {
    const before = seen.length;
    await new Promise<void>((resolve, reject) => {
      const socket = tlsConnect({ host: "127.0.0.1", port, ca: file("ca.crt"), ...(client === undefined ? {} : { key: file(`${client}.key`), cert: file(`${client}.crt`) }) });
      socket.on("error", reject);
      socket.on("data", () => undefined);
      socket.on("end", () => socket.end());
      socket.on("close", () => resolve());
    });
    const result = seen[before];
    if (result === undefined) throw new Error("server saw no connection");
    return result;
  };

  const good = await handshake("agent");
  t.ok(good.authorized, "the CA-issued agent certificate is verified");
  t.same(await auth.authenticate({ headers: {}, peerCertificate: good.cert, peerAuthorized: good.authorized }), {
    agent: "spiffe://corp/agent/etl",
    onBehalfOf: "alice@corp.com",
    chain: ["spiffe://corp/agent/etl", "alice@corp.com"],
    authenticatedBy: "mtls",
    attestation: { agent: "mtls", human: "mtls_san" },
  });

  const noUri = await handshake("nouri");
  t.ok(noUri.authorized);
  await fails(t, auth.authenticate({ headers: {}, peerCertificate: noUri.cert, peerAuthorized: noUri.authorized }), "certificate_without_uri_san");

  const rogue = await handshake("rogue");
  t.notOk(rogue.authorized, "a certificate from another CA is not verified");
  await fails(t, auth.authenticate({ headers: {}, peerCertificate: rogue.cert, peerAuthorized: rogue.authorized }), "certificate_not_verified");

  const none = await handshake();
  t.same(Object.keys(none.cert), [], "no client certificate: an empty object");
  t.equal(await auth.authenticate({ headers: {}, peerCertificate: none.cert, peerAuthorized: none.authorized }), undefined);
  t.equal((await auth.authenticate({ ...bearer(await token()), peerCertificate: none.cert, peerAuthorized: none.authorized }))?.authenticatedBy, "jwt");
});

await t.test("token exchange (RFC 8693): the issuer attests the human as the subject and the agent in act; a self-named human is refused", async (t) => {
  const exchanged = await AgentAuthenticator.create([{ ...staticJwt, delegation: "token_exchange" }]);
  const delegated = await new SignJWT({ act: { sub: "spiffe://corp/agent/etl", act: { sub: "spiffe://corp/agent/scheduler" } } })
    .setProtectedHeader({ alg: "EdDSA" })
    .setSubject("alice@corp.com")
    .setIssuer(issuer)
    .setAudience(audience)
    .setExpirationTime(nowSec() + 300)
    .sign(ed.privateKey);
  t.same(await exchanged.authenticate(bearer(delegated)), {
    agent: "spiffe://corp/agent/etl",
    onBehalfOf: "alice@corp.com",
    chain: ["spiffe://corp/agent/etl", "alice@corp.com", "spiffe://corp/agent/scheduler"],
    authenticatedBy: "jwt",
    attestation: { agent: `token_exchange:${issuer}`, human: `token_exchange:${issuer}` },
  });
  // A token without act is a person's own token (the issuer signs those too): not an agent's.
  const own = await new SignJWT({}).setProtectedHeader({ alg: "EdDSA" }).setSubject("spiffe://corp/agent/etl").setIssuer(issuer).setAudience(audience).setExpirationTime(nowSec() + 300).sign(ed.privateKey);
  const humansOwn = await new SignJWT({}).setProtectedHeader({ alg: "EdDSA" }).setSubject("alice@corp.com").setIssuer(issuer).setAudience(audience).setExpirationTime(nowSec() + 300).sign(ed.privateKey);
  await fails(t, exchanged.authenticate(bearer(humansOwn)), "unattested_agent");
  await fails(t, exchanged.authenticate(bearer(own)), "unattested_agent");
  // With unattended: true (an issuer of agents' own tokens), it is the agent alone, no human.
  const workloads = await AgentAuthenticator.create([{ ...staticJwt, delegation: "token_exchange", unattended: true }]);
  t.match(await workloads.authenticate(bearer(own)), { agent: "spiffe://corp/agent/etl", onBehalfOf: "", attestation: { agent: `jwt:${issuer}`, human: "" } });
  // A human named in a claim of the token's own is not attested by the exchange.
  await fails(t, exchanged.authenticate(bearer(await token())), "unattested_human");
  const badAct = await new SignJWT({ act: "spiffe://corp/agent/etl" }).setProtectedHeader({ alg: "EdDSA" }).setSubject("alice@corp.com").setIssuer(issuer).setAudience(audience).setExpirationTime(nowSec() + 300).sign(ed.privateKey);
  await fails(t, exchanged.authenticate(bearer(badAct)), "invalid_claim");
  // And a token signed by a key the issuer does not hold (the agent's own) is refused whatever it says.
  const selfMade = await new SignJWT({ act: { sub: "spiffe://corp/agent/etl" } }).setProtectedHeader({ alg: "EdDSA" }).setSubject("bob@corp.com").setIssuer(issuer).setAudience(audience).setExpirationTime(nowSec() + 300).sign(stranger.privateKey);
  await fails(t, exchanged.authenticate(bearer(selfMade)), "bad_signature");
  // The claim mode records that the human is only a claim.
  t.match(await auth.authenticate(bearer(await token())), { attestation: { agent: `jwt:${issuer}`, human: `claim:${issuer}:act_for` } });
});
