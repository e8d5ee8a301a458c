import { parseArgs } from "node:util";
import { AirlockError, Code } from "../common/errors.js";
import { Forwarder, loadForwarderConfig } from "../forwarder/index.js";

/**
 * `airlock forwarder --config forwarder.yaml`: runs until SIGINT or SIGTERM,
 * then closes cleanly (positions are already durable) and prints each sink's
 * summary line. A sink that stops on a failure sending again cannot fix (a
 * refused HEC token) stops the whole process with exit code 1, so a
 * supervisor sees it rather than a quiet gap in the SIEM.
 */
export async function runForwarder(args: string[]): Promise<void> {
  const { values } = parseArgs({ args, options: { config: { type: "string" } }, strict: true });
  if (values.config === undefined) throw new AirlockError(Code.InvalidArgument, "--config is required");
  let exitCode = 0;
  // Set once started: a sink can fail before start() has returned.
  const running: { forwarder?: Forwarder } = {};
  let stopping = false;
  const stop = () => {
    const forwarder = running.forwarder;
    if (stopping || forwarder === undefined) return;
    stopping = true;
    forwarder.close().then(
      () => {
        for (const line of forwarder.summary()) console.log(line);
        process.exit(exitCode);
      },
      () => process.exit(1),
    );
  };
  running.forwarder = await Forwarder.start({
    config: await loadForwarderConfig(values.config),
    onSinkFailed: (sink, error) => {
      console.error(`airlock: forwarder sink ${sink} stopped: ${error.message}`);
      exitCode = 1;
      // Deferred: the forwarder calls this from inside a sink's loop, which close() waits for.
      setImmediate(stop);
    },
  });
  if (exitCode !== 0) setImmediate(stop);
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
}
