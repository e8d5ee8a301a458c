/**
 * `npm run bench -- sidecar`: the sidecar's allow path against the upstream
 * called directly, in one run, with the load generator, the sidecar and the
 * upstream as separate processes. Prints
 *   sidecar: direct_rps=… proxied_rps=… ratio=… p50_added_ms=… p90_added_ms=… p99_added_ms=… cpu_ms_per_1k_calls=… rss_mb=…
 * and as its last line `ratio=<x> p90_added_ms=<y> cpu_ms_per_1k_calls=<z>`.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { generateDecisionKey } from "../common/decision.js";
import { freePort, startNats, waitUntil } from "../harness/index.js";
import { descriptorSetPath } from "../proto/index.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const tsx = ["--import", "tsx"];
const seconds = Number(process.env.BENCH_SECONDS ?? "5");
const rounds = Number(process.env.BENCH_ROUNDS ?? "2");

interface LoadResult {
  readonly count: number;
  readonly failures: number;
  readonly rps: number;
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
}

function startProcess(args: string[], ready: RegExp): Promise<{ child: ChildProcess; match: RegExpMatchArray }> {
  const child = spawn(process.execPath, [...tsx, ...args], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  return new Promise((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      output += chunk.toString("utf8");
      const match = output.match(ready);
      if (match !== null) resolve({ child, match });
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    child.once("exit", (code) => reject(new Error(`${args.join(" ")} exited (${code}) before it was ready:\n${output}`)));
  });
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
  await exited;
  clearTimeout(timer);
}

async function load(address: string, mode: "saturate" | "rate", amount: number): Promise<LoadResult> {
  return new Promise((resolve, reject) => {
    const generator = spawn(process.execPath, [...tsx, "bench/sidecar/loadgen.ts", address, mode, String(seconds), String(amount)], { cwd: root, stdio: ["ignore", "pipe", "inherit"] });
    let output = "";
    generator.stdout.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")));
    generator.once("exit", (code) => {
      if (code !== 0) return reject(new Error(`load generator failed (${code})`));
      resolve(JSON.parse(output.trim().split("\n").pop() ?? "{}") as LoadResult);
    });
  });
}

function cpuMs(pid: number): number {
  // utime and stime, fields 14 and 15 of /proc/<pid>/stat, in clock ticks (100 per second on Linux).
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.split(" ") ?? [];
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

function rssMb(pid: number): number {
  const match = readFileSync(`/proc/${pid}/status`, "utf8").match(/VmRSS:\s+(\d+) kB/);
  return Number(match?.[1] ?? 0) / 1024;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}

async function benchSidecar(): Promise<void> {
  const nats = await startNats();
  const dir = await mkdtemp(join(tmpdir(), "airlock-bench-"));
  const children: ChildProcess[] = [];
  try {
    const upstream = await startProcess(["bench/sidecar/upstream.ts"], /listening (\S+)/);
    children.push(upstream.child);
    const upstreamAddress = upstream.match[1] ?? "";
    const key = generateDecisionKey("bench");
    await writeFile(join(dir, "broker.pem"), key.publicKeyPem);
    await writeFile(
      join(dir, "policy.yaml"),
      "version: 1\ndefault: deny\nrules:\n  - id: status\n    match: { service: demo.v1.OpsService, method: GetStatus }\n    effect: allow\n",
    );
    const metricsPort = await freePort();
    const listenPort = await freePort();
    await writeFile(
      join(dir, "sidecar.yaml"),
      [
        `listen: 127.0.0.1:${listenPort}`,
        "upstreams:",
        `  - { name: ops, address: "${upstreamAddress}", descriptor_sets: ["${descriptorSetPath}"] }`,
        `nats: { url: "${nats.url}" }`,
        `vault: { address: "http://127.0.0.1:1" }`,
        "broker_keys: { bench: broker.pem }",
        "host: bench",
        "policy: policy.yaml",
        `metrics: { listen: "127.0.0.1:${metricsPort}" }`,
        "log_level: error",
      ].join("\n"),
    );
    const sidecar = spawn(process.execPath, [...tsx, "cli/airlock.ts", "sidecar", "--config", join(dir, "sidecar.yaml")], { cwd: root, stdio: ["ignore", "inherit", "inherit"] });
    children.push(sidecar);
    const healthy = await waitUntil(async () => (await fetch(`http://127.0.0.1:${metricsPort}/healthz`)).ok, 20_000);
    if (!healthy) throw new Error("the sidecar did not become healthy");
    const pid = sidecar.pid ?? 0;
    const proxied = `127.0.0.1:${listenPort}`;

    const direct: LoadResult[] = [];
    const through: LoadResult[] = [];
    const directRate: LoadResult[] = [];
    const throughRate: LoadResult[] = [];
    const cpuPer1k: number[] = [];
    const cpuPer1kSaturated: number[] = [];
    for (let round = 0; round < rounds; round++) {
      direct.push(await load(upstreamAddress, "saturate", 32));
      const beforeSaturation = cpuMs(pid);
      const saturated = await load(proxied, "saturate", 32);
      cpuPer1kSaturated.push(((cpuMs(pid) - beforeSaturation) / (saturated.count + saturated.failures + 200)) * 1000);
      through.push(saturated);
      directRate.push(await load(upstreamAddress, "rate", 500));
      const before = cpuMs(pid);
      const rated = await load(proxied, "rate", 500);
      // The generator warms up with 200 calls before it measures; they count too.
      cpuPer1k.push(((cpuMs(pid) - before) / (rated.count + rated.failures + 200)) * 1000);
      throughRate.push(rated);
    }
    const failures = [...direct, ...through, ...directRate, ...throughRate].reduce((sum, r) => sum + r.failures, 0);
    if (failures > 0) throw new Error(`${failures} calls failed during the benchmark`);
    const directRps = median(direct.map((r) => r.rps));
    const proxiedRps = median(through.map((r) => r.rps));
    const ratio = proxiedRps / directRps;
    const added = (q: "p50" | "p90" | "p99") => median(throughRate.map((r) => r[q])) - median(directRate.map((r) => r[q]));
    const cpu = median(cpuPer1k);
    const f = (n: number, digits = 3) => n.toFixed(digits);
    // For context: at saturation calls share event-loop wake-ups, so each costs less CPU than at 500 req/s.
    console.log(`sidecar_saturated: cpu_ms_per_1k_calls=${f(median(cpuPer1kSaturated), 0)}`);
    console.log(
      `sidecar: direct_rps=${f(directRps, 0)} proxied_rps=${f(proxiedRps, 0)} ratio=${f(ratio, 2)} p50_added_ms=${f(added("p50"))} p90_added_ms=${f(added("p90"))} p99_added_ms=${f(added("p99"))} cpu_ms_per_1k_calls=${f(cpu, 0)} rss_mb=${f(rssMb(pid), 0)}`,
    );
    console.log(`ratio=${f(ratio, 2)} p90_added_ms=${f(added("p90"))} cpu_ms_per_1k_calls=${f(cpu, 0)}`);
  } finally {
    for (const child of children.reverse()) await stop(child);
    await nats.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

const which = process.argv[2];
if (which === "sidecar") {
  await benchSidecar();
} else {
  console.error("usage: npm run bench -- sidecar");
  process.exitCode = 2;
}
