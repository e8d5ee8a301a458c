/**
 * The `nats` config section, the one way parts connect, and the operator's
 * commands for the security material (`airlock nats init | add-host | revoke-host`).
 */
import { execFile, execFileSync } from "node:child_process";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { createUser } from "@nats-io/nkeys";
import t from "tap";
import { ConfigReader } from "../../common/config.js";
import { Code } from "../../common/errors.js";
import { addBusHost, initBusMaterial, revokeBusHost } from "../../common/bus-material.js";
import { connectNats, parseNatsConfig, parseNatsReplicas } from "../../common/nats.js";
import { useInfra } from "../../harness/index.js";

const { nats } = await useInfra(t, { nats: true });
const dir = await mkdtemp(join(tmpdir(), "airlock-nats-test-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));

await t.test("the nats section: each bad field is named, credentials never ride in the URL", async (t) => {
  const parse = (value: unknown) => parseNatsConfig(new ConfigReader({ nats: value }, "", join(dir, "x.yaml")).object("nats"));
  const good = parse({ url: "tls://nats:4222", auth: { kind: "nkey", seed_file: "host.nk" }, tls: { ca_file: "ca.pem" } });
  t.same(good, { servers: ["tls://nats:4222"], auth: { kind: "nkey", seedFile: join(dir, "host.nk") }, tls: { caFile: join(dir, "ca.pem") } });
  const cases: [unknown, string][] = [
    [{ url: "tls://nats:4222" }, "nats.auth"],
    [{ url: "tls://nats:4222", auth: { kind: "token", token: "x" } }, "nats.auth.kind"],
    [{ url: "tls://user:secret@nats:4222", auth: { kind: "nkey", seed_file: "h.nk" } }, "nats.url"],
    [{ url: "http://nats:4222", auth: { kind: "nkey", seed_file: "h.nk" } }, "nats.url"],
    [{ urls: [], auth: { kind: "nkey", seed_file: "h.nk" } }, "nats.urls"],
    [{ url: "tls://nats:4222", auth: { kind: "nkey", seed_file: "h.nk" }, tls: { cert_file: "c.pem" } }, "nats.tls.cert_file"],
    [{ url: "tls://nats:4222", auth: { kind: "nkey", seed_file: "h.nk" }, token: "old-style" }, "nats.token"],
  ];
  for (const [value, field] of cases) {
    const error = (() => {
      try {
        parse(value);
        return undefined;
      } catch (e) {
        return e;
      }
    })();
    t.match(error, { code: Code.InvalidArgument, details: { field } }, `refused, naming ${field}`);
    t.notMatch(String(error), /secret/, "the message does not repeat a password");
  }
});

await t.test("nats.replicas, read by the parts that create streams: 1, 3 or 5, naming the field; unknown to the others", async (t) => {
  const section = (value: Record<string, unknown>) => new ConfigReader({ nats: { url: "tls://nats:4222", auth: { kind: "nkey", seed_file: "h.nk" }, ...value } }, "", join(dir, "x.yaml")).object("nats");
  const withReplicas = (value: Record<string, unknown>) => {
    const reader = section(value);
    const replicas = parseNatsReplicas(reader);
    parseNatsConfig(reader);
    return replicas;
  };
  t.equal(withReplicas({}), 1, "one replica by default");
  t.equal(withReplicas({ replicas: 3 }), 3);
  t.equal(withReplicas({ replicas: 5 }), 5);
  for (const bad of [0, 2, 4, 7, "3", 1.5]) {
    t.throws(() => withReplicas({ replicas: bad }), { code: Code.InvalidArgument, details: { field: "nats.replicas" } }, `${JSON.stringify(bad)} is refused`);
  }
  // A part that creates no stream (the sidecar, the forwarder) does not take the key.
  t.throws(() => parseNatsConfig(section({ replicas: 3 })), { code: Code.InvalidArgument, details: { field: "nats.replicas" } });
});

await t.test("connecting: a missing seed file and a seed the server does not know are clear errors", async (t) => {
  const config = await nats.credentials({ kind: "broker" });
  const missing = await connectNats({ ...config, auth: { kind: "nkey", seedFile: join(dir, "none.nk") } }, { role: { kind: "broker" }, name: "t", extra: { reconnect: false } }).catch((e: unknown) => e);
  t.match(missing, { code: Code.FailedPrecondition, details: { field: "nats.auth.seed_file" } });
  const stranger = join(dir, "stranger.nk");
  await writeFile(stranger, new TextDecoder().decode(createUser().getSeed()));
  const refused = await connectNats({ ...config, auth: { kind: "nkey", seedFile: stranger } }, { role: { kind: "broker" }, name: "t", extra: { reconnect: false, timeout: 3000 } }).catch((e: unknown) => e);
  t.match(refused, { code: Code.Unauthenticated }, "an nkey that is no user of the server is unauthenticated");
  t.notMatch(String(refused), /SU[A-Z2-7]{20}/, "the message carries no seed");
});

await t.test("the material: seeds are 0600, hosts come and go alone, bad input changes nothing", async (t) => {
  const material = join(dir, "material");
  await initBusMaterial(material);
  t.match(await initBusMaterial(material).catch((e: unknown) => e), { code: Code.AlreadyExists }, "init refuses to overwrite");
  const added = await addBusHost(material, "web-01");
  t.equal((await stat(added.seedFile)).mode & 0o777, 0o600, "a host seed is readable by its owner alone");
  t.equal((await stat(join(material, "users", "admin.nk"))).mode & 0o777, 0o600);
  t.equal((await addBusHost(material, "web-01")).created, false, "adding a host again keeps its credential");
  const before = await readFile(join(material, "auth.conf"), "utf8");
  t.match(await addBusHost(material, "web 01; rm -rf /").catch((e: unknown) => e), { code: Code.InvalidArgument, details: { field: "host" } });
  t.match(await revokeBusHost(material, "never-added").catch((e: unknown) => e), { code: Code.NotFound });
  t.equal(await readFile(join(material, "auth.conf"), "utf8"), before, "refused input changed nothing");
  t.match(before, /airlock\.request\.web-01\.>/, "web-01's user has web-01's subjects");
  await addBusHost(material, "web-02");
  await revokeBusHost(material, "web-01");
  const after = await readFile(join(material, "auth.conf"), "utf8");
  t.notMatch(after, new RegExp(added.publicKey), "web-01's user is gone");
  t.match(after, /airlock\.request\.web-02\.>/, "web-02 is untouched");
  t.notMatch(after, /no_auth_user/, "no anonymous user");
  const registry = JSON.parse(await readFile(join(material, "registry.json"), "utf8")) as { revoked: { host: string; publicKey: string }[] };
  t.same(registry.revoked.map((r) => [r.host, r.publicKey]), [["web-01", added.publicKey]], "the revocation is on record");
  t.match(await stat(added.seedFile).catch((e: unknown) => e), { code: "ENOENT" }, "the revoked seed file is deleted");
  const readded = await addBusHost(material, "web-01");
  t.not(readded.publicKey, added.publicKey, "a host that comes back gets a new key");
});

await t.test("airlock nats prints paths and public keys, never a seed", async (t) => {
  const cli = fileURLToPath(new URL("../../cli/airlock.ts", import.meta.url));
  const run = (...args: string[]) => promisify(execFile)(process.execPath, ["--import", import.meta.resolve("tsx"), cli, "nats", ...args]).then(
    ({ stdout, stderr }) => ({ code: 0, out: stdout + stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, out: e.stdout + e.stderr }),
  );
  const material = join(dir, "cli");
  const init = await run("init", "--dir", material, "--server-name", "nats.internal");
  t.equal(init.code, 0, init.out);
  t.match(init.out, /users\/broker\.nk \(U[A-Z2-7]{55}\)/);
  const add = await run("add-host", "web-07", "--dir", material);
  t.match(add.out, /added host web-07: seed \S+web-07\.nk \(U[A-Z2-7]{55}\)/);
  const revoke = await run("revoke-host", "web-07", "--dir", material);
  t.match(revoke.out, /revoked host web-07/);
  for (const output of [init.out, add.out, revoke.out]) t.notMatch(output, /\bS[UAON][A-Z2-7]{50,}/, "no seed printed");
  // An auth.conf from an older version, without a right this one adds: render-auth brings it up
  // to date and keeps every key.
  await run("add-host", "web-08", "--dir", material);
  const current = await readFile(join(material, "auth.conf"), "utf8");
  const older = current.replaceAll("AIRLOCK_CHAT", "AIRLOCK_OLD");
  t.not(older, current, "the older file lacks the chat bucket's rights");
  await writeFile(join(material, "auth.conf"), older);
  const rendered = await run("render-auth", "--dir", material);
  t.equal(rendered.code, 0, rendered.out);
  t.match(rendered.out, /wrote \S+auth\.conf with this version's permissions \(1 hosts, every key kept\)/);
  t.equal(await readFile(join(material, "auth.conf"), "utf8"), current, "the same users and keys, with this version's rights");
  const none = await run("render-auth", "--dir", join(dir, "no-material"));
  t.equal(none.code, 1);
  t.match(none.out, /holds no NATS security material/);
  const bad = await run("revoke-host", "web-07", "--dir", material);
  t.equal(bad.code, 1);
  t.match(bad.out, /airlock: host web-07 has no NATS credential/);
  const server = await readFile(join(material, "server.pem"), "utf8");
  t.match(server, /BEGIN CERTIFICATE/);
  t.match(execFileSync("openssl", ["x509", "-in", join(material, "server.pem"), "-noout", "-ext", "subjectAltName"]).toString(), /DNS:nats\.internal/, "the certificate is valid for the named server");
});
