/**
 * The sidecar's call reporter through a NATS outage: one send at a time (a
 * flush per interval must not pile up a chain of sends, each waiting out its
 * timeout), nothing lost once NATS is back, and nothing sent twice.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import t from "tap";
import { ensureStreams, streams, subjects } from "../../common/subjects.js";
import { useInfra, waitUntil } from "../../harness/index.js";
import { type CallReportBatch, CallReporter } from "../../sidecar/reports.js";

const { nats } = await useInfra(t, { nats: true });
// The streams are a broker's to create.
const broker = await nats.connect({ kind: "broker" });
await ensureStreams(await jetstreamManager(broker));
await broker.close();
const sidecar = await nats.connect({ kind: "sidecar", host: "report-host" }, { reconnectTimeWait: 50, maxReconnectAttempts: -1 });
t.teardown(() => sidecar.close());
// The interval timer is not what is tested: flushes are called by hand.
const reporter = new CallReporter({ nc: sidecar, host: "report-host", flushIntervalMs: 3_600_000 });
t.teardown(() => reporter.close());

/** Every call reported on the host's subject so far, by method, read as an administrator. */
async function stored(): Promise<Map<string, number>> {
  const admin = await nats.connect({ kind: "admin" });
  try {
    const consumer = await jetstream(admin).consumers.get(streams.security.name, { filter_subjects: [subjects.security("report-host")] });
    const counts = new Map<string, number>();
    const pending = (await consumer.info()).num_pending;
    if (pending === 0) return counts;
    const messages = await consumer.fetch({ max_messages: pending, expires: 2_000 });
    let seen = 0;
    for await (const message of messages) {
      for (const call of message.json<CallReportBatch>().calls) counts.set(call.method, (counts.get(call.method) ?? 0) + call.count);
      if (++seen >= pending) break;
    }
    return counts;
  } finally {
    await admin.close();
  }
}

await t.test("flushes during an outage share one send; after it everything arrives once", async (t) => {
  reporter.report({ outcome: "denied", method: "/m/Before", rule: "default", agent: "a", onBehalfOf: "", reason: "policy_deny" });
  await reporter.flush();
  t.ok(await waitUntil(async () => (await stored()).get("/m/Before") === 1, 10_000), "a batch before the outage is stored");

  await nats.pause();
  const flushes: Array<Promise<void>> = [];
  for (let i = 0; i < 8; i++) {
    reporter.report({ outcome: "denied", method: `/m/During${i}`, rule: "default", agent: "a", onBehalfOf: "", reason: "policy_deny" });
    flushes.push(reporter.flush());
  }
  // Each send waits up to 2 s for JetStream's answer. Chained one per flush, the eighth flush would settle
  // after about 16 s; shared, every flush settles when the one send in flight gives up.
  let settled = false;
  void Promise.all(flushes).then(() => (settled = true));
  t.ok(await waitUntil(async () => settled, 6_000), "every flush made in the outage settled with the one send in flight");
  await nats.resume();
  t.ok(
    await waitUntil(async () => {
      await reporter.flush();
      const counts = await stored();
      return Array.from({ length: 8 }, (_, i) => counts.get(`/m/During${i}`)).every((count) => count === 1);
    }, 20_000),
    "after the outage every report kept arrives",
  );
  const counts = await stored();
  t.same([...counts.values()].filter((count) => count !== 1), [], "no report stored twice");
  t.equal(counts.size, 9);
});
