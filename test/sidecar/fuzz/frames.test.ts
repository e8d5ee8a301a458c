/**
 * Fuzzing the data plane's frame reader (sidecar/h2/connection.ts, server role)
 * with fast-check: structure-aware frame sequences (every frame type, flags,
 * stream ids near the interesting ones, padding, priority blocks, header blocks
 * that are valid or not, lengths that lie) sent in random chunks. Whatever
 * arrives, the process does not throw, the connection either answers a PING
 * or ends with GOAWAY and closes, and no stream is left open once the socket
 * is gone. Time-bounded (test/helpers/fuzz.ts); `npm run fuzz` runs it long.
 */
import { type AddressInfo, connect as netConnect, createServer as createNetServer, type Socket } from "node:net";
import fc from "fast-check";
import t from "tap";
import { H2Connection, type H2Stream } from "../../../sidecar/h2/connection.js";
import { encodeHeaderBlock } from "../../../sidecar/h2/hpack.js";
import { corpus, fuzzParameters } from "../../helpers/fuzz.js";
import { clientPreface, FrameSplitter, frame, frameType, settingsFrame } from "../../helpers/h2-frames.js";

const open = new Set<H2Stream>();
const sockets = new Set<Socket>();
const connections: H2Connection[] = [];
const server = createNetServer((socket) => {
  sockets.add(socket);
  socket.on("close", () => sockets.delete(socket));
  socket.on("error", () => undefined);
  connections.push(
    new H2Connection(socket, {
      role: "server",
      limits: { maxSettingsPerSecond: 1_000_000, maxPingsPerSecond: 1_000_000 },
      onStream: (stream) => {
        open.add(stream);
        stream.onclose = () => open.delete(stream);
        stream.ondata = () => undefined;
        stream.onend = () => stream.sendHeaders([[":status", "200"], ["grpc-status", "0"]], true);
        stream.resume();
      },
    }),
  );
});
const port = await new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port)));
t.teardown(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise((resolve) => server.close(resolve));
});

const validBlock = encodeHeaderBlock([
  [":method", "POST"],
  [":scheme", "http"],
  [":path", "/fuzz"],
  [":authority", "fuzz.test"],
]);

const streamId = fc.oneof(fc.constantFrom(0, 1, 3, 5, 2, 0x7fffffff), fc.integer({ min: 0, max: 41 }));
const payload = fc.oneof(
  fc.uint8Array({ maxLength: 24 }).map((b) => Buffer.from(b)),
  fc.constant(validBlock),
  fc.constantFrom(Buffer.alloc(4), Buffer.alloc(5), Buffer.alloc(8), Buffer.from([0, 0, 0, 0, 0, 0]), Buffer.from([0x7f, 0xff, 0xff, 0xff])),
);
/** One frame: a known type most of the time, flags from the interesting bits, a payload that may lie about itself. */
const anyFrame = fc.tuple(fc.oneof(fc.integer({ min: 0, max: 9 }), fc.constant(0xfa)), fc.constantFrom(0, 0x1, 0x4, 0x5, 0x8, 0x20, 0x2d, 0xff), streamId, payload).map(([type, flags, id, body]) => frame(type, flags, id, body));

const sequence = fc.tuple(fc.array(anyFrame, { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 6 }));

/** Sends the bytes in chunks, then a PING: resolves "alive" on its ACK, "closed" on GOAWAY or close. */
function run(bytes: Buffer, cuts: number[]): Promise<"alive" | "closed" | "timeout"> {
  return new Promise((resolve) => {
    const socket = netConnect({ host: "127.0.0.1", port });
    const splitter = new FrameSplitter();
    const ping = Buffer.from("fuzzping");
    let settled = false;
    const done = (result: "alive" | "closed" | "timeout") => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => done("timeout"), 3000);
    socket.on("error", () => done("closed"));
    socket.on("close", () => done("closed"));
    socket.on("data", (chunk: Buffer) => {
      let frames;
      try {
        frames = splitter.push(chunk);
      } catch {
        return;
      }
      for (const f of frames) {
        if (f.type === frameType.ping && (f.flags & 1) === 1 && f.payload.equals(ping)) return done("alive");
      }
    });
    socket.on("connect", () => {
      const all = Buffer.concat([clientPreface, settingsFrame([]), bytes, frame(frameType.ping, 0, 0, ping)]);
      const at = [...new Set(cuts.map((c) => c % all.length))].sort((a, b) => a - b);
      let last = 0;
      for (const point of [...at, all.length]) {
        if (point > last) socket.write(all.subarray(last, point));
        last = Math.max(last, point);
      }
    });
  });
}

await t.test("any frame sequence: no throw, a live or closed connection, no stream left behind", async (t) => {
  await fc.assert(
    fc.asyncProperty(sequence, async ([frames, cuts]) => {
      const result = await run(Buffer.concat(frames), cuts);
      if (result === "timeout") throw new Error(`the connection neither answered a PING nor closed: ${Buffer.concat(frames).toString("hex")}`);
    }),
    fuzzParameters(),
  );
  // Every socket the fuzzer opened is gone: each connection's streams were closed with it.
  for (let i = 0; i < 100 && sockets.size > 0; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  t.equal(sockets.size, 0, "all fuzz connections closed");
  t.equal(open.size, 0, "no stream left open");
});

await t.test("corpus: frame sequences that exercise edges", async (t) => {
  for (const bytes of corpus("frames")) {
    const result = await run(bytes, []);
    t.not(result, "timeout", `${bytes.toString("hex").slice(0, 40)}: ${result}`);
  }
});
