/**
 * The SIEM forwarder (`airlock forwarder --config forwarder.yaml`): streams the
 * audit trail, as the read-only audit role, to Splunk HEC, syslog over TLS
 * (RFC 5424 / 5425) and signed webhooks, at least once and in order, resuming
 * every sink from its durable position in the position file.
 *
 * ```ts
 * const forwarder = await Forwarder.start({ config: await loadForwarderConfig("forwarder.yaml") });
 * // … later
 * await forwarder.close();
 * console.log(forwarder.summary().join("\n")); // forwarder sink=splunk kind=splunk_hec forwarded=42 lost=0 …
 * ```
 * @module
 */
export {
  type ForwarderConfig,
  forwarderConfigDefaults,
  loadForwarderConfig,
  parseForwarderConfig,
  type RetryConfig,
  type SinkConfig,
  sinkKinds,
  type SinkTlsConfig,
  type SplunkHecSinkConfig,
  type SyslogSinkConfig,
  type WebhookSinkConfig,
} from "./config.js";
export { Forwarder, type ForwarderOptions, realSleep, type Sleep, type SinkStats, sinkStatsLine } from "./forwarder.js";
export { PositionStore } from "./position.js";
export { type AuditWebhookPayload, createSink, type Sink, syslogEnterpriseId, syslogFrame, syslogMessage } from "./sinks.js";
