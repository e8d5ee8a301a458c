import { createHash, generateKeyPairSync, randomUUID, sign } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import t, { type Test } from "tap";
import { AirlockError, Code } from "../../common/errors.js";
import {
  type DecisionRejection,
  DecisionKeyRing,
  decisionRejections,
  generateDecisionKey,
  ReplayGuard,
  signDecision,
  verifyDecision,
} from "../../common/decision.js";
import { CredentialDeliverySchema, type DecisionBody, DecisionBodySchema, DecisionSchema, Verdict } from "../../proto/index.js";

const requestBytes = new TextEncoder().encode('{"table":"customers"}');
const requestSha256 = new Uint8Array(createHash("sha256").update(requestBytes).digest());
const requestId = "req-1";
const now = new Date("2030-01-01T00:00:00Z");

function body(overrides: Partial<DecisionBody> = {}): DecisionBody {
  const defaults = create(DecisionBodySchema, {
    decisionId: randomUUID(),
    requestId,
    requestSha256,
    verdict: Verdict.APPROVED,
    reason: "looks fine",
    decidedAt: timestampFromMs(now.getTime() - 1000),
    expiresAt: timestampFromMs(now.getTime() + 60_000),
    credential: { wrappingToken: "hvs.wrap", wrappingAccessor: "acc", injectHeader: "x-airlock-credential", kind: "database" },
  });
  return { ...defaults, ...overrides };
}

const main = generateDecisionKey("broker-2030-01");
const ring = DecisionKeyRing.fromPem({ [main.signing.keyId]: main.publicKeyPem });
const expect = { requestId, requestSha256, now };

/** Checks the thrown error is a permission_denied rejection with the given reason. */
function rejects(t: Test, fn: () => unknown, reason: DecisionRejection, id = requestId): void {
  try {
    fn();
    t.fail(`expected rejection ${reason}`);
  } catch (error) {
    t.type(error, AirlockError);
    const e = error as AirlockError;
    t.equal(e.code, Code.PermissionDenied, `${reason}: permission_denied`);
    t.same(e.details, { reason, requestId: id }, `${reason}: details`);
  }
}

await t.test("sign and verify round trip", async (t) => {
  const original = body();
  const decision = signDecision(original, main.signing);
  t.equal(decision.keyId, "broker-2030-01");
  t.equal(decision.signature.length, 64, "an Ed25519 signature");
  t.same(decision.body, toBinary(DecisionBodySchema, original), "body travels as serialized once");
  // Through the wire and back: the Decision itself is serialized on NATS.
  const wire = create(DecisionSchema, { body: decision.body, signature: decision.signature, keyId: decision.keyId });
  const verified = verifyDecision(wire, ring, expect);
  t.equal(verified.decisionId, original.decisionId);
  t.equal(verified.verdict, Verdict.APPROVED);
  t.equal(verified.credential?.wrappingToken, "hvs.wrap");
  // A denial needs no credential.
  const denial = verifyDecision(signDecision(body({ verdict: Verdict.DENIED, credential: undefined }), main.signing), ring, expect);
  t.equal(denial.verdict, Verdict.DENIED);
  // Without an explicit now, the real clock is used (2030 is in the future for a while).
  t.ok(verifyDecision(signDecision(body({ expiresAt: timestampFromMs(Date.now() + 60_000) }), main.signing), ring, { requestId, requestSha256 }));
  t.same([...decisionRejections].sort(), [
    "bad_signature", "expired", "hash_mismatch", "malformed_body", "missing_credential", "replayed", "request_mismatch", "unknown_key",
  ]);
});

await t.test("every rejection comes from a real tampering", async (t) => {
  const good = signDecision(body(), main.signing);

  await t.test("unknown_key: a key id the ring does not hold", async (t) => {
    rejects(t, () => verifyDecision({ ...good, keyId: "broker-evil" }, ring, expect), "unknown_key");
    // A forger with their own key: signature fine, key unknown.
    const forger = generateDecisionKey("broker-evil");
    rejects(t, () => verifyDecision(signDecision(body(), forger.signing), ring, expect), "unknown_key");
  });

  await t.test("bad_signature: flipped body byte, flipped signature byte, truncated signature, forger claiming our key id", async (t) => {
    for (const index of [0, 5, good.body.length - 1]) {
      const tampered = new Uint8Array(good.body);
      tampered[index] = (tampered[index] ?? 0) ^ 0x01;
      rejects(t, () => verifyDecision({ ...good, body: tampered }, ring, expect), "bad_signature");
    }
    const badSig = new Uint8Array(good.signature);
    badSig[10] = (badSig[10] ?? 0) ^ 0x80;
    rejects(t, () => verifyDecision({ ...good, signature: badSig }, ring, expect), "bad_signature");
    rejects(t, () => verifyDecision({ ...good, signature: good.signature.slice(0, 32) }, ring, expect), "bad_signature");
    rejects(t, () => verifyDecision({ ...good, signature: new Uint8Array() }, ring, expect), "bad_signature");
    const forger = generateDecisionKey(main.signing.keyId);
    rejects(t, () => verifyDecision(signDecision(body(), forger.signing), ring, expect), "bad_signature");
    // Swapping the wrapping token for another one breaks the signature too.
    const swapped = body();
    const decision = signDecision(swapped, main.signing);
    const other = toBinary(DecisionBodySchema, { ...swapped, credential: { ...swapped.credential!, wrappingToken: "hvs.attacker" } });
    rejects(t, () => verifyDecision({ ...decision, body: other }, ring, expect), "bad_signature");
  });

  await t.test("malformed_body: validly signed bytes that are not a DecisionBody, or without a decision id", async (t) => {
    // Field 1, length-delimited, claims 127 bytes but the message ends: not parsable.
    const garbage = new Uint8Array([0x0a, 0x7f, 0x01]);
    const decision = create(DecisionSchema, { body: garbage, keyId: main.signing.keyId, signature: sign(null, garbage, main.signing.privateKey) });
    rejects(t, () => verifyDecision(decision, ring, expect), "malformed_body");
    rejects(t, () => verifyDecision(signDecision(body({ decisionId: "" }), main.signing), ring, expect), "malformed_body");
  });

  await t.test("request_mismatch: a real signed decision for another request", async (t) => {
    rejects(t, () => verifyDecision(signDecision(body({ requestId: "req-2" }), main.signing), ring, expect), "request_mismatch");
    // The same decision replayed against another held request.
    rejects(t, () => verifyDecision(good, ring, { ...expect, requestId: "req-2" }), "request_mismatch", "req-2");
  });

  await t.test("hash_mismatch: the agent changed the request after approval", async (t) => {
    const changed = new Uint8Array(createHash("sha256").update('{"table":"payroll"}').digest());
    rejects(t, () => verifyDecision(good, ring, { ...expect, requestSha256: changed }), "hash_mismatch");
    rejects(t, () => verifyDecision(signDecision(body({ requestSha256: requestSha256.slice(0, 16) }), main.signing), ring, expect), "hash_mismatch");
    rejects(t, () => verifyDecision(signDecision(body({ requestSha256: new Uint8Array() }), main.signing), ring, expect), "hash_mismatch");
    // A caller passing a non-hash is a bug, not a rejection.
    t.throws(() => verifyDecision(good, ring, { ...expect, requestSha256: new Uint8Array() }), { code: Code.InvalidArgument });
  });

  await t.test("expired: past expiry, expiry exactly now, no expiry", async (t) => {
    rejects(t, () => verifyDecision(good, ring, { ...expect, now: new Date(now.getTime() + 60_001) }), "expired");
    rejects(t, () => verifyDecision(good, ring, { ...expect, now: new Date(now.getTime() + 60_000) }), "expired");
    rejects(t, () => verifyDecision(signDecision(body({ expiresAt: undefined }), main.signing), ring, expect), "expired");
    t.ok(verifyDecision(good, ring, { ...expect, now: new Date(now.getTime() + 59_999) }), "valid one millisecond before");
  });

  await t.test("missing_credential: an approval without a wrapping token", async (t) => {
    rejects(t, () => verifyDecision(signDecision(body({ credential: undefined }), main.signing), ring, expect), "missing_credential");
    rejects(t, () => verifyDecision(signDecision(body({ credential: create(CredentialDeliverySchema, { wrappingToken: "", injectHeader: "x-airlock-credential" }) }), main.signing), ring, expect), "missing_credential");
  });

  await t.test("the error message names the reason and never the wrapping token", async (t) => {
    try {
      verifyDecision(good, ring, { ...expect, requestId: "req-9" });
      t.fail("should throw");
    } catch (error) {
      const e = error as AirlockError;
      t.match(e.message, /^\[permission_denied\] decision rejected \(request_mismatch\)/);
      t.notMatch(e.message, /hvs\.wrap/);
      t.notMatch(JSON.stringify(e), /hvs\.wrap/);
    }
  });
});

await t.test("key rotation: two keys in the ring, then the old one removed", async (t) => {
  const next = generateDecisionKey("broker-2030-02");
  const both = DecisionKeyRing.fromPem({ [main.signing.keyId]: main.publicKeyPem, [next.signing.keyId]: next.publicKeyPem });
  t.same(both.keyIds().sort(), ["broker-2030-01", "broker-2030-02"]);
  const fromOld = signDecision(body(), main.signing);
  const fromNew = signDecision(body(), next.signing);
  t.ok(verifyDecision(fromOld, both, expect), "old key verifies during the overlap");
  t.ok(verifyDecision(fromNew, both, expect), "new key verifies during the overlap");
  const rotated = new DecisionKeyRing({ [next.signing.keyId]: both.get(next.signing.keyId)! });
  t.ok(verifyDecision(fromNew, rotated, expect));
  rejects(t, () => verifyDecision(fromOld, rotated, expect), "unknown_key");
  // Relabelling an old decision with the new key id does not help.
  rejects(t, () => verifyDecision({ ...fromOld, keyId: next.signing.keyId }, rotated, expect), "bad_signature");
});

await t.test("key ring refuses keys that are not Ed25519 public keys", async (t) => {
  const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const rsaPem = rsa.publicKey.export({ type: "spki", format: "pem" }).toString();
  for (const [label, pem] of [
    ["RSA public key", rsaPem],
    ["garbage", "-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n"],
    ["empty", ""],
    ["Ed25519 private key", main.signing.privateKey.export({ type: "pkcs8", format: "pem" }).toString()],
  ] as const) {
    t.throws(() => DecisionKeyRing.fromPem({ good: main.publicKeyPem, "broker-bad": pem }), { code: Code.InvalidArgument, details: { keyId: "broker-bad" } }, label);
    try {
      DecisionKeyRing.fromPem({ "broker-bad": pem });
    } catch (error) {
      t.match((error as AirlockError).message, /"broker-bad"/, `${label}: message names the key id`);
    }
  }
  t.throws(() => new DecisionKeyRing({ k: rsa.publicKey }), { code: Code.InvalidArgument, details: { keyId: "k" } });
  t.throws(() => new DecisionKeyRing({ k: main.signing.privateKey }), { code: Code.InvalidArgument }, "private key refused");
  t.throws(() => new DecisionKeyRing({ "": ring.get(main.signing.keyId)! }), { code: Code.InvalidArgument }, "empty key id");
  t.throws(() => signDecision(body(), { keyId: "rsa", privateKey: rsa.privateKey }), { code: Code.InvalidArgument }, "RSA signing key");
});

await t.test("ReplayGuard", async (t) => {
  let clock = now.getTime();
  const at = () => new Date(clock);

  await t.test("accepts a decision once", async (t) => {
    const guard = new ReplayGuard({ now: at });
    const decision = body();
    guard.accept(decision);
    t.ok(guard.has(decision.decisionId));
    rejects(t, () => guard.accept(decision), "replayed");
    // A re-verified copy of the same decision (same id, bytes received twice) is a replay too.
    const copy = verifyDecision(signDecision(decision, main.signing), ring, expect);
    rejects(t, () => guard.accept(copy), "replayed");
    guard.accept(body());
    t.equal(guard.size, 2);
  });

  await t.test("forgets entries once they expire, and refuses expired bodies", async (t) => {
    const guard = new ReplayGuard({ now: at });
    const short = body({ expiresAt: timestampFromMs(clock + 1_000) });
    const long = body({ expiresAt: timestampFromMs(clock + 60_000) });
    guard.accept(long);
    guard.accept(short);
    t.equal(guard.size, 2);
    clock += 1_000;
    t.equal(guard.size, 1, "the short one is forgotten at its expiry");
    t.notOk(guard.has(short.decisionId));
    t.ok(guard.has(long.decisionId));
    // After expiry the decision is refused as expired, not silently accepted again.
    rejects(t, () => guard.accept(short), "expired");
    rejects(t, () => guard.accept(body({ expiresAt: undefined })), "expired");
    clock += 59_000;
    t.equal(guard.size, 0);
    clock = now.getTime();
  });

  await t.test("evicts the oldest accepted first at the cap", async (t) => {
    const guard = new ReplayGuard({ now: at, maxEntries: 3 });
    // Expiries out of insertion order: eviction still follows acceptance order.
    const bodies = [90_000, 10_000, 50_000, 70_000, 20_000].map((ms) => body({ expiresAt: timestampFromMs(clock + ms) }));
    for (const b of bodies) guard.accept(b);
    t.equal(guard.size, 3);
    t.same(
      bodies.map((b) => guard.has(b.decisionId)),
      [false, false, true, true, true],
    );
    // Many more than the cap: memory stays bounded, the newest are remembered.
    for (let i = 0; i < 50; i++) guard.accept(body({ expiresAt: timestampFromMs(clock + 100_000 + i) }));
    t.equal(guard.size, 3);
    clock += 200_000;
    t.equal(guard.size, 0, "everything expired");
    clock = now.getTime();
  });

  t.throws(() => new ReplayGuard({ maxEntries: 0 }), { code: Code.InvalidArgument });
});
