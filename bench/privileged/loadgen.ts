/**
 * The privileged benchmark's load generator, in a process of its own: calls
 * demo.v1.OpsService/RotateKey through the sidecar as an authenticated agent
 * (token from AGENT_TOKEN) and prints one JSON line with the count, duration
 * and latency percentiles.
 *
 *   loadgen <host:port> serial <calls>
 *   loadgen <host:port> saturate <seconds> <concurrency>
 */
import { toBinary, create } from "@bufbuild/protobuf";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import { OpsService } from "../../proto/gen/demo/v1/ops_pb.js";

const [address, mode, first, second] = process.argv.slice(2);
const token = process.env.AGENT_TOKEN;
if (address === undefined || token === undefined || (mode !== "serial" && mode !== "saturate")) {
  console.error("usage: AGENT_TOKEN=… loadgen <host:port> serial <calls> | saturate <seconds> <concurrency>");
  process.exit(2);
}
const client = new Client(address, credentials.createInsecure());
const passBytes = (bytes: Buffer) => bytes;
const latencies: number[] = [];
let failures = 0;
let counter = 0;

function call(): Promise<void> {
  const metadata = new Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  // Each call a distinct action, as real key rotations are.
  const request = Buffer.from(toBinary(OpsService.method.rotateKey.input, create(OpsService.method.rotateKey.input, { keyId: `bench-${process.pid}-${counter++}` })));
  const started = process.hrtime.bigint();
  return new Promise((resolve) => {
    client.makeUnaryRequest("/demo.v1.OpsService/RotateKey", passBytes, passBytes, request, metadata, {}, (error) => {
      if (error === null) latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
      else {
        failures++;
        if (failures <= 3) console.error(`call failed: ${error.message}`);
      }
      resolve();
    });
  });
}

for (let i = 0; i < 20; i++) await call();
latencies.length = 0;
failures = 0;
const started = Date.now();
if (mode === "serial") {
  for (let i = 0; i < Number(first ?? "100"); i++) await call();
} else {
  const deadline = started + Number(first ?? "10") * 1000;
  const worker = async () => {
    while (Date.now() < deadline) await call();
  };
  await Promise.all(Array.from({ length: Number(second ?? "16") }, worker));
}
const seconds = (Date.now() - started) / 1000;
latencies.sort((a, b) => a - b);
const at = (q: number) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? Number.NaN;
console.log(JSON.stringify({ count: latencies.length, failures, seconds, rps: latencies.length / seconds, p50: at(0.5), p90: at(0.9), p99: at(0.99) }));
client.close();
