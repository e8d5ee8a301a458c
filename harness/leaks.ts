import { delay, unreleased } from "./resources.js";

// Handle kinds that mean a socket, server or child process is still open.
const leakyHandles = new Set(["TCPSocketWrap", "TCPServerWrap", "TCPWRAP", "ProcessWrap", "PipeServerWrap"]);

function openHandles(): Map<string, number> {
  const counts = new Map<string, number>();
  for (const kind of process.getActiveResourcesInfo()) {
    if (leakyHandles.has(kind)) counts.set(kind, (counts.get(kind) ?? 0) + 1);
  }
  return counts;
}

/** A snapshot of this process's open sockets, servers and child processes, taken before a test starts anything. */
export interface HandleBaseline {
  readonly counts: ReadonlyMap<string, number>;
}

/** Takes a {@link HandleBaseline}. */
export function handleBaseline(): HandleBaseline {
  return { counts: openHandles() };
}

/**
 * What a test left behind: harness resources (processes, temp dirs, databases,
 * connections) not released, and sockets, servers or child processes opened
 * since `baseline` and still open. Closing is asynchronous, so it waits up to
 * `graceMs` for things to settle before it reports.
 */
export async function findLeaks(baseline: HandleBaseline, graceMs = 3000): Promise<string[]> {
  const deadline = Date.now() + graceMs;
  for (;;) {
    const leaks = unreleased();
    for (const [kind, count] of openHandles()) {
      const extra = count - (baseline.counts.get(kind) ?? 0);
      if (extra > 0) leaks.push(`${extra} open ${kind} handle(s) not there before the test`);
    }
    if (leaks.length === 0 || Date.now() > deadline) return leaks;
    await delay(50);
  }
}
