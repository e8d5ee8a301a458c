import type { IncomingHttpHeaders } from "node:http2";
import type { Socket } from "node:net";
import {
  clientPreface,
  defaultMaxFrameSize,
  defaultWindowSize,
  encodeFrame,
  encodeGoaway,
  encodeSettings,
  encodeUint32Frame,
  FrameFlag,
  frameHeaderLength,
  FrameType,
  H2ErrorCode,
  maxWindowSize,
  SettingId,
  writeFrameHeader,
} from "./frames.js";
import { encodeHeaderBlock, type HeaderField, HpackDecoder } from "./hpack.js";
import { type LimitName, sidecarLimitDefaults } from "./limits.js";

/** Limits of one HTTP/2 connection of the data plane. */
export interface H2Limits {
  /** Receive window of each stream: at most this much of a paused stream is held in memory. */
  readonly streamWindow: number;
  /** Receive window of the whole connection. */
  readonly connectionWindow: number;
  /** Streams a peer may have open at once on a server connection; more are refused with REFUSED_STREAM. */
  readonly maxConcurrentStreams: number;
  /** Largest header block (HEADERS plus CONTINUATION) accepted. */
  readonly maxHeaderBlockBytes: number;
  /** Server connections: time to receive the client preface and its first SETTINGS; the socket is closed after. */
  readonly handshakeTimeoutMs: number;
  /** Server connections: time without an open stream before GOAWAY and close. */
  readonly idleTimeoutMs: number;
  /** Server connections: SETTINGS, PING and stream resets (either way) a second before GOAWAY ENHANCE_YOUR_CALM. */
  readonly maxSettingsPerSecond: number;
  readonly maxPingsPerSecond: number;
  readonly maxResetsPerSecond: number;
}

/** The data plane's HTTP/2 limits. */
export const h2Defaults: H2Limits = {
  /** @default 1 MiB */
  streamWindow: 1 << 20,
  /** @default 8 MiB */
  connectionWindow: 1 << 23,
  /** @default 1000 */
  maxConcurrentStreams: 1000,
  /** @default 64 KiB */
  maxHeaderBlockBytes: 1 << 16,
  handshakeTimeoutMs: sidecarLimitDefaults.handshakeTimeoutMs,
  idleTimeoutMs: sidecarLimitDefaults.idleTimeoutMs,
  maxSettingsPerSecond: sidecarLimitDefaults.maxSettingsPerSecond,
  maxPingsPerSecond: sidecarLimitDefaults.maxPingsPerSecond,
  maxResetsPerSecond: sidecarLimitDefaults.maxResetsPerSecond,
};

/** What an {@link H2Connection} tells its owner. */
export interface H2ConnectionOptions {
  /** A server connection accepts streams its peer opens; a client connection opens them. */
  readonly role: "server" | "client";
  /** Server connections: a peer opened a stream and its request headers arrived. The stream starts paused. */
  readonly onStream?: (stream: H2Stream) => void;
  /** The peer will accept no new streams (GOAWAY), or the connection is gone. */
  readonly onUnusable?: () => void;
  readonly limits?: Partial<H2Limits>;
  /** A limit was hit on this connection (for `airlock_sidecar_limit_hits_total`). */
  readonly onLimit?: (limit: LimitName) => void;
}

/** Outbound bytes a stream queues (waiting for flow-control window) before `write` asks its writer to wait. */
const streamHighWaterMark = 64 * 1024;

/** Until this many bytes are pending, a flush copies them into one buffer instead of a vectored write. */
const coalesceBytes = 64 * 1024;

/** Unsent bytes on the socket past which streams' writers are asked to wait for 'drain'. */
const socketHighWaterMark = 1 << 20;

/**
 * Unsent bytes past which the peer is taken to have stopped reading (it may still
 * be sending PINGs or SETTINGS to grow our output): the connection is closed.
 */
const socketHardLimit = 16 << 20;

/** Most CONTINUATION frames one header block may take (an empty one costs us a frame and a buffer). */
const maxContinuationFrames = 64;

/** Stream ids of resets a server connection remembers, to ignore frames the peer sent before it saw them. */
const maxRememberedResets = 1024;


/**
 * One HTTP/2 connection (RFC 9113) over a socket, for the sidecar's data
 * plane: frames in, frames out, HPACK, flow control, SETTINGS, PING and
 * GOAWAY, and nothing of node:http2's per-stream machinery. A stream is a
 * small object with callback slots; DATA payloads travel as the socket's own
 * buffers, and every frame written while one input chunk is processed leaves
 * in a single socket write.
 */
export class H2Connection {
  /** The socket the connection runs over (a TLSSocket for agents on TLS). */
  readonly socket: Socket;
  private readonly role: "server" | "client";
  private readonly limits: H2Limits;
  private readonly onStream: ((stream: H2Stream) => void) | undefined;
  private readonly onUnusable: (() => void) | undefined;
  private readonly decoder: HpackDecoder;
  private readonly streams = new Map<number, H2Stream>();
  private pending: Buffer | undefined;
  private prefaceRemaining: number;
  private continuation: { streamId: number; endStream: boolean; fragments: Buffer[]; bytes: number } | undefined;
  /** Client connections: the id of the next stream this side opens (odd, RFC 9113 §5.1.1). */
  private nextStreamId = 1;
  private lastPeerStreamId = 0;
  /** The peer's SETTINGS. */
  private peerInitialWindow = defaultWindowSize;
  private peerMaxFrameSize = defaultMaxFrameSize;
  private peerMaxConcurrentStreams = Number.POSITIVE_INFINITY;
  /** Bytes we may still send on the connection. */
  private sendWindow = defaultWindowSize;
  /** Bytes delivered (or discarded) since the last connection WINDOW_UPDATE. */
  private unackedBytes = 0;
  /** Bytes the peer may still send on the connection. */
  private receiveWindow: number;
  /** Streams waiting for the socket to drain. */
  private readonly congested = new Set<H2Stream>();
  /** Per-second budgets of a server connection: resets (CVE-2023-44487, CVE-2025-8671), SETTINGS and PING. */
  private readonly budgets = { resets: { count: 0, since: 0 }, settings: { count: 0, since: 0 }, pings: { count: 0, since: 0 } };
  private readonly onLimit: ((limit: LimitName) => void) | undefined;
  /** Server connections: the handshake deadline, then the idle check. */
  private timer: NodeJS.Timeout | undefined;
  private handshaken = false;
  /** When the last stream closed (ms), for the idle timeout. */
  private idleSince = Date.now();
  private unusable = false;
  private draining = false;
  private readonly blocked = new Set<H2Stream>();
  private out: Buffer[] = [];
  private outBytes = 0;
  private flushScheduled = false;
  private goawayReceived = false;
  private closed = false;
  /**
   * Server connections: ids of peer streams this side reset, most recent last. Frames the peer
   * sent before it saw our RST_STREAM may still arrive and are ignored (RFC 9113 §5.1 "closed");
   * on any other closed stream they are errors.
   */
  private readonly resetByUs = new Set<number>();

  constructor(socket: Socket, options: H2ConnectionOptions) {
    this.socket = socket;
    this.role = options.role;
    this.limits = { ...h2Defaults, ...options.limits };
    this.onStream = options.onStream;
    this.onUnusable = options.onUnusable;
    this.decoder = new HpackDecoder({ maxHeaderListSize: this.limits.maxHeaderBlockBytes * 2 });
    this.receiveWindow = Math.max(this.limits.connectionWindow, defaultWindowSize);
    this.prefaceRemaining = this.role === "server" ? clientPreface.length : 0;

    const settings: Array<[number, number]> = [
      [SettingId.initialWindowSize, this.limits.streamWindow],
      [SettingId.maxHeaderListSize, this.limits.maxHeaderBlockBytes * 2],
    ];
    if (this.role === "client") settings.push([SettingId.enablePush, 0]);
    else settings.push([SettingId.maxConcurrentStreams, this.limits.maxConcurrentStreams]);
    if (this.role === "client") this.queue(clientPreface);
    this.queue(encodeSettings(settings));
    if (this.limits.connectionWindow > defaultWindowSize) {
      this.queue(encodeUint32Frame(FrameType.windowUpdate, 0, this.limits.connectionWindow - defaultWindowSize));
    }

    this.onLimit = options.onLimit;
    if (this.role === "server") {
      this.timer = setTimeout(() => {
        // No preface and SETTINGS in time: a slowloris holds a socket for free otherwise.
        this.onLimit?.("handshake_timeout");
        this.shutDown(new Error("no HTTP/2 handshake in time"));
        this.socket.destroy();
      }, this.limits.handshakeTimeoutMs);
      this.timer.unref();
    }
    socket.on("data", (chunk: Buffer) => this.receive(chunk));
    socket.on("drain", () => this.drained());
    socket.on("error", () => undefined);
    socket.once("close", () => this.shutDown(new Error("the connection closed")));
  }

  /** @internal The receive window each stream starts with. */
  get streamWindow(): number {
    return this.limits.streamWindow;
  }

  /** True while new streams may be opened on this (client) connection. */
  get usable(): boolean {
    return !this.closed && !this.draining && !this.goawayReceived && this.nextStreamId < 2 ** 31 - 2 && this.streams.size < this.peerMaxConcurrentStreams;
  }

  /** Opens a stream (client connections) and sends its request headers. */
  openStream(fields: Iterable<HeaderField>, endStream: boolean, sensitive?: ReadonlySet<string>): H2Stream {
    const stream = new H2Stream(this, this.nextStreamId, this.peerInitialWindow, false);
    this.nextStreamId += 2;
    if (this.closed) {
      queueMicrotask(() => stream.close(H2ErrorCode.refusedStream, new Error("the connection closed")));
      return stream;
    }
    this.streams.set(stream.id, stream);
    stream.sendHeaders(fields, endStream, sensitive);
    return stream;
  }

  /** Closes the connection once its last stream is over (at once if none is open); opens no more. */
  closeWhenIdle(): void {
    this.draining = true;
    if (this.streams.size === 0) this.close();
  }

  /** Sends GOAWAY, then closes the socket; open streams are closed at once. */
  close(errorCode: number = H2ErrorCode.noError): void {
    if (this.closed) return;
    const goaway = encodeGoaway(this.lastPeerStreamId, errorCode);
    this.flush();
    this.shutDown(new Error("the connection was closed"));
    if (!this.socket.destroyed) this.socket.end(goaway, () => this.socket.destroy());
  }

  /** @internal Queues a frame; frames queued in one turn of the event loop leave in one write. */
  queue(frame: Buffer): void {
    if (this.closed) return;
    this.out.push(frame);
    this.outBytes += frame.length;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(() => this.flush());
    }
  }

  /** @internal True when the socket holds so much unsent data that writers should wait; `stream` is told on drain. */
  waitForDrain(stream: H2Stream): boolean {
    if (this.socket.writableLength + this.outBytes < socketHighWaterMark) return false;
    this.congested.add(stream);
    return true;
  }

  /** @internal Sends what the windows allow of `chunk` as DATA frames; returns the bytes sent. */
  sendData(stream: H2Stream, chunk: Buffer, endStream: boolean): number {
    // A window may be negative after the peer shrank SETTINGS_INITIAL_WINDOW_SIZE (RFC 9113 §6.9.2).
    const allowed = Math.max(0, Math.min(chunk.length, stream.sendWindow, this.sendWindow));
    let offset = 0;
    while (offset < allowed) {
      const size = Math.min(allowed - offset, this.peerMaxFrameSize);
      const last = offset + size === chunk.length;
      const header = Buffer.allocUnsafe(frameHeaderLength);
      writeFrameHeader(header, 0, size, FrameType.data, last && endStream ? FrameFlag.endStream : 0, stream.id);
      this.queue(header);
      this.queue(offset === 0 && size === chunk.length ? chunk : chunk.subarray(offset, offset + size));
      offset += size;
    }
    stream.sendWindow -= allowed;
    this.sendWindow -= allowed;
    if (allowed < chunk.length) this.blocked.add(stream);
    return allowed;
  }

  /** @internal Sends a header block as HEADERS plus CONTINUATION frames. */
  sendHeaderBlock(streamId: number, block: Buffer, endStream: boolean): void {
    const first = Math.min(block.length, this.peerMaxFrameSize);
    const header = Buffer.allocUnsafe(frameHeaderLength);
    const flags = (endStream ? FrameFlag.endStream : 0) | (first === block.length ? FrameFlag.endHeaders : 0);
    writeFrameHeader(header, 0, first, FrameType.headers, flags, streamId);
    this.queue(header);
    this.queue(block.subarray(0, first));
    for (let offset = first; offset < block.length; offset += this.peerMaxFrameSize) {
      const size = Math.min(block.length - offset, this.peerMaxFrameSize);
      const continuation = Buffer.allocUnsafe(frameHeaderLength);
      writeFrameHeader(continuation, 0, size, FrameType.continuation, offset + size === block.length ? FrameFlag.endHeaders : 0, streamId);
      this.queue(continuation);
      this.queue(block.subarray(offset, offset + size));
    }
  }

  /**
   * @internal Counts delivered or discarded DATA bytes and returns window to the peer: `stream`'s,
   * and the connection's on a server connection (a client connection returned it on arrival).
   */
  consumed(stream: H2Stream | undefined, bytes: number): void {
    if (bytes === 0 || this.closed) return;
    if (this.role === "server") this.returnConnectionWindow(bytes);
    if (stream === undefined || stream.closed || stream.remoteEnded) return;
    stream.unackedBytes += bytes;
    if (stream.unackedBytes >= this.limits.streamWindow / 2) {
      this.queue(encodeUint32Frame(FrameType.windowUpdate, stream.id, stream.unackedBytes));
      stream.receiveWindow += stream.unackedBytes;
      stream.unackedBytes = 0;
    }
  }

  private returnConnectionWindow(bytes: number): void {
    this.unackedBytes += bytes;
    if (this.unackedBytes >= this.limits.connectionWindow / 2) {
      this.queue(encodeUint32Frame(FrameType.windowUpdate, 0, this.unackedBytes));
      this.receiveWindow += this.unackedBytes;
      this.unackedBytes = 0;
    }
  }

  /** @internal */
  forget(stream: H2Stream): void {
    this.streams.delete(stream.id);
    if (this.streams.size === 0) this.idleSince = Date.now();
    this.blocked.delete(stream);
    this.congested.delete(stream);
    // Closed on a later turn: the stream's own close handlers are still running.
    if (this.draining && this.streams.size === 0) queueMicrotask(() => this.close());
  }

  private drained(): void {
    if (this.socket.isPaused() && !this.closed) this.socket.resume();
    if (this.congested.size === 0) return;
    const waiting = [...this.congested];
    this.congested.clear();
    for (const stream of waiting) stream.flushQueued();
  }

  private markUnusable(): void {
    if (this.unusable) return;
    this.unusable = true;
    this.onUnusable?.();
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.out.length === 0) return;
    const out = this.out;
    const bytes = this.outBytes;
    this.out = [];
    this.outBytes = 0;
    if (this.socket.destroyed) return;
    if (out.length === 1) {
      this.socket.write(out[0] as Buffer);
    } else if (bytes <= coalesceBytes) {
      this.socket.write(Buffer.concat(out, bytes));
    } else {
      this.socket.cork();
      for (const frame of out) this.socket.write(frame);
      this.socket.uncork();
    }
    if (this.socket.writableLength > socketHardLimit) {
      this.shutDown(new Error("the peer stopped reading"));
      this.socket.destroy();
    } else if (this.socket.writableLength > socketHighWaterMark && !this.socket.isPaused()) {
      // A peer that does not read what we send (PING and SETTINGS replies included) is not read either.
      this.socket.pause();
    }
  }

  private shutDown(error: Error): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    for (const stream of [...this.streams.values()]) stream.close(H2ErrorCode.cancel, error);
    this.streams.clear();
    this.blocked.clear();
    this.congested.clear();
    this.markUnusable();
  }

  private receive(chunk: Buffer): void {
    if (this.closed) return;
    let input = this.pending === undefined ? chunk : Buffer.concat([this.pending, chunk]);
    this.pending = undefined;
    if (this.prefaceRemaining > 0) {
      const take = Math.min(this.prefaceRemaining, input.length);
      const at = clientPreface.length - this.prefaceRemaining;
      if (!input.subarray(0, take).equals(clientPreface.subarray(at, at + take))) {
        // Not HTTP/2 with prior knowledge (an HTTP/1 client, a port scan): nothing to answer.
        this.shutDown(new Error("the peer did not speak HTTP/2"));
        this.socket.destroy();
        return;
      }
      this.prefaceRemaining -= take;
      input = input.subarray(take);
    }
    let offset = 0;
    try {
      while (input.length - offset >= frameHeaderLength) {
        const length = (input[offset]! << 16) | (input[offset + 1]! << 8) | input[offset + 2]!;
        if (length > defaultMaxFrameSize) {
          this.close(H2ErrorCode.frameSizeError);
          return;
        }
        if (input.length - offset - frameHeaderLength < length) break;
        const type = input[offset + 3]!;
        const flags = input[offset + 4]!;
        const streamId = input.readUInt32BE(offset + 5) & 0x7fffffff;
        const payload = input.subarray(offset + frameHeaderLength, offset + frameHeaderLength + length);
        offset += frameHeaderLength + length;
        this.receiveFrame(type, flags, streamId, payload);
        if (this.closed) return;
      }
    } catch (error) {
      // A bug or a peer that broke the protocol in a way not checked above: never crash the sidecar.
      // A connection error (RFC 9113 §5.4.1): GOAWAY with the code, then close.
      this.close(error instanceof ProtocolViolation ? error.errorCode : H2ErrorCode.internalError);
      return;
    }
    if (offset < input.length) this.pending = Buffer.from(input.subarray(offset));
  }

  private receiveFrame(type: number, flags: number, streamId: number, payload: Buffer): void {
    if (this.continuation !== undefined && (type !== FrameType.continuation || streamId !== this.continuation.streamId)) {
      throw new ProtocolViolation(H2ErrorCode.protocolError);
    }
    switch (type) {
      case FrameType.data:
        this.receiveData(flags, streamId, payload);
        return;
      case FrameType.headers:
        this.receiveHeaders(flags, streamId, payload);
        return;
      case FrameType.continuation:
        this.receiveContinuation(flags, streamId, payload);
        return;
      case FrameType.rstStream:
        if (streamId === 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
        if (payload.length !== 4) throw new ProtocolViolation(H2ErrorCode.frameSizeError);
        this.receiveReset(streamId, payload.readUInt32BE(0));
        return;
      case FrameType.settings:
        this.receiveSettings(flags, streamId, payload);
        return;
      case FrameType.ping:
        if (streamId !== 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
        if (payload.length !== 8) throw new ProtocolViolation(H2ErrorCode.frameSizeError);
        if ((flags & FrameFlag.ack) === 0) this.spend("pings", this.limits.maxPingsPerSecond, "ping_flood");
        if ((flags & FrameFlag.ack) === 0) this.queue(encodeFrame(FrameType.ping, FrameFlag.ack, 0, payload));
        return;
      case FrameType.goaway:
        this.receiveGoaway(streamId, payload);
        return;
      case FrameType.windowUpdate:
        this.receiveWindowUpdate(streamId, payload);
        return;
      case FrameType.pushPromise:
        // Clients announce SETTINGS_ENABLE_PUSH=0 and servers never receive one.
        throw new ProtocolViolation(H2ErrorCode.protocolError);
      case FrameType.priority:
        // Nothing the proxy acts on, but still checked (RFC 9113 §6.3).
        if (streamId === 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
        if (payload.length !== 5) this.resetId(streamId, H2ErrorCode.frameSizeError);
        else if ((payload.readUInt32BE(0) & 0x7fffffff) === streamId) this.resetId(streamId, H2ErrorCode.protocolError);
        return;
      default:
        // Unknown frame types carry nothing the proxy acts on.
        return;
    }
  }

  private receiveData(flags: number, streamId: number, payload: Buffer): void {
    if (streamId === 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
    let data = payload;
    if ((flags & FrameFlag.padded) !== 0) {
      const padding = payload[0] ?? 0;
      if (padding >= payload.length) throw new ProtocolViolation(H2ErrorCode.protocolError);
      data = payload.subarray(1, payload.length - padding);
    }
    this.receiveWindow -= payload.length;
    if (this.receiveWindow < 0) throw new ProtocolViolation(H2ErrorCode.flowControlError);
    // On an upstream connection the connection window goes back at once: it is shared by every
    // agent's calls, and one agent that stops reading must not stall the others. Each stream's own
    // window still bounds what it holds.
    if (this.role === "client") this.returnConnectionWindow(payload.length);
    const stream = this.streams.get(streamId);
    if (stream !== undefined && !stream.remoteEnded) {
      stream.receiveWindow -= payload.length;
      if (stream.receiveWindow < 0) {
        // The peer ignored the window: this stream is reset, the connection goes on.
        this.consumed(undefined, payload.length);
        this.resetForMisbehaviour(stream, H2ErrorCode.flowControlError);
        return;
      }
    }
    if (stream === undefined || stream.remoteEnded) {
      // A stream this side already closed: its bytes still count against the connection window.
      this.consumed(undefined, payload.length);
      if (stream !== undefined) this.resetForMisbehaviour(stream, H2ErrorCode.streamClosed);
      else if (this.isIdle(streamId)) throw new ProtocolViolation(H2ErrorCode.protocolError);
      // A stream that ended both ways, or that the peer reset: its DATA is an error (§5.1).
      else if (this.role === "server" && !this.resetByUs.has(streamId)) this.resetId(streamId, H2ErrorCode.streamClosed);
      return;
    }
    this.consumed(stream, payload.length - data.length);
    const endStream = (flags & FrameFlag.endStream) !== 0;
    if (stream.contentLength >= 0) {
      // §8.1.1: DATA that does not add up to content-length makes the request malformed.
      stream.contentLength -= data.length;
      if (stream.contentLength < 0 || (endStream && stream.contentLength !== 0)) {
        this.consumed(undefined, data.length);
        this.resetForMisbehaviour(stream, H2ErrorCode.protocolError);
        return;
      }
    }
    stream.receiveData(data, endStream);
  }

  private receiveHeaders(flags: number, streamId: number, payload: Buffer): void {
    if (streamId === 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
    let start = 0;
    let end = payload.length;
    if ((flags & FrameFlag.padded) !== 0) {
      start = 1;
      end -= payload[0] ?? 0;
    }
    const dependsOnItself = (flags & FrameFlag.priority) !== 0 && payload.length >= start + 4 && (payload.readUInt32BE(start) & 0x7fffffff) === streamId;
    if ((flags & FrameFlag.priority) !== 0) start += 5;
    if (end < start) throw new ProtocolViolation(H2ErrorCode.protocolError);
    if (dependsOnItself) {
      // A stream error (§5.3.1); the header block is still decoded, since it changed the HPACK table.
      if ((flags & FrameFlag.endHeaders) !== 0) {
        this.decodeBlock(payload.subarray(start, end));
        if (this.role === "server" && streamId > this.lastPeerStreamId) this.lastPeerStreamId = streamId;
        this.resetId(streamId, H2ErrorCode.protocolError);
        return;
      }
    }
    const fragment = payload.subarray(start, end);
    const endStream = (flags & FrameFlag.endStream) !== 0;
    if ((flags & FrameFlag.endHeaders) !== 0) {
      this.receiveHeaderBlock(streamId, fragment, endStream);
      return;
    }
    this.continuation = { streamId, endStream, fragments: [Buffer.from(fragment)], bytes: fragment.length };
  }

  private receiveContinuation(flags: number, streamId: number, payload: Buffer): void {
    const continuation = this.continuation;
    if (continuation === undefined || continuation.streamId !== streamId) throw new ProtocolViolation(H2ErrorCode.protocolError);
    // Empty CONTINUATION frames add no bytes but still cost a frame each (CVE-2024-27316): cap their number.
    if (continuation.fragments.length >= maxContinuationFrames) throw new ProtocolViolation(H2ErrorCode.enhanceYourCalm);
    continuation.fragments.push(Buffer.from(payload));
    continuation.bytes += payload.length;
    if (continuation.bytes > this.limits.maxHeaderBlockBytes) throw new ProtocolViolation(H2ErrorCode.enhanceYourCalm);
    if ((flags & FrameFlag.endHeaders) === 0) return;
    this.continuation = undefined;
    this.receiveHeaderBlock(streamId, Buffer.concat(continuation.fragments, continuation.bytes), continuation.endStream);
  }

  private decodeBlock(block: Buffer): HeaderField[] {
    if (block.length > this.limits.maxHeaderBlockBytes) throw new ProtocolViolation(H2ErrorCode.enhanceYourCalm);
    try {
      // Decoded even for streams already closed: the peer's HPACK table changed either way.
      return this.decoder.decode(block);
    } catch {
      throw new ProtocolViolation(H2ErrorCode.compressionError);
    }
  }

  private receiveHeaderBlock(streamId: number, block: Buffer, endStream: boolean): void {
    const fields = this.decodeBlock(block);
    const existing = this.streams.get(streamId);
    if (existing !== undefined) {
      if (existing.remoteEnded) {
        // Half-closed (remote): the peer already ended its side (§5.1).
        this.resetForMisbehaviour(existing, H2ErrorCode.streamClosed);
        return;
      }
      // After a request's headers (or a response's) only trailers may follow, and they end the
      // stream; anything else would sit in a paused stream's inbox outside flow control.
      if (!endStream && (existing.openedByPeer || existing.responseHeadersReceived)) {
        this.resetForMisbehaviour(existing, H2ErrorCode.protocolError);
        return;
      }
      // Request trailers carry no pseudo-header fields (§8.1).
      if (existing.openedByPeer && malformedTrailers(fields)) {
        this.resetForMisbehaviour(existing, H2ErrorCode.protocolError);
        return;
      }
      existing.receiveHeaders(fields, endStream);
      return;
    }
    if (this.role === "client") return;
    if (streamId % 2 === 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
    if (streamId <= this.lastPeerStreamId) {
      // Trailers of a stream this side reset, sent before the peer saw the reset: ignored. Any other
      // HEADERS on a lower id reopens a closed stream or opens one out of order (§5.1, §5.1.1).
      if (this.resetByUs.has(streamId)) return;
      throw new ProtocolViolation(H2ErrorCode.protocolError);
    }
    this.lastPeerStreamId = streamId;
    const stream = new H2Stream(this, streamId, this.peerInitialWindow, true);
    if (this.streams.size >= this.limits.maxConcurrentStreams) {
      this.resetId(streamId, H2ErrorCode.refusedStream);
      return;
    }
    const contentLength = malformedRequest(fields);
    if (contentLength === malformed) {
      // RFC 9113 §8.1.1: a malformed request is a stream error; it is never forwarded.
      this.resetForMisbehaviour(stream, H2ErrorCode.protocolError);
      return;
    }
    this.streams.set(streamId, stream);
    stream.headers = toHeaderObject(fields);
    stream.contentLength = contentLength;
    if (endStream) {
      if (contentLength > 0) {
        this.resetForMisbehaviour(stream, H2ErrorCode.protocolError);
        return;
      }
      stream.receiveData(emptyBuffer, true);
    }
    this.onStream?.(stream);
  }

  /** Sends RST_STREAM for a stream that has no stream object (idle, refused or closed); counts toward the reset budget. */
  private resetId(streamId: number, code: number): void {
    this.queue(encodeUint32Frame(FrameType.rstStream, streamId, code));
    this.noteReset(streamId);
    this.countReset();
  }

  /** @internal Remembers that this side reset a peer's stream, so frames already in flight are ignored. */
  noteReset(streamId: number): void {
    if (this.role !== "server") return;
    if (this.resetByUs.size >= maxRememberedResets) this.resetByUs.delete(this.resetByUs.values().next().value ?? 0);
    this.resetByUs.add(streamId);
  }

  private receiveSettings(flags: number, streamId: number, payload: Buffer): void {
    if (streamId !== 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
    if ((flags & FrameFlag.ack) !== 0) {
      if (payload.length !== 0) throw new ProtocolViolation(H2ErrorCode.frameSizeError);
      return;
    }
    if (payload.length % 6 !== 0) throw new ProtocolViolation(H2ErrorCode.frameSizeError);
    if (!this.handshaken && this.role === "server") this.handshakeDone();
    else this.spend("settings", this.limits.maxSettingsPerSecond, "settings_flood");
    let initialWindow: number | undefined;
    for (let offset = 0; offset < payload.length; offset += 6) {
      const id = payload.readUInt16BE(offset);
      const value = payload.readUInt32BE(offset + 2);
      if (id === SettingId.initialWindowSize) {
        if (value > maxWindowSize) throw new ProtocolViolation(H2ErrorCode.flowControlError);
        initialWindow = value;
      } else if (id === SettingId.maxFrameSize) {
        if (value < defaultMaxFrameSize || value > 16_777_215) throw new ProtocolViolation(H2ErrorCode.protocolError);
        this.peerMaxFrameSize = value;
      } else if (id === SettingId.maxConcurrentStreams) {
        this.peerMaxConcurrentStreams = value;
      } else if (id === SettingId.enablePush && value > 1) {
        throw new ProtocolViolation(H2ErrorCode.protocolError);
      }
      // HEADER_TABLE_SIZE needs nothing: the encoder never uses the peer's dynamic table.
    }
    // Only the last INITIAL_WINDOW_SIZE of a frame counts, so a frame repeating it costs one pass.
    if (initialWindow !== undefined && initialWindow !== this.peerInitialWindow) {
      const delta = initialWindow - this.peerInitialWindow;
      this.peerInitialWindow = initialWindow;
      for (const stream of this.streams.values()) {
        stream.sendWindow += delta;
        if (stream.sendWindow > maxWindowSize) throw new ProtocolViolation(H2ErrorCode.flowControlError);
      }
    }
    this.queue(encodeFrame(FrameType.settings, FrameFlag.ack, 0));
    this.unblock();
  }

  private receiveGoaway(streamId: number, payload: Buffer): void {
    if (streamId !== 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
    if (payload.length < 8) throw new ProtocolViolation(H2ErrorCode.frameSizeError);
    const lastStreamId = payload.readUInt32BE(0) & 0x7fffffff;
    this.goawayReceived = true;
    if (this.role === "client") {
      // Streams past the last one the peer will process were never seen by it: safe to retry, so REFUSED_STREAM.
      for (const stream of [...this.streams.values()]) {
        if (stream.id > lastStreamId) stream.close(H2ErrorCode.refusedStream);
      }
    }
    this.markUnusable();
  }

  private receiveWindowUpdate(streamId: number, payload: Buffer): void {
    if (payload.length !== 4) throw new ProtocolViolation(H2ErrorCode.frameSizeError);
    const increment = payload.readUInt32BE(0) & 0x7fffffff;
    if (streamId === 0) {
      if (increment === 0) throw new ProtocolViolation(H2ErrorCode.protocolError);
      this.sendWindow += increment;
      if (this.sendWindow > maxWindowSize) throw new ProtocolViolation(H2ErrorCode.flowControlError);
      this.unblock();
      return;
    }
    const stream = this.streams.get(streamId);
    if (stream === undefined) {
      if (this.isIdle(streamId)) throw new ProtocolViolation(H2ErrorCode.protocolError);
      return;
    }
    if (increment === 0) {
      this.resetForMisbehaviour(stream, H2ErrorCode.protocolError);
      return;
    }
    stream.sendWindow += increment;
    if (stream.sendWindow > maxWindowSize) {
      this.resetForMisbehaviour(stream, H2ErrorCode.flowControlError);
      return;
    }
    if (this.blocked.delete(stream)) stream.flushQueued();
  }

  private unblock(): void {
    if (this.blocked.size === 0) return;
    const waiting = [...this.blocked];
    this.blocked.clear();
    for (const stream of waiting) {
      if (this.sendWindow <= 0) {
        this.blocked.add(stream);
        continue;
      }
      stream.flushQueued();
    }
  }

  private receiveReset(streamId: number, code: number): void {
    const stream = this.streams.get(streamId);
    if (stream === undefined) {
      if (this.isIdle(streamId)) throw new ProtocolViolation(H2ErrorCode.protocolError);
      return;
    }
    this.countReset();
    stream.close(code);
  }

  /**
   * Opening streams and having them reset at once costs the peer nothing and us a call each
   * (CVE-2023-44487), whether the peer resets them or makes us do it (CVE-2025-8671).
   */
  private countReset(): void {
    this.spend("resets", this.limits.maxResetsPerSecond, "reset_flood");
  }

  /** Spends one unit of a per-second budget of a server connection; past it, GOAWAY ENHANCE_YOUR_CALM. */
  private spend(budget: "resets" | "settings" | "pings", perSecond: number, limit: LimitName): void {
    if (this.role !== "server") return;
    const state = this.budgets[budget];
    const now = Date.now();
    if (now - state.since >= 1000) {
      state.since = now;
      state.count = 0;
    }
    if (++state.count > perSecond) {
      this.onLimit?.(limit);
      throw new ProtocolViolation(H2ErrorCode.enhanceYourCalm);
    }
  }

  /** The client's preface and first SETTINGS arrived: the handshake deadline gives way to the idle check. */
  private handshakeDone(): void {
    this.handshaken = true;
    clearTimeout(this.timer);
    this.idleSince = Date.now();
    this.armIdle(this.limits.idleTimeoutMs);
  }

  private armIdle(ms: number): void {
    // One timer per connection, never touched per stream: a stream only moves idleSince when the last one closes.
    this.timer = setTimeout(() => {
      if (this.closed) return;
      const idleFor = Date.now() - this.idleSince;
      if (this.streams.size > 0 || idleFor < this.limits.idleTimeoutMs) {
        this.armIdle(this.streams.size > 0 ? this.limits.idleTimeoutMs : this.limits.idleTimeoutMs - idleFor);
        return;
      }
      this.onLimit?.("idle_timeout");
      this.close(H2ErrorCode.noError);
    }, ms);
    this.timer.unref();
  }

  /** Resets a stream because its peer broke the protocol on it; counts toward the reset budget. */
  private resetForMisbehaviour(stream: H2Stream, code: number): void {
    stream.reset(code);
    this.countReset();
  }

  private isIdle(streamId: number): boolean {
    return this.role === "server" ? streamId > this.lastPeerStreamId : streamId >= this.nextStreamId;
  }
}

/**
 * One HTTP/2 stream. Its owner sets the callback slots it needs; each fires
 * in order: headers and data as they arrive, `onend` once the peer's
 * END_STREAM is delivered, `onclose` exactly once when the stream is over
 * (ended both ways, reset by either side, or its connection gone).
 */
export class H2Stream {
  readonly id: number;
  readonly connection: H2Connection;
  /** Request headers of a stream a peer opened; empty on streams this side opened. */
  headers: IncomingHttpHeaders = {};
  ondata: ((chunk: Buffer) => void) | undefined;
  onend: (() => void) | undefined;
  /** Response headers and trailers (client streams); trailers come with `endStream`. */
  onheaders: ((fields: HeaderField[], endStream: boolean) => void) | undefined;
  /** The stream is over: `code` is the RST_STREAM code (NO_ERROR when it ended cleanly); `error` is set when the connection failed. */
  onclose: ((code: number, error: Error | undefined) => void) | undefined;
  /** Writes may continue after `write` returned false. */
  ondrain: (() => void) | undefined;

  headersSent = false;
  /** The peer's END_STREAM has been delivered through `onend`. */
  readableEnded = false;
  /** This side has sent END_STREAM (or queued it behind data waiting for window). */
  localEnded = false;
  closed = false;
  /** @internal */
  remoteEnded = false;
  /** @internal */
  sendWindow: number;
  /** @internal */
  unackedBytes = 0;
  /** @internal Bytes the peer may still send on this stream. */
  receiveWindow: number;
  private paused: boolean;
  /** @internal A peer opened this stream (a request to this server). */
  readonly openedByPeer: boolean;
  /** @internal A response's headers have arrived (client streams). */
  responseHeadersReceived = false;
  /** @internal Request bytes still expected by the request's content-length; -1 without one. */
  contentLength = -1;
  private readonly inbox: Array<Buffer | { readonly fields: HeaderField[]; readonly endStream: boolean }> = [];
  private outbox: Buffer[] = [];
  private outboxBytes = 0;
  private trailersQueued: Buffer | undefined;
  private endQueued = false;
  private writerWaiting = false;
  private delivering = false;

  /** @internal */
  constructor(connection: H2Connection, id: number, sendWindow: number, openedByPeer: boolean) {
    this.connection = connection;
    this.id = id;
    this.sendWindow = sendWindow;
    this.openedByPeer = openedByPeer;
    // The peer may send against the default window until it has seen our SETTINGS.
    this.receiveWindow = Math.max(connection.streamWindow, defaultWindowSize);
    // A request stream waits for its owner to decide what to do with the body, as node's streams do.
    this.paused = openedByPeer;
  }

  /** Sends headers (response headers, trailers, or a client's request headers). */
  sendHeaders(fields: Iterable<HeaderField>, endStream: boolean, sensitive?: ReadonlySet<string>): void {
    if (this.closed || this.localEnded) return;
    const block = encodeHeaderBlock(fields, sensitive);
    this.headersSent = true;
    if (endStream && (this.outboxBytes > 0 || this.outbox.length > 0)) {
      // Trailers go after the DATA still waiting for window.
      this.trailersQueued = block;
      this.localEnded = true;
      return;
    }
    this.connection.sendHeaderBlock(this.id, block, endStream);
    if (endStream) {
      this.localEnded = true;
      this.endedLocally();
    }
  }

  /** Sends DATA. Returns false when the caller should wait for `ondrain` before writing more. */
  write(chunk: Buffer): boolean {
    if (this.closed || this.localEnded || chunk.length === 0) return true;
    let rest = chunk;
    if (this.outbox.length === 0) {
      const sent = this.connection.sendData(this, chunk, false);
      if (sent === chunk.length) return this.checkSocket();
      rest = chunk.subarray(sent);
    }
    this.outbox.push(rest);
    this.outboxBytes += rest.length;
    if (this.outboxBytes < streamHighWaterMark) return true;
    this.writerWaiting = true;
    return false;
  }

  /** Sends DATA after checking the socket: false asks the writer to wait for `ondrain`. */
  private checkSocket(): boolean {
    if (!this.connection.waitForDrain(this)) return true;
    this.writerWaiting = true;
    return false;
  }

  /** Half-closes this side: END_STREAM after the DATA already written. */
  end(): void {
    if (this.closed || this.localEnded) return;
    this.localEnded = true;
    if (this.outbox.length > 0) {
      this.endQueued = true;
      return;
    }
    this.connection.queue(encodeFrame(FrameType.data, FrameFlag.endStream, this.id));
    this.endedLocally();
  }

  /** Resets the stream (RST_STREAM) with `code`; `onclose` fires with it. */
  reset(code: number): void {
    if (this.closed) return;
    // END_STREAM sent both ways means the stream is closed for the peer already: a RST_STREAM then
    // is a frame on a closed stream, which node:http2 counts as invalid (GOAWAY after 1,000).
    const endSent = this.localEnded && this.trailersQueued === undefined && !this.endQueued;
    if (!(endSent && this.remoteEnded)) {
      this.connection.queue(encodeUint32Frame(FrameType.rstStream, this.id, code));
      if (this.openedByPeer) this.connection.noteReset(this.id);
    }
    this.close(code);
  }

  /** Stops delivering DATA; what arrives is held, and the peer's window is not refilled, until `resume`. */
  pause(): void {
    this.paused = true;
  }

  /** Delivers what arrived while paused, then keeps delivering as DATA arrives. */
  resume(): void {
    this.paused = false;
    this.deliverInbox();
  }

  /** @internal */
  receiveData(chunk: Buffer, endStream: boolean): void {
    if (endStream) this.remoteEnded = true;
    if (this.paused || this.inbox.length > 0 || this.delivering) {
      if (chunk.length > 0) this.inbox.push(chunk);
      this.deliverInbox();
      return;
    }
    if (chunk.length > 0) {
      this.connection.consumed(this, chunk.length);
      this.ondata?.(chunk);
    }
    if (this.remoteEnded && !this.paused && !this.closed && this.inbox.length === 0) this.endedRemotely();
  }

  /** @internal */
  receiveHeaders(fields: HeaderField[], endStream: boolean): void {
    if (this.remoteEnded) return;
    this.responseHeadersReceived = true;
    if (endStream) this.remoteEnded = true;
    if (this.paused || this.inbox.length > 0 || this.delivering) {
      this.inbox.push({ fields, endStream });
      this.deliverInbox();
      return;
    }
    this.onheaders?.(fields, endStream);
    if (endStream && !this.closed) this.endedRemotely();
  }

  /** @internal Sends queued DATA (and a queued END_STREAM or trailers) as the windows allow. */
  flushQueued(): void {
    while (this.outbox.length > 0 && !this.closed) {
      const chunk = this.outbox[0]!;
      const sent = this.connection.sendData(this, chunk, false);
      this.outboxBytes -= sent;
      if (sent < chunk.length) {
        this.outbox[0] = chunk.subarray(sent);
        return;
      }
      this.outbox.shift();
    }
    if (this.closed) return;
    if (this.trailersQueued !== undefined) {
      const trailers = this.trailersQueued;
      this.trailersQueued = undefined;
      this.connection.sendHeaderBlock(this.id, trailers, true);
      this.endedLocally();
      return;
    }
    if (this.endQueued) {
      this.endQueued = false;
      this.connection.queue(encodeFrame(FrameType.data, FrameFlag.endStream, this.id));
      this.endedLocally();
      return;
    }
    if (this.writerWaiting) {
      this.writerWaiting = false;
      this.ondrain?.();
    }
  }

  /** @internal Ends the stream's life: no more frames either way. */
  close(code: number, error?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.connection.forget(this);
    let undelivered = 0;
    for (const item of this.inbox) if (Buffer.isBuffer(item)) undelivered += item.length;
    this.inbox.length = 0;
    this.outbox = [];
    this.outboxBytes = 0;
    this.connection.consumed(undefined, undelivered);
    this.onclose?.(code, error);
  }

  private deliverInbox(): void {
    if (this.delivering) return;
    this.delivering = true;
    try {
      while (!this.paused && !this.closed && this.inbox.length > 0) {
        const item = this.inbox.shift()!;
        if (Buffer.isBuffer(item)) {
          this.connection.consumed(this, item.length);
          this.ondata?.(item);
        } else {
          this.onheaders?.(item.fields, item.endStream);
        }
      }
    } finally {
      this.delivering = false;
    }
    if (this.remoteEnded && !this.paused && !this.closed && !this.readableEnded && this.inbox.length === 0) this.endedRemotely();
  }

  private endedRemotely(): void {
    if (this.readableEnded) return;
    this.readableEnded = true;
    this.onend?.();
    if (this.localEnded && !this.closed && this.outbox.length === 0 && this.trailersQueued === undefined && !this.endQueued) this.close(H2ErrorCode.noError);
  }

  private endedLocally(): void {
    if (this.closed) return;
    if (this.openedByPeer) {
      // The response is complete, so the rest of the request no longer matters. A server may answer
      // before the request is over (RFC 9113 §8.1): RST_STREAM(NO_ERROR) asks the client to stop sending.
      if (this.remoteEnded) this.close(H2ErrorCode.noError);
      else this.reset(H2ErrorCode.noError);
      return;
    }
    if (this.readableEnded) this.close(H2ErrorCode.noError);
  }
}

/** Thrown inside the frame loop for a connection error; never leaves the connection. */
class ProtocolViolation extends Error {
  readonly errorCode: number;
  constructor(errorCode: number) {
    super(`HTTP/2 connection error ${errorCode}`);
    this.errorCode = errorCode;
  }
}

const emptyBuffer = Buffer.alloc(0);

/** Request fields as node's header object: repeated fields become arrays. */
function toHeaderObject(fields: readonly HeaderField[]): IncomingHttpHeaders {
  // No prototype: a field named __proto__ must stay a field.
  const headers = Object.create(null) as IncomingHttpHeaders;
  for (const [name, value] of fields) {
    const existing = headers[name];
    if (existing === undefined) headers[name] = value;
    else if (Array.isArray(existing)) existing.push(value);
    else headers[name] = [existing, value];
  }
  return headers;
}

/** A field value with NUL, CR or LF (RFC 9113 §8.2.1). */
function invalidValue(value: string): boolean {
  return value.includes("\r") || value.includes("\n") || value.includes("\0");
}

/** An HTTP method: a token (RFC 9110 §5.6.2). Empty is not one (found by the differential fuzzer). */
const tokenPattern = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** A URI scheme (RFC 3986 §3.1). */
const schemePattern = /^[A-Za-z][A-Za-z0-9+.-]*$/;
/** An authority (host and port, RFC 3986 §3.2), with the characters nghttp2 accepts; not empty. */
const authorityPattern = /^[A-Za-z0-9\-._~%!$&'()*+,;=:@[\]]+$/;

/** {@link malformedRequest}'s answer for a malformed request. */
const malformed = -2;

/** Fields that are only about one HTTP/1.1 connection and make an HTTP/2 message malformed (§8.2.2). */
const connectionSpecific: ReadonlySet<string> = new Set(["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"]);

/**
 * Checks a request's header fields (RFC 9113 §8.1.1, 8.2, 8.3): exactly one
 * each of `:method`, `:scheme` and a non-empty `:path`, at most one
 * `:authority`, no other pseudo-header and none after a regular field, no
 * connection-specific field, `te` only as `trailers`, no NUL/CR/LF in values,
 * a content-length of digits, and a `host` that is not empty and, next to
 * `:authority`, the same (§8.3.1); `:method` a token, `:scheme` a scheme,
 * `:path` starting with `/`, `:authority` and `host` of authority characters
 * (the differential fuzzer against nghttp2 found the last two groups). CONNECT
 * is refused (no gRPC call uses it).
 * @returns {@link malformed}, or the content-length (-1 when absent).
 */
function malformedRequest(fields: readonly HeaderField[]): number {
  let method = 0;
  let scheme = 0;
  let path = 0;
  let authority = 0;
  let authorityValue: string | undefined;
  let host: string | undefined;
  let regular = false;
  let contentLength = -1;
  for (const [name, value] of fields) {
    if (invalidValue(value)) return malformed;
    if (name.charCodeAt(0) === 58 /* ':' */) {
      if (regular) return malformed;
      if (name === ":method") {
        if (++method > 1 || value === "CONNECT" || !tokenPattern.test(value)) return malformed;
      } else if (name === ":scheme") {
        if (++scheme > 1 || !schemePattern.test(value)) return malformed;
      } else if (name === ":path") {
        if (++path > 1 || value.charCodeAt(0) !== 47 /* '/' */) return malformed;
      } else if (name === ":authority") {
        if (++authority > 1 || !authorityPattern.test(value)) return malformed;
        authorityValue = value;
      } else {
        return malformed;
      }
      continue;
    }
    regular = true;
    if (name === "te") {
      if (value !== "trailers") return malformed;
    } else if (name === "content-length") {
      if (contentLength !== -1 || !/^[0-9]{1,15}$/.test(value)) return malformed;
      contentLength = Number(value);
    } else if (name === "host") {
      if (host !== undefined || !authorityPattern.test(value)) return malformed;
      host = value;
    } else if (connectionSpecific.has(name)) {
      return malformed;
    }
  }
  if (host !== undefined && authorityValue !== undefined && host !== authorityValue) return malformed;
  return method === 1 && scheme === 1 && path === 1 ? contentLength : malformed;
}

/** Request trailers: no pseudo-header fields, no connection-specific fields, no NUL/CR/LF. */
function malformedTrailers(fields: readonly HeaderField[]): boolean {
  for (const [name, value] of fields) {
    if (name.charCodeAt(0) === 58 || connectionSpecific.has(name) || invalidValue(value)) return true;
  }
  return false;
}
