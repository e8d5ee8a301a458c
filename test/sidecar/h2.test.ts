/**
 * Protocol-level tests of the data plane's HTTP/2 connection layer
 * (sidecar/h2/connection.ts): against node:http2 (nghttp2) as an independent
 * peer in both roles, and against raw sockets for peers that break the rules.
 */
import { createHash, randomBytes } from "node:crypto";
import { clientPreface, type Frame, FrameSplitter, frame, frameFlag, frameType, settingsFrame } from "../helpers/h2-frames.js";
import {
  type ClientHttp2Session,
  type ClientHttp2Stream,
  connect as http2Connect,
  constants as h2,
  createServer as createHttp2Server,
  type IncomingHttpHeaders,
  type ServerHttp2Session,
  type ServerHttp2Stream,
} from "node:http2";
import { type AddressInfo, connect as netConnect, createServer as createNetServer, type Socket } from "node:net";
import t, { type Test } from "tap";
import { H2Connection, type H2Limits, type H2Stream } from "../../sidecar/h2/connection.js";
import { encodeHeaderBlock, type HeaderField, HpackDecoder } from "../../sidecar/h2/hpack.js";

// --- wire constants, written out here so the tests do not trust sidecar/h2/frames.ts

const type = frameType;
const flag = frameFlag;
const code = { noError: 0, protocolError: 1, flowControlError: 3, frameSizeError: 6, refusedStream: 7, cancel: 8, compressionError: 9 } as const;
const settingInitialWindowSize = 0x4;
const preface = clientPreface;
const MiB = 1 << 20;

function uint32Frame(frameType: number, streamId: number, value: number): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(value);
  return frame(frameType, 0, streamId, payload);
}

const requestBlock = (path = "/raw"): Buffer =>
  encodeHeaderBlock([
    [":method", "POST"],
    [":scheme", "http"],
    [":path", path],
    [":authority", "raw.test"],
  ]);

const headersFrame = (streamId: number, endStream: boolean, block: Buffer = requestBlock()): Buffer =>
  frame(type.headers, flag.endHeaders | (endStream ? flag.endStream : 0), streamId, block);

/** DATA frames of at most 16,384 bytes carrying `bytes`. */
function dataFrames(streamId: number, bytes: Buffer): Buffer {
  const frames: Buffer[] = [];
  for (let offset = 0; offset < bytes.length; offset += 16_384) frames.push(frame(type.data, 0, streamId, bytes.subarray(offset, offset + 16_384)));
  return Buffer.concat(frames);
}

const sha256 = (bytes: Buffer): string => createHash("sha256").update(bytes).digest("hex");
const hasField = (fields: readonly HeaderField[], name: string, value: string): boolean => fields.some(([n, v]) => n === name && v === value);

/** Rejects when `promise` does not settle in time, so a broken feature fails instead of hanging the run. */
async function within<T>(promise: Promise<T>, label: string, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${label}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// --- our server role, with every stream's close recorded

interface ServerStreamRecord {
  readonly stream: H2Stream;
  /** Every onclose call, to check it fires exactly once. */
  readonly closes: Array<{ code: number; error: Error | undefined }>;
  readonly closed: Promise<{ code: number; error: Error | undefined }>;
}

interface H2ServerHarness {
  readonly port: number;
  readonly connections: H2Connection[];
  readonly records: ServerStreamRecord[];
  /** Streams onStream handed out whose onclose has not fired yet. */
  readonly open: Set<H2Stream>;
}

/**
 * A node:net server running our H2Connection in the server role. `handler`
 * must not replace `stream.onclose`: the harness owns it.
 */
async function startH2Server(t: Test, handler: (stream: H2Stream) => void, limits?: Partial<H2Limits>): Promise<H2ServerHarness> {
  const connections: H2Connection[] = [];
  const records: ServerStreamRecord[] = [];
  const open = new Set<H2Stream>();
  const sockets = new Set<Socket>();
  const onStream = (stream: H2Stream): void => {
    const closes: ServerStreamRecord["closes"] = [];
    let resolveClosed!: (value: { code: number; error: Error | undefined }) => void;
    const closed = new Promise<{ code: number; error: Error | undefined }>((resolve) => (resolveClosed = resolve));
    open.add(stream);
    stream.onclose = (closeCode, error) => {
      closes.push({ code: closeCode, error });
      open.delete(stream);
      resolveClosed({ code: closeCode, error });
    };
    records.push({ stream, closes, closed });
    handler(stream);
  };
  const server = createNetServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    connections.push(new H2Connection(socket, limits === undefined ? { role: "server", onStream } : { role: "server", onStream, limits }));
  });
  const port = await new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port)));
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  });
  return { port, connections, records, open };
}

/** How often the echo handler was told to wait for window. */
const echoStats = { pauses: 0, drains: 0 };

/** The echo handler: response headers, every DATA chunk back with backpressure, trailers at the end. */
function echo(stream: H2Stream): void {
  stream.sendHeaders(
    [
      [":status", "200"],
      ["content-type", "application/octet-stream"],
    ],
    false,
  );
  stream.ondata = (chunk) => {
    if (!stream.write(chunk)) {
      echoStats.pauses++;
      stream.pause();
    }
  };
  stream.ondrain = () => {
    echoStats.drains++;
    stream.resume();
  };
  stream.onend = () => stream.sendHeaders([["x-done", "1"]], true);
  stream.resume();
}

async function nodeClient(t: Test, port: number, problems: string[]): Promise<ClientHttp2Session> {
  const client = http2Connect(`http://127.0.0.1:${port}`);
  t.teardown(() => client.destroy());
  client.on("error", (error: Error) => problems.push(`client session: ${error.message}`));
  client.on("goaway", (errorCode) => {
    if (errorCode !== 0) problems.push(`client got GOAWAY ${errorCode}`);
  });
  await within(new Promise((resolve) => client.once("remoteSettings", resolve)), "the server's SETTINGS");
  return client;
}

/** Sends `body` from a node client on one request stream and collects what comes back. */
async function nodeEcho(
  client: ClientHttp2Session,
  body: Buffer,
  chunkSize: number,
): Promise<{ status: unknown; contentType: unknown; received: Buffer; trailers: IncomingHttpHeaders | undefined; rstCode: number | undefined; error: Error | undefined }> {
  const request: ClientHttp2Stream = client.request({ ":method": "POST", ":path": "/echo", "content-type": "application/octet-stream" });
  let error: Error | undefined;
  request.on("error", (e: Error) => (error = e));
  const responseHeaders = new Promise<IncomingHttpHeaders>((resolve) => request.once("response", resolve));
  let trailers: IncomingHttpHeaders | undefined;
  request.once("trailers", (headers: IncomingHttpHeaders) => (trailers = headers));
  const chunks: Buffer[] = [];
  request.on("data", (chunk: Buffer) => chunks.push(chunk));
  const closed = new Promise<void>((resolve) => request.once("close", resolve));
  for (let offset = 0; offset < body.length; offset += chunkSize) {
    if (!request.write(body.subarray(offset, offset + chunkSize))) {
      await within(new Promise((resolve) => request.once("drain", resolve)), `drain at ${offset}`);
    }
  }
  request.end();
  const response = await within(responseHeaders, "the response headers");
  await within(closed, "the request stream to close");
  return { status: response[":status"], contentType: response["content-type"], received: Buffer.concat(chunks), trailers, rstCode: request.rstCode, error };
}

// --- a node:http2 server for our client role

interface NodeServerHarness {
  readonly port: number;
  readonly sessions: ServerHttp2Session[];
  /** The server's raw sockets, to drop a connection without any HTTP/2 goodbye. */
  readonly sockets: Socket[];
  readonly problems: string[];
  /** Resolves when node has closed its server stream `id` (waiting for the stream to arrive first). */
  streamClosed(id: number): Promise<void>;
}

async function startNodeServer(t: Test, onRequest: (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => void): Promise<NodeServerHarness> {
  const sessions: ServerHttp2Session[] = [];
  const sockets: Socket[] = [];
  const problems: string[] = [];
  const closedById = new Map<number, { promise: Promise<void>; resolve: () => void }>();
  const closedEntry = (id: number): { promise: Promise<void>; resolve: () => void } => {
    let entry = closedById.get(id);
    if (entry === undefined) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      entry = { promise, resolve };
      closedById.set(id, entry);
    }
    return entry;
  };
  const server = createHttp2Server();
  server.on("connection", (socket: Socket) => sockets.push(socket));
  server.on("session", (session) => {
    sessions.push(session);
    session.on("error", (error: Error) => problems.push(`server session: ${error.message}`));
  });
  server.on("stream", (stream, headers) => {
    stream.on("error", (error) => problems.push(`server stream ${stream.id}: ${error.message}`));
    const { resolve } = closedEntry(stream.id ?? -1);
    stream.once("close", resolve);
    onRequest(stream, headers);
  });
  const port = await new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port)));
  t.teardown(async () => {
    for (const session of sessions) session.destroy();
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  });
  return { port, sessions, sockets, problems, streamClosed: (id) => closedEntry(id).promise };
}

/**
 * Waits until node has finished stream `streamId` and our client has
 * processed every frame node sent for it: node's PING goes out after them,
 * and our connection handles frames in order before it ACKs.
 */
async function clientCaughtUp(node: NodeServerHarness, streamId: number): Promise<void> {
  await within(node.streamClosed(streamId), `node to close stream ${streamId}`);
  const error = await within(new Promise<Error | null>((resolve) => node.sessions[0]!.ping((err) => resolve(err))), "our client's PING ACK");
  if (error !== null) throw error;
}

interface ClientHarness {
  readonly connection: H2Connection;
  /** Times onUnusable was called. */
  unusableCalls: number;
  readonly unusable: Promise<void>;
}

function connectClient(t: Test, port: number): ClientHarness {
  const socket = netConnect({ host: "127.0.0.1", port });
  t.teardown(() => socket.destroy());
  let resolveUnusable!: () => void;
  const harness: { connection?: H2Connection; unusableCalls: number; unusable: Promise<void> } = {
    unusableCalls: 0,
    unusable: new Promise<void>((resolve) => (resolveUnusable = resolve)),
  };
  const connection = new H2Connection(socket, {
    role: "client",
    onUnusable: () => {
      harness.unusableCalls++;
      resolveUnusable();
    },
  });
  return Object.assign(harness, { connection });
}

interface ClientStreamRecord {
  readonly stream: H2Stream;
  readonly headers: Array<{ fields: HeaderField[]; endStream: boolean }>;
  readonly chunks: Buffer[];
  readonly closes: Array<{ code: number; error: Error | undefined }>;
  readonly closed: Promise<{ code: number; error: Error | undefined }>;
  readonly firstHeaders: Promise<HeaderField[]>;
}

function record(stream: H2Stream): ClientStreamRecord {
  const headers: ClientStreamRecord["headers"] = [];
  const chunks: Buffer[] = [];
  const closes: ClientStreamRecord["closes"] = [];
  let resolveClosed!: (value: { code: number; error: Error | undefined }) => void;
  let resolveHeaders!: (fields: HeaderField[]) => void;
  const closed = new Promise<{ code: number; error: Error | undefined }>((resolve) => (resolveClosed = resolve));
  const firstHeaders = new Promise<HeaderField[]>((resolve) => (resolveHeaders = resolve));
  stream.onheaders = (fields, endStream) => {
    headers.push({ fields, endStream });
    resolveHeaders(fields);
  };
  stream.ondata = (chunk) => chunks.push(Buffer.from(chunk));
  stream.onclose = (closeCode, error) => {
    closes.push({ code: closeCode, error });
    resolveClosed({ code: closeCode, error });
  };
  return { stream, headers, chunks, closes, closed, firstHeaders };
}

const request = (path: string, extra: HeaderField[] = []): HeaderField[] => [[":method", "POST"], [":scheme", "http"], [":path", path], [":authority", "x"], ...extra];

// --- a raw client socket that parses the frames our server sends

class RawPeer {
  readonly frames: Frame[] = [];
  isClosed = false;
  private readonly splitter = new FrameSplitter();
  private readonly listeners = new Set<() => void>();
  private pings = 0;

  private constructor(readonly socket: Socket) {
    socket.on("data", (chunk: Buffer) => {
      this.frames.push(...this.splitter.push(chunk));
      this.notify();
    });
    socket.on("error", () => undefined);
    socket.on("close", () => {
      this.isClosed = true;
      this.notify();
    });
  }

  static async connect(t: Test, port: number): Promise<RawPeer> {
    const socket = netConnect({ host: "127.0.0.1", port });
    t.teardown(() => socket.destroy());
    const peer = new RawPeer(socket);
    await within(new Promise((resolve) => socket.once("connect", resolve)), "the raw connection");
    return peer;
  }

  send(...frames: Buffer[]): void {
    this.socket.write(Buffer.concat(frames));
  }

  /** Resolves with `check()`'s first result that is not undefined, checked now and after every frame or the close. */
  async until<T>(check: () => T | undefined, label: string): Promise<T> {
    const now = check();
    if (now !== undefined) return now;
    let listener: (() => void) | undefined;
    try {
      return await within(
        new Promise<T>((resolve) => {
          listener = () => {
            const result = check();
            if (result !== undefined) resolve(result);
          };
          this.listeners.add(listener);
        }),
        label,
      );
    } finally {
      if (listener !== undefined) this.listeners.delete(listener);
    }
  }

  async closed(): Promise<void> {
    await this.until(() => (this.isClosed ? true : undefined), "the server to close the connection");
  }

  /**
   * Sends a PING and waits for its ACK: the server handles frames in order, so
   * everything sent before has been processed. False if the connection closed instead.
   */
  async sync(): Promise<boolean> {
    const payload = Buffer.alloc(8);
    payload.writeUInt32BE(0x5a5a0000 + ++this.pings, 4);
    this.send(frame(type.ping, 0, 0, payload));
    return this.until(() => {
      if (this.frames.some((f) => f.type === type.ping && (f.flags & flag.ack) !== 0 && f.payload.equals(payload))) return true;
      return this.isClosed ? false : undefined;
    }, "the PING ACK");
  }

  goaway(): { lastStreamId: number; errorCode: number } | undefined {
    const goaway = this.frames.find((f) => f.type === type.goaway);
    return goaway === undefined ? undefined : { lastStreamId: goaway.payload.readUInt32BE(0) & 0x7fffffff, errorCode: goaway.payload.readUInt32BE(4) };
  }

  resets(): Array<{ streamId: number; errorCode: number }> {
    return this.frames.filter((f) => f.type === type.rstStream).map((f) => ({ streamId: f.streamId, errorCode: f.payload.readUInt32BE(0) }));
  }

  data(streamId: number): Buffer {
    return Buffer.concat(this.frames.filter((f) => f.type === type.data && f.streamId === streamId).map((f) => f.payload));
  }

  private notify(): void {
    for (const listener of [...this.listeners]) listener();
  }
}

// ============================================================================

await t.test("server role against a node:http2 client", async (t) => {
  await t.test("8 MiB echo with flow control both ways, then 50 concurrent streams on the same session", async (t) => {
    const server = await startH2Server(t, echo);
    const problems: string[] = [];
    // Default settings: the client's receive windows are 65,535, so the 8 MiB echo must wait for its WINDOW_UPDATEs.
    const client = await nodeClient(t, server.port, problems);
    t.equal(client.localSettings.initialWindowSize, 65_535, "the client's stream receive window is the default");

    const body = randomBytes(8 * MiB);
    const pausesBefore = echoStats.pauses;
    const drainsBefore = echoStats.drains;
    const big = await nodeEcho(client, body, 64 * 1024);
    t.ok(echoStats.pauses > pausesBefore, `the server's writes waited for the client's window (${echoStats.pauses - pausesBefore} times)`);
    t.equal(echoStats.drains - drainsBefore, echoStats.pauses - pausesBefore, "and every wait ended with ondrain");
    t.equal(big.status, 200, "status 200");
    t.equal(big.contentType, "application/octet-stream", "content-type");
    t.equal(big.received.length, body.length, "as many bytes came back as were sent");
    t.equal(sha256(big.received), sha256(body), "the sha256 of the echo matches");
    t.equal(big.trailers?.["x-done"], "1", "trailers arrived");
    t.equal(big.rstCode, 0, "the stream closed with NO_ERROR");
    t.equal(big.error, undefined, "no stream error");

    const bodies = Array.from({ length: 50 }, (_, i) => randomBytes(1 + ((i * 7919) % 40_000)));
    const results = await Promise.all(bodies.map((b) => nodeEcho(client, b, 4096)));
    results.forEach((result, i) => {
      const ok = result.status === 200 && result.received.equals(bodies[i]!) && result.trailers?.["x-done"] === "1" && result.rstCode === 0 && result.error === undefined;
      if (!ok) t.fail(`concurrent stream ${i}: status ${String(result.status)}, ${result.received.length}/${bodies[i]!.length} bytes, rstCode ${result.rstCode}`);
    });
    t.pass(`all ${results.length} concurrent echoes matched, with trailers and NO_ERROR`);

    t.same(problems, [], "no session errors");
    t.equal(server.connections.length, 1, "one connection");
    t.equal(server.records.length, 51, "onStream once per request");
    await within(Promise.all(server.records.map((r) => r.closed)), "every server stream to close");
    t.equal(server.open.size, 0, "no stream left open on the server connection");
    t.ok(
      server.records.every((r) => r.closes.length === 1 && r.closes[0]!.code === code.noError && r.closes[0]!.error === undefined && r.stream.closed),
      "every server stream's onclose fired exactly once, with NO_ERROR",
    );
    t.ok(
      server.records.every((r) => r.stream.headers[":path"] === "/echo" && r.stream.headers[":method"] === "POST"),
      "request headers reached onStream",
    );
  });

  await t.test("a response that ends while the client is still sending resets the stream with NO_ERROR", async (t) => {
    const server = await startH2Server(t, (stream) => {
      stream.sendHeaders([[":status", "200"], ["x-early", "yes"]], true);
    });
    const problems: string[] = [];
    const client = await nodeClient(t, server.port, problems);
    const req = client.request({ ":method": "POST", ":path": "/early" });
    let error: Error | undefined;
    req.on("error", (e: Error) => (error = e));
    const response = new Promise<IncomingHttpHeaders>((resolve) => req.once("response", resolve));
    const closed = new Promise<void>((resolve) => req.once("close", resolve));
    req.resume();
    req.write(randomBytes(32 * 1024)); // the request is never ended by the client
    const headers = await within(response, "the early response");
    await within(closed, "the client stream to close");
    t.equal(headers[":status"], 200, "status 200");
    t.equal(headers["x-early"], "yes", "response header");
    t.equal(req.rstCode, code.noError, "the server reset the stream with NO_ERROR");
    t.equal(error, undefined, "the client saw no stream error");
    const [only] = server.records;
    t.same(await within(only!.closed, "server stream close"), { code: code.noError, error: undefined }, "the server stream closed with NO_ERROR");
    t.equal(only!.closes.length, 1, "onclose fired once");
    t.equal(server.open.size, 0, "no stream left open on the server connection");
    t.same(problems, [], "no session errors");
  });

  await t.test("header blocks larger than a frame both ways (CONTINUATION)", async (t) => {
    const value = randomBytes(20_000).toString("hex"); // 40,000 characters: HPACK blocks well over 16,384 bytes either way
    const seen: Array<string | string[] | undefined> = [];
    const server = await startH2Server(t, (stream) => {
      seen.push(stream.headers["x-big"]);
      stream.sendHeaders([[":status", "200"], ["x-big-echo", String(stream.headers["x-big"])]], true);
    });
    const problems: string[] = [];
    const client = await nodeClient(t, server.port, problems);
    const req = client.request({ ":method": "GET", ":path": "/big", "x-big": value }, { endStream: true });
    req.on("error", (e: Error) => problems.push(`stream: ${e.message}`));
    const response = await within(new Promise<IncomingHttpHeaders>((resolve) => req.once("response", resolve)), "the response");
    req.resume();
    await within(new Promise((resolve) => req.once("close", resolve)), "the stream to close");
    t.same(seen, [value], "our server decoded the 40 KB value nghttp2 sent as HEADERS + CONTINUATION");
    t.equal(response["x-big-echo"], value, "nghttp2 decoded the 40 KB value our encoder split into HEADERS + CONTINUATION");
    t.equal(req.rstCode, 0, "the stream closed cleanly");
    t.same(problems, [], "no errors");
    t.equal(server.open.size, 0, "no stream left open on the server connection");
  });

  await t.test("PING is acknowledged with its payload", async (t) => {
    const server = await startH2Server(t, echo);
    const problems: string[] = [];
    const client = await nodeClient(t, server.port, problems);
    const payload = Buffer.from("h2-ping!");
    const [error, echoed] = await within(
      new Promise<[Error | null, Buffer]>((resolve) => {
        client.ping(payload, (err, _duration, received) => resolve([err, received]));
      }),
      "the PING ACK",
    );
    t.equal(error, null, "the ping callback got no error");
    t.same(echoed, payload, "the ACK carried the same payload");
    t.same(problems, [], "no session errors");
  });
});

await t.test("client role against a node:http2 server", async (t) => {
  await t.test("8 MiB echo with response headers, trailers and one onclose", async (t) => {
    const node = await startNodeServer(t, (stream) => {
      stream.respond({ ":status": 200, "content-type": "application/octet-stream" }, { waitForTrailers: true });
      stream.on("wantTrailers", () => stream.sendTrailers({ "x-done": "1" }));
      stream.pipe(stream);
    });
    const { connection } = connectClient(t, node.port);
    const stream = connection.openStream(request("/echo"), false);
    t.equal(stream.id, 1, "the first client stream is 1");
    const rec = record(stream);
    const body = randomBytes(8 * MiB);
    let waits = 0;
    for (let offset = 0; offset < body.length; offset += 64 * 1024) {
      if (!stream.write(body.subarray(offset, offset + 64 * 1024))) {
        waits++;
        await within(new Promise<void>((resolve) => (stream.ondrain = resolve)), `drain at ${offset}`);
      }
    }
    stream.end();
    const { code: closeCode, error } = await within(rec.closed, "the stream to close");
    const received = Buffer.concat(rec.chunks);
    t.equal(received.length, body.length, "as many bytes came back as were sent");
    t.equal(sha256(received), sha256(body), "the sha256 of the echo matches");
    t.ok(waits > 0, "write asked the writer to wait for window at least once");
    t.equal(rec.headers.length, 2, "two header blocks: response headers and trailers");
    t.ok(rec.headers[0] !== undefined && !rec.headers[0].endStream && hasField(rec.headers[0].fields, ":status", "200"), "response headers with :status 200, not ending the stream");
    t.ok(rec.headers[0] !== undefined && hasField(rec.headers[0].fields, "content-type", "application/octet-stream"), "response content-type");
    t.ok(rec.headers[1] !== undefined && rec.headers[1].endStream && hasField(rec.headers[1].fields, "x-done", "1"), "trailers with endStream");
    t.equal(closeCode, code.noError, "onclose with NO_ERROR");
    t.equal(error, undefined, "no error");
    t.equal(rec.closes.length, 1, "onclose fired exactly once");
    t.ok(stream.closed && stream.readableEnded && stream.localEnded, "the stream is closed, ended both ways");
    t.ok(connection.usable, "the connection is still usable");
    t.same(node.problems, [], "no errors on the node server");
  });

  await t.test("a server that answers early with END_STREAM, and one that refuses the stream", async (t) => {
    const node = await startNodeServer(t, (stream, headers) => {
      if (headers[":path"] === "/early") stream.respond({ ":status": 200, "x-early": "yes" }, { endStream: true });
      else stream.close(h2.NGHTTP2_REFUSED_STREAM);
    });
    const { connection } = connectClient(t, node.port);

    const early = record(connection.openStream(request("/early"), false));
    early.stream.write(randomBytes(1024)); // still sending: the request is never ended
    const earlyClose = await within(early.closed, "the early stream to close");
    t.equal(early.headers.length, 1, "one header block");
    t.ok(early.headers[0]?.endStream === true && hasField(early.headers[0].fields, ":status", "200") && hasField(early.headers[0].fields, "x-early", "yes"), "response headers ending the stream");
    t.ok(early.stream.readableEnded, "the response ended");
    t.same(earlyClose, { code: code.noError, error: undefined }, "onclose with NO_ERROR (nghttp2's RST_STREAM NO_ERROR)");
    t.equal(early.closes.length, 1, "onclose fired once");

    const refused = record(connection.openStream(request("/refuse"), false));
    const refusedClose = await within(refused.closed, "the refused stream to close");
    t.same(refusedClose, { code: code.refusedStream, error: undefined }, "onclose with REFUSED_STREAM");
    t.equal(refused.closes.length, 1, "onclose fired once");
    t.same(refused.headers, [], "no headers");
    t.ok(connection.usable, "the connection is still usable");
    // node reports its own stream.close(REFUSED_STREAM) as an error on its stream: expected here.
    t.same(node.problems.filter((p) => !p.includes("NGHTTP2_REFUSED_STREAM")), [], "no other errors on the node server");
  });

  await t.test("a request whose HEADERS carry END_STREAM is ended locally, and closes when the response ends", async (t) => {
    const node = await startNodeServer(t, (stream) => stream.respond({ ":status": 204 }, { endStream: true }));
    const { connection } = connectClient(t, node.port);
    const rec = record(connection.openStream([[":method", "GET"], [":scheme", "http"], [":path", "/get"], [":authority", "x"]], true));
    t.ok(rec.stream.localEnded, "localEnded is true right after openStream(..., endStream=true)");
    await clientCaughtUp(node, 1);
    t.same(rec.headers.map((h) => h.endStream), [true], "the response ended the stream");
    t.ok(rec.headers[0] !== undefined && hasField(rec.headers[0].fields, ":status", "204"), ":status 204");
    t.ok(rec.stream.readableEnded, "the response was delivered to its end");
    t.same(rec.closes, [{ code: code.noError, error: undefined }], "onclose fired once, with NO_ERROR, once both sides ended");
    t.ok(rec.stream.closed, "the stream is closed");
    t.same(node.problems, [], "no errors on the node server");
  });

  await t.test("header blocks larger than a frame both ways (CONTINUATION)", async (t) => {
    const value = randomBytes(20_000).toString("hex");
    const seen: unknown[] = [];
    const node = await startNodeServer(t, (stream, headers) => {
      seen.push(headers["x-big"]);
      stream.respond({ ":status": 200, "x-big-echo": headers["x-big"] ?? "" }, { endStream: true });
    });
    const { connection } = connectClient(t, node.port);
    // The request ends with DATA rather than on its HEADERS, so this test does not depend on the previous one.
    const rec = record(connection.openStream(request("/big", [["x-big", value]]), false));
    rec.stream.end();
    await clientCaughtUp(node, 1);
    t.same(seen, [value], "nghttp2 decoded the 40 KB value our encoder split into HEADERS + CONTINUATION");
    t.ok(rec.headers[0] !== undefined && hasField(rec.headers[0].fields, "x-big-echo", value), "our client decoded the 40 KB value nghttp2 sent as HEADERS + CONTINUATION");
    t.same(rec.closes, [{ code: code.noError, error: undefined }], "closed once, with NO_ERROR");
    t.same(node.problems, [], "no errors on the node server");
  });

  await t.test("GOAWAY makes the connection unusable; streams it covers finish, later ones are refused", async (t) => {
    const held: ServerHttp2Stream[] = [];
    const node = await startNodeServer(t, (stream) => {
      stream.respond({ ":status": 200 });
      held.push(stream);
    });
    const client = connectClient(t, node.port);
    const { connection } = client;
    const first = record(connection.openStream(request("/one"), false));
    const second = record(connection.openStream(request("/two"), false));
    first.stream.end();
    second.stream.end();
    await within(Promise.all([first.firstHeaders, second.firstHeaders]), "both response headers");
    t.ok(connection.usable, "usable before GOAWAY");
    t.equal(client.unusableCalls, 0, "onUnusable not called yet");

    // The server will finish stream 1 only.
    node.sessions[0]!.goaway(h2.NGHTTP2_NO_ERROR, 1);
    await within(client.unusable, "onUnusable");
    t.notOk(connection.usable, "usable is false after GOAWAY");
    t.equal(client.unusableCalls, 1, "onUnusable called once");
    t.same(await within(second.closed, "stream 3 to close"), { code: code.refusedStream, error: undefined }, "stream 3, past the GOAWAY's last stream, closes with REFUSED_STREAM");
    t.notOk(first.stream.closed, "stream 1 stays open");

    held[0]!.end();
    t.same(await within(first.closed, "stream 1 to close"), { code: code.noError, error: undefined }, "stream 1 still completes with NO_ERROR");
    t.equal(first.closes.length, 1, "stream 1 onclose fired once");
    t.equal(second.closes.length, 1, "stream 3 onclose fired once");
  });

  await t.test("the server closing the socket closes open streams with an error", async (t) => {
    const node = await startNodeServer(t, (stream) => stream.respond({ ":status": 200 }));
    const client = connectClient(t, node.port);
    const { connection } = client;
    const streams = [record(connection.openStream(request("/a"), false)), record(connection.openStream(request("/b"), true))];
    await within(Promise.all(streams.map((s) => s.firstHeaders)), "the response headers");
    // Drop the TCP connection under node's session: no GOAWAY, no RST_STREAM, just the close.
    node.sockets[0]!.destroy();
    const closes = await within(Promise.all(streams.map((s) => s.closed)), "the streams to close");
    for (const [i, closed] of closes.entries()) {
      t.ok(closed.error instanceof Error, `stream ${streams[i]!.stream.id}: onclose got an error`);
      t.equal(closed.code, code.cancel, `stream ${streams[i]!.stream.id}: with CANCEL`);
      t.equal(streams[i]!.closes.length, 1, `stream ${streams[i]!.stream.id}: onclose fired once`);
    }
    await within(client.unusable, "onUnusable");
    t.notOk(connection.usable, "the connection is unusable");
    const late = record(connection.openStream(request("/late"), true));
    t.equal((await within(late.closed, "a stream opened after the close")).code, code.refusedStream, "a stream opened on the closed connection is refused");
  });
});

await t.test("server role against misbehaving raw peers", async (t) => {
  const hello = (): Buffer => Buffer.concat([preface, settingsFrame([])]);

  await t.test("a client that does not speak HTTP/2 is disconnected", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    peer.socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    await peer.closed();
    t.pass("the server closed the socket");
    t.equal(server.records.length, 0, "no stream was opened");
    t.ok(server.connections[0]?.socket.destroyed, "the server side of the socket is destroyed");
  });

  await t.test("DATA on stream 0 is a connection error: GOAWAY PROTOCOL_ERROR", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    peer.send(hello(), frame(type.data, 0, 0, Buffer.from("hello")));
    await peer.closed();
    t.same(peer.goaway(), { lastStreamId: 0, errorCode: code.protocolError }, "GOAWAY PROTOCOL_ERROR, last stream 0");
    t.equal(peer.frames.at(-1)?.type, type.goaway, "GOAWAY is the last frame before the close");
  });

  await t.test("a frame longer than 16,384 bytes: GOAWAY FRAME_SIZE_ERROR", async (t) => {
    const server = await startH2Server(t, (stream) => stream.resume());
    const peer = await RawPeer.connect(t, server.port);
    peer.send(hello(), headersFrame(1, false), frame(type.data, 0, 1, Buffer.alloc(16_385)));
    await peer.closed();
    t.same(peer.goaway(), { lastStreamId: 1, errorCode: code.frameSizeError }, "GOAWAY FRAME_SIZE_ERROR naming stream 1 as the last processed");
    t.equal(server.records.length, 1, "stream 1 was opened before the bad frame");
    t.same(server.records[0]!.closes.map((c) => c.code), [code.cancel], "and closed once when the connection failed");
    t.ok(server.records[0]!.closes[0]?.error instanceof Error, "with an error");
    t.equal(server.open.size, 0, "no stream left open on the server connection");
  });

  await t.test("a header block that is not valid HPACK: GOAWAY COMPRESSION_ERROR", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    // 0x80 is an indexed field with index 0, which RFC 7541 §6.1 forbids.
    peer.send(hello(), headersFrame(1, true, Buffer.of(0x80)));
    await peer.closed();
    t.same(peer.goaway()?.errorCode, code.compressionError, "GOAWAY COMPRESSION_ERROR");
    t.equal(server.records.length, 0, "no stream was opened");
  });

  await t.test("a frame other than CONTINUATION inside a header block: GOAWAY PROTOCOL_ERROR", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    const block = requestBlock();
    peer.send(hello(), frame(type.headers, 0, 1, block.subarray(0, 4)), frame(type.ping, 0, 0, Buffer.alloc(8)));
    await peer.closed();
    t.same(peer.goaway()?.errorCode, code.protocolError, "GOAWAY PROTOCOL_ERROR");
    t.equal(server.records.length, 0, "no stream was opened");
  });

  await t.test("a peer-opened stream starts paused: DATA is held until resume()", async (t) => {
    const delivered: string[] = [];
    const server = await startH2Server(t, (stream) => {
      stream.ondata = (chunk) => delivered.push(chunk.toString("latin1"));
      stream.onend = () => delivered.push("<end>");
    });
    const peer = await RawPeer.connect(t, server.port);
    peer.send(hello(), headersFrame(1, false), frame(type.data, 0, 1, Buffer.from("first,")), frame(type.data, flag.endStream, 1, Buffer.from("second")));
    t.ok(await peer.sync(), "the frames were processed");
    t.equal(server.records.length, 1, "onStream was called");
    t.same(delivered, [], "nothing was delivered before resume()");
    server.records[0]!.stream.resume();
    t.same(delivered.join(""), "first,second<end>", "resume() delivered the held DATA in order, then onend");
    server.records[0]!.stream.sendHeaders([[":status", "200"]], true);
    t.same(await within(server.records[0]!.closed, "the stream to close"), { code: code.noError, error: undefined }, "closed with NO_ERROR once both sides ended");
    t.equal(server.open.size, 0, "no stream left open on the server connection");
  });

  await t.test("padded DATA and padded HEADERS with a priority block", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    const padded = (data: Buffer, padLength: number): Buffer => Buffer.concat([Buffer.of(padLength), data, Buffer.alloc(padLength)]);
    const priority = Buffer.of(0, 0, 0, 0, 15); // depends on stream 0, weight 16
    const padFlag = 0x8;
    const priorityFlag = 0x20;
    peer.send(
      hello(),
      frame(type.headers, flag.endHeaders | padFlag | priorityFlag, 1, padded(Buffer.concat([priority, requestBlock("/padded")]), 7)),
      frame(type.data, padFlag, 1, padded(Buffer.from("hello, "), 200)),
      frame(type.data, padFlag | flag.endStream, 1, padded(Buffer.from("padding"), 0)),
    );
    await peer.until(() => (peer.frames.some((f) => f.type === type.headers && (f.flags & flag.endStream) !== 0) || peer.isClosed ? true : undefined), "the trailers");
    t.equal(server.records[0]?.stream.headers[":path"], "/padded", "the padded header block decoded");
    t.equal(peer.data(1).toString("latin1"), "hello, padding", "DATA came back without the padding");
    const decoder = new HpackDecoder();
    const blocks = peer.frames.filter((f) => f.type === type.headers).map((f) => decoder.decode(f.payload));
    t.ok(blocks[0] !== undefined && hasField(blocks[0], ":status", "200"), "response headers :status 200");
    t.ok(blocks[1] !== undefined && hasField(blocks[1], "x-done", "1"), "trailers x-done: 1");
    t.same(server.records[0]?.closes, [{ code: code.noError, error: undefined }], "the stream closed once, with NO_ERROR");
    t.equal(peer.goaway(), undefined, "no GOAWAY");
  });

  await t.test("DATA after the peer's END_STREAM: RST_STREAM STREAM_CLOSED", async (t) => {
    const server = await startH2Server(t, () => undefined);
    const peer = await RawPeer.connect(t, server.port);
    peer.send(hello(), headersFrame(1, true), frame(type.data, 0, 1, Buffer.from("too late")));
    t.ok(await peer.sync(), "the connection stays up");
    t.same(peer.resets(), [{ streamId: 1, errorCode: 5 }], "RST_STREAM STREAM_CLOSED for stream 1");
    t.same(server.records[0]?.closes.map((c) => c.code), [5], "onclose fired once with STREAM_CLOSED");
    t.equal(server.open.size, 0, "no stream left open on the server connection");
  });

  await t.test("maxConcurrentStreams: streams past the limit get REFUSED_STREAM", async (t) => {
    const server = await startH2Server(t, () => undefined, { maxConcurrentStreams: 2 });
    const peer = await RawPeer.connect(t, server.port);
    peer.send(hello(), headersFrame(1, false), headersFrame(3, false), headersFrame(5, false));
    t.ok(await peer.sync(), "the connection stays up");
    t.same(peer.resets(), [{ streamId: 5, errorCode: code.refusedStream }], "RST_STREAM REFUSED_STREAM for stream 5 only");
    t.equal(server.records.length, 2, "onStream called twice");
    t.same(server.records.map((r) => r.stream.id), [1, 3], "for streams 1 and 3");
    const settings = peer.frames.find((f) => f.type === type.settings && (f.flags & flag.ack) === 0);
    const advertised = settings === undefined ? [] : Array.from({ length: settings.payload.length / 6 }, (_, i) => [settings.payload.readUInt16BE(i * 6), settings.payload.readUInt32BE(i * 6 + 2)]);
    t.ok(advertised.some(([id, value]) => id === 0x3 && value === 2), "the server announced SETTINGS_MAX_CONCURRENT_STREAMS 2");

    // Once stream 1 is gone there is room again.
    peer.send(uint32Frame(type.rstStream, 1, code.cancel), headersFrame(7, false));
    t.ok(await peer.sync(), "the connection stays up");
    t.same(server.records[0]!.closes.map((c) => c.code), [code.cancel], "the client's RST_STREAM closed stream 1 with its code");
    t.same(server.records.map((r) => r.stream.id), [1, 3, 7], "stream 7 is accepted after stream 1 was reset");
    t.same(peer.resets(), [{ streamId: 5, errorCode: code.refusedStream }], "and not refused");
    t.equal(peer.goaway(), undefined, "no GOAWAY");
  });

  await t.test("DATA beyond the stream's flow-control window is rejected, not buffered", async (t) => {
    // The stream window at the protocol default, so the peer's limit does not depend on when it sees our SETTINGS;
    // the connection window larger, so only the stream's is exceeded.
    const server = await startH2Server(t, () => undefined, { streamWindow: 65_535, connectionWindow: 4 * MiB });
    const peer = await RawPeer.connect(t, server.port);
    peer.send(hello());
    await peer.until(() => (peer.frames.some((f) => f.type === type.windowUpdate && f.streamId === 0) ? true : undefined), "the server's connection WINDOW_UPDATE");
    // The stream is never resumed, so nothing is consumed and no WINDOW_UPDATE is due: 65,535 bytes is all the client may send.
    peer.send(headersFrame(1, false), dataFrames(1, Buffer.alloc(4 * 65_535, 1)));
    const alive = await peer.sync();
    const rejected = peer.resets().some((r) => r.streamId === 1 && r.errorCode === code.flowControlError) || peer.goaway()?.errorCode === code.flowControlError;
    t.ok(rejected, "RST_STREAM or GOAWAY with FLOW_CONTROL_ERROR for the 196,605 bytes past the window", { alive, resets: peer.resets(), goaway: peer.goaway() });
    t.equal(server.records.length, 1, "the stream was opened");
  });

  await t.test("DATA beyond the connection's flow-control window is a connection error", async (t) => {
    const server = await startH2Server(t, () => undefined, { streamWindow: 65_535, connectionWindow: 65_535 });
    const peer = await RawPeer.connect(t, server.port);
    // Each stream stays within its own window; together they exceed the connection's by 3 × 65,535 bytes.
    const streams = [1, 3, 5, 7];
    peer.send(hello(), ...streams.map((id) => Buffer.concat([headersFrame(id, false), dataFrames(id, Buffer.alloc(65_535, 2))])));
    const alive = await peer.sync();
    const rejected = peer.goaway()?.errorCode === code.flowControlError || peer.resets().some((r) => r.errorCode === code.flowControlError);
    t.ok(rejected, "GOAWAY (or at least RST_STREAM) FLOW_CONTROL_ERROR for the 196,605 bytes past the connection window", { alive, resets: peer.resets(), goaway: peer.goaway() });
  });

  await t.test("a SETTINGS that shrinks the initial window below what is in flight (negative window, RFC 9113 §6.9.2)", async (t) => {
    let served: H2Stream | undefined;
    const server = await startH2Server(t, (stream) => {
      served = stream;
      stream.resume();
      stream.sendHeaders([[":status", "200"]], false);
      stream.write(Buffer.alloc(100, "a"));
    });
    const peer = await RawPeer.connect(t, server.port);
    peer.send(preface, settingsFrame([[settingInitialWindowSize, 100]]), headersFrame(1, false));
    await peer.until(() => (peer.data(1).length >= 100 ? true : undefined), "the first 100 bytes");
    t.equal(peer.data(1).toString("latin1"), "a".repeat(100), "the server filled the 100-byte window exactly");

    // Window 100 - 100 sent = 0; lowering the initial window to 50 makes it -50.
    peer.send(settingsFrame([[settingInitialWindowSize, 50]]));
    t.ok(await peer.sync(), "the new SETTINGS was processed");
    const more = Buffer.concat([Buffer.alloc(50, "b"), Buffer.alloc(50, "c")]);
    served!.write(more);
    served!.sendHeaders([["x-done", "1"]], true);
    t.ok(await peer.sync(), "the write was processed");
    t.equal(peer.data(1).length, 100, "nothing more was sent while the window is negative");

    // -50 + 150 = 100: exactly the 100 bytes written may go now.
    peer.send(uint32Frame(type.windowUpdate, 1, 150));
    await peer.until(() => (peer.frames.some((f) => f.type === type.headers && (f.flags & flag.endStream) !== 0) || peer.isClosed ? true : undefined), "the trailers");
    const after = peer.data(1).subarray(100);
    t.equal(after.toString("latin1"), more.toString("latin1"), "the 100 bytes written arrive whole and in order before the trailers");
    t.equal(peer.goaway(), undefined, "no GOAWAY");
  });

  await t.test("a flood of empty CONTINUATION frames: GOAWAY ENHANCE_YOUR_CALM, not a growing buffer", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    const block = requestBlock();
    const flood = Array.from({ length: 200 }, () => frame(type.continuation, 0, 1));
    peer.send(hello(), frame(type.headers, 0, 1, block), ...flood);
    await peer.closed();
    t.same(peer.goaway()?.errorCode, 0xb, "GOAWAY ENHANCE_YOUR_CALM");
    t.equal(server.records.length, 0, "no stream was opened");
  });

  await t.test("a second HEADERS without END_STREAM on a request stream: RST_STREAM PROTOCOL_ERROR", async (t) => {
    const server = await startH2Server(t, () => undefined);
    const peer = await RawPeer.connect(t, server.port);
    const trailersBlock = encodeHeaderBlock([["x-more", "headers"]]);
    peer.send(hello(), headersFrame(1, false), frame(type.headers, flag.endHeaders, 1, trailersBlock));
    t.ok(await peer.sync(), "the connection stays up");
    t.same(peer.resets(), [{ streamId: 1, errorCode: code.protocolError }], "RST_STREAM PROTOCOL_ERROR for stream 1");
    t.same(server.records[0]?.closes.map((c) => c.code), [code.protocolError], "onclose fired once with PROTOCOL_ERROR");
    t.equal(server.open.size, 0, "no stream left open on the server connection");
  });

  await t.test("a field value with CR, LF or NUL is a malformed request: RST_STREAM PROTOCOL_ERROR, no stream", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    const blocks = ["a\r\nx-injected: 1", "nul\0", "lf\n"].map((value) =>
      encodeHeaderBlock([
        [":method", "POST"],
        [":scheme", "http"],
        [":path", "/raw"],
        [":authority", "raw.test"],
        ["x-value", value],
      ]),
    );
    peer.send(hello(), ...blocks.map((block, i) => frame(type.headers, flag.endHeaders | flag.endStream, 1 + 2 * i, block)));
    t.ok(await peer.sync(), "the connection stays up");
    t.same(
      peer.resets().map((r) => r.errorCode),
      [code.protocolError, code.protocolError, code.protocolError],
      "each stream refused with PROTOCOL_ERROR",
    );
    t.equal(server.records.length, 0, "the owner never saw them");
  });

  await t.test("malformed requests (RFC 9113 §8.1.1, 8.2, 8.3) are refused with RST_STREAM PROTOCOL_ERROR and never reach the owner", async (t) => {
    const server = await startH2Server(t, echo);
    const peer = await RawPeer.connect(t, server.port);
    const base: HeaderField[] = [
      [":method", "POST"],
      [":scheme", "http"],
      [":path", "/raw"],
      [":authority", "raw.test"],
    ];
    const without = (name: string) => base.filter(([n]) => n !== name);
    const cases: Array<[string, HeaderField[]]> = [
      ["unknown pseudo-header", [...base, [":unknown", "x"]]],
      ["response pseudo-header", [...base, [":status", "200"]]],
      ["pseudo-header after a regular field", [...without(":authority"), ["x-a", "1"], [":authority", "raw.test"]]],
      ["connection-specific field", [...base, ["connection", "keep-alive"]]],
      ["transfer-encoding", [...base, ["transfer-encoding", "chunked"]]],
      ["te other than trailers", [...base, ["te", "gzip"]]],
      ["empty :path", [...without(":path"), [":path", ""]]],
      ["no :method", without(":method")],
      ["no :scheme", without(":scheme")],
      ["no :path", without(":path")],
      ["two :method", [...base.slice(0, 1), ...base]],
      ["two :path", [...base, [":path", "/other"]]],
      ["CONNECT", [[":method", "CONNECT"], [":authority", "raw.test:443"]]],
      ["content-length that is not a number", [...base, ["content-length", "1e3"]]],
      // Found by the differential fuzzer (test/sidecar/fuzz/headers.test.ts): nghttp2 refuses these, the data plane accepted them.
      ["empty host", [...base, ["host", ""]]],
      ["host naming another authority than :authority", [...base, ["host", "elsewhere.test"]]],
      // Finding 2 of the differential fuzzer: empty :method and :scheme were accepted.
      ["empty :method", [[":method", ""], ...without(":method")]],
      ["empty :scheme", [[":method", "POST"], [":scheme", ""], [":path", "/raw"], [":authority", "raw.test"]]],
      [":method that is not a token", [[":method", "GE T"], ...without(":method")]],
      [":path that does not start with /", [...without(":path"), [":path", "demo.v1.OpsService/GetStatus"]]],
      [":authority with a space", [...without(":authority"), [":authority", "a b"]]],
    ];
    peer.send(hello(), ...cases.map(([, fields], i) => frame(type.headers, flag.endHeaders | flag.endStream, 1 + 2 * i, encodeHeaderBlock(fields))));
    t.ok(await peer.sync(), "the connection stays up");
    const resets = peer.resets();
    for (const [i, [name]] of cases.entries()) {
      t.same(resets.find((r) => r.streamId === 1 + 2 * i)?.errorCode, code.protocolError, name);
    }
    t.equal(server.records.length, 0, "the owner never saw any of them");
    // te: trailers is how gRPC clients ask for trailers: still accepted.
    peer.send(frame(type.headers, flag.endHeaders | flag.endStream, 1 + 2 * cases.length, encodeHeaderBlock([...base, ["te", "trailers"]])));
    t.ok(await peer.sync());
    t.equal(server.records.length, 1, "a well-formed request with te: trailers is served");
  });

  await t.test("content-length that DATA does not add up to: RST_STREAM PROTOCOL_ERROR", async (t) => {
    const server = await startH2Server(t, () => undefined);
    const peer = await RawPeer.connect(t, server.port);
    const declared = encodeHeaderBlock([
      [":method", "POST"],
      [":scheme", "http"],
      [":path", "/raw"],
      [":authority", "raw.test"],
      ["content-length", "4"],
    ]);
    peer.send(hello(), frame(type.headers, flag.endHeaders, 1, declared), frame(type.data, flag.endStream, 1, Buffer.from("abc")));
    peer.send(frame(type.headers, flag.endHeaders, 3, declared), frame(type.data, 0, 3, Buffer.from("abc")), frame(type.data, flag.endStream, 3, Buffer.from("de")));
    t.ok(await peer.sync());
    t.same(peer.resets(), [
      { streamId: 1, errorCode: code.protocolError },
      { streamId: 3, errorCode: code.protocolError },
    ]);
  });

  await t.test("stream state errors: HEADERS on half-closed (remote), frames on closed streams, lower stream ids, PRIORITY checks", async (t) => {
    const streamClosed = 0x5;
    {
      const server = await startH2Server(t, () => undefined);
      const peer = await RawPeer.connect(t, server.port);
      // Half-closed (remote) while the owner has not answered: a second HEADERS is STREAM_CLOSED.
      peer.send(hello(), headersFrame(1, true), frame(type.headers, flag.endHeaders | flag.endStream, 1, encodeHeaderBlock([["x-late", "1"]])));
      t.ok(await peer.sync());
      t.same(peer.resets(), [{ streamId: 1, errorCode: streamClosed }], "HEADERS on half-closed (remote)");
      // The peer resets a stream, then sends DATA on it: STREAM_CLOSED.
      peer.send(headersFrame(3, false), uint32Frame(type.rstStream, 3, code.cancel), frame(type.data, 0, 3, Buffer.from("x")));
      t.ok(await peer.sync());
      t.same(peer.resets().at(-1), { streamId: 3, errorCode: streamClosed }, "DATA after the peer's own RST_STREAM");
      // PRIORITY: wrong length is a stream error, depending on itself too, stream 0 a connection error.
      peer.send(frame(0x2, 0, 5, Buffer.alloc(4)), frame(0x2, 0, 7, Buffer.from([0, 0, 0, 7, 16])));
      t.ok(await peer.sync());
      t.same(peer.resets().slice(-2), [
        { streamId: 5, errorCode: code.frameSizeError },
        { streamId: 7, errorCode: code.protocolError },
      ], "PRIORITY with 4 octets, PRIORITY on itself");
      peer.send(frame(0x2, 0, 0, Buffer.from([0, 0, 0, 1, 16])));
      await peer.closed();
      t.same(peer.goaway()?.errorCode, code.protocolError, "PRIORITY on stream 0: GOAWAY PROTOCOL_ERROR");
    }
    {
      const server = await startH2Server(t, echo);
      const peer = await RawPeer.connect(t, server.port);
      peer.send(hello(), headersFrame(5, true), headersFrame(3, true));
      await peer.closed();
      t.same(peer.goaway()?.errorCode, code.protocolError, "a stream id lower than one already used: GOAWAY PROTOCOL_ERROR");
    }
    {
      const server = await startH2Server(t, () => undefined);
      const peer = await RawPeer.connect(t, server.port);
      // HEADERS whose priority names the stream itself.
      const priority = Buffer.from([0, 0, 0, 1, 16]);
      peer.send(hello(), frame(type.headers, flag.endHeaders | flag.endStream | flag.priority, 1, Buffer.concat([priority, requestBlock()])));
      t.ok(await peer.sync());
      t.same(peer.resets(), [{ streamId: 1, errorCode: code.protocolError }], "HEADERS depending on itself");
      t.equal(server.records.length, 0, "never reached the owner");
    }
  });

  await t.test("a field named __proto__ stays a field", async (t) => {
    const server = await startH2Server(t, () => undefined);
    const peer = await RawPeer.connect(t, server.port);
    const block = encodeHeaderBlock([
      [":method", "POST"],
      [":scheme", "http"],
      [":path", "/raw"],
      [":authority", "raw.test"],
      ["__proto__", "x"],
    ]);
    peer.send(hello(), frame(type.headers, flag.endHeaders | flag.endStream, 1, block));
    t.ok(await peer.sync(), "the connection stays up");
    const headers = server.records[0]?.stream.headers;
    t.equal(Object.getPrototypeOf(headers), null, "the header object has no prototype to replace");
    t.equal(headers?.["__proto__"], "x", "__proto__ is an ordinary field");
  });

  await t.test("resets the peer makes us send count toward the reset budget (MadeYouReset): GOAWAY ENHANCE_YOUR_CALM", async (t) => {
    const server = await startH2Server(t, () => undefined);
    const peer = await RawPeer.connect(t, server.port);
    const frames: Buffer[] = [];
    const zeroIncrement = Buffer.alloc(4);
    for (let i = 0; i < 1100; i++) {
      const streamId = 1 + 2 * i;
      // A WINDOW_UPDATE of 0 is a stream error: the server resets the stream itself.
      frames.push(headersFrame(streamId, false), frame(type.windowUpdate, 0, streamId, zeroIncrement));
    }
    peer.send(hello(), ...frames);
    await peer.closed();
    t.same(peer.goaway()?.errorCode, 0xb, "GOAWAY ENHANCE_YOUR_CALM once more than 1,000 resets a second");
    t.ok(peer.resets().length <= 1001, `at most 1,001 streams were reset first (${peer.resets().length})`);
    t.equal(server.open.size, 0, "no stream left open on the server connection");
  });
});

