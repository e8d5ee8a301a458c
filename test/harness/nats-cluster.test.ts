import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { copyFile, rm } from "node:fs/promises";
import { join } from "node:path";
import t from "tap";
import { Code } from "../../common/errors.js";
import { connectNats } from "../../common/nats.js";
import { natsServerRelease, startNatsCluster, waitUntil } from "../../harness/index.js";

const cluster = await startNatsCluster({ nodes: 3 });
t.teardown(() => cluster.stop());

await t.test("three nodes of the pinned server, one client URL each, the same material", async (t) => {
  t.equal(cluster.nodes.length, 3);
  t.equal(cluster.urls.length, 3);
  t.equal(new Set(cluster.urls).size, 3, "a port per node");
  for (const url of cluster.urls) t.match(url, /^tls:\/\/127\.0\.0\.1:\d+$/);
  t.equal(`v${cluster.version}`, natsServerRelease.version);
  const broker = await cluster.credentials({ kind: "broker" });
  t.same(broker.servers, cluster.urls, "a role's config names every node");
  // Every node serves the same users and the same JetStream: through each URL alone, the
  // admin's credential appends to one replicated stream.
  for (const [index, url] of cluster.urls.entries()) {
    const nc = await cluster.connect({ kind: "admin" }, { servers: [url], reconnect: false });
    if (index === 0) await (await jetstreamManager(nc)).streams.add({ name: "HARNESS_ALL", subjects: ["harness.all"], num_replicas: 3 });
    t.equal((await jetstream(nc).publish("harness.all", url)).seq, index + 1, `JetStream appends through ${url}`);
    await nc.close();
  }
});

await t.test("an R3 stream keeps serving when a node is killed, and the node catches up after its restart", async (t) => {
  const nc = await cluster.connect({ kind: "admin" }, { maxReconnectAttempts: -1, reconnectTimeWait: 100 });
  t.teardown(() => nc.close());
  const jsm = await jetstreamManager(nc);
  const info = await jsm.streams.add({ name: "HARNESS_R3", subjects: ["harness.r3.>"], num_replicas: 3 });
  t.equal(info.config.num_replicas, 3);
  t.equal(info.cluster?.replicas?.length, 2, "a leader and two replicas");
  const js = jetstream(nc);
  t.equal((await js.publish("harness.r3.a", "before")).seq, 1);

  // A host joining now is known to every node (the cluster's nodes are all reloaded).
  const sidecar = await cluster.credentials({ kind: "sidecar", host: "cluster-host" });
  for (const url of cluster.urls) {
    const probe = await cluster.connect({ kind: "sidecar", host: "cluster-host" }, { servers: [url], reconnect: false });
    await probe.close();
  }
  t.same(sidecar.servers, cluster.urls);

  const leaderName = (await jsm.streams.info("HARNESS_R3")).cluster?.leader;
  const victim = cluster.nodes.find((node) => node.name === leaderName);
  if (victim === undefined) throw new Error(`no node is the stream's leader ${leaderName}`);
  await victim.kill();
  t.equal(victim.pid, 0, "the leader is down");
  // The two survivors elect a new stream leader and accept writes.
  let seq = 0;
  t.ok(
    await waitUntil(
      async () => {
        seq = await js.publish("harness.r3.b", "during", { timeout: 2000 }).then(
          (ack) => ack.seq,
          () => 0,
        );
        return seq > 0;
      },
      30_000,
      200,
    ),
    "writes resume on two of three nodes",
  );
  t.equal(seq, 2);
  t.not((await jsm.streams.info("HARNESS_R3")).cluster?.leader, leaderName, "another node leads the stream");

  await victim.restart();
  t.not(victim.pid, 0);
  // The restarted node has the message written while it was down.
  const alone = await cluster.connect({ kind: "admin" }, { servers: [victim.url], reconnect: false });
  t.teardown(() => alone.close());
  const caughtUp = await waitUntil(
    async () => {
      const state = await (await jetstreamManager(alone)).streams.info("HARNESS_R3").catch(() => undefined);
      const replica = [state?.cluster?.leader === victim.name ? { current: true, name: victim.name } : undefined, ...(state?.cluster?.replicas ?? [])].find((peer) => peer?.name === victim.name);
      return state?.state.messages === 2 && replica?.current === true;
    },
    30_000,
    200,
  );
  t.ok(caughtUp, "the restarted node is a current replica again");
  await jsm.streams.delete("HARNESS_R3");
});

await t.test("a revoked host is refused by every node", async (t) => {
  const config = await cluster.credentials({ kind: "sidecar", host: "doomed" });
  // Kept aside: revoking deletes the seed file.
  const kept = join(cluster.securityDir, "kept-doomed.nk");
  await copyFile(config.auth.seedFile, kept);
  t.teardown(() => rm(kept, { force: true }));
  const role = { kind: "sidecar", host: "doomed" } as const;
  for (const url of cluster.urls) {
    const nc = await connectNats({ ...config, auth: { kind: "nkey", seedFile: kept }, servers: [url] }, { role, name: "before", extra: { reconnect: false } });
    await nc.close();
  }
  await cluster.revokeHost("doomed");
  for (const url of cluster.urls) {
    await t.rejects(connectNats({ ...config, auth: { kind: "nkey", seedFile: kept }, servers: [url] }, { role, name: "after", extra: { reconnect: false, timeout: 2000 } }), { code: Code.Unauthenticated }, `refused at ${url}`);
  }
});
