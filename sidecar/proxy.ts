import {
  type ClientHttp2Session,
  type ClientHttp2Stream,
  connect as http2Connect,
  constants,
  type IncomingHttpHeaders,
  type OutgoingHttpHeaders,
  type ServerHttp2Stream,
} from "node:http2";
import { connect as netConnect } from "node:net";
import type { TLSSocket } from "node:tls";
import { type DescMessage, fromBinary, type JsonObject, toJson } from "@bufbuild/protobuf";
import { AirlockError, Code } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { AgentIdentity } from "./identity.js";
import type { SidecarMetrics } from "./metrics.js";
import type { MethodTable, ProxiedMethod } from "./methods.js";
import type { Policy, PolicyVerdict } from "./policy.js";
import { type GrpcMessage, MessageReader, MessageSizeGuard, messageTooLarge, statusResponse } from "./wire.js";

/** An upstream the sidecar forwards to. */
export interface UpstreamTarget {
  readonly name: string;
  /** `host:port` of a plaintext HTTP/2 gRPC server. */
  readonly address: string;
}

/** A privileged call the proxy hands to the approval flow, with its client messages buffered. */
export interface HeldCall {
  readonly method: ProxiedMethod;
  readonly identity: AgentIdentity;
  readonly verdict: PolicyVerdict & { readonly approve: NonNullable<PolicyVerdict["approve"]> };
  /** The request messages the decision binds: all of them, or the first one of a bidi stream. */
  readonly messages: readonly GrpcMessage[];
  /** The decoded messages, as JSON, in the same order. */
  readonly decoded: readonly JsonObject[];
  readonly metadata: IncomingHttpHeaders;
  /** Fires when the agent cancels the call or its deadline passes. */
  readonly signal: AbortSignal;
}

/** What the approval flow returns for an approved call: the secret to inject and how to report completion. */
export interface ApprovedCall {
  readonly requestId: string;
  readonly injectHeader: string;
  /** The unwrapped secret. Injected into the upstream call only; never logged or returned to the agent. */
  readonly secret: string;
  /** Called once when the upstream call ends, with its gRPC status. */
  readonly complete: (status: number, message: string) => void;
}

/** The proxy's collaborators and limits. */
export interface ProxyOptions {
  readonly methods: MethodTable;
  readonly upstreams: ReadonlyMap<string, UpstreamTarget>;
  readonly policy: () => Policy;
  readonly authenticate: (headers: IncomingHttpHeaders, socket: TLSSocket | undefined) => Promise<AgentIdentity | undefined>;
  readonly hold: (call: HeldCall) => Promise<ApprovedCall>;
  readonly host: string;
  /** Largest request message accepted, in bytes. */
  readonly maxMessageBytes: number;
  /** Largest number of client messages buffered while a streaming call waits for its decision. */
  readonly maxBufferedMessages: number;
  /** Metadata keys an agent may never send: the credential headers the sidecar injects. */
  readonly reservedHeaders: () => ReadonlySet<string>;
  readonly metrics: SidecarMetrics;
  readonly log: Logger;
}

const { NGHTTP2_CANCEL, NGHTTP2_NO_ERROR, NGHTTP2_REFUSED_STREAM, HTTP2_HEADER_PATH, HTTP2_HEADER_STATUS } = constants;

/**
 * The sidecar's HTTP/2 stream handler. Allowed calls are forwarded frame by
 * frame: request and response bytes are never decoded or re-encoded (only each
 * 5-byte message prefix is read, for the size limit), and headers, trailers,
 * status codes, deadlines (`grpc-timeout`) and cancellation pass through.
 */
export class GrpcProxy {
  private readonly options: ProxyOptions;
  private readonly sessions = new Map<string, ClientHttp2Session>();
  private closed = false;

  constructor(options: ProxyOptions) {
    this.options = options;
  }

  /** Closes the upstream sessions. Calls in flight are cancelled. */
  close(): void {
    this.closed = true;
    for (const session of this.sessions.values()) session.destroy();
    this.sessions.clear();
  }

  /** Serves one call. Never throws: every failure becomes a gRPC status. */
  serve(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
    stream.on("error", () => undefined);
    const started = process.hrtime.bigint();
    const rawPath = headers[HTTP2_HEADER_PATH];
    const path = typeof rawPath === "string" ? rawPath : "";
    const method = this.options.methods.get(path);
    if (method === undefined) {
      this.reject(stream, new AirlockError(Code.Unimplemented, `method ${path} is not served by this sidecar`, { details: { method: path } }), "unknown_method");
      return;
    }
    for (const reserved of this.options.reservedHeaders()) {
      if (headers[reserved] !== undefined) {
        this.reject(stream, new AirlockError(Code.InvalidArgument, `metadata ${reserved} is reserved for the credential the sidecar injects`), "reserved_header");
        return;
      }
    }
    // The hot path: when the first rule for this method has no condition, its
    // effect holds whoever calls, so an allowed call is forwarded at once, with
    // no identity check, no decoding and no promise.
    const fixed = fixedVerdict(this.options.policy(), method, this.options.host);
    if (fixed?.effect === "allow") {
      this.options.metrics.calls.labels(method.path, "allow").inc();
      this.forward(stream, headers, method, { buffered: [], ended: false, started });
      return;
    }
    this.route(stream, headers, method, started).catch((error: unknown) => {
      this.reject(stream, AirlockError.from(error, Code.Internal), "internal");
    });
  }

  private async route(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, method: ProxiedMethod, started: bigint): Promise<void> {
    const { service, method: desc } = method;
    const policy = this.options.policy();
    const needsRequest = policy.needsRequest(service.typeName, desc.name);
    const socket = stream.session?.socket as TLSSocket | undefined;
    const identity = await this.options.authenticate(headers, socket?.encrypted === true ? socket : undefined);

    let reader: MessageReader | undefined;
    let first: { messages: GrpcMessage[]; decoded: JsonObject[]; ended: boolean } | undefined;
    if (needsRequest) {
      reader = new MessageReader(this.options.maxMessageBytes);
      first = await readMessages(stream, reader, desc.input, 1);
    }
    const verdict = policy.evaluate({
      service: service.typeName,
      method: desc.name,
      host: this.options.host,
      ...(identity === undefined ? {} : { identity }),
      request: () => first?.decoded[0] ?? {},
    });
    this.options.metrics.calls.labels(method.path, verdict.effect).inc();

    if (identity?.authenticatedBy === "jwt") {
      // The agent's token proves who it is to the sidecar; the upstream must not receive (and could replay) it.
      delete headers.authorization;
      delete headers["x-airlock-agent-token"];
    }
    if (verdict.effect === "allow") {
      this.forward(stream, headers, method, { buffered: first?.messages ?? [], ended: first?.ended ?? false, started });
      return;
    }
    if (verdict.effect === "deny") {
      this.reject(stream, new AirlockError(Code.PermissionDenied, `denied by rule ${verdict.ruleId}: ${verdict.reason}`, { details: { rule: verdict.ruleId } }), "policy_deny");
      return;
    }
    const approve = verdict.approve;
    if (approve === undefined) throw new AirlockError(Code.Internal, `rule ${verdict.ruleId} holds calls but has no approval settings`);
    if (identity === undefined) {
      this.reject(stream, new AirlockError(Code.Unauthenticated, `${method.path} is privileged: present an agent certificate or token`), "unauthenticated");
      return;
    }
    const reason = headers["x-airlock-reason"];
    if (approve.requireReason && (typeof reason !== "string" || reason.trim() === "")) {
      this.reject(stream, new AirlockError(Code.InvalidArgument, `rule ${verdict.ruleId} requires a justification: send it in metadata x-airlock-reason`), "reason_missing");
      return;
    }
    await this.holdThenForward(stream, headers, method, { ...verdict, approve }, identity, reader, first, started);
  }

  private async holdThenForward(
    stream: ServerHttp2Stream,
    headers: IncomingHttpHeaders,
    method: ProxiedMethod,
    verdict: HeldCall["verdict"],
    identity: AgentIdentity,
    reader: MessageReader | undefined,
    first: { messages: GrpcMessage[]; decoded: JsonObject[]; ended: boolean } | undefined,
    started: bigint,
  ): Promise<void> {
    const kind = method.method.methodKind;
    const activeReader = reader ?? new MessageReader(this.options.maxMessageBytes);
    const messages = [...(first?.messages ?? [])];
    const decoded = [...(first?.decoded ?? [])];
    let ended = (first?.ended ?? false) || stream.readableEnded;
    // The decision binds every request message of unary, server- and
    // client-streaming calls (a client stream is held until it half-closes);
    // of a bidi stream it binds the first message, and later ones wait in a
    // bounded buffer until the decision.
    const wanted = kind === "bidi_streaming" ? 1 : this.options.maxBufferedMessages;
    if (!ended && messages.length < wanted) {
      const more = await readMessages(stream, activeReader, method.method.input, wanted - messages.length);
      messages.push(...more.messages);
      decoded.push(...more.decoded);
      ended = more.ended;
      if (!ended && kind !== "bidi_streaming") {
        throw new AirlockError(Code.ResourceExhausted, `more than ${this.options.maxBufferedMessages} messages in a held call`);
      }
    }
    if (messages.length === 0) throw new AirlockError(Code.InvalidArgument, "a held call needs a request message");

    const held = [...messages];
    const later: Buffer[] = [];
    let laterCount = 0;
    const abort = new AbortController();
    const onData = (chunk: Buffer) => {
      later.push(chunk);
      laterCount += activeReader.push(chunk).length;
      if (laterCount > this.options.maxBufferedMessages) {
        abort.abort();
        this.reject(stream, new AirlockError(Code.ResourceExhausted, `more than ${this.options.maxBufferedMessages} messages buffered while waiting for approval`), "buffer_full");
      }
    };
    const onEnd = () => {
      ended = true;
    };
    if (!ended) {
      stream.on("data", onData);
      stream.once("end", onEnd);
      stream.resume();
    }
    stream.once("close", () => abort.abort());
    this.options.metrics.held.inc();
    const waitStarted = Date.now();
    let approved: ApprovedCall;
    try {
      approved = await this.options.hold({ method, identity, verdict, messages: held, decoded, metadata: headers, signal: abort.signal });
    } finally {
      this.options.metrics.held.dec();
      this.options.metrics.approvalWait.observe((Date.now() - waitStarted) / 1000);
      stream.off("data", onData);
      stream.off("end", onEnd);
      ended ||= stream.readableEnded;
    }
    if (stream.closed || stream.destroyed) {
      approved.complete(Code.Canceled, "the agent went away before the approved call ran");
      return;
    }
    this.forward(stream, headers, method, {
      buffered: [...held.map((m) => m.framed), ...later].map((framed) => ({ framed })),
      ended,
      started,
      inject: { name: approved.injectHeader, value: approved.secret },
      onEnd: approved.complete,
    });
  }

  private session(target: UpstreamTarget): ClientHttp2Session {
    const existing = this.sessions.get(target.name);
    if (existing !== undefined && !existing.closed && !existing.destroyed) return existing;
    const { host, port } = splitAddress(target.address);
    // gRPC messages are small and latency-bound: Nagle's algorithm with delayed ACKs would hold them back.
    const session = http2Connect(`http://${target.address}`, { createConnection: () => netConnect({ host, port, noDelay: true }) });
    session.on("error", () => undefined);
    const forget = () => {
      if (this.sessions.get(target.name) === session) this.sessions.delete(target.name);
    };
    session.once("close", forget);
    session.once("goaway", forget);
    if (!this.closed) this.sessions.set(target.name, session);
    return session;
  }

  private forward(
    stream: ServerHttp2Stream,
    headers: IncomingHttpHeaders,
    method: ProxiedMethod,
    options: {
      buffered: ReadonlyArray<{ framed: Buffer }>;
      ended: boolean;
      started: bigint;
      inject?: { name: string; value: string };
      onEnd?: (status: number, message: string) => void;
    },
  ): void {
    const target = this.options.upstreams.get(method.upstream);
    if (target === undefined) throw new AirlockError(Code.Internal, `no upstream named ${method.upstream}`);
    const outgoing: OutgoingHttpHeaders = {};
    for (const [name, value] of Object.entries(headers)) {
      if (name.startsWith(":") && name !== HTTP2_HEADER_PATH) continue;
      outgoing[name] = value;
    }
    outgoing[":method"] = "POST";
    if (options.inject !== undefined) outgoing[options.inject.name] = options.inject.value;

    let upstream: ClientHttp2Stream;
    try {
      upstream = this.session(target).request(outgoing, { endStream: false });
    } catch (error) {
      this.reject(stream, new AirlockError(Code.Unavailable, `upstream ${target.name} is unreachable`, { cause: error }), "upstream_unavailable");
      options.onEnd?.(Code.Unavailable, "upstream unreachable");
      return;
    }
    let responded = false;
    let finalStatus: number = Code.Unknown;
    let finalMessage = "";
    let trailers: IncomingHttpHeaders | undefined;
    let reported = false;
    const report = () => {
      if (reported) return;
      reported = true;
      const added = Number(process.hrtime.bigint() - options.started) / 1e9;
      this.options.metrics.passThrough.labels(method.path).observe(added);
      options.onEnd?.(finalStatus, finalMessage);
    };

    upstream.on("response", (responseHeaders, flags) => {
      if (stream.destroyed) return;
      responded = true;
      const trailersOnly = (flags & constants.NGHTTP2_FLAG_END_STREAM) !== 0 || responseHeaders["grpc-status"] !== undefined;
      if (trailersOnly) {
        finalStatus = Number(responseHeaders["grpc-status"] ?? Code.Unknown);
        finalMessage = String(responseHeaders["grpc-message"] ?? "");
        stream.respond(responseHeaders, { endStream: true });
        report();
        return;
      }
      stream.respond(responseHeaders, { waitForTrailers: true });
    });
    upstream.on("trailers", (received: IncomingHttpHeaders) => {
      trailers = received;
      finalStatus = Number(received["grpc-status"] ?? Code.Unknown);
      finalMessage = String(received["grpc-message"] ?? "");
    });
    stream.on("wantTrailers", () => {
      if (trailers === undefined) {
        finalStatus = Code.Internal;
        stream.sendTrailers({ "grpc-status": String(Code.Internal), "grpc-message": "upstream ended the call without a status" });
      } else {
        const rest: OutgoingHttpHeaders = { ...trailers };
        delete rest[HTTP2_HEADER_STATUS];
        stream.sendTrailers(rest);
      }
      report();
    });
    upstream.on("data", (chunk: Buffer) => {
      if (!stream.destroyed && !stream.write(chunk)) {
        upstream.pause();
        stream.once("drain", () => upstream.resume());
      }
    });
    upstream.on("end", () => {
      if (responded && !stream.destroyed && !stream.writableEnded) stream.end();
    });
    upstream.on("error", (error) => {
      if (!responded) {
        this.reject(stream, new AirlockError(Code.Unavailable, `upstream ${target.name} is unreachable`, { cause: error }), "upstream_unavailable");
        finalStatus = Code.Unavailable;
        finalMessage = "upstream unreachable";
        report();
      }
    });
    upstream.on("close", () => {
      const code = upstream.rstCode ?? NGHTTP2_NO_ERROR;
      if (code !== NGHTTP2_NO_ERROR && !stream.destroyed) {
        if (!responded) {
          const status = code === NGHTTP2_REFUSED_STREAM ? Code.Unavailable : code === NGHTTP2_CANCEL ? Code.Canceled : Code.Internal;
          this.reject(stream, new AirlockError(status, `upstream ${target.name} reset the call`), "upstream_reset");
          finalStatus = status;
        } else {
          stream.close(code);
          finalStatus = Code.Canceled;
        }
      }
      report();
    });
    stream.on("close", () => {
      if (!upstream.closed) upstream.close(NGHTTP2_CANCEL);
    });

    for (const message of options.buffered) upstream.write(message.framed);
    if (options.ended || stream.readableEnded) {
      upstream.end();
      return;
    }
    const guard = new MessageSizeGuard(this.options.maxMessageBytes);
    stream.on("data", (chunk: Buffer) => {
      const oversized = guard.inspect(chunk);
      if (oversized !== undefined) {
        upstream.close(NGHTTP2_CANCEL);
        this.reject(stream, messageTooLarge(oversized, this.options.maxMessageBytes), "too_large");
        return;
      }
      if (!upstream.write(chunk)) {
        stream.pause();
        upstream.once("drain", () => stream.resume());
      }
    });
    stream.on("end", () => upstream.end());
    // A stream paused while its first messages were read does not resume on its own.
    stream.resume();
  }

  private reject(stream: ServerHttp2Stream, error: AirlockError, reason: string): void {
    this.options.metrics.rejections.inc({ reason });
    if (error.code === Code.Internal) this.options.log.error({ err: error }, "call failed inside the sidecar");
    if (stream.destroyed || stream.closed) return;
    if (stream.headersSent) {
      stream.close(constants.NGHTTP2_INTERNAL_ERROR);
      return;
    }
    stream.respond(statusResponse(error.code, error.rawMessage, error.details), { endStream: true });
    // The agent may still be sending; stop reading its messages.
    stream.resume();
  }
}

/**
 * Reads up to `count` whole messages from the agent's stream and decodes them
 * (the paths that need request fields). Resolves early when the agent
 * half-closes. Bytes past the last whole message stay in `reader`.
 */
function readMessages(
  stream: ServerHttp2Stream,
  reader: MessageReader,
  schema: DescMessage,
  count: number,
): Promise<{ messages: GrpcMessage[]; decoded: JsonObject[]; ended: boolean }> {
  return new Promise((resolve, reject) => {
    const messages: GrpcMessage[] = [];
    const decoded: JsonObject[] = [];
    // 'end' may have fired while nobody listened (between two reads): readableEnded remembers it.
    if (stream.readableEnded) {
      if (reader.partialBytes > 0) reject(new AirlockError(Code.InvalidArgument, "the request ended inside a message"));
      else resolve({ messages, decoded, ended: true });
      return;
    }
    const finish = (ended: boolean) => {
      stream.off("data", onData);
      stream.off("end", onEnd);
      stream.off("close", onClose);
      if (!ended) stream.pause();
      resolve({ messages, decoded, ended });
    };
    const onData = (chunk: Buffer) => {
      let complete: GrpcMessage[];
      try {
        complete = reader.push(chunk);
      } catch (error) {
        stream.off("data", onData);
        reject(AirlockError.from(error, Code.InvalidArgument));
        return;
      }
      for (const message of complete) {
        if (message.compressed) {
          reject(new AirlockError(Code.InvalidArgument, "compressed request messages cannot be inspected by policy: send them uncompressed"));
          return;
        }
        try {
          decoded.push(toJson(schema, fromBinary(schema, message.payload)) as JsonObject);
        } catch (error) {
          reject(new AirlockError(Code.InvalidArgument, `malformed ${schema.typeName} message`, { cause: error }));
          return;
        }
        messages.push(message);
      }
      if (messages.length >= count) finish(false);
    };
    const onEnd = () => {
      if (reader.partialBytes > 0) {
        reject(new AirlockError(Code.InvalidArgument, "the request ended inside a message"));
        return;
      }
      finish(true);
    };
    const onClose = () => reject(new AirlockError(Code.Canceled, "the agent cancelled the call"));
    stream.on("data", onData);
    stream.once("end", onEnd);
    stream.once("close", onClose);
    stream.resume();
  });
}


function splitAddress(address: string): { host: string; port: number } {
  const colon = address.lastIndexOf(":");
  return { host: address.slice(0, colon).replace(/^\[|\]$/g, ""), port: Number(address.slice(colon + 1)) };
}

const fixedVerdicts = new WeakMap<Policy, Map<string, PolicyVerdict | null>>();

/**
 * The verdict for every call of `method` when the first rule that matches it
 * has no condition (or no rule matches: the default), else null. Cached per
 * policy object, so a reload starts afresh.
 */
function fixedVerdict(policy: Policy, method: ProxiedMethod, host: string): PolicyVerdict | null {
  let byPath = fixedVerdicts.get(policy);
  if (byPath === undefined) {
    byPath = new Map();
    fixedVerdicts.set(policy, byPath);
  }
  let verdict = byPath.get(method.path);
  if (verdict === undefined) {
    const service = method.service.typeName;
    const name = method.method.name;
    const first = policy.rules.find((rule) => (rule.service === "*" || rule.service === service) && (rule.method === "*" || rule.method === name));
    verdict = first === undefined || first.when === undefined ? policy.evaluate({ service, method: name, host, request: () => ({}) }) : null;
    byPath.set(method.path, verdict);
  }
  return verdict;
}
