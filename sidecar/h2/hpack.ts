/**
 * HPACK (RFC 7541): the header compression of HTTP/2, as the sidecar's own
 * data plane needs it — a full decoder for what peers send, and a stateless
 * encoder for what the sidecar sends.
 */
import { huffmanDecode, latin1String } from "./huffman.js";

/** A header field as it travels in HTTP/2: lowercase name, value as a latin1 string (one character per byte). */
export type HeaderField = readonly [name: string, value: string];

/**
 * A header block could not be decoded. HPACK state is shared by the whole
 * connection, so after this the connection must be closed with
 * COMPRESSION_ERROR (RFC 7540 §4.3).
 */
export class HpackError extends Error {
  override readonly name = "HpackError";
}

/** RFC 7541 Appendix A. */
const staticTable: readonly HeaderField[] = [
  [":authority", ""],
  [":method", "GET"],
  [":method", "POST"],
  [":path", "/"],
  [":path", "/index.html"],
  [":scheme", "http"],
  [":scheme", "https"],
  [":status", "200"],
  [":status", "204"],
  [":status", "206"],
  [":status", "304"],
  [":status", "400"],
  [":status", "404"],
  [":status", "500"],
  ["accept-charset", ""],
  ["accept-encoding", "gzip, deflate"],
  ["accept-language", ""],
  ["accept-ranges", ""],
  ["accept", ""],
  ["access-control-allow-origin", ""],
  ["age", ""],
  ["allow", ""],
  ["authorization", ""],
  ["cache-control", ""],
  ["content-disposition", ""],
  ["content-encoding", ""],
  ["content-language", ""],
  ["content-length", ""],
  ["content-location", ""],
  ["content-range", ""],
  ["content-type", ""],
  ["cookie", ""],
  ["date", ""],
  ["etag", ""],
  ["expect", ""],
  ["expires", ""],
  ["from", ""],
  ["host", ""],
  ["if-match", ""],
  ["if-modified-since", ""],
  ["if-none-match", ""],
  ["if-range", ""],
  ["if-unmodified-since", ""],
  ["last-modified", ""],
  ["link", ""],
  ["location", ""],
  ["max-forwards", ""],
  ["proxy-authenticate", ""],
  ["proxy-authorization", ""],
  ["range", ""],
  ["referer", ""],
  ["refresh", ""],
  ["retry-after", ""],
  ["server", ""],
  ["set-cookie", ""],
  ["strict-transport-security", ""],
  ["transfer-encoding", ""],
  ["user-agent", ""],
  ["vary", ""],
  ["via", ""],
  ["www-authenticate", ""],
];
const staticTableLength = staticTable.length;

/** RFC 7541 §4.1: an entry's size counts its name and value octets plus 32 for bookkeeping. */
const entryOverhead = 32;

/**
 * Integers bound lengths and indexes, which can never be this large in a real
 * block; capping them keeps the arithmetic exact and rejects encodings padded
 * with endless continuation bytes.
 */
const maxInteger = 2 ** 31 - 1;
/** Continuation bytes needed to reach `maxInteger` (7 bits each, 28 + 7 > 31). */
const maxContinuationBytes = 5;

const emptyBlock = Buffer.alloc(0);

/**
 * Decodes the header blocks one peer sends on one connection (RFC 7541). It
 * holds that connection's dynamic table, so use one decoder per connection
 * and feed it every block in the order received.
 */
export class HpackDecoder {
  private readonly maxTableSize: number;
  private readonly maxHeaderListSize: number;
  /** The table size the peer's encoder currently uses: starts at our limit, lowered (or raised back) by size updates. */
  private capacity: number;
  /**
   * Dynamic table entries as a ring: `count` entries from `oldest` on, the
   * newest last, so inserting and evicting move nothing. Every entry takes at
   * least 32 octets, so 128 slots hold any table of the default 4096 octets;
   * the ring doubles when a larger table needs more.
   */
  private ring: (HeaderField | undefined)[];
  private oldest = 0;
  private count = 0;
  private size = 0;
  /** The block being decoded and the read position in it; fields rather than return values so reads allocate nothing. */
  private block: Buffer = emptyBlock;
  private position = 0;

  /**
   * @param options.maxTableSize - The SETTINGS_HEADER_TABLE_SIZE we advertise:
   *   the largest dynamic table the peer may ask for. The table starts at this
   *   size. Advertising less than the protocol default of 4096 is only safe
   *   once the peer has acknowledged it, since until then it may encode
   *   against a 4096-octet table. @default 4096
   * @param options.maxHeaderListSize - The SETTINGS_MAX_HEADER_LIST_SIZE we
   *   enforce: the largest decoded header list, counted as RFC 7540 §6.5.2 does
   *   (name + value + 32 per field). @default 65536
   */
  constructor(options: { maxTableSize?: number; maxHeaderListSize?: number } = {}) {
    const { maxTableSize = 4096, maxHeaderListSize = 65536 } = options;
    if (!Number.isInteger(maxTableSize) || maxTableSize < 0 || maxTableSize > 0xffffffff) throw new RangeError(`maxTableSize must be an integer in [0, 2^32), got ${maxTableSize}`);
    if (!Number.isInteger(maxHeaderListSize) || maxHeaderListSize < 0) throw new RangeError(`maxHeaderListSize must be a non-negative integer, got ${maxHeaderListSize}`);
    this.maxTableSize = maxTableSize;
    this.maxHeaderListSize = maxHeaderListSize;
    this.capacity = maxTableSize;
    this.ring = new Array<HeaderField | undefined>(Math.max(1, Math.min(128, Math.floor(maxTableSize / entryOverhead)))).fill(undefined);
  }

  /** Current size of the dynamic table in octets (RFC 7541 §4.1). For diagnostics and tests. */
  get dynamicTableSize(): number {
    return this.size;
  }

  /** A copy of the dynamic table, newest entry (index 62) first. For diagnostics and tests: it allocates. */
  dynamicTableEntries(): HeaderField[] {
    const entries: HeaderField[] = [];
    for (let index = 0; index < this.count; index++) entries.push(this.dynamicEntry(index));
    return entries;
  }

  /**
   * Decodes one complete header block (a HEADERS or PUSH_PROMISE payload with
   * its CONTINUATION payloads joined, padding and priority removed).
   *
   * @returns the fields in block order; names are lowercase, values latin1.
   *   Tuples may be shared with the decoder's tables and with other results:
   *   they are immutable.
   * @throws {HpackError} on any compression error: a bad index, a malformed
   *   or truncated integer or string, invalid Huffman data, a misplaced or
   *   oversized table size update, an uppercase name, or a header list larger
   *   than `maxHeaderListSize`. The decoder's state is undefined afterwards:
   *   the connection must be closed with COMPRESSION_ERROR.
   */
  decode(block: Uint8Array): HeaderField[] {
    const bytes = Buffer.isBuffer(block) ? block : Buffer.from(block.buffer, block.byteOffset, block.byteLength);
    this.block = bytes;
    this.position = 0;
    const fields: HeaderField[] = [];
    let listSize = 0;
    try {
      while (this.position < bytes.length) {
        const first = bytes[this.position]!;
        let field: HeaderField;
        if (first >= 0x80) {
          // 6.1 Indexed Header Field
          field = this.fieldAt(this.readInteger(7));
        } else if (first >= 0x40) {
          // 6.2.1 Literal Header Field with Incremental Indexing
          field = this.readLiteral(6);
          this.insert(field);
        } else if (first >= 0x20) {
          // 6.3 Dynamic Table Size Update: RFC 7541 §4.2 allows it only before the first field.
          if (fields.length > 0) throw new HpackError("dynamic table size update after the first header field of a block");
          const capacity = this.readInteger(5);
          if (capacity > this.maxTableSize) throw new HpackError(`dynamic table size update to ${capacity} exceeds the advertised maximum of ${this.maxTableSize}`);
          this.capacity = capacity;
          this.evictTo(capacity);
          continue;
        } else {
          // 6.2.2 Literal Header Field without Indexing (0000) and 6.2.3 Never Indexed (0001) decode alike.
          field = this.readLiteral(4);
        }
        listSize += field[0].length + field[1].length + entryOverhead;
        if (listSize > this.maxHeaderListSize) throw new HpackError(`header list exceeds the maximum size of ${this.maxHeaderListSize} octets`);
        fields.push(field);
      }
    } finally {
      // Do not keep the caller's (possibly pooled) buffer alive.
      this.block = emptyBlock;
    }
    return fields;
  }

  private readLiteral(prefixBits: number): HeaderField {
    const nameIndex = this.readInteger(prefixBits);
    const name = nameIndex === 0 ? this.readName() : this.fieldAt(nameIndex)[0];
    return [name, this.readString()];
  }

  private readName(): string {
    const name = this.readString();
    // Indexed names need no check: static names are lowercase and dynamic ones were checked on the way in.
    for (let index = 0; index < name.length; index++) {
      const code = name.charCodeAt(index);
      if (code >= 0x41 && code <= 0x5a) throw new HpackError(`header name ${JSON.stringify(name)} has uppercase characters (RFC 7540 §8.1.2)`);
    }
    return name;
  }

  /** RFC 7541 §5.1, with an N-bit prefix; the bits above the prefix belong to the caller. */
  private readInteger(prefixBits: number): number {
    const bytes = this.block;
    if (this.position >= bytes.length) throw new HpackError("header block ends where an integer should start");
    const prefixMax = (1 << prefixBits) - 1;
    let value = bytes[this.position++]! & prefixMax;
    if (value < prefixMax) return value;
    let multiplier = 1;
    for (let continuation = 1; ; continuation++) {
      if (this.position >= bytes.length) throw new HpackError("integer runs past the end of the header block");
      const byte = bytes[this.position++]!;
      value += (byte & 0x7f) * multiplier;
      if (byte < 0x80) break;
      if (continuation === maxContinuationBytes) throw new HpackError("integer has too many continuation bytes");
      multiplier *= 128;
    }
    if (value > maxInteger) throw new HpackError(`integer ${value} is too large`);
    return value;
  }

  /** RFC 7541 §5.2: a length-prefixed octet string, raw or Huffman-coded. */
  private readString(): string {
    const bytes = this.block;
    const huffmanCoded = this.position < bytes.length && bytes[this.position]! >= 0x80;
    const length = this.readInteger(7);
    const start = this.position;
    const end = start + length;
    if (end > bytes.length) throw new HpackError(`string of ${length} octets runs past the end of the header block`);
    // No string can fit in the header list if even its shortest decoding (30 bits a byte for Huffman) does not: refuse before materializing it.
    if ((huffmanCoded ? Math.floor((length * 8) / 30) : length) > this.maxHeaderListSize) throw new HpackError(`string of ${length} octets exceeds the maximum header list size of ${this.maxHeaderListSize} octets`);
    this.position = end;
    if (!huffmanCoded) return latin1String(bytes, start, end);
    try {
      return huffmanDecode(bytes, start, end);
    } catch (error) {
      throw new HpackError(`invalid Huffman-coded string: ${(error as Error).message}`, { cause: error });
    }
  }

  /** RFC 7541 §2.3.3: one index space, the static table first, then the dynamic table newest first. */
  private fieldAt(index: number): HeaderField {
    if (index === 0) throw new HpackError("index 0 is not a valid table index");
    if (index <= staticTableLength) return staticTable[index - 1]!;
    const dynamicIndex = index - staticTableLength - 1;
    if (dynamicIndex >= this.count) throw new HpackError(`index ${index} is past the end of the table (${staticTableLength} static + ${this.count} dynamic entries)`);
    return this.dynamicEntry(dynamicIndex);
  }

  /** `dynamicIndex` 0 is the newest entry; the caller checks it is below `count`. */
  private dynamicEntry(dynamicIndex: number): HeaderField {
    let slot = this.oldest + this.count - 1 - dynamicIndex;
    if (slot >= this.ring.length) slot -= this.ring.length;
    return this.ring[slot]!;
  }

  /** RFC 7541 §4.4: evict the oldest entries until the new one fits; one larger than the whole table just empties it. */
  private insert(field: HeaderField): void {
    const entrySize = field[0].length + field[1].length + entryOverhead;
    if (entrySize > this.capacity) {
      this.evictTo(0);
      return;
    }
    this.evictTo(this.capacity - entrySize);
    if (this.count === this.ring.length) this.growRing();
    let slot = this.oldest + this.count;
    if (slot >= this.ring.length) slot -= this.ring.length;
    this.ring[slot] = field;
    this.count++;
    this.size += entrySize;
  }

  private growRing(): void {
    const larger = new Array<HeaderField | undefined>(2 * this.ring.length).fill(undefined);
    for (let index = 0; index < this.count; index++) larger[index] = this.ring[(this.oldest + index) % this.ring.length];
    this.ring = larger;
    this.oldest = 0;
  }

  private evictTo(maxSize: number): void {
    while (this.size > maxSize) {
      const evicted = this.ring[this.oldest]!;
      this.ring[this.oldest] = undefined;
      this.size -= evicted[0].length + evicted[1].length + entryOverhead;
      this.oldest = this.oldest + 1 === this.ring.length ? 0 : this.oldest + 1;
      this.count--;
    }
  }
}

/** Static-table index of each name (its first entry), and of each exact name and value pair. */
const staticNameIndex = new Map<string, number>();
const staticFieldIndex = new Map<string, Map<string, number>>();
staticTable.forEach(([name, value], offset) => {
  const index = offset + 1;
  if (!staticNameIndex.has(name)) staticNameIndex.set(name, index);
  let byValue = staticFieldIndex.get(name);
  if (byValue === undefined) staticFieldIndex.set(name, (byValue = new Map<string, number>()));
  byValue.set(value, index);
});

/*
 * How encodeHeaderBlock represents each field, decided in its sizing pass and
 * reused by its writing pass: (table index << 2) | representation.
 */
const indexedField = 0;
const literalWithoutIndexing = 1;
const literalNeverIndexed = 2;
let plans = new Int32Array(64);

/** Octets an integer takes with an N-bit prefix (RFC 7541 §5.1). */
function integerLength(value: number, prefixBits: number): number {
  const prefixMax = (1 << prefixBits) - 1;
  if (value < prefixMax) return 1;
  let length = 2;
  for (let rest = value - prefixMax; rest >= 0x80; rest = Math.floor(rest / 0x80)) length++;
  return length;
}

/** Writes an integer with an N-bit prefix, `flags` filling the bits above it; returns the position after it. */
function writeInteger(output: Buffer, position: number, value: number, prefixBits: number, flags: number): number {
  const prefixMax = (1 << prefixBits) - 1;
  if (value < prefixMax) {
    output[position++] = flags | value;
    return position;
  }
  output[position++] = flags | prefixMax;
  let rest = value - prefixMax;
  while (rest >= 0x80) {
    output[position++] = (rest % 0x80) | 0x80;
    rest = Math.floor(rest / 0x80);
  }
  output[position++] = rest;
  return position;
}

/** Writes a raw (not Huffman-coded) string literal; returns the position after it. */
function writeString(output: Buffer, position: number, value: string): number {
  position = writeInteger(output, position, value.length, 7, 0);
  // Like decoding, short strings are cheaper to copy in JS than through a call into Buffer#write.
  if (value.length > 32) return position + output.write(value, position, "latin1");
  for (let index = 0; index < value.length; index++) output[position++] = value.charCodeAt(index);
  return position;
}

/**
 * Encodes a header block WITHOUT touching the peer's dynamic table and without
 * Huffman coding, so it needs no per-connection encoder state and any block it
 * produces can be sent on any connection, in any order.
 *
 * Exact (name, value) matches in the static table become indexed fields; a
 * name found in the static table becomes a literal without indexing with an
 * indexed name; anything else a literal without indexing with a literal name.
 * Names in `sensitive` always use the never-indexed literal (RFC 7541 §7.1.3),
 * which tells every later hop not to index them either: use it for
 * credentials.
 *
 * @param fields - Names must already be lowercase, and values latin1 strings
 *   (one character per byte): characters above U+00FF are not representable
 *   and would be truncated to their low byte.
 * @param sensitive - Names whose values must never be indexed. @default none
 * @returns a Buffer holding exactly the block.
 */
export function encodeHeaderBlock(fields: Iterable<HeaderField>, sensitive?: ReadonlySet<string>): Buffer {
  const list: readonly HeaderField[] = Array.isArray(fields) ? (fields as readonly HeaderField[]) : Array.from(fields);
  if (plans.length < list.length) plans = new Int32Array(Math.max(list.length, plans.length * 2));
  let length = 0;
  for (let fieldIndex = 0; fieldIndex < list.length; fieldIndex++) {
    const [name, value] = list[fieldIndex]!;
    const neverIndexed = sensitive?.has(name) === true;
    const exactIndex = neverIndexed ? undefined : staticFieldIndex.get(name)?.get(value);
    if (exactIndex !== undefined) {
      plans[fieldIndex] = (exactIndex << 2) | indexedField;
      length += integerLength(exactIndex, 7);
      continue;
    }
    const nameIndex = staticNameIndex.get(name) ?? 0;
    plans[fieldIndex] = (nameIndex << 2) | (neverIndexed ? literalNeverIndexed : literalWithoutIndexing);
    length += integerLength(nameIndex, 4) + integerLength(value.length, 7) + value.length;
    if (nameIndex === 0) length += integerLength(name.length, 7) + name.length;
  }

  const output = Buffer.allocUnsafe(length);
  let position = 0;
  for (let fieldIndex = 0; fieldIndex < list.length; fieldIndex++) {
    const [name, value] = list[fieldIndex]!;
    const plan = plans[fieldIndex]!;
    const index = plan >>> 2;
    const representation = plan & 3;
    if (representation === indexedField) {
      position = writeInteger(output, position, index, 7, 0x80);
      continue;
    }
    position = writeInteger(output, position, index, 4, representation === literalNeverIndexed ? 0x10 : 0x00);
    if (index === 0) position = writeString(output, position, name);
    position = writeString(output, position, value);
  }
  return output;
}
