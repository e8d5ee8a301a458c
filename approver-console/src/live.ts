// The live view of pending requests, fed by the broker's Server-Sent Events.
import { RequestState } from "../../proto/gen/airlock/v1/reviewer_pb.js";
import { eventsUrl, type RequestView, readRequestView } from "./api.js";
import { timestampMs } from "./format.js";

/** How the event stream is doing. */
export type LiveStatus = "connecting" | "live" | "reconnecting";

const maxBackoffMs = 10_000;

const createdMs = (view: RequestView): number => timestampMs(view.record.request?.createdAt);
const updatedMs = (view: RequestView): number => timestampMs(view.record.updatedAt);

/**
 * Every pending request, kept current from `GET /api/v1/events`: the stream
 * first replays what is pending, then says `ready`, then sends each change.
 * What arrives between a (re)connect and `ready` is a full snapshot, so it
 * replaces the list: a request decided while we were disconnected goes away.
 */
export class LiveRequests {
  #pending = new Map<string, RequestView>();
  /** The newest update time seen per request, so a late, older view never undoes a newer one. */
  readonly #seen = new Map<string, number>();
  #snapshot: Map<string, RequestView> | undefined;
  #source: EventSource | undefined;
  #retry: ReturnType<typeof setTimeout> | undefined;
  #backoffMs = 500;
  #ready = false;
  #status: LiveStatus = "connecting";
  readonly #listeners = new Set<() => void>();
  readonly #viewListeners = new Set<(view: RequestView) => void>();
  readonly #onError: () => void;

  /** `onError` runs when the stream fails, so the app can check whether the session is still good. */
  constructor(onError: () => void = () => undefined) {
    this.#onError = onError;
  }

  get status(): LiveStatus {
    return this.#status;
  }

  /** Whether the stream has delivered its first full snapshot. */
  get ready(): boolean {
    return this.#ready;
  }

  /** Pending requests, newest first. */
  pending(): RequestView[] {
    return [...this.#pending.values()].sort((a, b) => createdMs(b) - createdMs(a));
  }

  /** How many pending requests the signed-in reviewer may still vote on. */
  needCount(): number {
    let count = 0;
    for (const view of this.#pending.values()) if (view.needsMe) count++;
    return count;
  }

  /** Calls `listener` after every change of the list or status. Returns the unsubscribe function. */
  subscribe(listener: () => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Calls `listener` with every request view that arrives, whatever its state. */
  onView(listener: (view: RequestView) => void): () => void {
    this.#viewListeners.add(listener);
    return () => this.#viewListeners.delete(listener);
  }

  /** Takes in a view learned elsewhere (a list or decision answer). Ignored when older than what we have. */
  apply(view: RequestView): void {
    if (!this.#put(this.#pending, view)) return;
    for (const listener of this.#viewListeners) listener(view);
    this.#changed();
  }

  /** Seeds the list from `GET /requests` while the stream has not delivered its snapshot yet. */
  seed(views: readonly RequestView[]): void {
    if (this.#ready) return;
    for (const view of views) this.#put(this.#pending, view);
    this.#changed();
  }

  start(): void {
    if (this.#source !== undefined) return;
    this.#snapshot = new Map();
    const source = new EventSource(eventsUrl, { withCredentials: true });
    this.#source = source;
    source.addEventListener("request", (event) => {
      let view: RequestView;
      try {
        view = readRequestView(JSON.parse((event as MessageEvent<string>).data));
      } catch {
        return;
      }
      if (this.#snapshot !== undefined) {
        this.#put(this.#snapshot, view);
        for (const listener of this.#viewListeners) listener(view);
      } else {
        this.apply(view);
      }
    });
    source.addEventListener("ready", () => {
      if (this.#snapshot !== undefined) this.#pending = this.#snapshot;
      this.#snapshot = undefined;
      this.#ready = true;
      this.#backoffMs = 500;
      this.#status = "live";
      this.#changed();
    });
    source.addEventListener("error", () => {
      // The browser's own retry gives up on an HTTP error and waits seconds otherwise: reconnect ourselves.
      this.#close();
      this.#status = "reconnecting";
      this.#changed();
      this.#onError();
      this.#retry = setTimeout(() => {
        this.#retry = undefined;
        this.start();
      }, this.#backoffMs);
      this.#backoffMs = Math.min(maxBackoffMs, this.#backoffMs * 2);
    });
  }

  /** Closes the stream for good (sign-out). */
  stop(): void {
    this.#close();
    if (this.#retry !== undefined) clearTimeout(this.#retry);
    this.#retry = undefined;
    this.#pending.clear();
    this.#seen.clear();
    this.#ready = false;
    this.#status = "connecting";
    this.#changed();
  }

  #close(): void {
    this.#source?.close();
    this.#source = undefined;
    this.#snapshot = undefined;
  }

  /** Files `view` in `map` (pending) or takes it out (decided). False when it is older than what we know. */
  #put(map: Map<string, RequestView>, view: RequestView): boolean {
    const id = view.record.request?.id;
    if (id === undefined || id === "") return false;
    const updated = updatedMs(view);
    if ((this.#seen.get(id) ?? -1) > updated) return false;
    this.#seen.set(id, updated);
    if (view.record.state === RequestState.PENDING) map.set(id, view);
    else map.delete(id);
    return true;
  }

  #changed(): void {
    for (const listener of this.#listeners) listener();
  }
}

