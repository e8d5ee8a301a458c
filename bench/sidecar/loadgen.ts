/**
 * The benchmark's load generator, in a process of its own: calls
 * demo.v1.OpsService/GetStatus on one address and prints one JSON line with
 * the count, the duration and latency percentiles.
 *
 *   loadgen <host:port> saturate <seconds> <concurrency>
 *   loadgen <host:port> rate <seconds> <calls per second>
 */
import { Client, credentials, Metadata } from "@grpc/grpc-js";

const [address, mode, secondsText, amountText] = process.argv.slice(2);
if (address === undefined || (mode !== "saturate" && mode !== "rate")) {
  console.error("usage: loadgen <host:port> saturate|rate <seconds> <concurrency|rps>");
  process.exit(2);
}
const seconds = Number(secondsText ?? "5");
const amount = Number(amountText ?? "32");
const client = new Client(address, credentials.createInsecure());
const path = "/demo.v1.OpsService/GetStatus";
// GetStatusRequest has no fields: its encoding is empty. Pre-encoded so the generator spends nothing on protobuf.
const request = Buffer.alloc(0);
const passBytes = (bytes: Buffer) => bytes;
// The agent's token (AGENT_TOKEN), sent on every call to both targets: the upstream ignores it.
const metadata = new Metadata();
if (process.env.AGENT_TOKEN !== undefined) metadata.set("authorization", `Bearer ${process.env.AGENT_TOKEN}`);
const latencies: number[] = [];
let failures = 0;

function call(): Promise<void> {
  const started = process.hrtime.bigint();
  return new Promise((resolve) => {
    client.makeUnaryRequest(path, passBytes, passBytes, request, metadata, {}, (error) => {
      if (error === null) latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
      else failures++;
      resolve();
    });
  });
}

// Warm the connection up before measuring.
for (let i = 0; i < 200; i++) await call();
latencies.length = 0;
failures = 0;

const started = Date.now();
const deadline = started + seconds * 1000;
if (mode === "saturate") {
  const worker = async () => {
    while (Date.now() < deadline) await call();
  };
  await Promise.all(Array.from({ length: amount }, worker));
} else {
  const intervalMs = 1000 / amount;
  const pending: Array<Promise<void>> = [];
  let sent = 0;
  await new Promise<void>((resolve) => {
    const tick = setInterval(() => {
      const due = Math.min(Math.floor((Date.now() - started) / intervalMs), Math.floor(seconds * amount));
      while (sent < due) {
        pending.push(call());
        sent++;
      }
      if (Date.now() >= deadline) {
        clearInterval(tick);
        resolve();
      }
    }, 1);
  });
  await Promise.all(pending);
}
const elapsed = (Date.now() - started) / 1000;
latencies.sort((a, b) => a - b);
const at = (q: number) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? Number.NaN;
// At a fixed rate the bench pools every latency across rounds (microsecond resolution is plenty).
const raw = mode === "rate" ? { latencies: latencies.map((ms) => Math.round(ms * 1000) / 1000) } : {};
console.log(JSON.stringify({ count: latencies.length, failures, seconds: elapsed, rps: latencies.length / elapsed, p50: at(0.5), p90: at(0.9), p99: at(0.99), ...raw }));
client.close();
