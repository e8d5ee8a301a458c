/**
 * h2spec, the HTTP/2 conformance tester, obtained the way Vault is: built
 * once per machine from the Go module proxy through a pinned wrapper module
 * (`harness/h2spec-build`: go.mod / go.sum pin h2spec and every dependency)
 * into the cache dir, never into the clone. `$H2SPEC_BIN` overrides it.
 * @module
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { copyFile, mkdir, readFile, rename } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { ManagedProcess, makeTempDir } from "./resources.js";
import { acquireLock, defaultCacheDir, goBinary } from "./gobuild.js";

const wrapperDir = join(dirname(fileURLToPath(import.meta.url)), "h2spec-build");
const wrapperFiles = ["go.mod", "go.sum"] as const;

/** Options of {@link resolveH2spec}. */
export interface ResolveH2specOptions {
  /** @default process.env.AIRLOCK_CACHE_DIR ?? ~/.cache/airlock */
  readonly cacheDir?: string;
  /** @default writes to standard error */
  readonly onProgress?: (line: string) => void;
}

/**
 * The h2spec binary: `$H2SPEC_BIN`, else the cached build, building it first
 * (about 20 s; parallel callers wait on a lock instead of building twice).
 */
export async function resolveH2spec(options: ResolveH2specOptions = {}): Promise<string> {
  const fromEnv = process.env.H2SPEC_BIN;
  if (fromEnv !== undefined && fromEnv !== "") return fromEnv;
  const progress = options.onProgress ?? ((line: string) => process.stderr.write(`${line}\n`));
  const hash = createHash("sha256");
  for (const file of wrapperFiles) hash.update(await readFile(join(wrapperDir, file)));
  const goMod = await readFile(join(wrapperDir, "go.mod"), "utf8");
  const version = goMod.match(/github\.com\/summerwind\/h2spec (v\S+)/)?.[1] ?? "unknown";
  const root = join(options.cacheDir ?? defaultCacheDir(), "h2spec", hash.digest("hex").slice(0, 16));
  const binary = join(root, "h2spec");
  if (existsSync(binary)) return binary;
  const go = goBinary();
  if (go === undefined) throw new Error("h2spec not found: set H2SPEC_BIN, or install Go (https://go.dev/dl) so the harness can build it");
  await mkdir(dirname(root), { recursive: true });
  const release = await acquireLock(`${root}.lock`, () => progress(`h2spec: another process is building h2spec ${version}; waiting for it`));
  try {
    if (existsSync(binary)) return binary;
    const src = join(root, "src");
    await mkdir(src, { recursive: true });
    for (const file of wrapperFiles) await copyFile(join(wrapperDir, file), join(src, file));
    progress(`h2spec: building h2spec ${version} from the Go module proxy into ${root} (once per machine)`);
    const build = new ManagedProcess("go build h2spec", go, ["build", "-trimpath", "-ldflags=-s -w", "-o", `${binary}.tmp`, "github.com/summerwind/h2spec/cmd/h2spec"], {
      cwd: src,
      env: { ...process.env, CGO_ENABLED: "0", GOFLAGS: "-mod=readonly" },
    });
    const code = await build.exited;
    await build.stop();
    if (code !== 0) throw new Error(`building h2spec failed (exit ${code}):\n${build.recentOutput}`);
    await rename(`${binary}.tmp`, binary);
    return binary;
  } finally {
    await release();
  }
}

/** One h2spec case: `generic/3.1/2` (suite, section, position in the section) and its title. */
export interface H2specCase {
  readonly id: string;
  readonly title: string;
  readonly outcome: "passed" | "failed" | "skipped";
  /** h2spec's expected / actual text for a failed case. */
  readonly detail: string;
}

/** The three suites h2spec runs. */
export type H2specSuite = "generic" | "http2" | "hpack";

/** What one h2spec run found. */
export interface H2specReport {
  readonly cases: readonly H2specCase[];
  /** Passed and total per suite (skipped cases count in the total). */
  readonly counts: Readonly<Record<H2specSuite, { readonly passed: number; readonly total: number }>>;
}

/** Options of {@link runH2spec}. */
export interface RunH2specOptions {
  readonly port: number;
  /** @default "127.0.0.1" */
  readonly host?: string;
  /** The `:path` h2spec requests. @default "/" */
  readonly path?: string;
  /** Seconds h2spec waits for each expected answer. @default 1 */
  readonly timeoutSec?: number;
}

const entities: Readonly<Record<string, string>> = { "&lt;": "<", "&gt;": ">", "&amp;": "&", "&quot;": '"', "&#39;": "'", "&#34;": "\"", "&#xA;": "\n" };
const unescape = (text: string): string => text.replace(/&(lt|gt|amp|quot|#39|#34|#xA);/g, (entity) => entities[entity] ?? entity);

/** Parses h2spec's JUnit report. */
export function parseH2specJunit(xml: string): H2specReport {
  const cases: H2specCase[] = [];
  const counts = { generic: { passed: 0, total: 0 }, http2: { passed: 0, total: 0 }, hpack: { passed: 0, total: 0 } };
  const position = new Map<string, number>();
  for (const match of xml.matchAll(/<testcase package="([^"]*)" classname="([^"]*)"[^>]*?(?:\/>|>([\s\S]*?)<\/testcase>)/g)) {
    const section = match[1] ?? "";
    const index = (position.get(section) ?? 0) + 1;
    position.set(section, index);
    const body = match[3] ?? "";
    const outcome = /<skipped/.test(body) ? "skipped" : /<(error|failure)/.test(body) ? "failed" : "passed";
    const detail = unescape(body.replace(/<[^>]+>/g, "").trim());
    cases.push({ id: `${section}/${index}`, title: unescape(match[2] ?? ""), outcome, detail });
    const suite = section.split("/")[0] as H2specSuite;
    const count = counts[suite];
    if (count === undefined) continue;
    count.total++;
    if (outcome === "passed") count.passed++;
  }
  return { cases, counts };
}

/** Runs h2spec's three suites against a server and parses its report. */
export async function runH2spec(options: RunH2specOptions): Promise<H2specReport> {
  const binary = await resolveH2spec();
  const dir = await makeTempDir("h2spec");
  try {
    const report = join(dir.path, "report.xml");
    const run = new ManagedProcess("h2spec", binary, ["-h", options.host ?? "127.0.0.1", "-p", String(options.port), "-P", options.path ?? "/", "-o", String(options.timeoutSec ?? 1), "-j", report]);
    await run.exited;
    await run.stop();
    if (!existsSync(report)) throw new Error(`h2spec wrote no report:\n${run.recentOutput}`);
    return parseH2specJunit(await readFile(report, "utf8"));
  } finally {
    await dir.remove();
  }
}

/** `h2spec: generic=P/T http2=P/T hpack=P/T`. */
export function formatH2specCounts(report: H2specReport): string {
  const { generic, http2, hpack } = report.counts;
  return `h2spec: generic=${generic.passed}/${generic.total} http2=${http2.passed}/${http2.total} hpack=${hpack.passed}/${hpack.total}`;
}
