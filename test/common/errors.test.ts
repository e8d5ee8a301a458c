import { status } from "@grpc/grpc-js";
import t from "tap";
import { AirlockError, Code, codeFromName, codeName, httpStatusFor, isCode } from "../../common/index.js";

await t.test("every code equals the gRPC status code of the same name", async (t) => {
  const grpcNames = Object.entries(status as Record<string, unknown>).filter(([, value]) => typeof value === "number" && value !== 0);
  t.equal(Object.keys(Code).length, grpcNames.length, "one Airlock code per non-OK gRPC status");
  for (const [name, value] of grpcNames) {
    // gRPC spells it CANCELLED; Airlock's names follow connect-es ("canceled").
    const airlockName = name === "CANCELLED" ? "canceled" : name.toLowerCase();
    t.equal(codeFromName(airlockName), value, `${name} maps to ${String(value)}`);
  }
  t.equal(codeName(Code.PermissionDenied), "permission_denied");
  t.equal(codeName(Code.Unauthenticated), "unauthenticated");
});

await t.test("names round-trip and unknown values are refused", async (t) => {
  for (const code of Object.values(Code)) t.equal(codeFromName(codeName(code)), code);
  t.equal(codeFromName("nope"), undefined);
  t.notOk(isCode(0), "OK is not an error code");
  t.notOk(isCode(17));
  t.notOk(isCode("3"));
  t.ok(isCode(3));
});

await t.test("AirlockError carries code, message, cause and details", async (t) => {
  const cause = new Error("socket hang up");
  const error = new AirlockError(Code.Unavailable, "broker unreachable", { cause, details: { requestId: "r1" } });
  t.ok(error instanceof Error);
  t.equal(error.message, "[unavailable] broker unreachable");
  t.equal(error.rawMessage, "broker unreachable");
  t.equal(error.cause, cause);
  t.same(error.details, { requestId: "r1" });
  t.same(JSON.parse(JSON.stringify(error)), { code: "unavailable", message: "broker unreachable", details: { requestId: "r1" } });
});

await t.test("from() keeps AirlockErrors and wraps anything else", async (t) => {
  const original = new AirlockError(Code.NotFound, "no such request");
  t.equal(AirlockError.from(original), original);
  const wrapped = AirlockError.from(new TypeError("bad"), Code.Internal);
  t.equal(wrapped.code, Code.Internal);
  t.equal(wrapped.rawMessage, "bad");
  t.type(wrapped.cause, TypeError);
  t.equal(AirlockError.from("plain string").code, Code.Unknown);
});

await t.test("HTTP statuses for the API's documented errors", async (t) => {
  t.equal(httpStatusFor(Code.Unauthenticated), 401);
  t.equal(httpStatusFor(Code.PermissionDenied), 403);
  t.equal(httpStatusFor(Code.NotFound), 404);
  t.equal(httpStatusFor(Code.FailedPrecondition), 409);
  t.equal(httpStatusFor(Code.InvalidArgument), 422);
  t.equal(httpStatusFor(Code.ResourceExhausted), 429);
});
