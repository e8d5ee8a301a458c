/**
 * The demo's notification receiver: a generic webhook endpoint (what the broker's
 * `notifications.webhooks` post to) that checks each delivery's signature and prints it
 * as a person would read it: who is asked to review what, escalations, break-glass, and
 * each outcome together with the human the agent acted for, who is the one to tell.
 *
 * `npm run demo` starts it next to the broker; `node --import tsx demo/notify-receiver.ts`
 * runs it alone (`AIRLOCK_NOTIFY_LISTEN`, default 127.0.0.1:9466; `AIRLOCK_NOTIFY_SECRET`).
 * @module
 */
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";
import { AirlockError } from "../common/errors.js";
import { verifyWebhookSignature } from "../broker/notify/index.js";

/** Options of {@link startNotificationReceiver}. */
export interface NotificationReceiverOptions {
  /** The webhook's shared secret (the broker's `notifications.webhooks[].secret`). */
  readonly secret: string;
  /** Where the lines go. */
  readonly print: (line: string) => void;
  /** `host:port` to listen on. @default "127.0.0.1:0" (any free port) */
  readonly listen?: string;
  /** The console's base URL, for the link printed with a review request; none when absent. */
  readonly consoleUrl?: () => string | undefined;
}

/** A running receiver. */
export interface NotificationReceiver {
  /** The URL the broker posts to. */
  readonly url: string;
  /** Deliveries taken (signature good), by event kind. */
  readonly received: ReadonlyMap<string, number>;
  close(): Promise<void>;
}

/** Defaults of the demo receiver. */
export const notificationReceiverDefaults = { listen: "127.0.0.1:9466", path: "/airlock/notifications", maxBodyBytes: 1024 * 1024 } as const;

interface Payload {
  readonly event?: string;
  readonly request?: {
    readonly request?: { readonly id?: string; readonly method?: string; readonly identity?: { readonly agent?: string; readonly onBehalfOf?: string } };
  };
  readonly details?: Readonly<Record<string, unknown>>;
}

function list(value: unknown): string {
  return Array.isArray(value) && value.length > 0 ? value.map(String).join(", ") : "nobody named";
}

/** One delivery as the lines the demo prints. */
export function describeNotification(payload: Payload, consoleUrl: string | undefined): string[] {
  const request = payload.request?.request;
  const id = request?.id ?? "";
  const name = `${request?.method ?? "?"} (${id.slice(0, 8)})`;
  const details = payload.details ?? {};
  const human = request?.identity?.onBehalfOf ?? "";
  switch (payload.event) {
    case "review_requested":
      return [
        `notify review requested: ${name} → groups ${list(details.groups)}; reviewers ${list(details.reviewers)}${consoleUrl === undefined ? "" : `; ${consoleUrl}#/requests/${encodeURIComponent(id)}`}`,
      ];
    case "escalated":
      return [`notify escalated: ${name} → ${String(details.group)} may now decide (${list(details.reviewers)})`];
    case "break_glass":
      return [`notify BREAK-GLASS: ${name} approved alone by ${String(details.reviewer)}: ${String(details.reason)}; told ${list(details.reviewers)}`];
    case "decided": {
      const by = Array.isArray(details.by) && details.by.length > 0 ? ` by ${list(details.by)}` : "";
      const reason = typeof details.reason === "string" && details.reason !== "" ? `: ${details.reason}` : "";
      return [
        `notify decided: ${name} ${String(details.outcome)}${by}${reason}`,
        human === "" ? `notify (the agent ${request?.identity?.agent ?? ""} acts for nobody: no human to tell)` : `notify → tell ${human}, for whom the agent acted: ${request?.method ?? "the action"} was ${String(details.outcome)}`,
      ];
    }
    default:
      return [`notify ${String(payload.event)}: ${name}`];
  }
}

async function readBody(request: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of request) {
    const buffer = chunk as Buffer;
    size += buffer.length;
    if (size > notificationReceiverDefaults.maxBodyBytes) throw new Error("body too large");
    chunks.push(buffer);
  }
  return Buffer.concat(chunks).toString("utf8");
}

/** Starts the receiver; see {@link NotificationReceiver}. Deliveries with a bad signature are answered 401 and printed as refused. */
export async function startNotificationReceiver(options: NotificationReceiverOptions): Promise<NotificationReceiver> {
  const received = new Map<string, number>();
  const server: Server = createServer((request, response) => {
    void (async () => {
      if (request.method !== "POST" || request.url !== notificationReceiverDefaults.path) {
        response.writeHead(404).end();
        return;
      }
      let raw: string;
      try {
        raw = await readBody(request);
      } catch {
        response.writeHead(413).end();
        return;
      }
      try {
        verifyWebhookSignature(options.secret, raw, request.headers);
      } catch (error) {
        options.print(`notify refused a delivery: ${AirlockError.from(error).rawMessage}`);
        response.writeHead(401).end();
        return;
      }
      let payload: Payload;
      try {
        payload = JSON.parse(raw) as Payload;
      } catch {
        response.writeHead(400).end();
        return;
      }
      received.set(String(payload.event), (received.get(String(payload.event)) ?? 0) + 1);
      for (const line of describeNotification(payload, options.consoleUrl?.())) options.print(line);
      response.writeHead(204).end();
    })();
  });
  const [host = "127.0.0.1", port = "0"] = (options.listen ?? "127.0.0.1:0").split(/:(?=\d+$)/);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(Number(port), host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  return {
    url: `http://${host}:${address.port}${notificationReceiverDefaults.path}`,
    received,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

// Run alone (docker compose): print to stdout until SIGTERM.
if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  const secret = process.env.AIRLOCK_NOTIFY_SECRET ?? "";
  if (secret.length < 16) {
    console.error("AIRLOCK_NOTIFY_SECRET must be set (16 characters or more)");
    process.exit(1);
  }
  const receiver = await startNotificationReceiver({ secret, print: (line) => console.log(line), listen: process.env.AIRLOCK_NOTIFY_LISTEN ?? notificationReceiverDefaults.listen });
  console.log(`notify receiver listening at ${receiver.url}`);
  process.once("SIGTERM", () => void receiver.close().then(() => process.exit(0)));
}
