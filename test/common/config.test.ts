import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { AirlockError, Code, type ConfigEnv, ConfigReader, expandConfigVariables, readConfigFile } from "../../common/index.js";

const dir = await mkdtemp(join(tmpdir(), "airlock-config-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));

let files = 0;
async function configFile(text: string): Promise<string> {
  const path = join(dir, `config-${files++}.yaml`);
  await writeFile(path, text);
  return path;
}

async function failure(promise: Promise<unknown>): Promise<AirlockError> {
  try {
    await promise;
  } catch (error) {
    if (error instanceof AirlockError) return error;
    throw error;
  }
  throw new Error("expected an AirlockError, got success");
}

function expansionFailure(value: unknown, env: ConfigEnv): AirlockError {
  try {
    expandConfigVariables(value, "inline.yaml", { env });
  } catch (error) {
    if (error instanceof AirlockError) return error;
    throw error;
  }
  throw new Error("expected an AirlockError, got success");
}

await t.test("${NAME} and ${NAME:-default} expand in string values at any depth", async (t) => {
  const path = await configFile(
    [
      "nats: { url: '${NATS_URL}' }",
      "http: ${HTTP:-127.0.0.1:9465}",
      "listen: ${LISTEN:-127.0.0.1:7443}",
      "upstreams:",
      "  - name: ops",
      "    address: ${OPS_HOST}:${OPS_PORT}",
      "    descriptor_sets: ['${DIR}/a.binpb', plain.binpb]",
      "count: 3",
      "enabled: true",
      "nothing: null",
      "",
    ].join("\n"),
  );
  const root = await readConfigFile(path, { env: { NATS_URL: "nats://n:4222", LISTEN: "0.0.0.0:7443", OPS_HOST: "ops", OPS_PORT: "50051", DIR: "/keys" } });
  t.equal(root.object("nats").string("url"), "nats://n:4222");
  t.equal(root.string("http"), "127.0.0.1:9465", "unset: the default");
  t.equal(root.string("listen"), "0.0.0.0:7443", "set: the value, not the default");
  const upstream = root.list("upstreams")[0];
  t.equal(upstream?.string("address"), "ops:50051", "several references in one value");
  t.same(upstream?.strings("descriptor_sets"), ["/keys/a.binpb", "plain.binpb"], "inside lists");
  t.equal(root.integer("count", 0), 3, "numbers stay numbers");
  t.equal(root.boolean("enabled", false), true, "booleans stay booleans");
});

await t.test("an empty variable is an empty string, and takes the default with :-", async (t) => {
  t.same(expandConfigVariables({ a: "x${EMPTY}y", b: "${EMPTY:-fallback}", c: "${UNSET:-}" }, "inline.yaml", { env: { EMPTY: "" } }), { a: "xy", b: "fallback", c: "" });
});

await t.test("$${ is a literal ${ and any other $ is kept", async (t) => {
  const expanded = expandConfigVariables({ a: "$${NOT_A_VAR}", b: "cost: $5, $HOME, $$, $", c: "$${A}-${A}", d: "pa$$word" }, "inline.yaml", { env: { A: "1" } });
  t.same(expanded, { a: "${NOT_A_VAR}", b: "cost: $5, $HOME, $$, $", c: "${A}-1", d: "pa$$word" });
});

await t.test("a value is expanded once: a variable holding ${...} stays as it is", async (t) => {
  t.same(expandConfigVariables({ a: "${A}" }, "inline.yaml", { env: { A: "${B}", B: "no" } }), { a: "${B}" });
});

await t.test("keys are not expanded", async (t) => {
  const expanded = expandConfigVariables({ broker_keys: { "${KEY_ID}": "${DIR}/broker.pem" } }, "inline.yaml", { env: { KEY_ID: "k9", DIR: "/keys" } });
  t.same(expanded, { broker_keys: { "${KEY_ID}": "/keys/broker.pem" } });
});

await t.test("a whole-value reference gives a string, which typed readers then refuse as such", async (t) => {
  const reader = new ConfigReader(expandConfigVariables({ port: "${PORT}" }, "inline.yaml", { env: { PORT: "9465" } }), "", "inline.yaml");
  t.equal(reader.string("port"), "9465");
  const typed = new ConfigReader(expandConfigVariables({ port: "${PORT}" }, "inline.yaml", { env: { PORT: "9465" } }), "", "inline.yaml");
  t.throws(() => typed.integer("port", 1), { code: Code.InvalidArgument });
});

await t.test("an unset variable without a default fails naming the field and the variable", async (t) => {
  const path = await configFile("upstreams:\n  - name: ops\n    address: ${OPS_ADDR}\n");
  const error = await failure(readConfigFile(path, { env: {} }));
  t.equal(error.code, Code.InvalidArgument);
  t.equal(error.details.field, "upstreams[0].address");
  t.equal(error.details.variable, "OPS_ADDR");
  t.equal(error.details.source, path);
  t.match(error.rawMessage, `${path}: upstreams[0].address uses \${OPS_ADDR}, but the environment variable OPS_ADDR is not set`);

  const top = expansionFailure({ http: "${HTTP}" }, {});
  t.equal(top.details.field, "http");
  const nested = expansionFailure({ reviewers: { auth: { tokens: [{ token: "ok" }, { token: "${SAM_TOKEN}" }] } } }, {});
  t.equal(nested.details.field, "reviewers.auth.tokens[1].token");
  t.equal(nested.details.variable, "SAM_TOKEN");
});

await t.test("the error names the variable, never a value from the environment", async (t) => {
  const error = expansionFailure({ a: "${SECRET}", b: "${MISSING}" }, { SECRET: "hunter2" });
  t.equal(error.details.variable, "MISSING");
  t.notMatch(error.message, /hunter2/);
});

await t.test("malformed references fail naming the field", async (t) => {
  for (const text of ["${UNTERMINATED", "${}", "${1ABC}", "${A B}", "${A-default}", "${A:-${B}}", "${A:default}"]) {
    const error = expansionFailure({ list: [text] }, { A: "a", B: "b" });
    t.equal(error.code, Code.InvalidArgument, text);
    t.equal(error.details.field, "list[0]", text);
  }
});

await t.test("the process environment is the default", async (t) => {
  const name = `AIRLOCK_CONFIG_TEST_${process.pid}`;
  process.env[name] = "from-process-env";
  t.teardown(() => {
    delete process.env[name];
  });
  const path = await configFile(`value: \${${name}}\n`);
  t.equal((await readConfigFile(path)).string("value"), "from-process-env");
});

await t.test("the input value is not changed", async (t) => {
  const input = { a: ["${A}"], b: { c: "${A}" } };
  expandConfigVariables(input, "inline.yaml", { env: { A: "x" } });
  t.same(input, { a: ["${A}"], b: { c: "${A}" } });
});

await t.test("ConfigReader's existing errors are unchanged", async (t) => {
  const missing = await failure(readConfigFile(join(dir, "nope.yaml"), { env: {} }));
  t.equal(missing.code, Code.InvalidArgument);
  t.match(missing.rawMessage, /cannot read config file/);
  const broken = await failure(readConfigFile(await configFile("a: [1,\n"), { env: {} }));
  t.match(broken.rawMessage, /is not valid YAML/);
  const list = await failure(readConfigFile(await configFile("- a\n- b\n"), { env: {} }));
  t.match(list.rawMessage, /the file must be a mapping/);
  const root = await readConfigFile(await configFile("known: ${A}\ntypo: 1\n"), { env: { A: "x" } });
  t.equal(root.string("known"), "x");
  t.throws(() => root.done(), { code: Code.InvalidArgument, details: { field: "typo" } });
});
