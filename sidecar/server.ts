import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import type { IncomingHttpHeaders } from "node:http2";
import { createServer as createNetServer, type Server as NetServer, type Socket } from "node:net";
import { createServer as createTlsServer, type TLSSocket } from "node:tls";
import type { Server as HttpServer } from "node:http";
import type { NatsConnection } from "@nats-io/transport-node";
import { decodeJwt } from "jose";
import { DecisionKeyRing } from "../common/decision.js";
import { AirlockError, Code } from "../common/errors.js";
import { createLogger, type Logger } from "../common/logger.js";
import { connectNats } from "../common/nats.js";
import { createVaultClient } from "../common/vault.js";
import { ApprovalFlow } from "./approvals.js";
import type { SidecarConfig } from "./config.js";
import { type AgentIdentity, AgentAuthenticator } from "./identity.js";
import { startHealthServer } from "../common/health.js";
import { createSidecarMetrics, type SidecarMetrics } from "./metrics.js";
import { loadMethodTable } from "./methods.js";
import { type Policy, PolicyWatcher, policyDefaults } from "./policy.js";
import { H2Connection } from "./h2/connection.js";
import { GrpcProxy, type UpstreamTarget } from "./proxy.js";

/** A running sidecar. */
export interface Sidecar {
  /** `host:port` agents connect to. */
  readonly address: string;
  readonly port: number;
  /** Port of /metrics, /healthz and /readyz. */
  readonly metricsPort: number;
  readonly metrics: SidecarMetrics;
  /** Stops accepting calls, ends those in flight, closes NATS and the policy watcher. */
  close(): Promise<void>;
}

/** Options of {@link startSidecar} that are not configuration. */
export interface StartSidecarOptions {
  /** @default a pino logger named "sidecar" at the config's level */
  readonly log?: Logger;
}

/**
 * Starts a sidecar from a validated config: loads the descriptor sets and
 * the policy (hot-reloaded), connects to NATS, follows this host's decisions,
 * and serves agents over HTTP/2 (TLS or mTLS when configured).
 */
export async function startSidecar(config: SidecarConfig, options: StartSidecarOptions = {}): Promise<Sidecar> {
  const log = options.log ?? createLogger({ name: "sidecar", level: config.logLevel });
  const metrics = createSidecarMetrics();
  const methods = await loadMethodTable(config.upstreams);
  const keyPems: Record<string, string> = {};
  for (const [keyId, file] of Object.entries(config.brokerKeys)) {
    try {
      keyPems[keyId] = await readFile(file, "utf8");
    } catch (error) {
      throw new AirlockError(Code.InvalidArgument, `cannot read broker key ${keyId} from ${file}`, { cause: error, details: { field: `broker_keys.${keyId}` } });
    }
  }
  const keyRing = DecisionKeyRing.fromPem(keyPems);
  let identities: Pick<IdentityCache, "authenticate">;
  if (config.agentAuth.length === 0) {
    // Allow and deny rules work without agent identity; a held call without identity is refused.
    log.warn("no agent_auth configured: every call that needs approval will be refused as unauthenticated");
    identities = { authenticate: () => Promise.resolve(undefined) };
  } else {
    identities = new IdentityCache(await AgentAuthenticator.create(config.agentAuth));
  }

  const cleanups: Array<() => Promise<void> | void> = [];
  const cleanup = async () => {
    for (const step of cleanups.reverse()) await step();
  };
  try {
    const watcher = await PolicyWatcher.start(config.policyFile, {
      onReload: () => log.info({ policy: config.policyFile }, "policy reloaded"),
      onError: (error) => log.error({ policy: config.policyFile, reason: error.rawMessage }, "policy change refused; keeping the last good policy"),
    });
    cleanups.push(() => watcher.close());

    const nc: NatsConnection = await connectNats(config.nats, {
      role: { kind: "sidecar", host: config.host },
      name: `airlock-sidecar-${config.host}`,
      // No Error (stack capture) built up front for every publish: see the broker's connection.
      extra: { maxReconnectAttempts: -1, reconnectTimeWait: 250, noAsyncTraces: true },
    });
    cleanups.push(() => nc.close());
    let natsConnected = true;
    void (async () => {
      for await (const status of nc.status()) {
        if (status.type === "disconnect") natsConnected = false;
        if (status.type === "reconnect") natsConnected = true;
        if (status.type === "disconnect" || status.type === "reconnect") log.warn({ nats: status.type }, "NATS connection changed");
      }
    })();
    const flow = await ApprovalFlow.start({ nc, host: config.host, keyRing, vault: createVaultClient({ address: config.vault.address }), metrics, log });
    cleanups.push(() => flow.close());

    // The credential headers of the policy in force: an agent may never send one itself.
    const reservedByPolicy = new WeakMap<Policy, ReadonlySet<string>>();
    const reservedHeaders = () => {
      const policy = watcher.current();
      let reserved = reservedByPolicy.get(policy);
      if (reserved === undefined) {
        reserved = new Set([policyDefaults.injectHeader, ...policy.rules.flatMap((rule) => (rule.approve === undefined ? [] : [rule.approve.credential.injectHeader]))]);
        reservedByPolicy.set(policy, reserved);
      }
      return reserved;
    };
    const proxy = new GrpcProxy({
      methods,
      upstreams: new Map<string, UpstreamTarget>(config.upstreams.map((u) => [u.name, { name: u.name, address: u.address }])),
      policy: () => watcher.current(),
      authenticate: (headers, socket) => identities.authenticate(headers, socket),
      hold: (call) => flow.hold(call),
      host: config.host,
      maxMessageBytes: config.limits.maxMessageBytes,
      maxBufferedMessages: config.limits.maxBufferedMessages,
      reservedHeaders,
      metrics,
      log,
    });
    cleanups.push(() => proxy.close());

    const connections = new Set<H2Connection>();
    const accept = (socket: Socket) => {
      // gRPC messages are small and latency-bound: Nagle's algorithm with delayed ACKs would hold them back.
      socket.setNoDelay(true);
      const connection = new H2Connection(socket, { role: "server", onStream: (stream) => proxy.serve(stream) });
      connections.add(connection);
      socket.once("close", () => connections.delete(connection));
    };
    const server: NetServer =
      config.tls === undefined
        ? createNetServer(accept)
        : createTlsServer(
            {
              cert: readFileSync(config.tls.cert),
              key: readFileSync(config.tls.key),
              ALPNProtocols: ["h2"],
              // Client certificates are asked for, not required: one the CA did not issue is ignored
              // (socket.authorized is false), so token-only agents still connect over TLS.
              ...(config.tls.clientCa === undefined ? {} : { ca: readFileSync(config.tls.clientCa), requestCert: true, rejectUnauthorized: false }),
            },
            (socket: TLSSocket) => {
              // gRPC clients negotiate h2 by ALPN; anything else (HTTP/1.1) is not served.
              if (socket.alpnProtocol !== "h2" && socket.alpnProtocol !== false) socket.destroy();
              else accept(socket);
            },
          );
    server.on("tlsClientError", () => undefined);
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(config.listen.port, config.listen.host, resolve);
    });
    cleanups.push(
      () =>
        new Promise<void>((resolve) => {
          server.close(() => resolve());
          for (const connection of connections) connection.close();
          for (const connection of connections) connection.socket.destroy();
        }),
    );
    const address = server.address();
    const port = typeof address === "object" && address !== null ? address.port : config.listen.port;

    const opsHttp: { server: HttpServer; port: number } = await startHealthServer(
      metrics.registry,
      { nats: () => natsConnected && !nc.isClosed(), policy: () => true },
      config.metrics.host,
      config.metrics.port,
    );
    cleanups.push(
      () =>
        new Promise<void>((resolve) => {
          opsHttp.server.close(() => resolve());
          opsHttp.server.closeAllConnections();
        }),
    );
    log.info({ address: `${config.listen.host}:${port}`, host: config.host, methods: methods.size }, "sidecar listening");
    return { address: `${config.listen.host}:${port}`, port, metricsPort: opsHttp.port, metrics, close: cleanup };
  } catch (error) {
    await cleanup();
    throw error;
  }
}

/**
 * Verifying an agent token costs about 0.3 ms of CPU (EdDSA), too much for
 * every call: a verified token's identity is remembered for at most `ttlMs`
 * and never past the token's own `exp`. mTLS identities are cheap and not cached.
 */
class IdentityCache {
  private readonly authenticator: AgentAuthenticator;
  private readonly entries = new Map<string, { identity: AgentIdentity; until: number }>();
  private readonly ttlMs: number;
  private readonly maxEntries: number;

  constructor(authenticator: AgentAuthenticator, ttlMs = 30_000, maxEntries = 10_000) {
    this.authenticator = authenticator;
    this.ttlMs = ttlMs;
    this.maxEntries = maxEntries;
  }

  async authenticate(headers: IncomingHttpHeaders, socket: TLSSocket | undefined): Promise<AgentIdentity | undefined> {
    const peer = socket !== undefined && socket.authorized ? { peerCertificate: socket.getPeerCertificate(), peerAuthorized: true } : {};
    const token = headers.authorization ?? headers["x-airlock-agent-token"];
    if (typeof token !== "string" || "peerCertificate" in peer) return this.authenticator.authenticate({ headers, ...peer });
    const now = Date.now();
    const cached = this.entries.get(token);
    if (cached !== undefined && cached.until > now) return cached.identity;
    const identity = await this.authenticator.authenticate({ headers });
    if (identity !== undefined) {
      // Verified just above, so reading its claims unverified here is safe; the authenticator requires exp.
      const expiresMs = (decodeJwt(token.replace(/^Bearer\s+/i, "")).exp ?? 0) * 1000;
      if (this.entries.size >= this.maxEntries) this.entries.clear();
      this.entries.set(token, { identity, until: Math.min(now + this.ttlMs, expiresMs) });
    }
    return identity;
  }
}
