import type { IncomingHttpHeaders } from "node:http2";
import { connect as netConnect, type Socket } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { type DescMessage, fromBinary, type JsonObject, toBinary, toJson } from "@bufbuild/protobuf";
import { AirlockError, Code } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { H2Connection, type H2Stream } from "./h2/connection.js";
import { H2ErrorCode } from "./h2/frames.js";
import type { HeaderField } from "./h2/hpack.js";
import type { AgentIdentity, Authentication } from "./identity.js";
import type { SidecarMetrics } from "./metrics.js";
import type { MethodTable, ProxiedMethod } from "./methods.js";
import type { Policy, PolicyVerdict } from "./policy.js";
import type { CallReport } from "./reports.js";
import { healthPaths, serveHealth } from "./health.js";
import { type SidecarLimits, sidecarLimitDefaults } from "./h2/limits.js";
import { parseTouched, touchedTrailer } from "../common/touched.js";
import { frameMessage, type GrpcMessage, MessageReader, MessageSizeGuard, messageTooLarge, statusResponse } from "./wire.js";

/** An upstream the sidecar forwards to. */
export interface UpstreamTarget {
  readonly name: string;
  /** `host:port` of an HTTP/2 gRPC server, or `unix:/path`. */
  readonly address: string;
  /** TLS to the upstream (PEM bytes); absent for plaintext (loopback, unix socket, or `insecure: true`). */
  readonly tls?: { readonly ca?: Buffer; readonly cert?: Buffer; readonly key?: Buffer; readonly serverName?: string };
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
  /** Called once when the upstream call ends, with its gRPC status and what the upstream reported it touched. */
  readonly complete: (status: number, message: string, touched?: Readonly<Record<string, string>>) => void;
}

/** The proxy's collaborators and limits. */
export interface ProxyOptions {
  readonly methods: MethodTable;
  readonly upstreams: ReadonlyMap<string, UpstreamTarget>;
  readonly policy: () => Policy;
  /**
   * Who is calling (the sidecar's `AgentAuthenticator.identify`): asked on every
   * path, synchronously answered when it can be (the fast path stays synchronous).
   * May throw or reject with an AirlockError (`unauthenticated`, `unavailable`).
   */
  readonly authenticate: (headers: IncomingHttpHeaders, socket: TLSSocket | undefined) => Authentication | Promise<Authentication>;
  readonly hold: (call: HeldCall) => Promise<ApprovedCall>;
  /** Told each call the sidecar decided alone that the audit trail must hold (see `CallReporter`). Must not block. */
  readonly report: (report: CallReport) => void;
  readonly host: string;
  /** Largest request message accepted, in bytes. */
  readonly maxMessageBytes: number;
  /** Largest number of client messages buffered while a streaming call waits for its decision. */
  readonly maxBufferedMessages: number;
  /** The other data-plane limits the proxy enforces (sidecar/h2/limits.ts). @default sidecarLimitDefaults */
  readonly limits?: Pick<SidecarLimits, "maxHeldBytes" | "maxHeldBytesPerConnection" | "maxOutstandingApprovalsPerAgent" | "maxUpstreamConnections">;
  /** Metadata keys an agent may never send: the credential headers the sidecar injects. */
  readonly reservedHeaders: () => ReadonlySet<string>;
  readonly metrics: SidecarMetrics;
  readonly log: Logger;
  /** Whether the sidecar is ready, for `grpc.health.v1.Health` (the same checks as `/readyz`). @default always */
  readonly ready?: () => boolean;
}

/** What the first messages of a call held back for inspection left behind. */
interface ReadSoFar {
  readonly messages: GrpcMessage[];
  readonly decoded: JsonObject[];
  readonly ended: boolean;
}

/** How {@link GrpcProxy.forward} sends one call upstream. */
interface Forwarding {
  /** Request bytes read before forwarding began (whole messages, then any partial one). */
  readonly buffered: readonly Buffer[];
  readonly ended: boolean;
  readonly started: bigint;
  readonly inject?: { readonly name: string; readonly value: string };
  /** The header the agent's token came in: never forwarded. */
  readonly strip: string | undefined;
  /** Who is calling (`""` when anonymous): picks the upstream connection. */
  readonly agent: string;
  /** Told how an approved call ended, with what its upstream reported it touched (`airlock-touched`). */
  readonly onEnd?: (status: number, message: string, touched: Readonly<Record<string, string>>) => void;
}

/**
 * The sidecar's gRPC call handler on its own HTTP/2 data plane
 * ({@link H2Connection}). Allowed calls are forwarded frame by frame: request
 * and response bytes are never decoded or re-encoded (only each 5-byte message
 * prefix is read, for the size limit), and headers, trailers, status codes,
 * deadlines (`grpc-timeout`) and cancellation (RST_STREAM) pass through.
 */
export class GrpcProxy {
  private readonly options: ProxyOptions;
  /**
   * The connection new calls use, per upstream and agent: one agent's
   * cancellations (RST_STREAM floods an upstream may punish with GOAWAY) cost
   * only its own calls. Insertion order is age: past the limit the oldest goes.
   */
  private readonly connections = new Map<string, Map<string, H2Connection>>();
  /** Approval requests outstanding per agent: calls held now, and no-wait requests until their deadline (request id → ms). */
  private readonly outstanding = new Map<string, { holding: number; noWait: Map<string, number> }>();
  private readonly limits: NonNullable<ProxyOptions["limits"]>;
  /** Request bytes the held calls of each agent connection buffer now. */
  private readonly heldPerConnection = new WeakMap<H2Connection, { bytes: number }>();
  /** Every upstream connection still open, including ones draining after a GOAWAY. */
  private readonly openConnections = new Set<H2Connection>();
  private closed = false;
  private readonly health: { knows: (service: string) => boolean; ready: () => boolean };

  constructor(options: ProxyOptions) {
    this.options = options;
    this.limits = options.limits ?? sidecarLimitDefaults;
    const services = new Set([""]);
    for (const method of options.methods.values()) services.add(method.service.typeName);
    this.health = { knows: (service) => services.has(service), ready: options.ready ?? (() => true) };
  }

  /** Closes the upstream connections. Calls in flight are cancelled. */
  close(): void {
    this.closed = true;
    for (const connection of this.openConnections) connection.close();
    this.openConnections.clear();
    this.connections.clear();
  }

  /** Serves one call. Never throws: every failure becomes a gRPC status. */
  serve(stream: H2Stream): void {
    const started = process.hrtime.bigint();
    const headers = stream.headers;
    const rawPath = headers[":path"];
    const path = typeof rawPath === "string" ? rawPath : "";
    const method = this.options.methods.get(path);
    if (method === undefined) {
      if (path === healthPaths.check || path === healthPaths.watch) {
        serveHealth(stream, path === healthPaths.watch, this.health);
        return;
      }
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
    // effect holds whoever calls, so an allowed call is forwarded at once: no
    // decoding and no promise. Identity is still decided (and the agent's token
    // header stripped), from the authenticator's cache when the token was seen before.
    const fixed = fixedVerdict(this.options.policy(), method, this.options.host);
    if (fixed?.effect === "allow") {
      let authentication: Authentication | Promise<Authentication>;
      try {
        authentication = this.options.authenticate(headers, tlsSocketOf(stream));
      } catch (error) {
        this.refuseIdentity(stream, method, error);
        return;
      }
      if (authentication instanceof Promise) {
        authentication.then(
          (done) => this.allowFixed(stream, method, fixed, done, started),
          (error: unknown) => this.refuseIdentity(stream, method, error),
        );
        return;
      }
      this.allowFixed(stream, method, fixed, authentication, started);
      return;
    }
    this.route(stream, method, started).catch((error: unknown) => {
      const failure = AirlockError.from(error, Code.Internal);
      if (failure.details.limit === "held_bytes") this.options.metrics.limitHits.inc({ limit: "held_bytes" });
      this.reject(stream, failure, routeRejection(failure));
    });
  }

  /** Reports a call an `audit: true` rule allowed. */
  private reportAllowed(method: ProxiedMethod, verdict: PolicyVerdict, identity: AgentIdentity | undefined): void {
    this.options.report({ outcome: "allowed", method: method.path, rule: verdict.ruleId, agent: identity?.agent ?? "", onBehalfOf: identity?.onBehalfOf ?? "", reason: "allowed" });
  }

  /** Forwards a call the fixed verdict allows, once its identity is decided. */
  private allowFixed(stream: H2Stream, method: ProxiedMethod, verdict: PolicyVerdict, authentication: Authentication, started: bigint): void {
    if (authentication.identity === undefined && verdict.anonymous !== true) {
      this.rejectAnonymous(stream, method, verdict);
      return;
    }
    if (verdict.audit === true) this.reportAllowed(method, verdict, authentication.identity);
    this.options.metrics.tally(method.path).allowed();
    this.forward(stream, method, { buffered: [], ended: false, started, strip: authentication.consumedHeader, agent: authentication.identity?.agent ?? "" });
  }

  /**
   * Counts an approval request against its agent's outstanding budget, or
   * refuses it (RESOURCE_EXHAUSTED). A resume of a request the agent made
   * without waiting (by its request id, or by its call id) is not a new request.
   * Returns what to call with the hold's outcome: a request held without waiting
   * (ABORTED `not_waiting`) stays counted until its deadline.
   */
  private admitApproval(identity: AgentIdentity, metadata: IncomingHttpHeaders, timeoutMs: number): (outcome: unknown) => void {
    const agent = identity.agent;
    let entry = this.outstanding.get(agent);
    if (entry === undefined) {
      entry = { holding: 0, noWait: new Map() };
      this.outstanding.set(agent, entry);
    }
    const now = Date.now();
    for (const [id, until] of entry.noWait) if (until <= now) entry.noWait.delete(id);
    // A call id names its request for this agent and human (see callRequestId): the key the no-wait request is counted under.
    const callId = metadata["x-airlock-call-id"];
    const callKey = typeof callId === "string" ? `call-id:${identity.onBehalfOf}:${callId}` : undefined;
    const resumeId = metadata["x-airlock-request-id"];
    const resumeKey = callKey ?? (typeof resumeId === "string" ? resumeId : undefined);
    const resumedUntil = resumeKey === undefined ? undefined : entry.noWait.get(resumeKey);
    const resuming = resumedUntil !== undefined && resumeKey !== undefined && entry.noWait.delete(resumeKey);
    if (!resuming && entry.holding + entry.noWait.size >= this.limits.maxOutstandingApprovalsPerAgent) {
      this.options.metrics.limitHits.inc({ limit: "outstanding_approvals" });
      if (entry.holding + entry.noWait.size === 0) this.outstanding.delete(agent);
      throw new AirlockError(Code.ResourceExhausted, `agent ${agent} already has ${this.limits.maxOutstandingApprovalsPerAgent} approval requests outstanding: wait for them to be decided or to expire`, {
        details: { limit: "outstanding_approvals" },
      });
    }
    const counted = entry;
    counted.holding++;
    return (outcome) => {
      counted.holding--;
      const requestId = outcome instanceof AirlockError && outcome.details.reason === "not_waiting" ? outcome.details.requestId : undefined;
      if (typeof requestId === "string") counted.noWait.set(callKey ?? requestId, Date.now() + timeoutMs);
      // A resume that did not run the call (refused, cut off, failed) leaves its request outstanding, counted as before.
      else if (resuming && resumeKey !== undefined && outcome !== undefined) counted.noWait.set(resumeKey, resumedUntil);
      if (counted.holding + counted.noWait.size === 0 && this.outstanding.get(agent) === counted) this.outstanding.delete(agent);
    };
  }

  /** Every call needs an authenticated agent unless the rule that decided it says `anonymous: true`. */
  private rejectAnonymous(stream: H2Stream, method: ProxiedMethod, verdict: PolicyVerdict): void {
    const rule = verdict.ruleId === "default" ? "the policy default" : `rule ${verdict.ruleId}`;
    this.options.report({ outcome: "refused", method: method.path, rule: verdict.ruleId, agent: "", onBehalfOf: "", reason: "unauthenticated" });
    this.reject(stream, new AirlockError(Code.Unauthenticated, `${method.path} needs an authenticated agent (${rule} is not anonymous): present an agent certificate or token`), "unauthenticated");
  }

  /** Answers a call whose credential did not verify (or whose keys could not be fetched). */
  private refuseIdentity(stream: H2Stream, method: ProxiedMethod, error: unknown): void {
    const failure = AirlockError.from(error, Code.Unauthenticated);
    const reason = failure.code === Code.Unauthenticated ? "unauthenticated" : "auth_unavailable";
    this.options.report({ outcome: "refused", method: method.path, rule: "", agent: "", onBehalfOf: "", reason });
    this.reject(stream, failure, reason);
  }

  private async route(stream: H2Stream, method: ProxiedMethod, started: bigint): Promise<void> {
    const { service, method: desc } = method;
    const headers = stream.headers;
    const policy = this.options.policy();
    const needsRequest = policy.needsRequest(service.typeName, desc.name);
    let authentication: Authentication;
    try {
      authentication = await this.options.authenticate(headers, tlsSocketOf(stream));
    } catch (error) {
      this.refuseIdentity(stream, method, error);
      return;
    }
    const identity = authentication.identity;
    const strip = authentication.consumedHeader;

    let reader: MessageReader | undefined;
    let first: ReadSoFar | undefined;
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
    if (identity === undefined && verdict.anonymous !== true) {
      this.rejectAnonymous(stream, method, verdict);
      return;
    }

    if (verdict.effect === "allow") {
      if (verdict.audit === true) this.reportAllowed(method, verdict, identity);
      this.forward(stream, method, {
        buffered: [...(first?.messages ?? []).map((m) => m.framed), ...(reader === undefined ? [] : [reader.peekPartial()])],
        ended: first?.ended ?? false,
        started,
        strip,
        agent: identity?.agent ?? "",
      });
      return;
    }
    if (verdict.effect === "deny") {
      this.options.report({ outcome: "denied", method: method.path, rule: verdict.ruleId, agent: identity?.agent ?? "", onBehalfOf: identity?.onBehalfOf ?? "", reason: "policy_deny" });
      this.reject(stream, new AirlockError(Code.PermissionDenied, `denied by rule ${verdict.ruleId}: ${verdict.reason}`, { details: { rule: verdict.ruleId } }), "policy_deny");
      return;
    }
    const approve = verdict.approve;
    if (approve === undefined) throw new AirlockError(Code.Internal, `rule ${verdict.ruleId} holds calls but has no approval settings`);
    if (identity === undefined) throw new AirlockError(Code.Internal, `rule ${verdict.ruleId} holds calls but let a caller without identity through`);
    const reason = headers["x-airlock-reason"];
    if (approve.requireReason && (typeof reason !== "string" || reason.trim() === "")) {
      this.options.report({ outcome: "refused", method: method.path, rule: verdict.ruleId, agent: identity.agent, onBehalfOf: identity.onBehalfOf, reason: "reason_missing" });
      this.reject(stream, new AirlockError(Code.InvalidArgument, `rule ${verdict.ruleId} requires a justification: send it in metadata x-airlock-reason`), "reason_missing");
      return;
    }
    await this.holdThenForward(stream, method, { ...verdict, approve }, identity, strip, reader, first, started);
  }

  private async holdThenForward(
    stream: H2Stream,
    method: ProxiedMethod,
    verdict: HeldCall["verdict"],
    identity: AgentIdentity,
    strip: string | undefined,
    reader: MessageReader | undefined,
    first: ReadSoFar | undefined,
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
    // One message past the buffer is enough to know the call is too long.
    const wanted = kind === "bidi_streaming" ? 1 : this.options.maxBufferedMessages + 1;
    if (!ended && messages.length < wanted) {
      const more = await readMessages(stream, activeReader, method.method.input, wanted - messages.length, this.limits.maxHeldBytes - heldBytesOf(messages));
      messages.push(...more.messages);
      decoded.push(...more.decoded);
      ended = more.ended;
    }
    // Checked whichever read filled the buffer: messages sent after it would run unreviewed.
    if (kind !== "bidi_streaming" && (!ended || messages.length > this.options.maxBufferedMessages)) {
      throw new AirlockError(Code.ResourceExhausted, `more than ${this.options.maxBufferedMessages} messages in a held call`);
    }
    if (messages.length === 0) throw new AirlockError(Code.InvalidArgument, "a held call needs a request message");

    const held = [...messages];
    // Bytes of a message not yet whole when reading stopped; `later` continues from there.
    const partial = activeReader.peekPartial();
    const later: Buffer[] = [];
    let laterCount = 0;
    let heldBytes = heldBytesOf(held) + partial.length;
    let account = this.heldPerConnection.get(stream.connection);
    if (account === undefined) {
      account = { bytes: 0 };
      this.heldPerConnection.set(stream.connection, account);
    }
    const connectionHeld = account;
    connectionHeld.bytes += heldBytes;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      connectionHeld.bytes -= heldBytes;
    };
    if (connectionHeld.bytes > this.limits.maxHeldBytesPerConnection) {
      release();
      this.options.metrics.limitHits.inc({ limit: "held_bytes_per_connection" });
      throw new AirlockError(Code.ResourceExhausted, `the calls held on this connection already buffer more than ${this.limits.maxHeldBytesPerConnection} bytes`);
    }
    const abort = new AbortController();
    if (!ended) {
      stream.ondata = (chunk) => {
        later.push(chunk);
        heldBytes += chunk.length;
        connectionHeld.bytes += chunk.length;
        const overCall = heldBytes > this.limits.maxHeldBytes;
        if (overCall || connectionHeld.bytes > this.limits.maxHeldBytesPerConnection) {
          abort.abort();
          this.options.metrics.limitHits.inc({ limit: overCall ? "held_bytes" : "held_bytes_per_connection" });
          const what = overCall ? `more than ${this.limits.maxHeldBytes} bytes buffered while waiting for approval` : `the calls held on this connection buffer more than ${this.limits.maxHeldBytesPerConnection} bytes`;
          this.reject(stream, new AirlockError(Code.ResourceExhausted, what), "buffer_full");
          return;
        }
        try {
          laterCount += activeReader.push(chunk).length;
        } catch (error) {
          abort.abort();
          this.reject(stream, AirlockError.from(error, Code.ResourceExhausted), "too_large");
          return;
        }
        if (laterCount > this.options.maxBufferedMessages) {
          abort.abort();
          this.reject(stream, new AirlockError(Code.ResourceExhausted, `more than ${this.options.maxBufferedMessages} messages buffered while waiting for approval`), "buffer_full");
        }
      };
      stream.onend = () => {
        ended = true;
      };
    }
    stream.onclose = () => abort.abort();
    if (stream.closed) abort.abort();
    stream.resume();
    let settle: (outcome: unknown) => void;
    try {
      settle = this.admitApproval(identity, stream.headers, verdict.approve.timeoutMs);
    } catch (error) {
      release();
      throw error;
    }
    this.options.metrics.held.inc();
    const waitStarted = Date.now();
    let approved: ApprovedCall;
    try {
      approved = await this.options.hold({ method, identity, verdict, messages: held, decoded, metadata: stream.headers, signal: abort.signal });
      settle(undefined);
    } catch (error) {
      settle(error);
      const failure = AirlockError.from(error);
      if (failure.code === Code.DeadlineExceeded) {
        const requestId = typeof failure.details.requestId === "string" ? failure.details.requestId : undefined;
        this.options.report({ outcome: "timed_out", method: method.path, rule: verdict.ruleId, agent: identity.agent, onBehalfOf: identity.onBehalfOf, reason: "deadline_exceeded", ...(requestId === undefined ? {} : { requestId }) });
      }
      throw error;
    } finally {
      // Waiting is over: the bytes go upstream now (or nowhere), under the upstream stream's flow control.
      release();
      this.options.metrics.held.dec();
      this.options.metrics.approvalWait.observe((Date.now() - waitStarted) / 1000);
      stream.pause();
      stream.ondata = undefined;
      stream.onend = undefined;
      stream.onclose = undefined;
      ended ||= stream.readableEnded;
    }
    if (stream.closed) {
      approved.complete(Code.Canceled, "the agent went away before the approved call ran");
      return;
    }
    this.forward(stream, method, {
      buffered: [...held.map((m) => m.framed), partial, ...later],
      ended,
      started,
      strip,
      agent: identity.agent,
      inject: { name: approved.injectHeader, value: approved.secret },
      onEnd: approved.complete,
    });
  }

  private upstreamConnection(target: UpstreamTarget, agent: string): H2Connection {
    let byAgent = this.connections.get(target.name);
    if (byAgent === undefined) {
      byAgent = new Map();
      this.connections.set(target.name, byAgent);
    }
    const existing = byAgent.get(agent);
    if (existing?.usable === true) return existing;
    if (existing === undefined && byAgent.size >= this.limits.maxUpstreamConnections) {
      // Past the limit the oldest agent's connection finishes its calls and goes; that agent gets a new one when it calls again.
      const [oldestAgent, oldest] = byAgent.entries().next().value ?? ["", undefined];
      byAgent.delete(oldestAgent);
      oldest?.closeWhenIdle();
      this.options.metrics.limitHits.inc({ limit: "upstream_connections" });
    }
    // Out of stream ids or at the peer's stream limit: it finishes its calls, then goes.
    existing?.closeWhenIdle();
    const socket = connectUpstream(target);
    const connection: H2Connection = new H2Connection(socket, {
      role: "client",
      onUnusable: () => {
        if (byAgent.get(agent) === connection) byAgent.delete(agent);
        connection.closeWhenIdle();
      },
    });
    socket.once("close", () => this.openConnections.delete(connection));
    if (this.closed) {
      connection.close();
    } else {
      byAgent.delete(agent);
      byAgent.set(agent, connection);
      this.openConnections.add(connection);
    }
    return connection;
  }

  private forward(stream: H2Stream, method: ProxiedMethod, options: Forwarding): void {
    const target = this.options.upstreams.get(method.upstream);
    if (target === undefined) throw new AirlockError(Code.Internal, `no upstream named ${method.upstream}`);
    if (stream.closed) {
      // Cancelled before it could be forwarded (during an async policy step): the upstream never hears of it.
      options.onEnd?.(Code.Canceled, "the agent cancelled the call", {});
      return;
    }
    const outgoing: HeaderField[] = [
      [":method", "POST"],
      [":scheme", target.tls === undefined ? "http" : "https"],
      [":path", method.path],
      [":authority", target.address.startsWith("unix:") ? "localhost" : target.address],
    ];
    const strip = options.strip;
    for (const name in stream.headers) {
      // The agent's token is for the sidecar alone, whichever path the call took.
      // `host` names what the agent asked for; the upstream gets the sidecar's own :authority instead.
      if (name.charCodeAt(0) === 58 /* ':' */ || name === strip || name === "x-airlock-agent-token" || name === "host") continue;
      const value = stream.headers[name];
      if (typeof value === "string") outgoing.push([name, value]);
      else if (value !== undefined) for (const item of value) outgoing.push([name, item]);
    }
    let sensitive = alwaysSensitive;
    if (options.inject !== undefined) {
      outgoing.push([options.inject.name, options.inject.value]);
      sensitive = new Set([...alwaysSensitive, options.inject.name]);
    }

    const upstream = this.upstreamConnection(target, options.agent).openStream(outgoing, false, sensitive);
    let responded = false;
    let finished = false;
    let finalStatus: number = Code.Unknown;
    let finalMessage = "";
    let touched: Readonly<Record<string, string>> = {};
    let reported = false;
    const report = () => {
      if (reported) return;
      reported = true;
      this.options.metrics.tally(method.path).finished(Number(process.hrtime.bigint() - options.started) / 1e9);
      options.onEnd?.(finalStatus, finalMessage, touched);
    };
    // Only approved calls report a completion: the allow path does not look at trailers.
    const noteTouched = options.onEnd === undefined ? undefined : (fields: readonly HeaderField[]) => {
      for (const [name, value] of fields) if (name === touchedTrailer) touched = parseTouched(value);
    };

    upstream.onheaders = (fields, endStream) => {
      if (stream.closed) return;
      const status = grpcStatus(fields);
      if (!responded) {
        responded = true;
        if (endStream || status !== undefined) {
          // Trailers-only: the status without a body.
          finished = true;
          finalStatus = status?.code ?? Code.Unknown;
          finalMessage = status?.message ?? "";
          noteTouched?.(fields);
          stream.sendHeaders(fields, true);
          report();
          return;
        }
        stream.sendHeaders(fields, false);
        return;
      }
      finished = true;
      finalStatus = status?.code ?? Code.Unknown;
      finalMessage = status?.message ?? "";
      noteTouched?.(fields);
      stream.sendHeaders(fields, true);
      report();
    };
    upstream.ondata = (chunk) => {
      if (!stream.closed && !stream.write(chunk)) {
        upstream.pause();
        stream.ondrain = () => upstream.resume();
      }
    };
    upstream.onend = () => {
      if (finished || stream.closed) return;
      // END_STREAM on DATA: the upstream ended the call without trailers.
      finished = true;
      finalStatus = Code.Internal;
      finalMessage = "upstream ended the call without a status";
      if (responded) stream.sendHeaders([["grpc-status", String(Code.Internal)], ["grpc-message", finalMessage]], true);
      else this.reject(stream, new AirlockError(Code.Internal, finalMessage), "upstream_reset");
      report();
    };
    upstream.onclose = (code, error) => {
      if (!finished && !stream.closed) {
        if (!responded) {
          const status = error !== undefined || code === H2ErrorCode.refusedStream ? Code.Unavailable : code === H2ErrorCode.cancel ? Code.Canceled : Code.Internal;
          const reason = error !== undefined ? "upstream_unavailable" : "upstream_reset";
          const message = error !== undefined ? `upstream ${target.name} is unreachable` : `upstream ${target.name} reset the call`;
          this.reject(stream, new AirlockError(status, message), reason);
          finalStatus = status;
          finalMessage = message;
        } else {
          stream.reset(code === H2ErrorCode.noError ? H2ErrorCode.internalError : code);
          finalStatus = Code.Canceled;
        }
      }
      report();
    };
    stream.onclose = () => {
      if (finished) {
        // The upstream answered before the agent half-closed: our side of its stream may still be open.
        if (!upstream.closed) upstream.reset(H2ErrorCode.noError);
        return;
      }
      finished = true;
      finalStatus = Code.Canceled;
      finalMessage = "the agent cancelled the call";
      upstream.reset(H2ErrorCode.cancel);
    };

    // The guard follows message boundaries from the first byte, buffered ones included: they may
    // end inside a message.
    const guard = new MessageSizeGuard(this.options.maxMessageBytes);
    const tooLarge = (size: number) => {
      finished = true;
      finalStatus = Code.ResourceExhausted;
      finalMessage = "request message over the limit";
      upstream.reset(H2ErrorCode.cancel);
      this.reject(stream, messageTooLarge(size, this.options.maxMessageBytes), "too_large");
      report();
    };
    for (const chunk of options.buffered) {
      if (chunk.length === 0) continue;
      const oversized = guard.inspect(chunk);
      if (oversized !== undefined) {
        tooLarge(oversized);
        return;
      }
      upstream.write(chunk);
    }
    if (options.ended || stream.readableEnded) {
      upstream.end();
      return;
    }
    stream.ondata = (chunk) => {
      const oversized = guard.inspect(chunk);
      if (oversized !== undefined) {
        tooLarge(oversized);
        return;
      }
      if (!upstream.write(chunk)) {
        stream.pause();
        upstream.ondrain = () => stream.resume();
      }
    };
    stream.onend = () => upstream.end();
    stream.resume();
  }

  private reject(stream: H2Stream, error: AirlockError, reason: string): void {
    this.options.metrics.rejections.inc({ reason });
    if (error.code === Code.Internal) this.options.log.error({ err: error }, "call failed inside the sidecar");
    if (stream.closed) return;
    if (stream.headersSent) {
      stream.reset(H2ErrorCode.internalError);
      return;
    }
    // Ending the response while the agent still sends makes the stream answer with RST_STREAM(NO_ERROR): it stops reading.
    stream.sendHeaders(statusResponse(error.code, error.rawMessage, error.details), true);
  }
}

/**
 * Headers forwarded with HPACK's never-indexed representation, which asks every
 * later hop not to keep them in a compression table. The decoder does not report
 * which fields a peer sent that way, so credentials are marked by name.
 */
const alwaysSensitive: ReadonlySet<string> = new Set(["authorization", "x-airlock-agent-token", "cookie"]);

/** grpc-status and grpc-message of a response's trailers, if present. */
function grpcStatus(fields: readonly HeaderField[]): { code: number; message: string } | undefined {
  let code: number | undefined;
  let message = "";
  for (const [name, value] of fields) {
    if (name === "grpc-status") code = Number(value);
    else if (name === "grpc-message") message = value;
  }
  return code === undefined ? undefined : { code, message };
}

/**
 * Reads up to `count` whole messages from the agent's stream and decodes them
 * (the paths that need request fields). Resolves early when the agent
 * half-closes. Bytes past the last whole message stay in `reader`; the stream
 * is left paused.
 */
function readMessages(stream: H2Stream, reader: MessageReader, schema: DescMessage, count: number, maxBytes = Number.POSITIVE_INFINITY): Promise<ReadSoFar> {
  return new Promise((resolve, reject) => {
    const messages: GrpcMessage[] = [];
    const decoded: JsonObject[] = [];
    let settled = false;
    const finish = (outcome: { ended: boolean } | Error) => {
      if (settled) return;
      settled = true;
      stream.pause();
      stream.ondata = undefined;
      stream.onend = undefined;
      stream.onclose = undefined;
      if (outcome instanceof Error) reject(outcome);
      else resolve({ messages, decoded, ended: outcome.ended });
    };
    const ended = () => finish(reader.partialBytes > 0 ? new AirlockError(Code.InvalidArgument, "the request ended inside a message") : { ended: true });
    // The agent may have cancelled while its identity was being checked: 'close' will not fire again.
    if (stream.closed) {
      finish(new AirlockError(Code.Canceled, "the agent cancelled the call"));
      return;
    }
    // The end may have been delivered while nobody read (between two reads): readableEnded remembers it.
    if (stream.readableEnded) {
      ended();
      return;
    }
    let bytes = 0;
    stream.ondata = (chunk) => {
      bytes += chunk.length;
      if (bytes > maxBytes) {
        finish(new AirlockError(Code.ResourceExhausted, `more than ${maxBytes} request bytes in a held call`, { details: { limit: "held_bytes" } }));
        return;
      }
      let complete: GrpcMessage[];
      try {
        complete = reader.push(chunk);
      } catch (error) {
        finish(AirlockError.from(error, Code.InvalidArgument));
        return;
      }
      for (const message of complete) {
        if (message.compressed) {
          finish(new AirlockError(Code.InvalidArgument, "compressed request messages cannot be inspected by policy: send them uncompressed"));
          return;
        }
        let canonical: GrpcMessage;
        try {
          const parsed = fromBinary(schema, message.payload);
          const bytes = toBinary(schema, parsed, { writeUnknownFields: false });
          // Fields the descriptors do not know reach no rule and no reviewer, but an upstream may act on them.
          if (toBinary(schema, parsed).length !== bytes.length) {
            finish(new AirlockError(Code.InvalidArgument, `the ${schema.typeName} message has fields this sidecar's descriptors do not know: policy and reviewers cannot see them`));
            return;
          }
          decoded.push(toJson(schema, parsed) as JsonObject);
          // What policy read (and reviewers will see) is what goes upstream: the canonical re-encoding,
          // never bytes another protobuf parser might read differently (duplicate fields, overlong varints).
          const framed = frameMessage(bytes);
          canonical = { compressed: false, payload: framed.subarray(5), framed };
        } catch (error) {
          finish(new AirlockError(Code.InvalidArgument, `malformed ${schema.typeName} message`, { cause: error }));
          return;
        }
        messages.push(canonical);
      }
      if (messages.length >= count) finish({ ended: false });
    };
    stream.onend = ended;
    stream.onclose = () => finish(new AirlockError(Code.Canceled, "the agent cancelled the call"));
    stream.resume();
  });
}

/** The `details.reason`s of a held call's outcomes that are their own rejection reason (see {@link routeRejection}). */
const callOutcomes: ReadonlySet<string> = new Set(["call_in_progress", "call_id_reused", "already_ran", "outcome_unknown", "ended_by_restart", "credential_expired"]);

/**
 * The `rejections_total` reason of a call that the slow path (reading, holding)
 * ended with an error: the outcome it stands for, so a reviewer's denial or a
 * no-wait call is not counted as the sidecar failing. Only codes that mean a
 * fault inside the sidecar are `internal`.
 */
export function routeRejection(failure: AirlockError): string {
  // What became of a call retried by its call id is an outcome of its own, whatever its code.
  const reason = failure.details.reason;
  if (typeof reason === "string" && callOutcomes.has(reason)) return reason;
  switch (failure.code) {
    case Code.PermissionDenied:
      return "approval_denied"; // a reviewer denied, or the decision or credential was refused
    case Code.DeadlineExceeded:
      return "approval_expired";
    case Code.Aborted:
      return "held_not_waiting"; // x-airlock-wait: false, or the broker cancelled the request
    case Code.Canceled:
      return "agent_cancelled";
    case Code.FailedPrecondition:
      return "already_used";
    case Code.NotFound:
      return "unknown_request";
    case Code.InvalidArgument:
      return "bad_request";
    case Code.ResourceExhausted:
      return "too_large";
    case Code.Unauthenticated:
      return "unauthenticated";
    case Code.Unavailable:
      return "unavailable"; // NATS or Vault unreachable: privileged calls fail closed
    default:
      return "internal";
  }
}

/** The call's TLS socket, when the agent connected over TLS. */
function tlsSocketOf(stream: H2Stream): TLSSocket | undefined {
  const socket = stream.connection.socket as TLSSocket;
  return socket.encrypted === true ? socket : undefined;
}

/** Bytes of whole messages held for a decision. */
function heldBytesOf(messages: readonly GrpcMessage[]): number {
  let bytes = 0;
  for (const message of messages) bytes += message.framed.length;
  return bytes;
}

/** A socket to the upstream: TLS with ALPN h2, a unix socket, or plain TCP. */
function connectUpstream(target: UpstreamTarget): Socket {
  if (target.address.startsWith("unix:")) return netConnect({ path: target.address.slice("unix:".length) });
  const { host, port } = splitAddress(target.address);
  // gRPC messages are small and latency-bound: Nagle's algorithm with delayed ACKs would hold them back.
  if (target.tls === undefined) return netConnect({ host, port, noDelay: true });
  const tls = target.tls;
  const socket = tlsConnect({
    host,
    port,
    ALPNProtocols: ["h2"],
    servername: tls.serverName ?? (/^[\d.:]+$/.test(host) ? "" : host),
    ...(tls.ca === undefined ? {} : { ca: tls.ca }),
    ...(tls.cert === undefined ? {} : { cert: tls.cert }),
    ...(tls.key === undefined ? {} : { key: tls.key }),
  });
  socket.setNoDelay(true);
  return socket;
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
    // Rules for other hosts never apply here: the first rule that does decides whether the verdict is fixed.
    const first = policy.rules.find((rule) => (rule.service === "*" || rule.service === service) && (rule.method === "*" || rule.method === name) && (rule.hosts === undefined || rule.hosts.includes(host)));
    verdict = first === undefined || first.when === undefined ? policy.evaluate({ service, method: name, host, request: () => ({}) }) : null;
    byPath.set(method.path, verdict);
  }
  return verdict;
}
