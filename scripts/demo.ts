/**
 * `npm run demo [-- --auto-approve]`: runs the product end to end on this
 * machine (see demo/run.ts). Ctrl-C stops everything it started.
 */
import { parseArgs } from "node:util";
import { AirlockError } from "../common/errors.js";
import { busCheckLine } from "../demo/bus-check.js";
import { trailVerdictLine } from "../broker/index.js";
import { runDemo, summaryTable } from "../demo/run.js";

const { values } = parseArgs({ options: { "auto-approve": { type: "boolean" }, "broker-http": { type: "string" }, "log-level": { type: "string" } }, strict: true });
const autoApprove = values["auto-approve"] === true;
const demo = runDemo({
  autoApprove,
  ...(values["broker-http"] === undefined ? {} : { brokerHttp: values["broker-http"] }),
  ...(values["log-level"] === undefined ? {} : { logLevel: values["log-level"] }),
});

let interrupted = false;
let interruptedAt = 0;
const onSignal = (signal: NodeJS.Signals) => {
  if (interrupted) {
    // The same Ctrl-C arrives twice (the terminal signals the process group, and npm relays it):
    // only a second press, later, means "now" (the harness's exit hook still stops its servers).
    // The relayed copy can be handled more than a second late on a busy machine, hence 5 s.
    // package.json starts this file with `node --import tsx`, not the tsx CLI: the CLI relays a
    // signal to its child and SIGKILLs it if the child has not acknowledged within about 60 ms,
    // which a loaded machine misses, and then nothing is stopped or dropped.
    if (Date.now() - interruptedAt > 5000) process.exit(130);
    return;
  }
  interrupted = true;
  interruptedAt = Date.now();
  console.log(`\ndemo   ${signal}: stopping everything`);
  void demo.stop().then(
    () => {
      console.log("demo   stopped; nothing left running");
      process.exit(130);
    },
    (error: unknown) => {
      console.log(`demo   FAILED while stopping: ${AirlockError.from(error).rawMessage}`);
      process.exit(1);
    },
  );
};
process.on("SIGINT", onSignal);
process.on("SIGTERM", onSignal);

try {
  const result = await demo.done;
  // After Ctrl-C the agent's remaining steps fail against stopped servers: nothing to report.
  if (interrupted) await new Promise<void>(() => undefined);
  console.log("");
  for (const line of summaryTable(result.actions)) console.log(`       ${line}`);
  console.log("");
  for (const failure of result.failures) console.log(`demo   FAILED: ${failure}`);
  console.log(`notify ${(result.notified.get("review_requested") ?? 0) > 0 ? "ok" : "MISSING"} ${[...result.notified].map(([kind, count]) => `${kind}=${count}`).join(" ")}`);
  console.log(busCheckLine(result.bus));
  console.log(trailVerdictLine(result.audit));
  if (autoApprove) {
    if (result.ok) console.log("demo ok");
    else process.exitCode = 1;
  } else {
    console.log("demo   the agent's script is done; the console stays up for a look at the history and audit trail. Ctrl-C stops everything.");
    await new Promise<void>(() => undefined);
  }
} catch (error) {
  if (interrupted) await new Promise<void>(() => undefined);
  const failure = AirlockError.from(error);
  console.log(`demo   FAILED while starting: ${failure.rawMessage}`);
  process.exitCode = 1;
} finally {
  if (!interrupted) await demo.stop();
}
