// Request ids by a unique prefix: the reviewers' HTTP API, its gRPC twin and `airlock requests`,
// against a real stack (NATS, Vault, PostgreSQL, broker, sidecar). Two requests whose ids share
// a prefix come in the way any sidecar's do: published on the request stream with the stack
// host's own NATS credential, with the ids that sidecar chose.
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { jetstream } from "@nats-io/jetstream";
import t from "tap";
import { subjects } from "../../common/subjects.js";
import { waitUntil } from "../../harness/index.js";
import { ApprovalRequestSchema, Risk } from "../../proto/index.js";
import { startStack } from "../helpers/stack.js";

const stack = await startStack(t);
const dana = stack.tokens.dana;

interface Answer {
  readonly status: number;
  readonly body: { code?: string; message?: string; details?: Record<string, unknown>; record?: { request?: { id?: string }; state?: string } };
}

async function api(method: "GET" | "POST", path: string, body?: unknown): Promise<Answer> {
  const response = await fetch(`${stack.brokerUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${dana}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  return { status: response.status, body: (await response.json()) as Answer["body"] };
}

const cli = fileURLToPath(new URL("../../cli/airlock.ts", import.meta.url));
async function airlock(args: readonly string[], token = dana): Promise<{ stdout: string; stderr: string; code: number }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, ["--import", import.meta.resolve("tsx"), cli, "requests", ...args, "--url", stack.brokerUrl], {
      env: { ...process.env, AIRLOCK_TOKEN: token },
    });
    return { stdout, stderr, code: 0 };
  } catch (error) {
    const failed = error as { stdout: string; stderr: string; code: number };
    return { stdout: failed.stdout, stderr: failed.stderr, code: failed.code };
  }
}

// Two ids that share their first 9 characters, and nothing else about them is special: an
// export (data-owners) and a key rotation (security). Only the rotation is ever approved, so
// no PostgreSQL user is made for a call nobody runs (Vault's tokens end with its dev server).
const shared = randomBytes(4).toString("hex");
const ids = [`${shared}a-1111-4111-8111-${randomBytes(6).toString("hex")}`, `${shared}b-2222-4222-8222-${randomBytes(6).toString("hex")}`] as const;
const methods = ["ExportTable", "RotateKey"] as const;
const sidecarNc = await stack.nats.connect({ kind: "sidecar", host: stack.host });
t.teardown(() => sidecarNc.close());
for (const [index, id] of ids.entries()) {
  const request = create(ApprovalRequestSchema, {
    id,
    identity: { agent: "spiffe://example/agent/prefix", onBehalfOf: "bob@example.com", chain: ["bob@example.com", "spiffe://example/agent/prefix"], authenticatedBy: "jwt" },
    host: stack.host,
    service: "demo.v1.OpsService",
    method: methods[index] ?? "",
    requestSha256: randomBytes(32),
    reason: `prefix test ${id.slice(8, 9)}`,
    // What the sidecar claims here does not count: the broker takes the rule's terms.
    risk: Risk.LOW,
    ruleId: index === 0 ? "export" : "rotate",
    createdAt: timestampFromMs(Date.now()),
    deadline: timestampFromMs(Date.now() + 60_000),
  });
  await jetstream(sidecarNc).publish(subjects.request(stack.host, id), toBinary(ApprovalRequestSchema, request));
}
const arrived = await waitUntil(async () => (await Promise.all(ids.map((id) => api("GET", `/api/v1/requests/${id}`)))).every((answer) => answer.status === 200), 20_000);
if (!arrived) throw new Error("the broker did not record the two published requests within 20 s");

await t.test("the API takes a unique id prefix and refuses an ambiguous or too short one, with stable codes", async (t) => {
  const full = await api("GET", `/api/v1/requests/${ids[0]}`);
  t.equal(full.body.record?.request?.id, ids[0], "a full id works as before");
  const rule = (full.body.record?.request as { ruleDescription?: string } | undefined)?.ruleDescription;
  t.equal(rule, "An export copies customer records out of the database for good.", "the broker put its own rule's description in the record");
  const credential = (full.body.record?.request as { credential?: { description?: string } } | undefined)?.credential;
  t.equal(credential?.description, "SELECT on customers", "and the credential's description, from its policy, not the sidecar's message");

  const unique = await api("GET", `/api/v1/requests/${ids[1].slice(0, 9)}`);
  t.equal(unique.status, 200, "a prefix only one id starts with names that request");
  t.equal(unique.body.record?.request?.id, ids[1]);
  const upper = await api("GET", `/api/v1/requests/${ids[1].slice(0, 12).toUpperCase()}`);
  t.equal(upper.body.record?.request?.id, ids[1], "prefixes are compared without case");

  const ambiguous = await api("GET", `/api/v1/requests/${shared}`);
  t.equal(ambiguous.status, 422);
  t.equal(ambiguous.body.code, "ambiguous_id", "an ambiguous prefix has its own code");
  t.equal(ambiguous.body.details?.count, 2);
  const matches = (ambiguous.body.details?.matches ?? []) as { id: string; state: string; call: string }[];
  t.same(matches.map((match) => match.id).sort(), [...ids].sort(), "and lists the matches");
  t.same(
    matches.map((match) => [match.state, match.call]).sort(),
    [
      ["pending", "demo.v1.OpsService/ExportTable"],
      ["pending", "demo.v1.OpsService/RotateKey"],
    ],
    "with what each is",
  );
  t.match(ambiguous.body.message, new RegExp(`2 requests have ids starting with "${shared}".*${ids[0]}`), "the message names them too");

  const short = await api("GET", `/api/v1/requests/${shared.slice(0, 5)}`);
  t.equal(short.status, 422);
  t.equal(short.body.code, "id_prefix_too_short", "fewer than 6 characters is refused, even when it would be unique");
  t.equal(short.body.details?.minLength, 6);

  const none = await api("GET", `/api/v1/requests/ffffffffff`);
  t.equal(none.status, 404);
  t.equal(none.body.code, "not_found", "a prefix nothing starts with is not found");

  const vote = await api("POST", `/api/v1/requests/${shared}/decision`, { approve: true });
  t.equal(vote.body.code, "ambiguous_id", "a vote by an ambiguous prefix is refused before it counts");
  t.equal((await api("GET", `/api/v1/requests/${ids[0]}`)).body.record?.state, "REQUEST_STATE_PENDING", "and changed nothing");
});

await t.test("airlock requests show / approve / deny take a unique prefix, and list the matches of an ambiguous one", async (t) => {
  const shown = await airlock(["show", ids[0].slice(0, 9)]);
  t.equal(shown.code, 0, shown.stderr);
  t.match(shown.stdout, new RegExp(`request +${ids[0]}`), "show prints the full id");
  t.match(shown.stdout, /risk +high +rule export: An export copies customer records out of the database for good\./, "and why the rule holds it");
  t.match(shown.stdout, /grants +SELECT on customers, lives 5 min \(Vault database role export on mount database\)/, "and what an approval grants");

  const ambiguous = await airlock(["approve", shared]);
  t.equal(ambiguous.code, 1);
  t.match(ambiguous.stderr, /2 requests have ids starting with that prefix; give more of the id:/, "an ambiguous prefix fails");
  for (const [index, id] of ids.entries()) {
    t.match(ambiguous.stderr, new RegExp(`\\n  ${id}  pending +demo\\.v1\\.OpsService/${methods[index]}  spiffe://example/agent/prefix`), `and lists ${id}`);
  }

  const short = await airlock(["show", shared.slice(0, 4)]);
  t.equal(short.code, 1);
  t.match(short.stderr, /a shortened id needs at least 6 characters/, "a too short prefix is refused");

  const denied = await airlock(["deny", ids[0].slice(0, 10), "--reason", "not this one"]);
  t.equal(denied.code, 0, denied.stderr);
  t.match(denied.stdout, new RegExp(`denied ${ids[0]}: now denied`), "deny by prefix votes on the full id");
  const approved = await airlock(["approve", ids[1].slice(0, 9), "--reason", "fine"], stack.tokens.sam);
  t.equal(approved.code, 0, approved.stderr);
  t.match(approved.stdout, new RegExp(`voted to approve ${ids[1]}: now (approved|executing)`), "approve by prefix too");
});
