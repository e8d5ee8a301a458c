import { hostname } from "node:os";
import { type ConfigReader, readConfigFile, type ReadConfigOptions } from "../common/config.js";
import { parseDuration } from "../common/duration.js";
import { type NatsConnectionConfig, parseNatsConfig } from "../common/nats.js";

/** TLS settings of an outbound connection: the CA the receiver's certificate must chain to, and an optional client certificate. */
export interface SinkTlsConfig {
  /** PEM file of the CA; absent: the system's CAs. */
  readonly caFile?: string;
  readonly certFile?: string;
  readonly keyFile?: string;
  /** The name the receiver's certificate must carry, when it is not the host in the address. */
  readonly serverName?: string;
}

/** Splunk HTTP Event Collector: `POST <url>/services/collector/event` with `Authorization: Splunk <token>`. */
export interface SplunkHecSinkConfig {
  readonly kind: "splunk_hec";
  /** Unique among the sinks: the key of its position in the position file. */
  readonly name: string;
  /** The collector's base URL, e.g. `https://splunk.corp:8088` (the event path is added). */
  readonly url: string;
  /** The HEC token. A secret: never logged, never in an error. */
  readonly token: string;
  /** The Splunk index; absent: the token's default index. */
  readonly index?: string;
  /** @default os.hostname() */
  readonly host: string;
  /** @default "airlock" */
  readonly source: string;
  /** @default "airlock:audit" */
  readonly sourcetype: string;
  readonly tls?: SinkTlsConfig;
}

/** syslog (RFC 5424 messages) over TLS with octet-counting framing (RFC 5425). */
export interface SyslogSinkConfig {
  readonly kind: "syslog";
  readonly name: string;
  /** `host:port` of the collector (6514 is the registered syslog-over-TLS port). */
  readonly host: string;
  readonly port: number;
  /** 0–23. @default 10 (authpriv) */
  readonly facility: number;
  /** The HOSTNAME field. @default os.hostname() */
  readonly hostname: string;
  /** The APP-NAME field. @default "airlock" */
  readonly appName: string;
  readonly tls?: SinkTlsConfig;
}

/** A generic HTTPS receiver: a JSON batch signed with `x-airlock-signature` (the broker's webhook scheme). */
export interface WebhookSinkConfig {
  readonly kind: "webhook";
  readonly name: string;
  readonly url: string;
  /** The HMAC secret. Never logged, never in an error. */
  readonly secret: string;
  readonly tls?: SinkTlsConfig;
}

/** One place the trail is delivered to, picked by `kind`. */
export type SinkConfig = SplunkHecSinkConfig | SyslogSinkConfig | WebhookSinkConfig;

/** The sink kinds `sinks[].kind` accepts. */
export const sinkKinds = ["splunk_hec", "syslog", "webhook"] as const;

/** Backoff of a failed delivery: doubling from `initialMs` up to `maxMs`, for as long as the failure is retryable. */
export interface RetryConfig {
  readonly initialMs: number;
  readonly maxMs: number;
}

/** The forwarder's whole configuration (`forwarder.yaml`). */
export interface ForwarderConfig {
  /** As the read-only audit role. */
  readonly nats: NatsConnectionConfig;
  /** The JSON file holding the last sequence each sink acknowledged. */
  readonly positionFile: string;
  /** Most events one delivery carries. */
  readonly batchSize: number;
  /** How long to wait before looking for new events once a sink has caught up. */
  readonly pollIntervalMs: number;
  /** How long one delivery attempt may take before it counts as failed (and is retried). */
  readonly requestTimeoutMs: number;
  readonly retry: RetryConfig;
  readonly sinks: readonly SinkConfig[];
}

/** Defaults of {@link ForwarderConfig}. */
export const forwarderConfigDefaults = {
  batchSize: 100,
  /** A bound, so one delivery stays well under receivers' body limits (Splunk's default is 800 MB, most webhooks far less). */
  maxBatchSize: 1000,
  pollInterval: "1s",
  requestTimeout: "30s",
  retryInitial: "250ms",
  retryMax: "30s",
  syslogFacility: 10,
} as const;

function duration(reader: ConfigReader, key: string, fallback: string): number {
  const text = reader.string(key, fallback);
  const ms = parseDuration(text);
  if (ms === undefined || ms <= 0) throw reader.fail(reader.path === "" ? key : `${reader.path}.${key}`, "must be a duration such as 250ms, 5s or 1m");
  return ms;
}

function parseTls(reader: ConfigReader, withServerName: boolean): SinkTlsConfig | undefined {
  const tls = reader.optionalObject("tls");
  if (tls === undefined) return undefined;
  const caFile = tls.optionalFile("ca_file");
  const certFile = tls.optionalFile("cert_file");
  const keyFile = tls.optionalFile("key_file");
  if ((certFile === undefined) !== (keyFile === undefined)) throw tls.fail(`${tls.path}.cert_file`, "cert_file and key_file go together");
  const serverName = withServerName ? tls.optionalString("server_name") : undefined;
  tls.done();
  return {
    ...(caFile === undefined ? {} : { caFile }),
    ...(certFile === undefined ? {} : { certFile }),
    ...(keyFile === undefined ? {} : { keyFile }),
    ...(serverName === undefined ? {} : { serverName }),
  };
}

function httpsUrl(reader: ConfigReader, key: string): string {
  const text = reader.string(key);
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw reader.fail(`${reader.path}.${key}`, "must be an http(s) URL");
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") throw reader.fail(`${reader.path}.${key}`, "must be an http(s) URL");
  if (url.username !== "" || url.password !== "") throw reader.fail(`${reader.path}.${key}`, "must not carry credentials");
  return text;
}

function parseSink(reader: ConfigReader): SinkConfig {
  const kind = reader.oneOf("kind", sinkKinds);
  const name = reader.string("name", kind);
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) throw reader.fail(`${reader.path}.name`, "must be letters, digits, '.', '_' or '-', at most 64");
  const tls = parseTls(reader, kind === "syslog");
  let sink: SinkConfig;
  switch (kind) {
    case "splunk_hec": {
      const index = reader.optionalString("index");
      sink = {
        kind,
        name,
        url: httpsUrl(reader, "url"),
        token: reader.string("token"),
        ...(index === undefined ? {} : { index }),
        host: reader.string("host", hostname()),
        source: reader.string("source", "airlock"),
        sourcetype: reader.string("sourcetype", "airlock:audit"),
        ...(tls === undefined ? {} : { tls }),
      };
      break;
    }
    case "syslog": {
      const address = reader.address("address");
      sink = {
        kind,
        name,
        host: address.host,
        port: address.port,
        facility: reader.integer("facility", forwarderConfigDefaults.syslogFacility, 0, 23),
        hostname: reader.string("hostname", hostname()),
        appName: reader.string("app_name", "airlock"),
        ...(tls === undefined ? {} : { tls }),
      };
      for (const [key, value] of [
        ["hostname", sink.hostname],
        ["app_name", sink.appName],
      ] as const) {
        // RFC 5424 header fields are printable US-ASCII without spaces (PRINTUSASCII).
        if (!/^[\x21-\x7e]+$/.test(value) || value.length > (key === "hostname" ? 255 : 48)) throw reader.fail(`${reader.path}.${key}`, "must be printable ASCII without spaces (RFC 5424)");
      }
      break;
    }
    case "webhook":
      sink = { kind, name, url: httpsUrl(reader, "url"), secret: reader.string("secret"), ...(tls === undefined ? {} : { tls }) };
      break;
  }
  reader.done();
  return sink;
}

/**
 * Parses a forwarder config, failing with an `invalid_argument` AirlockError
 * naming the first bad field (`sinks[1].kind`, `sinks[0].token`), and on any
 * unknown key. Secrets (`token`, `secret`) are usually `${ENV}` references,
 * expanded by {@link readConfigFile} before this runs.
 */
export function parseForwarderConfig(root: ConfigReader): ForwarderConfig {
  const nats = parseNatsConfig(root.object("nats"));
  const positionFile = root.file("position_file");
  const batchSize = root.integer("batch_size", forwarderConfigDefaults.batchSize, 1, forwarderConfigDefaults.maxBatchSize);
  const pollIntervalMs = duration(root, "poll_interval", forwarderConfigDefaults.pollInterval);
  const requestTimeoutMs = duration(root, "request_timeout", forwarderConfigDefaults.requestTimeout);
  const retryReader = root.optionalObject("retry");
  const retry: RetryConfig =
    retryReader === undefined
      ? { initialMs: parseDuration(forwarderConfigDefaults.retryInitial) ?? 250, maxMs: parseDuration(forwarderConfigDefaults.retryMax) ?? 30_000 }
      : { initialMs: duration(retryReader, "initial", forwarderConfigDefaults.retryInitial), maxMs: duration(retryReader, "max", forwarderConfigDefaults.retryMax) };
  retryReader?.done();
  if (retry.maxMs < retry.initialMs) throw root.fail("retry.max", "must not be less than retry.initial");
  const sinks = root.list("sinks").map(parseSink);
  const seen = new Set<string>();
  for (const [index, sink] of sinks.entries()) {
    if (seen.has(sink.name)) throw root.fail(`sinks[${index}].name`, `repeats ${JSON.stringify(sink.name)}: each sink needs a name of its own (it keys the sink's position)`);
    seen.add(sink.name);
  }
  root.done();
  return { nats, positionFile, batchSize, pollIntervalMs, requestTimeoutMs, retry, sinks };
}

/** Reads, expands and parses a forwarder config file (see {@link parseForwarderConfig}). */
export async function loadForwarderConfig(path: string, options: ReadConfigOptions = {}): Promise<ForwarderConfig> {
  return parseForwarderConfig(await readConfigFile(path, options));
}
