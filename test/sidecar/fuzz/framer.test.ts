/**
 * Fuzzing the gRPC message framer (sidecar/wire.ts) with fast-check: any
 * sequence of messages, cut into chunks anywhere, comes out of MessageReader
 * exactly as it went in, and MessageSizeGuard names the first oversized message
 * whatever the cuts. Time-bounded (test/helpers/fuzz.ts); `npm run fuzz` runs it long.
 */
import fc from "fast-check";
import t from "tap";
import { MessageReader, MessageSizeGuard } from "../../../sidecar/wire.js";
import { corpus, fuzzParameters } from "../../helpers/fuzz.js";

const limit = 64;

/** A message: payload bytes and its compressed flag. */
const message = fc.record({ payload: fc.uint8Array({ maxLength: 96 }), compressed: fc.boolean() });

function framed(m: { payload: Uint8Array; compressed: boolean }): Buffer {
  const out = Buffer.alloc(5 + m.payload.length);
  out[0] = m.compressed ? 1 : 0;
  out.writeUInt32BE(m.payload.length, 1);
  out.set(m.payload, 5);
  return out;
}

/** `bytes` cut at the given points (each taken modulo the length). */
function cut(bytes: Buffer, points: number[]): Buffer[] {
  const at = [...new Set(points.map((p) => (bytes.length === 0 ? 0 : p % bytes.length)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let last = 0;
  for (const point of at) {
    if (point > last) chunks.push(bytes.subarray(last, point));
    last = Math.max(last, point);
  }
  chunks.push(bytes.subarray(last));
  return chunks;
}

await t.test("MessageReader returns every message as sent, whatever the chunking; oversized ones are refused", async (t) => {
  fc.assert(
    fc.property(fc.array(message, { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 20 }), (messages, points) => {
      const wire = Buffer.concat(messages.map(framed));
      const reader = new MessageReader(limit);
      const got: { payload: Buffer; compressed: boolean }[] = [];
      const firstTooLarge = messages.findIndex((m) => m.payload.length > limit);
      try {
        for (const chunk of cut(wire, points)) for (const m of reader.push(chunk)) got.push({ payload: Buffer.from(m.payload), compressed: m.compressed });
      } catch (error) {
        // Only an oversized message may stop the reader, and only once every message before it came out.
        if (firstTooLarge < 0) throw error;
        if (got.length !== firstTooLarge) throw new Error(`refused after ${got.length} messages, expected ${firstTooLarge}`, { cause: error });
        return;
      }
      if (firstTooLarge >= 0) throw new Error("an oversized message was not refused");
      if (got.length !== messages.length || reader.partialBytes !== 0) throw new Error("messages lost or left over");
      messages.forEach((m, i) => {
        if (!Buffer.from(m.payload).equals(got[i]!.payload) || m.compressed !== got[i]!.compressed) throw new Error(`message ${i} differs`);
      });
    }),
    fuzzParameters(),
  );
  t.pass("property held for the time budget");
});

await t.test("MessageSizeGuard flags the first oversized message at the same place MessageReader does", async (t) => {
  fc.assert(
    fc.property(fc.array(fc.nat({ max: 120 }), { maxLength: 10 }), fc.array(fc.nat(), { maxLength: 20 }), (sizes, points) => {
      const wire = Buffer.concat(sizes.map((size) => framed({ payload: new Uint8Array(size), compressed: false })));
      const guard = new MessageSizeGuard(limit);
      let flagged: number | undefined;
      for (const chunk of cut(wire, points)) {
        flagged = guard.inspect(chunk);
        if (flagged !== undefined) break;
      }
      const expected = sizes.find((size) => size > limit);
      if (flagged !== expected) throw new Error(`guard said ${String(flagged)}, expected ${String(expected)}`);
    }),
    fuzzParameters(),
  );
  t.pass("property held for the time budget");
});

await t.test("corpus: length prefixes at and around the limit and 2^32-1", async (t) => {
  for (const input of corpus("framer")) {
    const reader = new MessageReader(limit);
    const guard = new MessageSizeGuard(limit);
    let readerRefused = false;
    try {
      reader.push(input);
    } catch {
      readerRefused = true;
    }
    const size = input.length >= 5 ? input.readUInt32BE(1) : 0;
    t.equal(readerRefused, size > limit, `reader on ${input.toString("hex").slice(0, 20)}`);
    t.equal(guard.inspect(input) !== undefined, size > limit, `guard on ${input.toString("hex").slice(0, 20)}`);
  }
});
