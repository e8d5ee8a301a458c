import { jetstreamManager, jetstream } from "@nats-io/jetstream";
import { startNats } from "./harness/nats.js";
import { ensureStreams } from "./common/subjects.js";
const nats = await startNats();
try {
  const admin = await nats.connect({ kind: "admin" });
  await ensureStreams(await jetstreamManager(admin));
  await nats.credentials({ kind: "sidecar", host: "a" });
  const try1 = async (label: string) => {
    const side = await nats.connect({ kind: "sidecar", host: "a" });
    try { console.log(label, "ack", (await jetstream(side).publish("airlock.request.a.x0", "hi")).seq); } catch (e) { console.log(label, "fail", String(e)); }
    try { console.log(label, "core req", (await side.request("airlock.request.a.y", "hi", { timeout: 2000 })).string()); } catch (e) { console.log(label, "core req fail", String(e)); }
    await side.close();
  };
  await try1("after reload:");
  await admin.close();
  await nats.restart();
  await try1("after restart:");
} finally { await nats.stop(); }
