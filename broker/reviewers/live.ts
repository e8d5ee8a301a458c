/**
 * Live request updates for reviewers (the console's Server-Sent Events and the
 * gRPC WatchRequests stream): the pending requests, a `ready` marker, then
 * every change, none lost in between and none twice.
 * @module
 */
import { type RequestRecord, RequestState } from "../../proto/index.js";
import { isSettled } from "../rules.js";
import type { Broker } from "../service.js";
import { newestFirst } from "./views.js";

/** One item of {@link liveRequests}. */
export type LiveUpdate = { readonly kind: "request"; readonly record: RequestRecord } | { readonly kind: "ready" };

/**
 * The pending requests (newest first), `ready`, then each change as it is
 * written, until `signal` aborts. The watch is established before the snapshot
 * is read, so a change made meanwhile is never lost; changes the snapshot
 * already shows are skipped by KV revision. Memory stays bounded: a request is
 * forgotten once it is settled.
 */
export async function* liveRequests(broker: Broker, signal: AbortSignal): AsyncGenerator<LiveUpdate> {
  const changes = await broker.openWatch(signal);
  if (signal.aborted) return;
  const seen = new Map<string, number>();
  // From the broker's index, which waits until it holds every write made before this point.
  const snapshot = (await broker.activeRecords()).sort((a, b) => newestFirst(a.record, b.record));
  for (const { record, revision } of snapshot) {
    if (isSettled(record)) continue;
    seen.set(record.request?.id ?? "", revision);
    if (record.state === RequestState.PENDING) yield { kind: "request", record };
  }
  yield { kind: "ready" };
  for await (const { record, revision } of changes) {
    const id = record.request?.id ?? "";
    if ((seen.get(id) ?? 0) >= revision) continue;
    if (isSettled(record)) seen.delete(id);
    else seen.set(id, revision);
    yield { kind: "request", record };
  }
}
