/**
 * The HPACK Huffman code (RFC 7541 Appendix B).
 *
 * The code is canonical: codes are handed out in order of bit length, then of
 * symbol value, so the length of each symbol's code is enough to rebuild every
 * code. That keeps the table below small enough to check by eye against the
 * RFC, and the decoder tables are derived from it once, at module load.
 */

/** The end-of-string symbol: its 30-bit code (all ones) must never appear in a string, only prefixes of it as padding. */
const endOfString = 256;

/**
 * Code length in bits of each symbol: bytes 0x00–0xff, then EOS (256).
 * Transcribed from RFC 7541 Appendix B (the "len" column).
 */
const codeLengths: readonly number[] = [
  13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00–0x0f
  28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10–0x1f
   6, 10, 10, 12, 13,  6,  8, 11, 10, 10,  8, 11,  8,  6,  6,  6, // 0x20–0x2f  ' ' … '/'
   5,  5,  5,  6,  6,  6,  6,  6,  6,  6,  7,  8, 15,  6, 12, 10, // 0x30–0x3f  '0' … '?'
  13,  6,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7, // 0x40–0x4f  '@' … 'O'
   7,  7,  7,  7,  7,  7,  7,  7,  8,  7,  8, 13, 19, 13, 14,  6, // 0x50–0x5f  'P' … '_'
  15,  5,  6,  5,  6,  5,  6,  6,  6,  5,  7,  7,  6,  6,  6,  5, // 0x60–0x6f  '`' … 'o'
   6,  7,  6,  5,  5,  6,  7,  7,  7,  7,  7, 15, 11, 14, 13, 28, // 0x70–0x7f  'p' … DEL
  20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80–0x8f
  24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90–0x9f
  22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0–0xaf
  21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0–0xbf
  26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0–0xcf
  19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0–0xdf
  20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0–0xef
  26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0–0xff
  30,                                                             // EOS
];

/** Each symbol's code, right-aligned (the longest is 30 bits, so a uint32 holds any of them). */
const codes = new Uint32Array(257);
{
  const symbols = Array.from({ length: 257 }, (_, symbol) => symbol).sort((a, b) => codeLengths[a]! - codeLengths[b]! || a - b);
  let code = 0;
  let length = 0;
  for (const symbol of symbols) {
    const symbolLength = codeLengths[symbol]!;
    code *= 2 ** (symbolLength - length);
    length = symbolLength;
    codes[symbol] = code;
    code += 1;
  }
  // A complete prefix code ends exactly on the all-ones code of its last (longest) symbol, EOS here.
  if (codes[endOfString] !== 0x3fffffff) throw new Error("HPACK Huffman table is inconsistent");
}

/*
 * Decoding walks the code tree four bits at a time. The tree of a complete code
 * over 257 symbols has 256 internal nodes; each is a decoder state, and for
 * each state and nibble a precomputed transition gives the next state, the
 * symbol completed on the way (at most one: no code is shorter than 5 bits)
 * and whether stopping there leaves valid padding. Two array reads per input
 * byte, no per-bit work.
 */
const nextStateMask = 0xff;
const symbolShift = 8;
const emitsSymbol = 1 << 16;
/** The bits since the last complete symbol are at most 7 ones, i.e. a valid end of string. */
const endsValidly = 1 << 17;
/** The nibble completes the EOS symbol. */
const decodesEndOfString = 1 << 18;

const transitions = new Uint32Array(256 * 16);
{
  // Children of internal node n: childOf[2n] (bit 0) and childOf[2n + 1] (bit 1).
  // A value >= 0 is an internal node, a negative value is the leaf ~symbol.
  const unset = 0x7fffffff;
  const childOf = new Int32Array(2 * 256).fill(unset);
  let nodeCount = 1;
  for (let symbol = 0; symbol <= endOfString; symbol++) {
    const length = codeLengths[symbol]!;
    const code = codes[symbol]!;
    let node = 0;
    for (let bit = length - 1; bit > 0; bit--) {
      const slot = 2 * node + ((code >>> bit) & 1);
      if (childOf[slot] === unset) childOf[slot] = nodeCount++;
      node = childOf[slot]!;
    }
    childOf[2 * node + (code & 1)] = ~symbol;
  }
  if (nodeCount !== 256 || childOf.includes(unset)) throw new Error("HPACK Huffman table is inconsistent");

  // Padding is a prefix of EOS: the root and the nodes reached by up to seven 1 bits.
  const validEnd = new Uint8Array(256);
  for (let node = 0, depth = 0; depth <= 7; depth++, node = childOf[2 * node + 1]!) validEnd[node] = 1;

  for (let state = 0; state < 256; state++) {
    for (let nibble = 0; nibble < 16; nibble++) {
      let node = state;
      let entry = 0;
      for (let bit = 3; bit >= 0; bit--) {
        const child = childOf[2 * node + ((nibble >>> bit) & 1)]!;
        if (child >= 0) {
          node = child;
          continue;
        }
        const symbol = ~child;
        if (symbol === endOfString) {
          entry = decodesEndOfString;
          break;
        }
        entry = emitsSymbol | (symbol << symbolShift);
        node = 0;
      }
      if (entry !== decodesEndOfString) entry |= node | (validEnd[node] === 1 ? endsValidly : 0);
      transitions[state * 16 + nibble] = entry;
    }
  }
}

/** Decoded bytes land here before becoming a string; grown on demand and reused, since decoding runs for every header. */
let scratch = Buffer.allocUnsafe(1024);

/**
 * Decodes the Huffman-coded string in `bytes[start..end)`.
 *
 * @returns the decoded bytes as a latin1 string (one character per byte), which
 *   is how HTTP/2 header names and values are represented here.
 * @throws {RangeError} if the string contains the EOS symbol, or its padding is
 *   longer than 7 bits or not all ones (RFC 7541 §5.2) — a compression error.
 */
export function huffmanDecode(bytes: Uint8Array, start: number, end: number): string {
  // Every symbol takes at least 5 bits.
  const maxLength = Math.ceil(((end - start) * 8) / 5);
  if (scratch.length < maxLength) scratch = Buffer.allocUnsafe(Math.max(maxLength, scratch.length * 2));
  const output = scratch;
  let length = 0;
  let state = 0;
  let entry = endsValidly;
  for (let index = start; index < end; index++) {
    const byte = bytes[index]!;
    entry = transitions[(state << 4) | (byte >>> 4)]!;
    if ((entry & (emitsSymbol | decodesEndOfString)) !== 0) {
      if ((entry & decodesEndOfString) !== 0) throw new RangeError("Huffman string contains the EOS symbol");
      output[length++] = (entry >>> symbolShift) & 0xff;
    }
    state = entry & nextStateMask;
    entry = transitions[(state << 4) | (byte & 0x0f)]!;
    if ((entry & (emitsSymbol | decodesEndOfString)) !== 0) {
      if ((entry & decodesEndOfString) !== 0) throw new RangeError("Huffman string contains the EOS symbol");
      output[length++] = (entry >>> symbolShift) & 0xff;
    }
    state = entry & nextStateMask;
  }
  if ((entry & endsValidly) === 0) throw new RangeError("Huffman string has invalid padding (longer than 7 bits or not a prefix of EOS)");
  return latin1String(output, 0, length);
}

/**
 * `bytes[start..end)` as a latin1 string. Header values are mostly short, and
 * for a few characters building the string in JS beats the call into
 * `Buffer#toString`, whose fixed cost dominates there.
 */
export function latin1String(bytes: Buffer, start: number, end: number): string {
  if (end - start > 8) return bytes.toString("latin1", start, end);
  let value = "";
  for (let index = start; index < end; index++) value += String.fromCharCode(bytes[index]!);
  return value;
}

/** Number of bytes `huffmanEncode(value)` produces. */
function huffmanEncodedLength(value: Uint8Array): number {
  let bits = 0;
  for (let index = 0; index < value.length; index++) bits += codeLengths[value[index]!]!;
  return Math.ceil(bits / 8);
}

/**
 * Huffman-codes a byte string, padding the last byte with the most significant
 * bits of EOS (ones) as RFC 7541 §5.2 requires.
 *
 * Not on the hot path: the sidecar sends literals raw (see `encodeHeaderBlock`),
 * this exists for tests and completeness.
 */
export function huffmanEncode(value: Buffer): Buffer {
  const output = Buffer.allocUnsafe(huffmanEncodedLength(value));
  let position = 0;
  // Bits not yet written: `pendingCount` (< 8) of them, right-aligned in `pending`.
  let pending = 0;
  let pendingCount = 0;
  for (const byte of value) {
    const code = codes[byte]!;
    let remaining = codeLengths[byte]!;
    while (remaining > 0) {
      const room = 8 - pendingCount;
      if (remaining < room) {
        pending = (pending << remaining) | (code & ((1 << remaining) - 1));
        pendingCount += remaining;
        break;
      }
      remaining -= room;
      output[position++] = (pending << room) | ((code >>> remaining) & ((1 << room) - 1));
      pending = 0;
      pendingCount = 0;
    }
  }
  if (pendingCount > 0) {
    const padding = 8 - pendingCount;
    output[position] = (pending << padding) | ((1 << padding) - 1);
  }
  return output;
}
