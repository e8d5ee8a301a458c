import { AirlockError, Code, codeName } from "../common/errors.js";
import type { HeaderField } from "./h2/hpack.js";

/** The length prefix of every gRPC message: 1 byte compressed flag, 4 bytes big-endian length. */
const prefixLength = 5;

/**
 * The trailers-only response the sidecar answers with when it ends a call
 * itself (deny, unauthenticated, unimplemented, …): HTTP 200 with grpc-status
 * and a percent-encoded grpc-message, plus Airlock's own details header.
 */
export function statusResponse(code: Code, message: string, details: Readonly<Record<string, unknown>> = {}): HeaderField[] {
  const fields: HeaderField[] = [
    [":status", "200"],
    ["content-type", "application/grpc"],
    ["grpc-status", String(code)],
    ["grpc-message", encodeGrpcMessage(message)],
    ["x-airlock-error-code", codeName(code)],
  ];
  // \u escapes keep the value ASCII, so it reads the same whatever charset a client assumes for header bytes.
  if (Object.keys(details).length > 0) fields.push(["x-airlock-error-details", JSON.stringify(details).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`)]);
  const requestId = details.requestId;
  if (typeof requestId === "string") fields.push(["x-airlock-request-id", requestId]);
  return fields;
}

/** Percent-encodes a status message as the gRPC over HTTP/2 spec asks (printable ASCII but '%' stays as is). */
export function encodeGrpcMessage(message: string): string {
  let encoded = "";
  for (const byte of Buffer.from(message, "utf8")) {
    encoded += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return encoded;
}

/** Adds the 5-byte gRPC prefix to a serialized message. */
export function frameMessage(payload: Uint8Array): Buffer {
  const framed = Buffer.allocUnsafe(prefixLength + payload.length);
  framed.writeUInt8(0, 0);
  framed.writeUInt32BE(payload.length, 1);
  framed.set(payload, prefixLength);
  return framed;
}

/**
 * Follows message boundaries in a gRPC byte stream without copying the bytes:
 * the allow path forwards chunks untouched and only reads each 5-byte prefix,
 * so an oversized message is refused before it is forwarded whole.
 */
export class MessageSizeGuard {
  private readonly limit: number;
  /** Bytes of the current message's payload still to come. */
  private remaining = 0;
  /** Prefix bytes seen so far of a prefix split across chunks. */
  private prefixFill = 0;
  /**
   * The length read so far from a prefix split across chunks. A number, not a
   * buffer: a guard is made for every forwarded call, and a Buffer allocated for each showed in the allow path's profile.
   */
  private partialSize = 0;

  constructor(limit: number) {
    this.limit = limit;
  }

  /** Inspects the next chunk; returns the size of the first message over the limit, or undefined. */
  inspect(chunk: Buffer): number | undefined {
    let offset = 0;
    while (offset < chunk.length) {
      if (this.remaining > 0) {
        const take = Math.min(this.remaining, chunk.length - offset);
        this.remaining -= take;
        offset += take;
        continue;
      }
      let size: number;
      if (this.prefixFill === 0 && chunk.length - offset >= prefixLength) {
        size = chunk.readUInt32BE(offset + 1);
        offset += prefixLength;
      } else {
        // Byte 0 is the compressed flag; bytes 1–4 the big-endian length.
        if (this.prefixFill > 0) this.partialSize = this.partialSize * 256 + chunk[offset]!;
        this.prefixFill++;
        offset++;
        if (this.prefixFill < prefixLength) continue;
        size = this.partialSize;
        this.prefixFill = 0;
        this.partialSize = 0;
      }
      if (size > this.limit) return size;
      this.remaining = size;
    }
    return undefined;
  }
}

/** A complete gRPC message taken from a byte stream. */
export interface GrpcMessage {
  readonly compressed: boolean;
  readonly payload: Buffer;
  /** The message as it travelled: prefix and payload. */
  readonly framed: Buffer;
}

/**
 * Cuts a gRPC byte stream into whole messages, for the paths that must decode
 * (a rule reads request fields, or the call is held for approval).
 */
export class MessageReader {
  private pending: Buffer = Buffer.alloc(0);
  private readonly limit: number;

  constructor(limit: number) {
    this.limit = limit;
  }

  /** Adds a chunk and returns the messages it completed; a message over the limit is RESOURCE_EXHAUSTED. */
  push(chunk: Buffer): GrpcMessage[] {
    this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
    const messages: GrpcMessage[] = [];
    for (;;) {
      if (this.pending.length < prefixLength) break;
      const size = this.pending.readUInt32BE(1);
      if (size > this.limit) throw messageTooLarge(size, this.limit);
      if (this.pending.length < prefixLength + size) break;
      const framed = this.pending.subarray(0, prefixLength + size);
      messages.push({ compressed: framed[0] === 1, payload: framed.subarray(prefixLength), framed });
      this.pending = this.pending.subarray(prefixLength + size);
    }
    return messages;
  }

  /** The bytes received that do not make a whole message yet (left in place). */
  peekPartial(): Buffer {
    return this.pending;
  }

  /** Bytes received that do not make a whole message yet. */
  get partialBytes(): number {
    return this.pending.length;
  }
}

/** The error for a request message over the size limit. */
export function messageTooLarge(size: number, limit: number): AirlockError {
  return new AirlockError(Code.ResourceExhausted, `request message of ${size} bytes is over the limit of ${limit}`, { details: { size, limit } });
}
