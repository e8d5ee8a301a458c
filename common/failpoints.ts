/**
 * Failpoints: named places in the code where a fault-injection test can stop a
 * process dead, to kill it at an exact step (as TiKV's fail-rs and FoundationDB's
 * simulation do). Off unless `AIRLOCK_FAILPOINTS` names them, e.g.
 * `AIRLOCK_FAILPOINTS=broker.before_issue=pause`; with it unset, a failpoint is
 * one Map lookup.
 *
 * Actions: `pause` (never continues; the process is expected to be killed).
 * Reaching a failpoint writes `failpoint <name> reached` to stderr, so a test
 * knows the process is exactly there.
 * @module
 */
import { AirlockError, Code } from "./errors.js";

/** The failpoints the code has. */
export type FailpointName = "broker.before_issue" | "broker.after_issue" | "broker.before_publish" | "broker.after_intake_audit";

const known: readonly FailpointName[] = ["broker.before_issue", "broker.after_issue", "broker.before_publish", "broker.after_intake_audit"];

/** Parses `name=action,name=action`; an unknown name or action is an error naming it. */
export function parseFailpoints(spec: string): ReadonlyMap<FailpointName, "pause"> {
  const points = new Map<FailpointName, "pause">();
  for (const entry of spec.split(",").map((e) => e.trim()).filter((e) => e !== "")) {
    const [name, action] = entry.split("=");
    if (!known.includes(name as FailpointName)) throw new AirlockError(Code.InvalidArgument, `AIRLOCK_FAILPOINTS: unknown failpoint ${JSON.stringify(name)} (known: ${known.join(", ")})`);
    if (action !== "pause") throw new AirlockError(Code.InvalidArgument, `AIRLOCK_FAILPOINTS: ${name} has unknown action ${JSON.stringify(action)} (known: pause)`);
    points.set(name as FailpointName, action);
  }
  return points;
}

const active = parseFailpoints(process.env.AIRLOCK_FAILPOINTS ?? "");

/** Reaches a failpoint: resolves at once unless a test armed it. */
export function failpoint(name: FailpointName): Promise<void> {
  if (!active.has(name)) return Promise.resolve();
  process.stderr.write(`failpoint ${name} reached\n`);
  return new Promise<void>(() => undefined);
}
