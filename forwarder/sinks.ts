import { type JsonValue, toJson } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from "node:tls";
import { signWebhookBody } from "../broker/notify/index.js";
import { AirlockError, Code } from "../common/errors.js";
import { type AuditEvent, AuditEventSchema, AuditEventType } from "../proto/index.js";
import type { SinkConfig, SplunkHecSinkConfig, SyslogSinkConfig, WebhookSinkConfig } from "./config.js";
import { excerpt, httpFailure, HttpPoster, loadTlsOptions } from "./http.js";

/**
 * One receiver of the trail. {@link Sink.deliver} resolves only once the
 * receiver acknowledged every event of the batch (HTTP 2xx, HEC code 0, the
 * TLS write flushed for syslog); it rejects with an AirlockError whose
 * `retryable` says whether sending the same batch again can help.
 */
export interface Sink {
  readonly name: string;
  readonly kind: SinkConfig["kind"];
  /** Delivers `events` (in sequence order) as one batch. */
  deliver(events: readonly AuditEvent[], signal: AbortSignal): Promise<void>;
  /** Closes its connections. */
  close(): Promise<void>;
}

/** The event as protobuf JSON, the form `airlock audit export` writes and verifiers read. */
function eventJson(event: AuditEvent): JsonValue {
  return toJson(AuditEventSchema, event);
}

function eventMs(event: AuditEvent): number {
  return event.at === undefined ? 0 : timestampMs(event.at);
}

/** Splunk HEC's JSON answer: `{"text":"Success","code":0}` on success. */
interface HecAnswer {
  readonly text?: unknown;
  readonly code?: unknown;
}

function parseHecAnswer(text: string): HecAnswer | undefined {
  try {
    const parsed = JSON.parse(text) as unknown;
    return parsed !== null && typeof parsed === "object" ? parsed : undefined;
  } catch {
    return undefined;
  }
}

/** Splunk HTTP Event Collector, `/services/collector/event`, one HEC event object per audit event. */
class SplunkHecSink implements Sink {
  readonly name: string;
  readonly kind = "splunk_hec" as const;
  private readonly config: SplunkHecSinkConfig;
  private readonly poster: HttpPoster;

  constructor(config: SplunkHecSinkConfig, tls: ConnectionOptions) {
    this.name = config.name;
    this.config = config;
    this.poster = new HttpPoster(`${config.url.replace(/\/+$/, "")}/services/collector/event`, tls, `sink ${config.name} (splunk_hec)`);
  }

  /** The HEC body: concatenated event objects; each `event` is the audit event, whose `sequence` tells duplicates apart. */
  body(events: readonly AuditEvent[]): string {
    const { host, source, sourcetype, index } = this.config;
    return events
      .map((event) =>
        JSON.stringify({
          // HEC takes epoch seconds with a fraction; milliseconds are what the trail records.
          time: Number((eventMs(event) / 1000).toFixed(3)),
          host,
          source,
          sourcetype,
          ...(index === undefined ? {} : { index }),
          event: eventJson(event),
        }),
      )
      .join("\n");
  }

  async deliver(events: readonly AuditEvent[], signal: AbortSignal): Promise<void> {
    const answer = await this.poster.post(this.body(events), { authorization: `Splunk ${this.config.token}` }, signal);
    const hec = parseHecAnswer(answer.text);
    const hecCode = typeof hec?.code === "number" ? hec.code : undefined;
    if (answer.status === 200 && hecCode === 0) return;
    if (answer.status === 200) {
      // 200 without code 0 is not HEC's success: maybe a proxy's page. Not acknowledged; try again.
      throw new AirlockError(Code.Unknown, `${this.poster.what}: HTTP 200 without HEC's success answer: ${excerpt(answer.text)}`, { details: { sink: this.name, status: 200 } });
    }
    throw httpFailure(this.poster.what, answer, { sink: this.name, ...(hecCode === undefined ? {} : { hecCode }) });
  }

  close(): Promise<void> {
    this.poster.close();
    return Promise.resolve();
  }
}

/** RFC 5424 SD-PARAM value escaping: `"`, `\` and `]` take a backslash. */
function sdValue(text: string): string {
  return text.replace(/["\\\]]/g, (c) => `\\${c}`);
}

/** The private enterprise number RFC 5612 reserves for documentation: the SD-ID `airlock@32473`. */
export const syslogEnterpriseId = "airlock@32473";

/** RFC 5424 severities the forwarder uses: notice for events, warning for flagged ones (break-glass, security events). */
const severity = { notice: 5, warning: 4 } as const;

/**
 * One event as an RFC 5424 message:
 * `<PRI>1 TIMESTAMP HOSTNAME APP-NAME - AUDIT [airlock@32473 seq="N" type="…" …] JSON`.
 */
export function syslogMessage(event: AuditEvent, options: { facility: number; hostname: string; appName: string }): string {
  const pri = options.facility * 8 + (event.flagged ? severity.warning : severity.notice);
  const timestamp = event.at === undefined ? "-" : new Date(eventMs(event)).toISOString();
  const params: Array<[string, string]> = [
    ["seq", event.sequence.toString()],
    ["type", AuditEventType[event.type] ?? String(event.type)],
    ["event_id", event.eventId],
    ["actor", event.actor],
    ...(event.requestId === "" ? [] : [["request_id", event.requestId] as [string, string]]),
    ["flagged", String(event.flagged)],
  ];
  const sd = `[${syslogEnterpriseId} ${params.map(([name, value]) => `${name}="${sdValue(value)}"`).join(" ")}]`;
  return `<${pri}>1 ${timestamp} ${options.hostname} ${options.appName} - AUDIT ${sd} ${JSON.stringify(eventJson(event))}`;
}

/** RFC 5425 octet-counting framing: `MSG-LEN SP SYSLOG-MSG`, the length in bytes. */
export function syslogFrame(message: string): Buffer {
  const bytes = Buffer.from(message, "utf8");
  return Buffer.concat([Buffer.from(`${bytes.length} `, "ascii"), bytes]);
}

/**
 * syslog over TLS. RFC 5425 has no application acknowledgement: a batch counts
 * as delivered once TLS has handed it to the kernel. A connection the receiver
 * closed is noticed (its `end`) and replaced before the next batch, but a
 * receiver that crashes with unread bytes can lose them: the weakest of the sinks.
 */
class SyslogSink implements Sink {
  readonly name: string;
  readonly kind = "syslog" as const;
  private readonly config: SyslogSinkConfig;
  private readonly tls: ConnectionOptions;
  private socket: TLSSocket | undefined;
  private readonly what: string;

  constructor(config: SyslogSinkConfig, tls: ConnectionOptions) {
    this.name = config.name;
    this.config = config;
    this.tls = tls;
    this.what = `sink ${config.name} (syslog ${config.host}:${config.port})`;
  }

  private connect(signal: AbortSignal): Promise<TLSSocket> {
    const current = this.socket;
    if (current !== undefined && !current.destroyed && current.writable && !current.readableEnded) return Promise.resolve(current);
    this.drop();
    return new Promise((resolve, reject) => {
      const socket = tlsConnect({ host: this.config.host, port: this.config.port, ...this.tls, ...(this.tls.servername === undefined && !/^[\d.:]+$/.test(this.config.host) ? { servername: this.config.host } : {}) });
      const abort = () => socket.destroy(new Error("aborted"));
      signal.addEventListener("abort", abort, { once: true });
      const fail = (error: Error) => {
        signal.removeEventListener("abort", abort);
        socket.destroy();
        const code = (error as { code?: unknown }).code;
        reject(signal.aborted ? new AirlockError(Code.DeadlineExceeded, `${this.what}: no connection in time (or shutting down)`) : new AirlockError(Code.Unavailable, `${this.what}: ${typeof code === "string" ? code : error.message}`));
      };
      socket.once("error", fail);
      socket.once("secureConnect", () => {
        signal.removeEventListener("abort", abort);
        socket.off("error", fail);
        // A collector says nothing back; whatever it sends is read and dropped, and its end marks the connection dead.
        socket.on("data", () => undefined);
        socket.on("error", () => socket.destroy());
        socket.once("end", () => socket.destroy());
        this.socket = socket;
        resolve(socket);
      });
    });
  }

  private drop(): void {
    this.socket?.destroy();
    this.socket = undefined;
  }

  async deliver(events: readonly AuditEvent[], signal: AbortSignal): Promise<void> {
    const socket = await this.connect(signal);
    const data = Buffer.concat(events.map((event) => syslogFrame(syslogMessage(event, this.config))));
    await new Promise<void>((resolve, reject) => {
      const abort = () => {
        this.drop();
        reject(new AirlockError(Code.DeadlineExceeded, `${this.what}: the write did not finish in time (or shutting down)`));
      };
      signal.addEventListener("abort", abort, { once: true });
      socket.write(data, (error) => {
        signal.removeEventListener("abort", abort);
        if (error === undefined || error === null) return resolve();
        // Part of the batch may have gone out: sending it again is what at-least-once means.
        this.drop();
        reject(new AirlockError(Code.Unavailable, `${this.what}: ${error.message}`));
      });
    });
  }

  close(): Promise<void> {
    const socket = this.socket;
    this.socket = undefined;
    if (socket === undefined || socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      socket.once("close", () => resolve());
      socket.end();
      // A receiver that does not answer the close_notify must not hold shutdown up.
      setTimeout(() => socket.destroy(), 1000).unref();
    });
  }
}

/** The JSON a webhook sink POSTs: a batch of audit events in sequence order. */
export interface AuditWebhookPayload {
  readonly kind: "airlock.audit.batch";
  /** The sequence of the first and last event, as decimal strings (uint64). */
  readonly firstSequence: string;
  readonly lastSequence: string;
  /** Each `airlock.v1.AuditEvent` in protobuf JSON. */
  readonly events: readonly JsonValue[];
}

/** A generic HTTPS receiver, signed as the broker's webhooks are (`x-airlock-signature`, `x-airlock-timestamp`). */
class WebhookSink implements Sink {
  readonly name: string;
  readonly kind = "webhook" as const;
  private readonly config: WebhookSinkConfig;
  private readonly poster: HttpPoster;
  private readonly now: () => number;

  constructor(config: WebhookSinkConfig, tls: ConnectionOptions, now: () => number) {
    this.name = config.name;
    this.config = config;
    this.now = now;
    this.poster = new HttpPoster(config.url, tls, `sink ${config.name} (webhook)`);
  }

  async deliver(events: readonly AuditEvent[], signal: AbortSignal): Promise<void> {
    const payload: AuditWebhookPayload = {
      kind: "airlock.audit.batch",
      firstSequence: (events[0]?.sequence ?? 0n).toString(),
      lastSequence: (events[events.length - 1]?.sequence ?? 0n).toString(),
      events: events.map(eventJson),
    };
    const body = JSON.stringify(payload);
    // Signed at each attempt, so a retry after a long outage is not refused as a replay.
    const timestamp = Math.floor(this.now() / 1000);
    const answer = await this.poster.post(body, { "x-airlock-timestamp": String(timestamp), "x-airlock-signature": signWebhookBody(this.config.secret, timestamp, body) }, signal);
    if (answer.status >= 200 && answer.status < 300) return;
    throw httpFailure(this.poster.what, answer, { sink: this.name });
  }

  close(): Promise<void> {
    this.poster.close();
    return Promise.resolve();
  }
}

/**
 * Makes the sink a config describes, reading its TLS files now so a missing
 * file fails at start, naming the field.
 * @param now - the clock webhook signatures are dated by
 */
export async function createSink(config: SinkConfig, field: string, now: () => number = Date.now): Promise<Sink> {
  const tls = await loadTlsOptions(config.tls, field);
  switch (config.kind) {
    case "splunk_hec":
      return new SplunkHecSink(config, tls);
    case "syslog":
      return new SyslogSink(config, tls);
    case "webhook":
      return new WebhookSink(config, tls, now);
  }
}
