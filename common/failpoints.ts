/**
 * Failpoints: named places in the code where a fault-injection test can stop a
 * process dead, to kill it at an exact step (as TiKV's fail-rs and FoundationDB's
 * simulation do). Off unless `AIRLOCK_FAILPOINTS` names them, e.g.
 * `AIRLOCK_FAILPOINTS=broker.before_issue=pause`; with it unset, a failpoint is
 * one Map lookup.
 *
 * Actions: `pause` (never continues; the process is expected to be killed); `stop` (the
 * process stops itself with SIGSTOP there, and goes on from that very step when sent SIGCONT:
 * a replica frozen at the worst moment and woken after the others have moved on).
 * Reaching a failpoint writes `failpoint <name> reached` to stderr, so a test
 * knows the process is exactly there.
 * @module
 */
import { AirlockError, Code } from "./errors.js";

/** The failpoints the code has. */
export type FailpointName = "broker.before_issue" | "broker.after_issue" | "broker.before_publish" | "broker.after_intake_audit";

const known: readonly FailpointName[] = ["broker.before_issue", "broker.after_issue", "broker.before_publish", "broker.after_intake_audit"];

/** What a failpoint does when reached. */
export type FailpointAction = "pause" | "stop";

const actions: readonly FailpointAction[] = ["pause", "stop"];

/** Parses `name=action,name=action`; an unknown name or action is an error naming it. */
export function parseFailpoints(spec: string): ReadonlyMap<FailpointName, FailpointAction> {
  const points = new Map<FailpointName, FailpointAction>();
  for (const entry of spec.split(",").map((e) => e.trim()).filter((e) => e !== "")) {
    const [name, action] = entry.split("=");
    if (!known.includes(name as FailpointName)) throw new AirlockError(Code.InvalidArgument, `AIRLOCK_FAILPOINTS: unknown failpoint ${JSON.stringify(name)} (known: ${known.join(", ")})`);
    if (!actions.includes(action as FailpointAction)) throw new AirlockError(Code.InvalidArgument, `AIRLOCK_FAILPOINTS: ${name} has unknown action ${JSON.stringify(action)} (known: ${actions.join(", ")})`);
    points.set(name as FailpointName, action as FailpointAction);
  }
  return points;
}

const active = parseFailpoints(process.env.AIRLOCK_FAILPOINTS ?? "");

/** Reaches a failpoint: resolves at once unless a test armed it. */
export function failpoint(name: FailpointName): Promise<void> {
  const action = active.get(name);
  if (action === undefined) return Promise.resolve();
  // Written before stopping: stderr to a pipe is synchronous on Linux, so the test sees it first.
  process.stderr.write(`failpoint ${name} reached\n`);
  if (action === "stop") {
    process.kill(process.pid, "SIGSTOP");
    return Promise.resolve();
  }
  return new Promise<void>(() => undefined);
}
