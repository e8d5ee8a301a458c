/**
 * `npm run conformance`: h2spec's generic, http2 and hpack suites against a
 * real sidecar's agent port (harness/conformance.ts), printing
 * `h2spec: generic=P/T http2=P/T hpack=P/T`. With `--failures`, each case that
 * did not pass is listed first, with what h2spec expected and saw.
 */
import { conformanceHost, conformancePath, startConformanceSidecar } from "../harness/conformance.js";
import { formatH2specCounts, runH2spec } from "../harness/h2spec.js";
import { startNats } from "../harness/nats.js";

const nats = await startNats();
try {
  const target = await startConformanceSidecar(await nats.credentials({ kind: "sidecar", host: conformanceHost }));
  try {
    const report = await runH2spec({ port: target.port, path: conformancePath });
    if (process.argv.includes("--failures")) {
      for (const c of report.cases) if (c.outcome !== "passed") console.log(`${c.outcome} ${c.id} ${c.title}\n    ${c.detail.replace(/\n/g, "\n    ")}`);
    }
    console.log(formatH2specCounts(report));
  } finally {
    await target.close();
  }
} finally {
  await nats.stop();
}
