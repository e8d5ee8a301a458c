import { createServer, type Server } from "node:http";
import type { Registry } from "prom-client";

/** Named readiness checks for /readyz; each returns whether that dependency is ready. */
export type ReadinessChecks = Readonly<Record<string, () => boolean>>;

/**
 * Serves /metrics (Prometheus text from `registry`), /healthz (the process
 * runs) and /readyz (200 when every check passes, else 503, with the checks as
 * JSON) on `host:port`; resolves once listening.
 */
export async function startHealthServer(registry: Registry, checks: ReadinessChecks, host: string, port: number): Promise<{ server: Server; port: number }> {
  const server = createServer((request, response) => {
    if (request.url === "/metrics") {
      registry.metrics().then(
        (text) => {
          response.writeHead(200, { "content-type": registry.contentType });
          response.end(text);
        },
        () => {
          response.writeHead(500);
          response.end();
        },
      );
      return;
    }
    if (request.url === "/healthz") {
      response.writeHead(200, { "content-type": "text/plain" });
      response.end("ok\n");
      return;
    }
    if (request.url === "/readyz") {
      const results = Object.fromEntries(Object.entries(checks).map(([name, check]) => [name, check()]));
      const ready = Object.values(results).every(Boolean);
      response.writeHead(ready ? 200 : 503, { "content-type": "application/json" });
      response.end(JSON.stringify({ ready, checks: results }));
      return;
    }
    response.writeHead(404);
    response.end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, resolve);
  });
  const address = server.address();
  return { server, port: typeof address === "object" && address !== null ? address.port : port };
}
