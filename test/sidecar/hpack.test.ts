import { randomBytes } from "node:crypto";
import { clientPreface, type Frame, frame, frameFlag, frameType, settingsFrame } from "../helpers/h2-frames.js";
import {
  type ClientHttp2Stream,
  connect as http2Connect,
  createServer as createHttp2Server,
  type IncomingHttpHeaders,
  type OutgoingHttpHeaders,
  sensitiveHeaders,
  type ServerHttp2Session,
} from "node:http2";
import { type AddressInfo, connect as netConnect, createServer as createNetServer, type Server, type Socket } from "node:net";
import t, { type Test } from "tap";
import { encodeHeaderBlock, type HeaderField, HpackDecoder, HpackError } from "../../sidecar/h2/hpack.js";
import { huffmanDecode, huffmanEncode } from "../../sidecar/h2/huffman.js";

const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ""), "hex");
const latin1 = (bytes: Iterable<number>): string => Buffer.from([...bytes]).toString("latin1");
const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** HPACK integer (RFC 7541 §5.1), written independently of the codec so the tests do not trust it. */
function integer(value: number, prefixBits: number, flags: number): number[] {
  const max = 2 ** prefixBits - 1;
  if (value < max) return [flags | value];
  const bytes = [flags | max];
  let rest = value - max;
  for (; rest >= 128; rest = Math.floor(rest / 128)) bytes.push(0x80 | rest % 128);
  bytes.push(rest);
  return bytes;
}

/** A string literal (RFC 7541 §5.2), raw or Huffman-coded with the codec's encoder. */
function stringLiteral(value: string, huffman: boolean): Buffer {
  const raw = Buffer.from(value, "latin1");
  const body = huffman ? huffmanEncode(raw) : raw;
  return Buffer.concat([Buffer.from(integer(body.length, 7, huffman ? 0x80 : 0)), body]);
}

/** Literal header field without indexing, literal name (RFC 7541 §6.2.2). */
function literalField(name: string, value: string, options: { huffmanName?: boolean; huffmanValue?: boolean } = {}): Buffer {
  return Buffer.concat([Buffer.of(0x00), stringLiteral(name, options.huffmanName ?? false), stringLiteral(value, options.huffmanValue ?? false)]);
}

/** Asserts that decoding `block` fails with an HpackError whose message matches. */
function decodeError(t: Test, decoder: HpackDecoder, block: Buffer, message: RegExp, label: string): void {
  let thrown: unknown;
  try {
    decoder.decode(block);
  } catch (error) {
    thrown = error;
  }
  t.ok(thrown instanceof HpackError, `${label}: throws an HpackError`);
  t.match(thrown, { name: "HpackError", message }, label);
}

await t.test("Huffman code", async (t) => {
  await t.test("codes match RFC 7541 Appendix B", async (t) => {
    // [symbol, code, length], a sample of Appendix B: all of 0x00–0x1a, then the first and last codes of each length.
    const appendixB: [number, number, number][] = [
      [0, 0x1ff8, 13], [1, 0x7fffd8, 23], [2, 0xfffffe2, 28], [3, 0xfffffe3, 28], [4, 0xfffffe4, 28], [5, 0xfffffe5, 28],
      [6, 0xfffffe6, 28], [7, 0xfffffe7, 28], [8, 0xfffffe8, 28], [9, 0xffffea, 24], [10, 0x3ffffffc, 30], [11, 0xfffffe9, 28],
      [12, 0xfffffea, 28], [13, 0x3ffffffd, 30], [14, 0xfffffeb, 28], [15, 0xfffffec, 28], [16, 0xfffffed, 28], [17, 0xfffffee, 28],
      [18, 0xfffffef, 28], [19, 0xffffff0, 28], [20, 0xffffff1, 28], [21, 0xffffff2, 28], [22, 0x3ffffffe, 30], [23, 0xffffff3, 28],
      [24, 0xffffff4, 28], [25, 0xffffff5, 28], [26, 0xffffff6, 28],
      [0x30, 0x0, 5], [0x74, 0x9, 5], [0x20, 0x14, 6], [0x75, 0x2d, 6], [0x3a, 0x5c, 7], [0x7a, 0x7b, 7], [0x26, 0xf8, 8], [0x5a, 0xfd, 8],
      [0x21, 0x3f8, 10], [0x3f, 0x3fc, 10], [0x27, 0x7fa, 11], [0x7c, 0x7fc, 11], [0x23, 0xffa, 12], [0x3e, 0xffb, 12], [0x7e, 0x1ffd, 13],
      [0x5e, 0x3ffc, 14], [0x7d, 0x3ffd, 14], [0x3c, 0x7ffc, 15], [0x7b, 0x7ffe, 15], [0x5c, 0x7fff0, 19], [0xd0, 0x7fff2, 19],
      [0x80, 0xfffe6, 20], [0xe2, 0xfffed, 20], [0x99, 0x1fffdc, 21], [0xe6, 0x1fffe8, 21], [0x81, 0x3fffd2, 22], [0xe9, 0x3fffeb, 22],
      [0x87, 0x7fffd9, 23], [0xef, 0x7ffff4, 23], [0x8e, 0xffffeb, 24], [0xed, 0xfffff5, 24], [0xc7, 0x1ffffec, 25], [0xeb, 0x1ffffef, 25],
      [0xc0, 0x3ffffe0, 26], [0xff, 0x3ffffee, 26], [0xcb, 0x7ffffde, 27], [0xfe, 0x7fffff0, 27], [0x7f, 0xffffffc, 28], [0xf9, 0xffffffe, 28],
    ];
    for (const [symbol, code, length] of appendixB) {
      // One symbol, left-aligned and padded with ones to a whole number of bytes.
      const byteLength = Math.ceil(length / 8);
      const padding = byteLength * 8 - length;
      const expected = Buffer.alloc(byteLength);
      expected.writeUIntBE(code * 2 ** padding + (2 ** padding - 1), 0, byteLength);
      t.same(huffmanEncode(Buffer.of(symbol)), expected, `symbol 0x${symbol.toString(16)}: ${length} bits`);
      t.equal(huffmanDecode(expected, 0, byteLength), latin1([symbol]));
    }
  });

  await t.test("every byte round-trips, alone, together and in random strings", async (t) => {
    for (let byte = 0; byte < 256; byte++) {
      const encoded = huffmanEncode(Buffer.of(byte, byte, byte));
      if (huffmanDecode(encoded, 0, encoded.length) !== latin1([byte, byte, byte])) t.fail(`byte 0x${byte.toString(16)} does not round-trip`);
    }
    const all = Buffer.from(range(0, 255));
    const encoded = huffmanEncode(all);
    t.equal(huffmanDecode(encoded, 0, encoded.length), all.toString("latin1"));
    for (let round = 0; round < 200; round++) {
      const value = randomBytes(round % 50);
      const coded = huffmanEncode(value);
      // Decoding honours start and end inside a larger buffer.
      const framed = Buffer.concat([Buffer.of(0x00, 0xff), coded, Buffer.of(0x00)]);
      if (huffmanDecode(framed, 2, 2 + coded.length) !== value.toString("latin1")) t.fail(`random value ${value.toString("hex")} does not round-trip`);
    }
    t.equal(huffmanDecode(Buffer.alloc(0), 0, 0), "");
    t.same(huffmanEncode(Buffer.from("www.example.com")), hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"), "C.4.1 www.example.com");
    t.same(huffmanEncode(Buffer.from("no-cache")), hex("a8eb 1064 9cbf"), "C.4.2 no-cache");
  });

  await t.test("invalid padding and EOS are rejected", async (t) => {
    // "a" is 00011: 3 padding bits, which must be ones.
    t.equal(huffmanDecode(Buffer.of(0x1f), 0, 1), "a");
    t.throws(() => huffmanDecode(Buffer.of(0x18), 0, 1), /padding/, "padding of zeros");
    t.throws(() => huffmanDecode(Buffer.of(0x1e), 0, 1), /padding/, "padding not all ones");
    t.throws(() => huffmanDecode(Buffer.of(0x1f, 0xff), 0, 2), /padding/, "11 bits of padding");
    t.throws(() => huffmanDecode(Buffer.of(0xff), 0, 1), /padding/, "a whole byte of padding");
    t.throws(() => huffmanDecode(Buffer.of(0xfe), 0, 1), /padding/, "an incomplete code that is not a prefix of EOS");
    t.throws(() => huffmanDecode(Buffer.of(0xff, 0xff, 0xff, 0xff), 0, 4), /EOS/, "EOS (30 ones) inside the string");
    t.throws(() => huffmanDecode(Buffer.of(0x1f, 0xff, 0xff, 0xff, 0xff), 0, 5), /EOS/, "EOS after a symbol");
    // "00z" is 5 + 5 + 7 bits: 7 bits of padding, the most allowed.
    t.equal(huffmanDecode(hex("003dff"), 0, 3), "00z", "7 bits of padding");
    t.throws(() => huffmanDecode(hex("003fff"), 0, 3), /padding/, "\"00\" then 14 bits of padding");
  });
});

/** One header block of an Appendix C sequence: the bytes, the fields, the dynamic table after it (newest first) and its size. */
interface AppendixStep {
  block: string;
  fields: HeaderField[];
  table: HeaderField[];
  tableSize: number;
}

function decodeSequence(t: Test, maxTableSize: number, steps: AppendixStep[]): void {
  const decoder = new HpackDecoder({ maxTableSize });
  steps.forEach((step, index) => {
    t.same(decoder.decode(hex(step.block)), step.fields, `block ${index + 1}: header list`);
    t.same(decoder.dynamicTableEntries(), step.table, `block ${index + 1}: dynamic table`);
    t.equal(decoder.dynamicTableSize, step.tableSize, `block ${index + 1}: dynamic table size`);
  });
}

// RFC 7541 Appendix C.3/C.4 share their header lists and tables; only the encoding differs.
const requestLists: HeaderField[][] = [
  [[":method", "GET"], [":scheme", "http"], [":path", "/"], [":authority", "www.example.com"]],
  [[":method", "GET"], [":scheme", "http"], [":path", "/"], [":authority", "www.example.com"], ["cache-control", "no-cache"]],
  [[":method", "GET"], [":scheme", "https"], [":path", "/index.html"], [":authority", "www.example.com"], ["custom-key", "custom-value"]],
];
const requestTables: [HeaderField[], number][] = [
  [[[":authority", "www.example.com"]], 57],
  [[["cache-control", "no-cache"], [":authority", "www.example.com"]], 110],
  [[["custom-key", "custom-value"], ["cache-control", "no-cache"], [":authority", "www.example.com"]], 164],
];
const requestSteps = (blocks: string[]): AppendixStep[] =>
  blocks.map((block, i) => ({ block, fields: requestLists[i]!, table: requestTables[i]![0], tableSize: requestTables[i]![1] }));

// C.5/C.6: responses with SETTINGS_HEADER_TABLE_SIZE 256, so entries get evicted.
const date21 = "Mon, 21 Oct 2013 20:13:21 GMT";
const date22 = "Mon, 21 Oct 2013 20:13:22 GMT";
const location = "https://www.example.com";
const cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
const responseLists: HeaderField[][] = [
  [[":status", "302"], ["cache-control", "private"], ["date", date21], ["location", location]],
  [[":status", "307"], ["cache-control", "private"], ["date", date21], ["location", location]],
  [[":status", "200"], ["cache-control", "private"], ["date", date22], ["location", location], ["content-encoding", "gzip"], ["set-cookie", cookie]],
];
const responseTables: [HeaderField[], number][] = [
  [[["location", location], ["date", date21], ["cache-control", "private"], [":status", "302"]], 222],
  // ":status: 307" evicts ":status: 302".
  [[[":status", "307"], ["location", location], ["date", date21], ["cache-control", "private"]], 222],
  // The new date evicts "cache-control", then "content-encoding" evicts ":status: 307" and "location", and "set-cookie" evicts the old date.
  [[["set-cookie", cookie], ["content-encoding", "gzip"], ["date", date22]], 215],
];
const responseSteps = (blocks: string[]): AppendixStep[] =>
  blocks.map((block, i) => ({ block, fields: responseLists[i]!, table: responseTables[i]![0], tableSize: responseTables[i]![1] }));

await t.test("RFC 7541 Appendix C examples", async (t) => {
  await t.test("C.1 integers and C.2 single representations", async (t) => {
    // C.1.2: 1337 with a 5-bit prefix is 1f 9a 0a; here as a table size update (001 + prefix).
    t.same(new HpackDecoder().decode(hex("3f9a0a")), [], "C.1.2 as a size update to 1337");
    t.same(integer(1337, 5, 0), [0x1f, 0x9a, 0x0a], "the test's own integer encoder agrees with C.1.2");
    const c21 = new HpackDecoder();
    t.same(c21.decode(hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")), [["custom-key", "custom-header"]], "C.2.1");
    t.same(c21.dynamicTableEntries(), [["custom-key", "custom-header"]]);
    t.equal(c21.dynamicTableSize, 55);
    const c22 = new HpackDecoder();
    t.same(c22.decode(hex("040c 2f73 616d 706c 652f 7061 7468")), [[":path", "/sample/path"]], "C.2.2");
    t.equal(c22.dynamicTableSize, 0);
    const c23 = new HpackDecoder();
    t.same(c23.decode(hex("1008 7061 7373 776f 7264 0673 6563 7265 74")), [["password", "secret"]], "C.2.3");
    t.equal(c23.dynamicTableSize, 0);
    t.same(new HpackDecoder().decode(hex("82")), [[":method", "GET"]], "C.2.4");
  });

  await t.test("C.3 requests without Huffman coding", async (t) => {
    decodeSequence(t, 4096, requestSteps(["8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d", "8286 84be 5808 6e6f 2d63 6163 6865", "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"]));
  });

  await t.test("C.4 requests with Huffman coding", async (t) => {
    decodeSequence(t, 4096, requestSteps(["8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", "8286 84be 5886 a8eb 1064 9cbf", "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"]));
  });

  await t.test("C.5 responses without Huffman coding, table size 256", async (t) => {
    decodeSequence(t, 256, responseSteps([
      `4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768
       7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d`,
      "4803 3330 37c1 c0bf",
      `88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153
       444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31`,
    ]));
  });

  await t.test("C.6 responses with Huffman coding, table size 256", async (t) => {
    decodeSequence(t, 256, responseSteps([
      `4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8
       e9ae 82ae 43d3`,
      "4883 640e ffc1 c0bf",
      `88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b
       3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07`,
    ]));
  });
});

await t.test("decoder", async (t) => {
  await t.test("dynamic table size updates", async (t) => {
    const decoder = new HpackDecoder({ maxTableSize: 256 });
    // Two updates before the first field are allowed (shrink, then grow back); 256 = 31 + 225 → 3f e1 01.
    t.same(decoder.decode(hex("20 3fe101 82")), [[":method", "GET"]]);
    t.same(decoder.decode(Buffer.concat([Buffer.of(0x40), stringLiteral("x-a", false), stringLiteral("1", false), Buffer.of(0x40), stringLiteral("x-b", false), stringLiteral("2", false)])), [["x-a", "1"], ["x-b", "2"]]);
    t.same(decoder.dynamicTableEntries(), [["x-b", "2"], ["x-a", "1"]]);
    t.equal(decoder.dynamicTableSize, 72);
    // Shrinking evicts the oldest entries first: 40 keeps only "x-b" (36).
    t.same(decoder.decode(Buffer.of(...integer(40, 5, 0x20), 0xbe)), [["x-b", "2"]]);
    t.same(decoder.dynamicTableEntries(), [["x-b", "2"]]);
    // 0 empties the table; index 62 is then out of range.
    t.same(decoder.decode(hex("20")), []);
    t.equal(decoder.dynamicTableSize, 0);
    decodeError(t, decoder, hex("be"), /past the end of the table/, "index 62 after the table was emptied");

    const sized = new HpackDecoder({ maxTableSize: 256 });
    decodeError(t, sized, hex("3fe201"), /exceeds the advertised maximum of 256/, "size update above maxTableSize");
    decodeError(t, new HpackDecoder(), hex("3fe21f"), /exceeds the advertised maximum of 4096/, "size update to 4097 with the default maximum");
    t.same(new HpackDecoder().decode(hex("3fe11f")), [], "size update to exactly 4096");
    decodeError(t, new HpackDecoder(), hex("82 20"), /size update after the first header field/, "size update mid-block");
    decodeError(t, new HpackDecoder(), hex("82 3fe101 86"), /size update after the first header field/, "size update mid-block, followed by fields");
  });

  await t.test("an entry larger than the table empties it without being added (RFC 7541 §4.4)", async (t) => {
    const decoder = new HpackDecoder({ maxTableSize: 100 });
    decoder.decode(Buffer.concat([Buffer.of(0x40), stringLiteral("x-small", false), stringLiteral("v", false)]));
    t.equal(decoder.dynamicTableSize, 40);
    const big = "b".repeat(70);
    t.same(decoder.decode(Buffer.concat([Buffer.of(0x40), stringLiteral("x-big", false), stringLiteral(big, false)])), [["x-big", big]]);
    t.same(decoder.dynamicTableEntries(), []);
    t.equal(decoder.dynamicTableSize, 0);
    // An entry of exactly the table size fits: 100 = 5 + 63 + 32.
    const exact = "e".repeat(63);
    decoder.decode(Buffer.concat([Buffer.of(0x40), stringLiteral("x-big", false), stringLiteral(exact, false)]));
    t.same(decoder.dynamicTableEntries(), [["x-big", exact]]);
    t.equal(decoder.dynamicTableSize, 100);
  });

  await t.test("the dynamic table wraps around its ring many times", async (t) => {
    // 4096 / (2 + 3 + 32): at most 110 of these entries; insert 1000, referencing old and new ones, against a plain model.
    const decoder = new HpackDecoder();
    const model: HeaderField[] = [];
    for (let i = 0; i < 1000; i++) {
      const field: HeaderField = [`x${i % 10}`, String(i).padStart(3, "0").slice(-3)];
      const block = Buffer.concat([Buffer.of(0x40), stringLiteral(field[0], false), stringLiteral(field[1], false), Buffer.of(0xbe, ...integer(61 + Math.min(model.length + 1, 50), 7, 0x80))]);
      model.unshift(field);
      let size = model.reduce((sum, [name, value]) => sum + name.length + value.length + 32, 0);
      while (size > 4096) {
        const [name, value] = model.pop()!;
        size -= name.length + value.length + 32;
      }
      const expected = [field, field, model[Math.min(model.length, 50) - 1]!];
      const decoded = decoder.decode(block);
      if (JSON.stringify(decoded) !== JSON.stringify(expected)) {
        t.fail(`insert ${i}: decoded ${JSON.stringify(decoded)}`);
        break;
      }
    }
    t.same(decoder.dynamicTableEntries(), model);
    t.equal(decoder.dynamicTableSize, model.reduce((sum, [name, value]) => sum + name.length + value.length + 32, 0));
    t.ok(model.length > 100, "the table was full");
  });

  await t.test("a table larger than the default holds more entries than it started with room for", async (t) => {
    const decoder = new HpackDecoder({ maxTableSize: 16384 });
    const model: HeaderField[] = [];
    const insert = (field: HeaderField, capacity: number): Buffer => {
      model.unshift(field);
      while (model.reduce((sum, [name, value]) => sum + name.length + value.length + 32, 0) > capacity) model.pop();
      return Buffer.concat([Buffer.of(0x40), stringLiteral(field[0], false), stringLiteral(field[1], false)]);
    };
    // First a small table, so the oldest entry has moved around the ring, then a large one.
    decoder.decode(Buffer.concat([Buffer.of(...integer(1000, 5, 0x20)), ...range(0, 99).map((i) => insert([`x-${i}`, "v"], 1000))]));
    t.equal(model.length, 27);
    t.same(decoder.dynamicTableEntries(), model);
    decoder.decode(Buffer.concat([Buffer.of(...integer(16384, 5, 0x20)), ...range(100, 499).map((i) => insert([`x-${i}`, "v"], 16384))]));
    t.equal(model.length, 427);
    t.same(decoder.dynamicTableEntries(), model);
    t.same(decoder.decode(Buffer.of(...integer(61 + 427, 7, 0x80), 0xbe)), [model[426], model[0]], "the oldest and the newest entries by index");
  });

  await t.test("all representations, static and dynamic names, raw and Huffman strings", async (t) => {
    const decoder = new HpackDecoder();
    const block = Buffer.concat([
      hex("83"), // indexed static: :method POST
      Buffer.of(0x40 | 31), stringLiteral("application/grpc", true), // incremental indexing, static name
      Buffer.of(0x40), stringLiteral("grpc-timeout", true), stringLiteral("5S", false), // incremental indexing, Huffman name
      Buffer.of(0x00 | 4), stringLiteral("/svc.Test/Call", false), // without indexing, static name
      Buffer.of(0x10 | 15, 23 - 15), stringLiteral("Bearer abc", true), // never indexed, static name over the 4-bit prefix
      Buffer.of(0x10), stringLiteral("x-secret", false), stringLiteral("s", false), // never indexed, literal name
      Buffer.of(0x00 | 15, 63 - 15), stringLiteral("7S", false), // without indexing, dynamic name (62 = grpc-timeout, 63 = content-type)
      hex("be bf"), // indexed dynamic
    ]);
    t.same(decoder.decode(block), [
      [":method", "POST"],
      ["content-type", "application/grpc"],
      ["grpc-timeout", "5S"],
      [":path", "/svc.Test/Call"],
      ["authorization", "Bearer abc"],
      ["x-secret", "s"],
      ["content-type", "7S"],
      ["grpc-timeout", "5S"],
      ["content-type", "application/grpc"],
    ]);
    t.same(decoder.dynamicTableEntries(), [["grpc-timeout", "5S"], ["content-type", "application/grpc"]], "only incremental indexing adds entries");
    // The same block through a plain Uint8Array view into a larger buffer.
    const backing = new Uint8Array(block.length + 7);
    backing.set(block, 3);
    t.same(new HpackDecoder().decode(new Uint8Array(backing.buffer, 3, block.length)).map(([name]) => name), [":method", "content-type", "grpc-timeout", ":path", "authorization", "x-secret", "content-type", "grpc-timeout", "content-type"]);
    // Values keep every byte as one latin1 character.
    const allBytes = latin1(range(0, 255));
    t.same(new HpackDecoder().decode(Buffer.concat([literalField("x-raw", allBytes), literalField("x-huff", allBytes, { huffmanValue: true })])), [["x-raw", allBytes], ["x-huff", allBytes]]);
    t.same(new HpackDecoder().decode(Buffer.alloc(0)), [], "an empty block is an empty list");
  });

  await t.test("compression errors", async (t) => {
    const d = (): HpackDecoder => new HpackDecoder();
    decodeError(t, d(), hex("80"), /index 0/, "indexed field with index 0");
    decodeError(t, d(), hex("be"), /index 62 is past the end/, "index 62 with an empty dynamic table");
    t.same(d().decode(hex("bd")), [["www-authenticate", ""]], "index 61 is the last static entry");
    decodeError(t, d(), hex("ff 80 01"), /index 255 is past the end/, "large index");
    decodeError(t, d(), Buffer.concat([Buffer.of(0x40 | 0x3f, 100 - 63), stringLiteral("v", false)]), /index 100 is past the end/, "literal with an out-of-range name index");
    decodeError(t, d(), Buffer.concat([Buffer.of(0x40 | 0), stringLiteral("x", false), stringLiteral("v", false), hex("bf")]), /index 63 is past the end/, "index one past the dynamic table");
    decodeError(t, d(), hex("ff"), /past the end of the header block/, "integer cut after its prefix");
    decodeError(t, d(), hex("ff 80 80"), /past the end of the header block/, "integer cut inside its continuation bytes");
    decodeError(t, d(), hex("ff ff ff ff ff 0f"), /too large/, "integer above 2^31");
    decodeError(t, d(), hex("ff ff ff ff ff 07"), /too large/, "integer just above 2^31 - 1");
    decodeError(t, d(), hex("ff 80 80 80 80 80 00"), /too many continuation bytes/, "integer padded with zero continuation bytes");
    decodeError(t, d(), hex("40"), /ends where an integer should start/, "literal without its name");
    decodeError(t, d(), hex("40 0a 6375"), /string of 10 octets runs past the end/, "name string cut short");
    decodeError(t, d(), hex("40 01 61"), /ends where an integer should start/, "literal without its value");
    decodeError(t, d(), hex("40 01 61 05 7878"), /string of 5 octets runs past the end/, "value string cut short");
    decodeError(t, d(), hex("00 01 61 7f ff ff ff 07"), /string of \d+ octets runs past the end/, "huge string length");
    decodeError(t, d(), hex("00 01 61 81 18"), /invalid Huffman-coded string: .*padding/, "Huffman value with zero padding");
    decodeError(t, d(), hex("00 01 61 82 1f ff"), /invalid Huffman-coded string: .*padding/, "Huffman value with 11 bits of padding");
    decodeError(t, d(), hex("00 81 18 01 61"), /invalid Huffman-coded string/, "Huffman name with invalid padding");
    decodeError(t, d(), hex("00 01 61 84 ff ff ff ff"), /invalid Huffman-coded string: .*EOS/, "EOS in a Huffman value");
    decodeError(t, d(), literalField("X-Upper", "v"), /uppercase/, "uppercase literal name");
    decodeError(t, d(), Buffer.concat([Buffer.of(0x40), stringLiteral("content-Type", true), stringLiteral("v", false)]), /uppercase/, "uppercase Huffman name with indexing");
    decodeError(t, d(), Buffer.concat([Buffer.of(0x10), stringLiteral("Authorization", false), stringLiteral("v", false)]), /uppercase/, "uppercase never-indexed name");
    t.same(d().decode(literalField("x-value-may-have-uppercase", "ABC")), [["x-value-may-have-uppercase", "ABC"]], "uppercase in values is fine");
  });

  await t.test("header list size limit", async (t) => {
    // "x-a" + 65 bytes + 32 = 100.
    const field = literalField("x-a", "v".repeat(65));
    t.same(new HpackDecoder({ maxHeaderListSize: 100 }).decode(field).length, 1, "exactly at the limit");
    decodeError(t, new HpackDecoder({ maxHeaderListSize: 99 }), field, /header list exceeds the maximum size of 99/, "one octet over");
    decodeError(t, new HpackDecoder({ maxHeaderListSize: 199 }), Buffer.concat([field, field]), /exceeds/, "over the limit on the second field");
    // A string that could not fit is refused before it is decoded: raw, and Huffman-coded (at least 8 bits per 30 bits of code).
    decodeError(t, new HpackDecoder({ maxHeaderListSize: 50 }), literalField("x-a", "v".repeat(51)), /string of 51 octets exceeds the maximum header list size of 50/, "raw string longer than the limit");
    decodeError(t, new HpackDecoder({ maxHeaderListSize: 50 }), Buffer.concat([Buffer.of(0x00), stringLiteral("x-a", false), Buffer.of(0x80 | 0x7f, 200 - 127), Buffer.alloc(200, 0)]), /string of 200 octets exceeds the maximum header list size/, "Huffman string whose shortest decoding is over the limit");
    // The classic bomb: one large entry, then many one-byte references to it.
    const bomb = Buffer.concat([Buffer.of(0x40), stringLiteral("x-bomb", false), stringLiteral("b".repeat(4000), false), Buffer.alloc(1000, 0xbe)]);
    decodeError(t, new HpackDecoder(), bomb, /header list exceeds the maximum size of 65536/, "references to a large dynamic entry");
    t.equal(new HpackDecoder({ maxHeaderListSize: 1000 * 4038 + 4038 }).decode(bomb).length, 1001, "the same block under a limit it fits");
  });

  t.throws(() => new HpackDecoder({ maxTableSize: -1 }), RangeError);
  t.throws(() => new HpackDecoder({ maxTableSize: 1.5 }), RangeError);
  t.throws(() => new HpackDecoder({ maxHeaderListSize: Number.NaN }), RangeError);
});

await t.test("encoder", async (t) => {
  t.same(encodeHeaderBlock([[":method", "GET"]]), hex("82"), "an exact static match is indexed (C.2.4)");
  t.same(encodeHeaderBlock([[":path", "/sample/path"]]), hex("040c 2f73 616d 706c 652f 7061 7468"), "a static name is a literal without indexing with an indexed name (C.2.2)");
  t.same(encodeHeaderBlock([["password", "secret"]], new Set(["password"])), hex("1008 7061 7373 776f 7264 0673 6563 7265 74"), "a sensitive name is never indexed (C.2.3)");
  t.same(encodeHeaderBlock([["custom-key", "custom-header"]]), hex("000a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"), "an unknown name is a literal name, without indexing");
  t.same(encodeHeaderBlock([["authorization", "Bearer x"]], new Set(["authorization"])), Buffer.concat([Buffer.of(0x1f, 23 - 15), stringLiteral("Bearer x", false)]), "never indexed with a static name past the 4-bit prefix");
  t.same(encodeHeaderBlock([[":status", "200"]], new Set([":status"])), Buffer.concat([Buffer.of(0x18), stringLiteral("200", false)]), "a sensitive exact static match is still never indexed");
  t.same(encodeHeaderBlock([["accept-encoding", "gzip, deflate"], [":authority", ""], ["www-authenticate", ""], [":status", "500"]]), hex("90 81 bd 8e"), "exact matches across the static table");
  t.same(encodeHeaderBlock([["content-type", "application/grpc"]]), Buffer.concat([Buffer.of(0x0f, 31 - 15), stringLiteral("application/grpc", false)]), "static name index above 14");
  t.same(encodeHeaderBlock([]), Buffer.alloc(0));
  const many = Array.from({ length: 300 }, (_, i): HeaderField => (i % 3 === 0 ? [":status", "404"] : i % 3 === 1 ? ["content-type", `type-${i}`] : [`x-${i}`, `v${i}`]));
  t.same(new HpackDecoder().decode(encodeHeaderBlock(many)), many, "300 fields round-trip");

  // Integers past their prefix: a 1337-byte value (7f ba 09) and a 200-byte name (7f 49).
  const longValue = "v".repeat(1337);
  const longName = "n".repeat(200);
  const long = encodeHeaderBlock([[longName, longValue]]);
  t.same(long.subarray(0, 3), hex("00 7f 49"));
  t.same(long.subarray(3 + 200, 3 + 200 + 3), hex("7f ba 09"));
  t.equal(long.length, 3 + 200 + 3 + 1337, "the buffer is exactly the block");

  // Round trip through the decoder, from a generator, with every byte value.
  const fields: HeaderField[] = [
    [":method", "POST"],
    [":scheme", "https"],
    [":path", "/demo.v1.OpsService/ExportTable"],
    [":authority", "ops.internal:8443"],
    ["content-type", "application/grpc"],
    ["te", "trailers"],
    ["grpc-timeout", "4999m"],
    ["authorization", "Bearer eyJ0eXAiOiJKV1QifQ.e30.sig"],
    ["x-bytes", latin1(range(0, 255))],
    ["x-empty", ""],
    [longName, longValue],
    ["x-repeat", "1"],
    ["x-repeat", "2"],
  ];
  function* generate(): Generator<HeaderField> {
    yield* fields;
  }
  const block = encodeHeaderBlock(generate(), new Set(["authorization"]));
  t.same(encodeHeaderBlock(fields, new Set(["authorization"])), block, "an array and a generator encode alike");
  const decoder = new HpackDecoder();
  t.same(decoder.decode(block), fields, "the decoder reads back exactly the fields");
  t.equal(decoder.dynamicTableSize, 0, "nothing was added to the peer's dynamic table");
});

// --- HTTP/2 framing, just enough to carry header blocks over a real socket (RFC 7540 §4, §6)
const settingHeaderTableSize = 0x1;
const maxFrameSize = 16384;
const flag = frameFlag;

/** A header block as HEADERS + CONTINUATION frames no larger than the default SETTINGS_MAX_FRAME_SIZE. */
function headerFrames(streamId: number, block: Buffer, endStream: boolean): Buffer {
  const frames: Buffer[] = [];
  for (let offset = 0; offset === 0 || offset < block.length; offset += maxFrameSize) {
    const last = offset + maxFrameSize >= block.length;
    const type = offset === 0 ? frameType.headers : frameType.continuation;
    const flags = (last ? flag.endHeaders : 0) | (offset === 0 && endStream ? flag.endStream : 0);
    frames.push(frame(type, flags, streamId, block.subarray(offset, offset + maxFrameSize)));
  }
  return Buffer.concat(frames);
}

/**
 * Splits a socket's bytes into frames and joins HEADERS + CONTINUATION payloads
 * into header blocks (padding and priority removed). Returns the 'data' listener.
 */
function frameReader(options: { expectPreface: boolean; onFrame: (frame: Frame) => void; onHeaderBlock: (streamId: number, block: Buffer, endStream: boolean) => void; onError: (message: string) => void }): (chunk: Buffer) => void {
  let pending = Buffer.alloc(0);
  let prefacePending = options.expectPreface;
  let open: { streamId: number; endStream: boolean; parts: Buffer[] } | undefined;
  return (chunk) => {
    pending = Buffer.concat([pending, chunk]);
    if (prefacePending) {
      if (pending.length < clientPreface.length) return;
      if (!pending.subarray(0, clientPreface.length).equals(clientPreface)) options.onError("bad client preface");
      pending = pending.subarray(clientPreface.length);
      prefacePending = false;
    }
    while (pending.length >= 9) {
      const length = pending.readUIntBE(0, 3);
      if (pending.length < 9 + length) return;
      const received: Frame = { type: pending[3]!, flags: pending[4]!, streamId: pending.readUInt32BE(5) & 0x7fffffff, payload: pending.subarray(9, 9 + length) };
      pending = pending.subarray(9 + length);
      if (open !== undefined && (received.type !== frameType.continuation || received.streamId !== open.streamId)) options.onError("header block interrupted");
      if (received.type === frameType.headers) {
        let payload = received.payload;
        if ((received.flags & flag.padded) !== 0) payload = payload.subarray(1, payload.length - payload[0]!);
        if ((received.flags & flag.priority) !== 0) payload = payload.subarray(5);
        open = { streamId: received.streamId, endStream: (received.flags & flag.endStream) !== 0, parts: [payload] };
      } else if (received.type === frameType.continuation) {
        if (open === undefined) options.onError("CONTINUATION without HEADERS");
        open?.parts.push(received.payload);
      } else {
        options.onFrame(received);
        continue;
      }
      if ((received.flags & flag.endHeaders) !== 0 && open !== undefined) {
        const { streamId, endStream, parts } = open;
        open = undefined;
        options.onHeaderBlock(streamId, Buffer.concat(parts), endStream);
      }
    }
  };
}

async function listen(server: Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return (server.address() as AddressInfo).port;
}

function within<T>(promise: Promise<T>, what: string, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Pseudo-header fields as a record, regular fields as an ordered list: node:http2 decides the order of the former. */
function splitFields(fields: readonly HeaderField[]): { pseudo: Record<string, string>; regular: HeaderField[] } {
  const pseudo: Record<string, string> = {};
  const regular: HeaderField[] = [];
  for (const field of fields) {
    if (field[0].startsWith(":")) pseudo[field[0]] = field[1];
    else regular.push(field);
  }
  return { pseudo, regular };
}

// Values across the byte range: nghttp2 accepts HTAB, 0x20–0x7e and 0x80–0xff in values, but no whitespace at either end.
const printable = `<${latin1(range(0x20, 0x7e))}>`;
const highBytes = latin1(range(0x80, 0xff));
const everyAcceptedByte = `[${latin1([0x09, ...range(0x20, 0x7e), ...range(0x80, 0xff)])}]`;

await t.test("interop: a node:http2 (nghttp2) client's header blocks decode to what it sent", async (t) => {
  // One decoder for the connection, advertising the default 4096-octet table; later the server
  // lowers the table to 256 octets with a new SETTINGS, which the client's encoder must announce
  // with a size update and then live with, evicting as it goes.
  const smallTableSize = 256;
  const decoder = new HpackDecoder();
  const blocks: { streamId: number; block: Buffer; fields: HeaderField[]; table: HeaderField[]; tableSize: number }[] = [];
  const problems: string[] = [];
  const sockets = new Set<Socket>();
  const server = createNetServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", (error) => problems.push(`server socket: ${error.message}`));
    socket.write(settingsFrame([]));
    socket.on(
      "data",
      frameReader({
        expectPreface: true,
        onError: (message) => problems.push(message),
        onFrame: (received) => {
          if (received.type === frameType.settings && (received.flags & flag.ack) === 0) socket.write(frame(frameType.settings, flag.ack, 0));
          if (received.type === frameType.rstStream) problems.push(`client reset stream ${received.streamId}`);
          if (received.type === frameType.goaway && received.payload.readUInt32BE(4) !== 0) problems.push(`client GOAWAY error ${received.payload.readUInt32BE(4)}`);
        },
        onHeaderBlock: (streamId, block) => {
          let fields: HeaderField[];
          try {
            fields = decoder.decode(block);
          } catch (error) {
            problems.push(`stream ${streamId}: ${String(error)}`);
            socket.destroy();
            return;
          }
          blocks.push({ streamId, block, fields, table: decoder.dynamicTableEntries(), tableSize: decoder.dynamicTableSize });
          // Answer with a block from our encoder, for nghttp2's decoder to check in turn.
          const response: HeaderField[] = [[":status", "200"], ["content-type", "application/grpc"], ["x-field-count", String(fields.length)], ["x-high", highBytes], ["x-printable", printable]];
          socket.write(headerFrames(streamId, encodeHeaderBlock(response), true));
        },
      }),
    );
  });
  const port = await listen(server);
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  });

  const client = http2Connect(`http://127.0.0.1:${port}`);
  t.teardown(() => client.destroy());
  client.on("error", (error: Error) => problems.push(`client: ${error.message}`));
  await within(new Promise((resolve) => client.once("remoteSettings", resolve)), "the client to see our SETTINGS");

  const requestHeaders = (i: number): OutgoingHttpHeaders => ({
    ":method": "POST",
    ":path": `/demo.v1.OpsService/Call${i % 3}`,
    "content-type": "application/grpc",
    te: "trailers",
    "user-agent": "grpc-node-js/1.14.7",
    "grpc-timeout": `${1000 + (i % 2)}m`,
    "x-request-id": randomBytes(8).toString("hex"),
    "x-printable": printable,
    "x-high": i % 2 === 0 ? highBytes : highBytes.split("").reverse().join(""),
    "x-repeat": ["alpha", "beta", `gamma-${i % 2}`],
    // nghttp2 never indexes short authorization values; x-secret is marked sensitive.
    authorization: `Bearer token-${i % 4}`,
    "x-secret": "s3cret",
    [sensitiveHeaders]: ["x-secret"],
    // On request 2, larger than a frame: the block arrives as HEADERS + CONTINUATION.
    "x-long": i === 2 ? "L".repeat(20_000) : `${"l".repeat(600)}${i}`,
  });
  const requests: OutgoingHttpHeaders[] = [];
  async function send(headers: OutgoingHttpHeaders): Promise<void> {
    const i = requests.push(headers) - 1;
    const stream: ClientHttp2Stream = client.request(headers, { endStream: true });
    const response = await within(
      new Promise<IncomingHttpHeaders>((resolve, reject) => {
        stream.once("response", resolve);
        stream.once("error", reject);
      }),
      `response ${i}`,
    );
    stream.resume();
    await within(new Promise((resolve) => stream.once("close", resolve)), `stream ${i} to close`);
    t.same(
      [response[":status"], response["content-type"], response["x-high"], response["x-printable"]],
      [200, "application/grpc", highBytes, printable],
      `request ${i}: nghttp2 decoded our response block`,
    );
  }

  const firstPhase = 4;
  for (let i = 0; i < firstPhase; i++) await send(requestHeaders(i));
  await send(requests[firstPhase - 1]!);
  for (const socket of sockets) socket.write(settingsFrame([[settingHeaderTableSize, smallTableSize]]));
  await within(new Promise((resolve) => client.once("remoteSettings", resolve)), "the client to see the smaller table");
  for (let i = firstPhase; i < 2 * firstPhase; i++) await send(requestHeaders(i));
  await send(requests.at(-1)!);
  // Small enough for the 256-octet table: the repeat refers to what the first one added.
  const small: OutgoingHttpHeaders = { ":method": "POST", ":path": "/demo.v1.OpsService/Small", "x-small": "\u00e9t\u00e9", "grpc-timeout": "1S" };
  await send(small);
  await send(small);
  await within(new Promise<void>((resolve) => client.close(resolve)), "the client to close");

  t.same(problems, [], "no decode errors, resets or socket errors");
  t.equal(blocks.length, requests.length, "one header block per request");
  for (const [i, { fields, streamId }] of blocks.entries()) {
    const headers = requests[i]!;
    const { pseudo, regular } = splitFields(fields);
    t.equal(streamId, 2 * i + 1, `request ${i}: stream id`);
    t.same(pseudo, { ":method": "POST", ":path": headers[":path"], ":scheme": "http", ":authority": `127.0.0.1:${port}` }, `request ${i}: pseudo-header fields`);
    const expected: HeaderField[] = Object.entries(headers)
      .filter(([name]) => !name.startsWith(":"))
      .flatMap(([name, value]) => (Array.isArray(value) ? value.map((v): HeaderField => [name, String(v)]) : [[name, String(value)] as HeaderField]));
    t.same(regular, expected, `request ${i}: regular fields, in order, byte for byte`);
  }

  // The blocks really exercised the dynamic table.
  const afterSettings = blocks.slice(firstPhase + 1);
  t.ok(blocks.slice(0, firstPhase + 1).some(({ table }) => table.some(([name]) => name === "x-high")), "latin1 values were indexed");
  t.throws(() => new HpackDecoder().decode(blocks[firstPhase]!.block), /past the end of the table/, "a repeated request refers to entries earlier blocks added");
  t.ok(blocks[firstPhase]!.block.length < blocks[firstPhase - 1]!.block.length / 4, "and is mostly table references");
  t.same(afterSettings[0]!.block.subarray(0, 3), hex("3f e1 01"), "the first block after the new SETTINGS starts with a size update to 256");
  t.ok(blocks[firstPhase]!.tableSize > smallTableSize, "the table was larger than 256 octets before the update");
  t.ok(afterSettings.every(({ tableSize }) => tableSize <= smallTableSize), "and never again after it");
  const evicted = afterSettings.some(({ table }, i) => i > 0 && afterSettings[i - 1]!.table.some((entry) => !table.some((kept) => kept[0] === entry[0] && kept[1] === entry[1])));
  t.ok(evicted, "entries were evicted from the 256-octet table by insertions");
  t.throws(() => new HpackDecoder().decode(afterSettings.at(-1)!.block), /past the end of the table/, "entries of the small table are referenced");
});

await t.test("interop: node:http2 (nghttp2) accepts our header blocks, raw and Huffman-coded", async (t) => {
  const problems: string[] = [];
  const seen: { headers: IncomingHttpHeaders; rawHeaders: string[] }[] = [];
  const sessions = new Set<ServerHttp2Session>();
  const server = createHttp2Server();
  server.on("session", (session) => {
    sessions.add(session);
    session.on("close", () => sessions.delete(session));
    session.on("error", (error: Error) => problems.push(`session: ${error.message}`));
    session.on("frameError", (type, code) => problems.push(`frame error: type ${type}, code ${code}`));
  });
  server.on("sessionError", (error) => problems.push(`sessionError: ${error.message}`));
  server.on("stream", (stream, headers, _flags, ...rest: unknown[]) => {
    const rawHeaders = rest[0];
    seen.push({ headers, rawHeaders: Array.isArray(rawHeaders) ? rawHeaders.map(String) : [] });
    stream.on("error", (error) => problems.push(`stream ${stream.id}: ${error.message}`));
    stream.respond({ ":status": 200, "content-type": "application/grpc", "x-high": highBytes, "x-printable": printable }, { endStream: true });
  });
  const port = await new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port)));
  t.teardown(async () => {
    for (const session of sessions) session.destroy();
    await new Promise((resolve) => server.close(resolve));
  });

  // Requests: raw literals from encodeHeaderBlock, plus Huffman literals built with huffmanEncode.
  const bigValue = "B".repeat(20_000);
  const requests: { fields: HeaderField[]; huffman: HeaderField[]; sensitive: Set<string> }[] = [
    {
      fields: [
        [":method", "POST"],
        [":scheme", "http"],
        [":path", "/demo.v1.OpsService/GetStatus"],
        [":authority", `127.0.0.1:${port}`],
        ["content-type", "application/grpc"],
        ["te", "trailers"],
        ["user-agent", "airlock-sidecar/0.1"],
        ["grpc-timeout", "5S"],
        ["authorization", "Bearer eyJhbGciOiJFZERTQSJ9.e30.c2ln"],
        ["x-printable", printable],
        ["x-high", highBytes],
        ["x-every-byte", everyAcceptedByte],
        ["x-repeat", "one"],
        ["x-repeat", "two"],
        ["x-empty", ""],
      ],
      huffman: [
        ["x-huffman-every-byte", everyAcceptedByte],
        ["x-huffman-printable", printable],
        ["x-huffman-high", highBytes],
      ],
      sensitive: new Set(["authorization"]),
    },
    {
      fields: [
        [":method", "GET"],
        [":scheme", "https"],
        [":path", "/"],
        [":authority", "example.test"],
        ["accept-encoding", "gzip, deflate"],
        ["x-big", bigValue],
      ],
      huffman: [[`x-${"n".repeat(150)}`, `${"v".repeat(200)}${everyAcceptedByte}`]],
      sensitive: new Set(),
    },
  ];

  const decoder = new HpackDecoder();
  const responses: HeaderField[][] = [];
  const socket = netConnect({ host: "127.0.0.1", port });
  t.teardown(() => socket.destroy());
  socket.on("error", (error) => problems.push(`client socket: ${error.message}`));
  const allAnswered = new Promise<void>((resolve) => {
    socket.on(
      "data",
      frameReader({
        expectPreface: false,
        onError: (message) => problems.push(message),
        onFrame: (received) => {
          if (received.type === frameType.settings && (received.flags & flag.ack) === 0) socket.write(frame(frameType.settings, flag.ack, 0));
          if (received.type === frameType.rstStream) problems.push(`server reset stream ${received.streamId} with code ${received.payload.readUInt32BE(0)}`);
          if (received.type === frameType.goaway) problems.push(`server GOAWAY with code ${received.payload.readUInt32BE(4)}`);
          if (problems.length > 0) resolve();
        },
        onHeaderBlock: (_streamId, block) => {
          try {
            responses.push(decoder.decode(block));
          } catch (error) {
            problems.push(`response: ${String(error)}`);
          }
          if (responses.length === requests.length || problems.length > 0) resolve();
        },
      }),
    );
  });
  await within(new Promise<void>((resolve) => socket.once("connect", resolve)), "the connection");
  socket.write(Buffer.concat([clientPreface, settingsFrame([])]));
  requests.forEach(({ fields, huffman, sensitive }, i) => {
    const block = Buffer.concat([encodeHeaderBlock(fields, sensitive), ...huffman.map(([name, value]) => literalField(name, value, { huffmanName: true, huffmanValue: true }))]);
    socket.write(headerFrames(2 * i + 1, block, true));
  });
  await within(allAnswered, "the responses");

  t.same(problems, [], "nghttp2 rejected nothing");
  t.equal(seen.length, requests.length, "a stream event per request");
  for (const [i, { headers, rawHeaders }] of seen.entries()) {
    const { fields, huffman, sensitive } = requests[i]!;
    t.same(rawHeaders, [...fields, ...huffman].flat(), `request ${i}: the server saw exactly our fields, in order`);
    const flagged: unknown = Reflect.get(headers, sensitiveHeaders);
    const flaggedSensitive = Array.isArray(flagged) ? flagged.map(String) : [];
    t.same(flaggedSensitive.filter((name) => sensitive.has(name)).sort(), [...sensitive].sort(), `request ${i}: never-indexed fields arrive flagged sensitive`);
  }
  for (const [i, response] of responses.entries()) {
    t.same(response.filter(([name]) => name !== "date"), [[":status", "200"], ["content-type", "application/grpc"], ["x-high", highBytes], ["x-printable", printable]], `response ${i}: nghttp2's block decodes`);
  }
});
