import { type AddressInfo, createServer, type Socket } from "node:net";
import t, { type Test } from "tap";
import { AirlockError, Code, createVaultClient } from "../../common/index.js";
import { freePort, useInfra } from "../../harness/index.js";

const { vault } = await useInfra(t, { vault: true });
const root = createVaultClient({ address: vault.address, token: vault.rootToken });
// Nothing listens here: every call that reaches the network fails with unavailable.
const nowhere = createVaultClient({ address: `http://127.0.0.1:${await freePort()}`, token: "hvs.do-not-leak-this-token", timeoutMs: 1000 });

async function caught(promise: Promise<unknown>): Promise<AirlockError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(error instanceof AirlockError)) throw new Error(`expected an AirlockError, got ${String(error)}`);
  return error;
}

/** Every own property, enumerable or not, of an error and its cause: what a log serializer could print. */
function everything(error: unknown, depth = 0): string {
  if (error === null || typeof error !== "object" || depth > 3) return String(error);
  return Object.getOwnPropertyNames(error)
    .map((key) => `${key}=${everything((error as Record<string, unknown>)[key], depth + 1)}`)
    .join(" ");
}

await t.test("a failed call's error carries neither the client's token nor the request body", async (t) => {
  const error = await caught(nowhere.writeConfig("database/config/main", { password: "do-not-leak-this-password" }));
  t.equal(error.code, Code.Unavailable);
  const text = everything(error);
  t.notMatch(text, "do-not-leak-this-token");
  t.notMatch(text, "do-not-leak-this-password");
  t.notOk(error.cause !== null && typeof error.cause === "object" && "config" in error.cause, "no request config in the cause");
  t.equal((error.cause as { code?: string }).code, "ECONNREFUSED", "the cause still says what happened");
});

/** A loopback TCP server that treats each connection with `serve`; closed at the test's end. */
async function rawServer(t: Test, serve: (socket: Socket) => void): Promise<{ address: string; connections: () => number }> {
  let connections = 0;
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => undefined);
    serve(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  });
  return { address: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, connections: () => connections };
}

await t.test("the HTTP transport: a silent or cut-off Vault is unavailable, a huge answer is refused, a redirect is not followed", async (t) => {
  const silent = await rawServer(t, () => undefined);
  const started = Date.now();
  const timedOut = await caught(createVaultClient({ address: silent.address, token: "t", timeoutMs: 300 }).lookupSelf("t"));
  t.equal(timedOut.code, Code.Unavailable, "no answer within the timeout");
  t.ok(Date.now() - started < 3000, `it gave up after its timeout (${Date.now() - started} ms)`);

  const cut = await rawServer(t, (socket) => {
    socket.once("data", () => socket.end('HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"data":'));
  });
  t.equal((await caught(createVaultClient({ address: cut.address, token: "t" }).lookupSelf("t"))).code, Code.Unavailable, "an answer cut off midway");

  const huge = await rawServer(t, (socket) => {
    socket.once("data", () => {
      socket.write("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 8388608\r\n\r\n");
      socket.end(Buffer.alloc(8 * 1024 * 1024, 0x20));
    });
  });
  const tooLarge = await caught(createVaultClient({ address: huge.address, token: "t" }).lookupSelf("t"));
  t.equal(tooLarge.code, Code.Unavailable, "an 8 MiB answer");
  t.equal((tooLarge.cause as { code?: string }).code, "ERR_RESPONSE_TOO_LARGE");

  const elsewhere = await rawServer(t, (socket) => socket.destroy());
  const redirecting = await rawServer(t, (socket) => {
    socket.once("data", () => socket.end(`HTTP/1.1 307 Temporary Redirect\r\nlocation: ${elsewhere.address}/v1/auth/token/lookup-self\r\ncontent-length: 0\r\n\r\n`));
  });
  const redirected = await caught(createVaultClient({ address: redirecting.address, token: "hvs.stays-here" }).lookupSelf("hvs.stays-here"));
  t.equal(redirected.code, Code.Internal, "a redirect is an error, not followed");
  t.equal(elsewhere.connections(), 0, "the token was not sent where the redirect pointed");
});

await t.test("bad input is refused before any request", async (t) => {
  // Against a Vault that is not there: an invalid_argument proves no request was made.
  for (const [name, promise] of [
    ["a policy name with ..", nowhere.writePolicy("../sys", "")],
    ["a mount with ..", nowhere.databaseCredentials({ mount: "db/../sys", role: "r", wrapTtlSeconds: 60 })],
    ["a role with a query", nowhere.databaseCredentials({ mount: "db", role: "r?list=true", wrapTtlSeconds: 60 })],
    ["no policies", nowhere.createToken({ policies: [], ttlSeconds: 60, numUses: 1, meta: {}, wrapTtlSeconds: 60 })],
    ["the root policy", nowhere.createToken({ policies: ["default", "root"], ttlSeconds: 60, numUses: 1, meta: {}, wrapTtlSeconds: 60 })],
    ["a zero wrap ttl", nowhere.createToken({ policies: ["default"], ttlSeconds: 60, numUses: 1, meta: {}, wrapTtlSeconds: 0 })],
    ["an empty lease id", nowhere.revokeLease("")],
  ] as const) {
    t.equal((await caught(promise)).code, Code.InvalidArgument, name);
  }
});

await t.test("createToken: wrapped, orphan, capped, with the accessor from wrap_info", async (t) => {
  const before = Date.now();
  const token = await root.createToken({ policies: ["default"], ttlSeconds: 90, numUses: 2, meta: { airlock_request_id: "r-1" }, wrapTtlSeconds: 30, displayName: "airlock-test" });
  const wrapLeft = token.wrapExpiresAt.getTime() - before;
  t.ok(wrapLeft > 25_000 && wrapLeft <= 31_000, `the wrapping token lives 30 s (${wrapLeft} ms)`);
  const info = await root.lookupAccessor(token.tokenAccessor);
  t.same(info.meta, { airlock_request_id: "r-1" });
  t.equal(info.orphan, true);
  t.equal(info.renewable, false);
  t.ok(info.ttl > 80 && info.ttl <= 90);
  t.equal(info.numUses, 2, "looking up by accessor spends none of the token's uses");
  await root.revokeAccessor(token.tokenAccessor);
  t.equal((await caught(root.lookupAccessor(token.tokenAccessor))).code, Code.NotFound);
  // Revocation is idempotent at Vault: a second one (another replica, the reconciler) is success.
  await root.revokeAccessor(token.tokenAccessor);
  t.pass("revoking a revoked token again succeeds");
});

await t.test("Vault's 400s for gone things become not_found or permission_denied; revoking gone things succeeds", async (t) => {
  t.equal((await caught(root.lookupAccessor("no-such-accessor"))).code, Code.NotFound);
  t.equal((await caught(root.lookupLease("database/creds/none/abc"))).code, Code.NotFound);
  await root.revokeAccessor("no-such-accessor");
  await root.revokeLease("database/creds/none/abc");
  await root.deletePolicy("no-such-policy");
  t.pass("revoking and deleting what does not exist succeed");

  const wrapped = await root.createToken({ policies: ["default"], ttlSeconds: 60, numUses: 1, meta: {}, wrapTtlSeconds: 60 });
  const sidecar = createVaultClient({ address: vault.address });
  t.ok((await sidecar.unwrap(wrapped.wrappingToken)).auth?.clientToken);
  // Vault answers a used wrapping token with 400; the contract says permission_denied.
  t.equal((await caught(sidecar.unwrap(wrapped.wrappingToken))).code, Code.PermissionDenied);
  t.equal((await caught(sidecar.unwrap("hvs.never-issued"))).code, Code.PermissionDenied);
});

await t.test("mount is idempotent for the same type and refuses another", async (t) => {
  await root.mount("scratch-db", "database");
  await root.mount("scratch-db", "database");
  t.equal((await caught(root.mount("scratch-db", "transit"))).code, Code.AlreadyExists);
  t.equal((await caught(root.databaseCredentials({ mount: "scratch-db", role: "none", wrapTtlSeconds: 60 }))).code, Code.InvalidArgument, "an unknown role");
});
