import { existsSync } from "node:fs";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import t from "tap";
import { natsServerRelease, natsServerVersion, startNats, useInfra } from "../../harness/index.js";

const { nats } = await useInfra(t, { nats: true });

await t.test("the server is the pinned release and runs JetStream over TLS on a loopback port", async (t) => {
  t.match(nats.url, /^tls:\/\/127\.0\.0\.1:\d+$/);
  t.equal(nats.version, await natsServerVersion());
  t.equal(`v${nats.version}`, natsServerRelease.version, "the project's pinned nats-server, not whatever the machine has");
  const nc = await nats.connect({ kind: "admin" });
  t.teardown(() => nc.close());
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: "HARNESS", subjects: ["harness.>"] });
  const ack = await jetstream(nc).publish("harness.hello", "world", { msgID: "m1" });
  t.equal(ack.seq, 1);
  const again = await jetstream(nc).publish("harness.hello", "world", { msgID: "m1" });
  t.ok(again.duplicate, "the dedup window drops a repeated msgID");
  const stored = await jsm.streams.getMessage("HARNESS", { seq: 1 });
  t.equal(stored?.string(), "world");

  const kv = await new Kvm(nc).create("harness");
  const revision = await kv.put("k", "v1");
  await t.rejects(kv.update("k", "v2", revision + 5), "compare-and-set refuses a stale revision");
  await kv.update("k", "v2", revision);
  t.equal((await kv.get("k"))?.string(), "v2");
});

await t.test("pause and resume keep the port and the JetStream store", async (t) => {
  const port = nats.port;
  await nats.pause();
  await t.rejects(nats.connect({ kind: "admin" }, { reconnect: false, timeout: 1000 }), "no server while paused");
  await nats.resume();
  t.equal(nats.port, port);
  const nc = await nats.connect({ kind: "admin" });
  t.teardown(() => nc.close());
  const stored = await (await jetstreamManager(nc)).streams.getMessage("HARNESS", { seq: 1 });
  t.equal(stored?.string(), "world", "the stream survived the restart");
});

await t.test("a connected client reconnects after restart", async (t) => {
  const nc = await nats.connect({ kind: "admin" }, { reconnectTimeWait: 100, maxReconnectAttempts: -1 });
  t.teardown(() => nc.close());
  const reconnected = (async () => {
    for await (const status of nc.status()) if (status.type === "reconnect") return true;
    return false;
  })();
  await nats.restart();
  // Requests made while the client is still disconnected time out in nats.js
  // v3: wait for the reconnect before using it.
  t.ok(await reconnected, "the client saw the reconnect");
  const kv = await new Kvm(nc).open("harness");
  t.equal((await kv.get("k"))?.string(), "v2");
});

await t.test("stop frees the port and removes the store dir", async (t) => {
  const other = await startNats();
  t.ok(existsSync(other.storeDir));
  t.ok(existsSync(other.securityDir));
  t.not(other.port, nats.port, "each server gets its own port");
  await other.stop();
  t.notOk(existsSync(other.storeDir), "store dir removed");
  t.notOk(existsSync(other.securityDir), "security material removed");
});
