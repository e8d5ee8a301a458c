import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { createServer as createTlsServer, type TLSSocket } from "node:tls";
import { verifyWebhookSignature } from "../../broker/notify/index.js";

/**
 * Receivers that speak the real formats, for the forwarder's tests: a
 * Splunk-HEC-compatible collector, a syslog-over-TLS collector (RFC 5425
 * framing, RFC 5424 messages) and a webhook receiver checking Airlock's
 * signature. Each records every audit sequence it accepted, in arrival order.
 */

/** What a receiver does with the next requests. `hold`: record the events, never answer (a receiver that took the batch and hung). */
export type ReceiverMode = "ok" | "busy" | "hold";

function readBody(request: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    request.on("data", (chunk: Buffer) => chunks.push(chunk));
    request.once("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    request.once("error", reject);
  });
}

/** Splits concatenated JSON values (HEC's batch format: objects one after another, any whitespace between). */
export function splitConcatenatedJson(text: string): unknown[] {
  const values: unknown[] = [];
  let depth = 0;
  let start = -1;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
      continue;
    }
    if (c === '"') inString = true;
    else if (c === "{") {
      if (depth === 0) start = i;
      depth++;
    } else if (c === "}") {
      depth--;
      if (depth === 0) values.push(JSON.parse(text.slice(start, i + 1)));
    } else if (depth === 0 && !/\s/.test(c ?? "")) throw new Error(`unexpected ${c} between events at ${i}`);
  }
  if (depth !== 0 || inString) throw new Error("truncated event");
  return values;
}

interface HttpReceiverBase {
  readonly url: string;
  /** Sequences accepted (answered with success), in order. */
  readonly accepted: bigint[];
  /** Sequences of every request seen, answered or not, in order. */
  readonly seen: bigint[];
  /** Requests refused (bad token, bad signature, malformed body). */
  readonly refused: string[];
  mode: ReceiverMode;
  /** Once this many sequences were accepted, hold every request (as `hold`): stops a sink at an exact batch. */
  holdAfter: number | undefined;
  /** Requests held unanswered in `hold` mode. */
  held(): number;
  close(): Promise<void>;
}

async function listen(server: Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return (server.address() as AddressInfo).port;
}

async function startHttpReceiver(
  tls: { key: Buffer; cert: Buffer } | undefined,
  handle: (request: IncomingMessage, body: string) => { refuse: [number, string] } | { sequences: bigint[] },
  answers: { ok: string; busy: string },
): Promise<HttpReceiverBase> {
  const held: ServerResponse[] = [];
  const receiver: Omit<HttpReceiverBase, "url" | "close" | "held"> & { url?: string } = { accepted: [], seen: [], refused: [], mode: "ok", holdAfter: undefined };
  const server = (tls === undefined ? createHttpServer : (handler: (req: IncomingMessage, res: ServerResponse) => void) => createHttpsServer(tls, handler))((request, response) => {
    void readBody(request).then((body) => {
      const json = (status: number, text: string) => response.writeHead(status, { "content-type": "application/json" }).end(text);
      const outcome = handle(request, body);
      if ("refuse" in outcome) {
        receiver.refused.push(outcome.refuse[1]);
        return json(outcome.refuse[0], outcome.refuse[1]);
      }
      if (receiver.mode === "busy") return json(503, answers.busy);
      receiver.seen.push(...outcome.sequences);
      if (receiver.mode === "hold" || (receiver.holdAfter !== undefined && receiver.accepted.length >= receiver.holdAfter)) return void held.push(response);
      receiver.accepted.push(...outcome.sequences);
      json(200, answers.ok);
    });
  }) as Server;
  const port = await listen(server);
  return Object.assign(receiver, {
    url: `${tls === undefined ? "http" : "https"}://127.0.0.1:${port}`,
    held: () => held.length,
    async close() {
      for (const response of held.splice(0)) response.destroy();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  });
}

/** A Splunk-HEC-compatible collector: checks `Authorization: Splunk <token>`, parses concatenated HEC event objects. */
export async function startHecReceiver(token: string, tls?: { key: Buffer; cert: Buffer }): Promise<HttpReceiverBase & { setToken(token: string): void }> {
  let expected = token;
  const receiver = await startHttpReceiver(
    tls,
    (request, body) => {
      if (request.method !== "POST" || request.url !== "/services/collector/event") return { refuse: [404, '{"text":"The requested URL was not found on this server.","code":404}'] };
      const authorization = request.headers.authorization;
      if (authorization === undefined) return { refuse: [401, '{"text":"Token is required","code":2}'] };
      if (authorization !== `Splunk ${expected}`) return { refuse: [403, '{"text":"Invalid token","code":4}'] };
      try {
        const events = splitConcatenatedJson(body) as Array<{ time?: unknown; source?: unknown; sourcetype?: unknown; host?: unknown; event?: { sequence?: unknown } }>;
        if (events.length === 0) return { refuse: [400, '{"text":"No data","code":5}'] };
        for (const event of events) {
          if (typeof event.time !== "number" || event.source !== "airlock" || event.sourcetype !== "airlock:audit" || typeof event.host !== "string" || typeof event.event?.sequence !== "string") throw new Error("not an airlock HEC event");
        }
        return { sequences: events.map((event) => BigInt(event.event?.sequence as string)) };
      } catch {
        return { refuse: [400, '{"text":"Invalid data format","code":6}'] };
      }
    },
    { ok: '{"text":"Success","code":0}', busy: '{"text":"Server is busy","code":9}' },
  );
  return Object.assign(receiver, {
    setToken(token: string) {
      expected = token;
    },
  });
}

/** A webhook receiver: verifies `x-airlock-signature` with the shared secret on the raw body, then reads the batch. */
export async function startWebhookReceiver(secret: string): Promise<HttpReceiverBase> {
  return startHttpReceiver(
    undefined,
    (request, body) => {
      try {
        verifyWebhookSignature(secret, body, request.headers);
      } catch (error) {
        return { refuse: [401, JSON.stringify({ error: String(error) })] };
      }
      const payload = JSON.parse(body) as { kind: string; firstSequence: string; lastSequence: string; events: Array<{ sequence: string }> };
      const sequences = payload.events.map((event) => BigInt(event.sequence));
      if (payload.kind !== "airlock.audit.batch" || String(sequences[0]) !== payload.firstSequence || String(sequences.at(-1)) !== payload.lastSequence) return { refuse: [400, '{"error":"bad batch"}'] };
      return { sequences };
    },
    { ok: '{"ok":true}', busy: '{"error":"busy"}' },
  );
}

/** One parsed RFC 5424 message. */
export interface SyslogMessage {
  readonly pri: number;
  readonly version: string;
  readonly timestamp: string;
  readonly hostname: string;
  readonly appName: string;
  readonly procId: string;
  readonly msgId: string;
  readonly sdId: string;
  readonly params: Readonly<Record<string, string>>;
  readonly msg: string;
}

/** Parses an RFC 5424 message with one SD element (what the forwarder sends). */
export function parseSyslog(text: string): SyslogMessage {
  const header = /^<(\d{1,3})>(\d) (\S+) (\S+) (\S+) (\S+) (\S+) /.exec(text);
  if (header === null) throw new Error(`not RFC 5424: ${text.slice(0, 80)}`);
  let i = header[0].length;
  if (text[i] !== "[") throw new Error("no structured data");
  const sdIdEnd = text.indexOf(" ", i);
  const sdId = text.slice(i + 1, sdIdEnd);
  i = sdIdEnd;
  const params: Record<string, string> = {};
  while (text[i] === " ") {
    const eq = text.indexOf("=", i);
    const name = text.slice(i + 1, eq);
    if (text[eq + 1] !== '"') throw new Error("SD-PARAM value not quoted");
    let value = "";
    let j = eq + 2;
    for (; text[j] !== '"'; j++) {
      if (j >= text.length) throw new Error("unterminated SD-PARAM");
      if (text[j] === "\\" && ['"', "\\", "]"].includes(text[j + 1] ?? "")) j++;
      value += text[j];
    }
    params[name] = value;
    i = j + 1;
  }
  if (text[i] !== "]" || text[i + 1] !== " ") throw new Error("SD element not closed");
  const [, pri, version, timestamp, hostname, appName, procId, msgId] = header;
  return { pri: Number(pri), version: version ?? "", timestamp: timestamp ?? "", hostname: hostname ?? "", appName: appName ?? "", procId: procId ?? "", msgId: msgId ?? "", sdId, params, msg: text.slice(i + 2) };
}

/** A syslog-over-TLS collector: octet-counted frames (RFC 5425), client certificate required. */
export interface SyslogReceiver {
  readonly port: number;
  readonly messages: SyslogMessage[];
  /** Sequences received (from the JSON body, checked against the `seq` SD-PARAM), in order. */
  readonly accepted: bigint[];
  readonly errors: string[];
  /** Stops listening and drops every connection: the forwarder's connects are refused. */
  down(): Promise<void>;
  /** Listens again on the same port. */
  up(): Promise<void>;
  close(): Promise<void>;
}

/** Starts a {@link SyslogReceiver} with the given server certificate, requiring client certificates from `ca`. */
export async function startSyslogReceiver(tls: { key: Buffer; cert: Buffer; ca: Buffer }): Promise<SyslogReceiver> {
  const sockets = new Set<TLSSocket>();
  const messages: SyslogMessage[] = [];
  const accepted: bigint[] = [];
  const errors: string[] = [];
  const server = createTlsServer({ ...tls, requestCert: true, rejectUnauthorized: true }, (socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", () => socket.destroy());
    let buffer = Buffer.alloc(0);
    socket.on("data", (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      for (;;) {
        const space = buffer.indexOf(0x20);
        if (space < 0) break;
        const lengthText = buffer.subarray(0, space).toString("ascii");
        if (!/^[1-9]\d{0,8}$/.test(lengthText)) {
          errors.push(`bad frame length ${JSON.stringify(lengthText)}`);
          socket.destroy();
          return;
        }
        const length = Number(lengthText);
        if (buffer.length < space + 1 + length) break;
        const text = buffer.subarray(space + 1, space + 1 + length).toString("utf8");
        buffer = buffer.subarray(space + 1 + length);
        try {
          const message = parseSyslog(text);
          const sequence = (JSON.parse(message.msg) as { sequence: string }).sequence;
          if (message.params.seq !== sequence) throw new Error(`seq ${message.params.seq} != body ${sequence}`);
          messages.push(message);
          accepted.push(BigInt(sequence));
        } catch (error) {
          errors.push(String(error));
        }
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  let listening = true;
  const down = async () => {
    if (!listening) return;
    listening = false;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const socket of sockets) socket.destroy();
    await closed;
  };
  return {
    port,
    messages,
    accepted,
    errors,
    down,
    async up() {
      if (listening) return;
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, "127.0.0.1", () => {
          server.off("error", reject);
          resolve();
        });
      });
      listening = true;
    },
    close: down,
  };
}
