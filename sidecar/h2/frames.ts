/**
 * HTTP/2 framing (RFC 9113 §4, §6): the numbers the sidecar's data plane reads
 * and writes, and the 9-byte frame header.
 * @module
 */

/** Frame types the data plane acts on; others are ignored, as RFC 9113 §4.1 asks. */
export const FrameType = {
  data: 0x0,
  headers: 0x1,
  priority: 0x2,
  rstStream: 0x3,
  settings: 0x4,
  pushPromise: 0x5,
  ping: 0x6,
  goaway: 0x7,
  windowUpdate: 0x8,
  continuation: 0x9,
} as const;

/** Frame flags. `ack` and `endStream` share a bit: which one it means depends on the frame type. */
export const FrameFlag = {
  endStream: 0x1,
  ack: 0x1,
  endHeaders: 0x4,
  padded: 0x8,
  priority: 0x20,
} as const;

/** RST_STREAM and GOAWAY error codes (RFC 9113 §7). */
export const H2ErrorCode = {
  noError: 0x0,
  protocolError: 0x1,
  internalError: 0x2,
  flowControlError: 0x3,
  streamClosed: 0x5,
  frameSizeError: 0x6,
  refusedStream: 0x7,
  cancel: 0x8,
  compressionError: 0x9,
  enhanceYourCalm: 0xb,
} as const;

/** SETTINGS identifiers (RFC 9113 §6.5.2). */
export const SettingId = {
  headerTableSize: 0x1,
  enablePush: 0x2,
  maxConcurrentStreams: 0x3,
  initialWindowSize: 0x4,
  maxFrameSize: 0x5,
  maxHeaderListSize: 0x6,
} as const;

/** The connection preface a client sends before its first frame. */
export const clientPreface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/** Length of the header in front of every frame's payload. */
export const frameHeaderLength = 9;

/** The smallest SETTINGS_MAX_FRAME_SIZE a peer may announce, and everybody's starting value. */
export const defaultMaxFrameSize = 16_384;

/** The flow-control window every stream and connection starts with. */
export const defaultWindowSize = 65_535;

/** The largest flow-control window RFC 9113 §6.9.1 allows. */
export const maxWindowSize = 2 ** 31 - 1;

/** Writes a frame header into `target` at `offset`. */
export function writeFrameHeader(target: Buffer, offset: number, length: number, type: number, flags: number, streamId: number): void {
  target[offset] = (length >>> 16) & 0xff;
  target[offset + 1] = (length >>> 8) & 0xff;
  target[offset + 2] = length & 0xff;
  target[offset + 3] = type;
  target[offset + 4] = flags;
  target.writeUInt32BE(streamId, offset + 5);
}

/** A whole frame: header and payload in one buffer. */
export function encodeFrame(type: number, flags: number, streamId: number, payload?: Uint8Array): Buffer {
  const length = payload?.length ?? 0;
  const frame = Buffer.allocUnsafe(frameHeaderLength + length);
  writeFrameHeader(frame, 0, length, type, flags, streamId);
  if (payload !== undefined) frame.set(payload, frameHeaderLength);
  return frame;
}

/** A RST_STREAM or WINDOW_UPDATE style frame: a header and one 32-bit value. */
export function encodeUint32Frame(type: number, streamId: number, value: number): Buffer {
  const frame = Buffer.allocUnsafe(frameHeaderLength + 4);
  writeFrameHeader(frame, 0, 4, type, 0, streamId);
  frame.writeUInt32BE(value >>> 0, frameHeaderLength);
  return frame;
}

/** A SETTINGS frame carrying `settings` as (identifier, value) pairs. */
export function encodeSettings(settings: ReadonlyArray<readonly [number, number]>): Buffer {
  const frame = Buffer.allocUnsafe(frameHeaderLength + settings.length * 6);
  writeFrameHeader(frame, 0, settings.length * 6, FrameType.settings, 0, 0);
  let offset = frameHeaderLength;
  for (const [id, value] of settings) {
    frame.writeUInt16BE(id, offset);
    frame.writeUInt32BE(value >>> 0, offset + 2);
    offset += 6;
  }
  return frame;
}

/** A GOAWAY frame naming the last stream this side will process. */
export function encodeGoaway(lastStreamId: number, errorCode: number): Buffer {
  const frame = Buffer.allocUnsafe(frameHeaderLength + 8);
  writeFrameHeader(frame, 0, 8, FrameType.goaway, 0, 0);
  frame.writeUInt32BE(lastStreamId, frameHeaderLength);
  frame.writeUInt32BE(errorCode, frameHeaderLength + 4);
  return frame;
}
