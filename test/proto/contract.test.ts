import { readFileSync } from "node:fs";
import { create, createFileRegistry, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema, timestampFromDate } from "@bufbuild/protobuf/wkt";
import t from "tap";
import {
  ApprovalRequestSchema,
  DecisionBodySchema,
  DecisionSchema,
  descriptorSetPath,
  ReviewerService,
  Verdict,
} from "../../proto/index.js";

const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(descriptorSetPath)));

await t.test("the descriptor set describes the demo upstream with every call kind", async (t) => {
  const ops = registry.getService("demo.v1.OpsService");
  if (ops === undefined) throw new Error("demo.v1.OpsService missing from the descriptor set");
  const kinds = Object.fromEntries(ops.methods.map((m) => [m.name, m.methodKind]));
  t.same(kinds, {
    GetStatus: "unary",
    ExportTable: "server_streaming",
    RotateKey: "unary",
    ImportRows: "client_streaming",
    GrantRole: "unary",
    Tail: "bidi_streaming",
  });
});

await t.test("the descriptor set carries imports, so it stands alone", async (t) => {
  t.ok(registry.getFile("google/protobuf/struct.proto"), "well-known imports included");
  for (const name of ["ApprovalRequest", "Decision", "DecisionBody", "CredentialDelivery", "Completion", "AuditEvent", "RequestRecord"]) {
    t.ok(registry.getMessage(`airlock.v1.${name}`), `airlock.v1.${name}`);
  }
  t.same(
    ReviewerService.methods.map((m) => [m.name, m.methodKind]),
    [
      ["ListRequests", "unary"],
      ["GetRequest", "unary"],
      ["Decide", "unary"],
      ["WatchRequests", "server_streaming"],
      ["VerifyAudit", "unary"],
    ],
  );
});

await t.test("a signed decision carries its body as bytes, so verification needs no re-encoding", async (t) => {
  const body = create(DecisionBodySchema, {
    decisionId: "d1",
    requestId: "r1",
    requestSha256: new Uint8Array(32).fill(7),
    verdict: Verdict.APPROVED,
    expiresAt: timestampFromDate(new Date("2030-01-01T00:00:00Z")),
    credential: { wrappingToken: "hvs.wrapped", kind: "vault_token", injectHeader: "x-airlock-credential" },
  });
  const bodyBytes = toBinary(DecisionBodySchema, body);
  const decision = fromBinary(DecisionSchema, toBinary(DecisionSchema, create(DecisionSchema, { body: bodyBytes, signature: new Uint8Array(64), keyId: "k1" })));
  t.same(Buffer.from(decision.body), Buffer.from(bodyBytes), "body bytes survive the wire unchanged");
  const decoded = fromBinary(DecisionBodySchema, decision.body);
  t.equal(decoded.requestId, "r1");
  t.equal(decoded.verdict, Verdict.APPROVED);
  t.equal(decoded.credential?.wrappingToken, "hvs.wrapped");
});

await t.test("an approval request holds the redacted request as JSON and the hash of the original", async (t) => {
  const request = create(ApprovalRequestSchema, {
    id: "r1",
    service: "demo.v1.OpsService",
    method: "ExportTable",
    requestSha256: new Uint8Array(32),
    redactedFields: ["filter.email"],
    credential: { kind: { case: "database", value: { mount: "database", role: "export" } }, injectHeader: "x-airlock-credential" },
  });
  const again = fromBinary(ApprovalRequestSchema, toBinary(ApprovalRequestSchema, request));
  t.equal(again.credential?.kind.case, "database");
  t.same(again.redactedFields, ["filter.email"]);
});
