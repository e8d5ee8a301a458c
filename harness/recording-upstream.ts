import { createServer, type IncomingHttpHeaders, type Http2Server, type ServerHttp2Session, type ServerHttp2Stream } from "node:http2";
import type { AddressInfo } from "node:net";

/** A real HTTP/2 gRPC server that answers every call OK and remembers the headers each call arrived with. */
export interface RecordingUpstream {
  /** `127.0.0.1:port`. */
  readonly address: string;
  /** The request headers of every call, oldest first. */
  readonly calls: IncomingHttpHeaders[];
  /** The request body bytes of every call that ended, in the order they ended. */
  readonly bodies: Buffer[];
  /** Closes the server and every session. */
  close(): Promise<void>;
}

/**
 * Starts a node:http2 server that plays any gRPC method: it reads the request to
 * its end, answers one empty message and `grpc-status: 0`, and records the
 * headers it received, so a test can see exactly what a proxy forwarded.
 */
export async function startRecordingUpstream(): Promise<RecordingUpstream> {
  const calls: IncomingHttpHeaders[] = [];
  const bodies: Buffer[] = [];
  const server: Http2Server = createServer();
  const sessions = new Set<ServerHttp2Session>();
  server.on("session", (session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
  });
  server.on("stream", (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    calls.push({ ...headers });
    const chunks: Buffer[] = [];
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    stream.on("error", () => undefined);
    stream.once("end", () => {
      bodies.push(Buffer.concat(chunks));
      if (stream.destroyed) return;
      stream.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true });
      stream.once("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
      // One empty message: an empty protobuf is a valid instance of every message type.
      stream.end(Buffer.from([0, 0, 0, 0, 0]));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    address: `127.0.0.1:${port}`,
    calls,
    bodies,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const session of sessions) session.destroy();
      }),
  };
}
