/**
 * Raw HTTP/2 frames for tests (RFC 9113 §4, §6), written independently of
 * `sidecar/h2` so a test can speak to the data plane (or to node:http2) the way
 * a misbehaving or exotic peer would.
 */

/** Frame type numbers. */
export const frameType = { data: 0x0, headers: 0x1, rstStream: 0x3, settings: 0x4, ping: 0x6, goaway: 0x7, windowUpdate: 0x8, continuation: 0x9 } as const;

/** Frame flags (`ack` and `endStream` share a bit). */
export const frameFlag = { ack: 0x1, endStream: 0x1, endHeaders: 0x4, padded: 0x8, priority: 0x20 } as const;

/** The connection preface a client sends first. */
export const clientPreface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/** One frame as read off a socket. */
export interface Frame {
  readonly type: number;
  readonly flags: number;
  readonly streamId: number;
  readonly payload: Buffer;
}

/** A whole frame: the 9-byte header, then `payload`. */
export function frame(type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(payload.length, 0, 3);
  header[3] = type;
  header[4] = flags;
  header.writeUInt32BE(streamId, 5);
  return Buffer.concat([header, payload]);
}

/** A SETTINGS frame with the given (identifier, value) pairs. */
export function settingsFrame(settings: ReadonlyArray<readonly [number, number]>): Buffer {
  const payload = Buffer.alloc(settings.length * 6);
  settings.forEach(([id, value], i) => {
    payload.writeUInt16BE(id, i * 6);
    payload.writeUInt32BE(value, i * 6 + 2);
  });
  return frame(frameType.settings, 0, 0, payload);
}

/**
 * Cuts a byte stream into frames: push each chunk, get the frames it completed.
 * Bytes of an incomplete frame are kept for the next chunk.
 */
export class FrameSplitter {
  private pending: Buffer = Buffer.alloc(0);

  /** Adds `chunk`; returns the frames it completed. */
  push(chunk: Buffer): Frame[] {
    this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
    const frames: Frame[] = [];
    while (this.pending.length >= 9) {
      const length = this.pending.readUIntBE(0, 3);
      if (this.pending.length < 9 + length) break;
      frames.push({ type: this.pending[3]!, flags: this.pending[4]!, streamId: this.pending.readUInt32BE(5) & 0x7fffffff, payload: this.pending.subarray(9, 9 + length) });
      this.pending = this.pending.subarray(9 + length);
    }
    return frames;
  }
}
