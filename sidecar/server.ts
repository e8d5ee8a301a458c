import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createServer as createNetServer, type Server as NetServer, type Socket } from "node:net";
import { createServer as createTlsServer, type TLSSocket } from "node:tls";
import type { Server as HttpServer } from "node:http";
import type { NatsConnection } from "@nats-io/transport-node";
import { DecisionKeyRing } from "../common/decision.js";
import { AirlockError, Code } from "../common/errors.js";
import { createLogger, type Logger } from "../common/logger.js";
import { connectNats } from "../common/nats.js";
import { createVaultClient } from "../common/vault.js";
import { CallReporter } from "./reports.js";
import { ApprovalFlow, callIdKeyFromSeed } from "./approvals.js";
import type { SidecarConfig, UpstreamConfig } from "./config.js";
import { AgentAuthenticator } from "./identity.js";
import { startHealthServer } from "../common/health.js";
import { createSidecarMetrics, type SidecarMetrics } from "./metrics.js";
import { loadMethodTable } from "./methods.js";
import { type Policy, PolicyWatcher, policyDefaults } from "./policy.js";
import { H2Connection } from "./h2/connection.js";
import type { LimitName } from "./h2/limits.js";
import { GrpcProxy, type UpstreamTarget } from "./proxy.js";

/** A running sidecar. */
export interface Sidecar {
  /** `host:port` agents connect to. */
  readonly address: string;
  readonly port: number;
  /** Port of /metrics, /healthz and /readyz. */
  readonly metricsPort: number;
  readonly metrics: SidecarMetrics;
  /**
   * Stops accepting calls, ends those in flight, gives completions NATS has not yet taken up
   * to `completionPublish.drainOnCloseMs`, then closes NATS and the policy watcher. Idempotent.
   */
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
  for (const upstream of config.upstreams) {
    if (upstream.transport.kind === "plaintext" && upstream.transport.why === "insecure") {
      log.warn({ upstream: upstream.name, address: upstream.address }, "upstream is reached in cleartext over the network (insecure: true): injected credentials can be read on the way");
    }
  }
  let authenticator: AgentAuthenticator;
  if (config.agentAuth.length === 0) {
    log.warn("no agent_auth configured: every call that needs an agent identity will be refused as unauthenticated");
    authenticator = AgentAuthenticator.none();
  } else {
    authenticator = await AgentAuthenticator.create(config.agentAuth);
  }

  const cleanups: Array<() => Promise<void> | void> = [];
  // Once: a second close waits for the first.
  let closing: Promise<void> | undefined;
  const cleanup = () => {
    closing ??= (async () => {
      for (const step of cleanups.reverse()) await step();
    })();
    return closing;
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
    // Call ids are keyed with a secret of this host's that survives restarts: its NATS seed.
    const callIdKey = callIdKeyFromSeed(await readFile(config.nats.auth.seedFile, "utf8"));
    const flow = await ApprovalFlow.start({ nc, host: config.host, keyRing, vault: createVaultClient({ address: config.vault.address }), metrics, log, heartbeatIntervalMs: config.heartbeatIntervalMs, callIdKey });
    cleanups.push(() => flow.close());
    // Closed before the connection (cleanups run in reverse), so its last batch still goes out.
    const reporter = new CallReporter({ nc, host: config.host });
    cleanups.push(() => reporter.close());

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
      upstreams: new Map<string, UpstreamTarget>(config.upstreams.map((u) => [u.name, upstreamTarget(u)])),
      policy: () => watcher.current(),
      authenticate: (headers, socket) => authenticator.identify(headers, socket),
      hold: (call) => flow.hold(call),
      report: (report) => reporter.report(report),
      host: config.host,
      maxMessageBytes: config.limits.maxMessageBytes,
      maxBufferedMessages: config.limits.maxBufferedMessages,
      limits: config.limits,
      reservedHeaders,
      metrics,
      log,
      ready: () => natsConnected && !nc.isClosed(),
    });
    cleanups.push(() => proxy.close());

    const connections = new Set<H2Connection>();
    const limits = config.limits;
    const h2Limits = {
      handshakeTimeoutMs: limits.handshakeTimeoutMs,
      idleTimeoutMs: limits.idleTimeoutMs,
      maxSettingsPerSecond: limits.maxSettingsPerSecond,
      maxPingsPerSecond: limits.maxPingsPerSecond,
      maxResetsPerSecond: limits.maxResetsPerSecond,
    };
    const onLimit = (limit: LimitName) => metrics.limitHits.inc({ limit });
    // Connections open now, in all and by peer address (counted from accept, TLS handshake included).
    let open = 0;
    const perPeer = new Map<string, number>();
    const admit = (socket: Socket): boolean => {
      const peer = socket.remoteAddress ?? "";
      const fromPeer = perPeer.get(peer) ?? 0;
      const limit: LimitName | undefined = open >= limits.maxConnections ? "connections" : fromPeer >= limits.maxConnectionsPerPeer ? "connections_per_peer" : undefined;
      if (limit !== undefined) {
        onLimit(limit);
        socket.destroy();
        return false;
      }
      open++;
      perPeer.set(peer, fromPeer + 1);
      socket.once("close", () => {
        open--;
        const left = (perPeer.get(peer) ?? 1) - 1;
        if (left === 0) perPeer.delete(peer);
        else perPeer.set(peer, left);
      });
      return true;
    };
    const accept = (socket: Socket) => {
      // gRPC messages are small and latency-bound: Nagle's algorithm with delayed ACKs would hold them back.
      socket.setNoDelay(true);
      const connection = new H2Connection(socket, { role: "server", onStream: (stream) => proxy.serve(stream), limits: h2Limits, onLimit });
      connections.add(connection);
      socket.once("close", () => connections.delete(connection));
    };
    const server: NetServer =
      config.tls === undefined
        ? createNetServer((socket) => {
            if (admit(socket)) accept(socket);
          })
        : createTlsServer(
            {
              handshakeTimeout: limits.handshakeTimeoutMs,
              cert: readFileSync(config.tls.cert),
              key: readFileSync(config.tls.key),
              ALPNProtocols: ["h2"],
              // Client certificates are asked for, not required: one the CA did not issue is ignored
              // (socket.authorized is false), so token-only agents still connect over TLS.
              ...(config.tls.clientCa === undefined ? {} : { ca: readFileSync(config.tls.clientCa), requestCert: true, rejectUnauthorized: false }),
            },
            (socket: TLSSocket) => {
              // gRPC clients negotiate h2 by ALPN; anything else (HTTP/1.1) is not served.
              if (socket.alpnProtocol !== "h2" && socket.alpnProtocol !== false) {
                socket.destroy();
                return;
              }
              // The client certificate is the agent's identity for the connection's life: no renegotiation.
              socket.disableRenegotiation();
              accept(socket);
            },
          );
    // TLS: counted from the TCP accept, before the handshake, so half-open handshakes count too.
    if (config.tls !== undefined) server.on("connection", (socket: Socket) => void admit(socket));
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

/** The proxy's view of an upstream: its address and, for TLS, the PEM files read. */
function upstreamTarget(upstream: UpstreamConfig): UpstreamTarget {
  const transport = upstream.transport;
  if (transport.kind !== "tls") return { name: upstream.name, address: upstream.address };
  const read = (file: string | undefined, field: string): Buffer | undefined => {
    if (file === undefined) return undefined;
    try {
      return readFileSync(file);
    } catch (error) {
      throw new AirlockError(Code.InvalidArgument, `cannot read ${file} for upstream ${upstream.name}`, { cause: error, details: { field } });
    }
  };
  const ca = read(transport.ca, "tls.ca");
  const cert = read(transport.cert, "tls.cert");
  const key = read(transport.key, "tls.key");
  return {
    name: upstream.name,
    address: upstream.address,
    tls: { ...(ca === undefined ? {} : { ca }), ...(cert === undefined ? {} : { cert }), ...(key === undefined ? {} : { key }), ...(transport.serverName === undefined ? {} : { serverName: transport.serverName }) },
  };
}
