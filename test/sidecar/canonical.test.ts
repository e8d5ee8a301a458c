/**
 * What policy decided on (and reviewers saw) is what the upstream receives
 * (issue 14, promise 7): every request message the sidecar decodes is
 * forwarded as its canonical re-encoding, and a message with fields the
 * sidecar's descriptors do not know is refused, since no rule or reviewer can
 * see them. Tested with crafted bytes: a duplicated field, an unknown field,
 * non-canonical varints.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import t from "tap";
import { natsConfigSection } from "../../common/nats.js";
import { ConfigReader } from "../../common/config.js";
import { generateDecisionKey } from "../../common/decision.js";
import { Code } from "../../common/index.js";
import { useInfra } from "../../harness/index.js";
import { startRecordingUpstream } from "../../harness/recording-upstream.js";
import { descriptorSetPath } from "../../proto/index.js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";
import { parseSidecarConfig, startSidecar } from "../../sidecar/index.js";
import { boundTouched, parseTouched } from "../../common/touched.js";
import { frameMessage } from "../../sidecar/wire.js";

const { nats } = await useInfra(t, { nats: true });
const dir = await mkdtemp(join(tmpdir(), "airlock-canonical-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const upstream = await startRecordingUpstream();
t.teardown(() => upstream.close());
await writeFile(join(dir, "broker.pem"), generateDecisionKey("k1").publicKeyPem);
await writeFile(
  join(dir, "policy.yaml"),
  `version: 1
default: deny
rules:
  - id: export-public
    match: { service: demo.v1.OpsService, method: ExportTable }
    when: 'request.table == "public_stats"'
    effect: allow
    anonymous: true
`,
);
const sidecar = await startSidecar(
  parseSidecarConfig(
    new ConfigReader(
      {
        listen: "127.0.0.1:0",
        upstreams: [{ name: "ops", address: upstream.address, descriptor_sets: [descriptorSetPath], services: ["demo.v1.OpsService"] }],
        nats: natsConfigSection(await nats.credentials({ kind: "sidecar", host: "canonical-host" })),
        vault: { address: "http://127.0.0.1:1" },
        broker_keys: { k1: "broker.pem" },
        host: "canonical-host",
        policy: "policy.yaml",
        metrics: { listen: "127.0.0.1:0" },
        log_level: "error",
      },
      "",
      join(dir, "sidecar.yaml"),
    ),
  ),
);
t.teardown(() => sidecar.close());
const client = new Client(sidecar.address, credentials.createInsecure());
t.teardown(() => client.close());

/** Calls ExportTable with raw request bytes; resolves with the status code. */
function exportRaw(bytes: Buffer): Promise<number> {
  return new Promise((resolve) => {
    const call = client.makeServerStreamRequest("/demo.v1.OpsService/ExportTable", (b: Buffer) => b, (b: Buffer) => b, bytes, new Metadata(), {});
    call.on("data", () => undefined);
    call.on("error", (error: { code: number }) => resolve(error.code));
    call.on("status", (status: { code: number }) => resolve(status.code));
  });
}

const field = (number: number, text: string) => Buffer.concat([Buffer.from([(number << 3) | 2, text.length]), Buffer.from(text)]);
const canonical = (table: string, limit = 0) => Buffer.from(toBinary(OpsService.method.exportTable.input, create(OpsService.method.exportTable.input, { table, limit })));

async function forwarded(bytes: Buffer): Promise<{ code: number; body: Buffer | undefined }> {
  const before = upstream.bodies.length;
  const code = await exportRaw(bytes);
  return { code, body: upstream.bodies.length > before ? upstream.bodies[upstream.bodies.length - 1] : undefined };
}

await t.test("a duplicated field: the upstream receives the message policy decided on, re-encoded, never the crafted bytes", async (t) => {
  // protobuf-es keeps the last value of a repeated scalar field; a parser that keeps the first would read "customers".
  const crafted = Buffer.concat([field(1, "customers"), field(1, "public_stats")]);
  const { code, body } = await forwarded(crafted);
  t.equal(code, 0, "allowed: policy saw public_stats");
  t.same(body, frameMessage(canonical("public_stats")), "the upstream got the canonical message, with customers nowhere in it");
});

await t.test("non-canonical varints are forwarded re-encoded", async (t) => {
  // limit = 5 as an overlong 3-byte varint, and the tag itself overlong.
  const crafted = Buffer.concat([field(1, "public_stats"), Buffer.from([0x10, 0x85, 0x80, 0x00]), Buffer.from([0x90, 0x00, 0x85, 0x00])]);
  const { code, body } = await forwarded(crafted);
  t.equal(code, 0);
  t.same(body, frameMessage(canonical("public_stats", 5)));
});

await t.test("a field the descriptors do not know is refused: neither policy nor a reviewer can see it", async (t) => {
  const crafted = Buffer.concat([field(1, "public_stats"), field(99, "drop table customers")]);
  const { code, body } = await forwarded(crafted);
  t.equal(code, Code.InvalidArgument);
  t.equal(body, undefined, "nothing reached the upstream");
});

await t.test("a canonical message passes unchanged", async (t) => {
  const { code, body } = await forwarded(canonical("public_stats", 7));
  t.equal(code, 0);
  t.same(body, frameMessage(canonical("public_stats", 7)));
});

await t.test("what an action touched: the airlock-touched trailer is parsed into bounded pairs, the rest marked truncated", async (t) => {
  t.same(parseTouched("rows=3; table=customers"), { rows: "3", table: "customers" });
  t.same(parseTouched(" rows = 3 ;;"), { rows: "3" }, "spaces and empty parts are fine");
  t.same(parseTouched("Rows=3; ok=1"), { ok: "1", truncated: "true" }, "a key that is not lowercase letters, digits and _ is left out, and says so");
  const many = Array.from({ length: 20 }, (_, i) => `k${i}=v`).join(";");
  const parsed = parseTouched(many);
  t.equal(Object.keys(parsed).length, 17, "at most 16 pairs, and the truncated mark");
  t.equal(parsed.truncated, "true");
  t.equal(parseTouched(`note=${"x".repeat(1000)}`).note?.length, 128, "a value is cut at 128 characters");
  t.equal(parseTouched(`note=${"x".repeat(1000)}`).truncated, "true", "a trailer past 512 bytes is cut, and says so");
  t.same(parseTouched("truncated=false; rows=1"), { rows: "1", truncated: "true" }, "the upstream cannot set the marker itself");
});

await t.test("what a completion says was touched is bounded again at the broker; the truncated mark survives the cap", async (t) => {
  // What the sidecar makes of 20 pairs: 16 and the mark. Bounding it again keeps the mark.
  const fromSidecar = parseTouched(Array.from({ length: 20 }, (_, i) => `k${i}=v`).join(";"));
  t.same(boundTouched(fromSidecar), fromSidecar, "a sidecar's bounded report passes unchanged, mark included");
  // A hostile host sends its own map: more pairs, odd keys, long values.
  const hostile: Record<string, string> = Object.fromEntries([...Array.from({ length: 30 }, (_, i): [string, string] => [`k${i}`, "v".repeat(500)]), ["Bad Key", "x"]]);
  const bounded = boundTouched(hostile);
  t.equal(Object.keys(bounded).length, 17, "16 pairs and the mark");
  t.equal(bounded.truncated, "true");
  t.equal(bounded.k0?.length, 128, "values capped");
  t.equal(bounded["Bad Key"], undefined, "a key of another form is left out");
  t.same(boundTouched({ rows: "2", table: "customers" }), { rows: "2", table: "customers" }, "a small honest report is untouched");
  t.same(boundTouched({ rows: "2", "x y": "1" }), { rows: "2", truncated: "true" }, "leaving out one bad key says so");
});
