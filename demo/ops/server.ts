import { create, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import {
  Metadata,
  type sendUnaryData,
  Server,
  type ServerDuplexStream,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
  ServerCredentials,
} from "@grpc/grpc-js";
import pg from "pg";
import { AirlockError, Code } from "../../common/errors.js";
import { grpcServiceDefinition, toServiceError } from "../../common/grpc.js";
import { createVaultClient } from "../../common/vault.js";
import {
  type ExportTableRequest,
  type ExportTableResponse,
  ExportTableResponseSchema,
  type GetStatusRequest,
  type GetStatusResponse,
  GetStatusResponseSchema,
  type GrantRoleRequest,
  type GrantRoleResponse,
  GrantRoleResponseSchema,
  type ImportRowsRequest,
  type ImportRowsResponse,
  ImportRowsResponseSchema,
  OpsService,
  type RotateKeyRequest,
  type RotateKeyResponse,
  RotateKeyResponseSchema,
  type TailRequest,
  type TailResponse,
  TailResponseSchema,
} from "../../proto/gen/demo/v1/ops_pb.js";

/** Where the ops service's privileged database methods connect, as the injected user. */
export interface OpsDatabase {
  readonly host: string;
  readonly port: number;
  readonly database: string;
}

/** Options of {@link startOpsServer}. */
export interface OpsServerOptions {
  /** @default "127.0.0.1:0" (a free loopback port) */
  readonly listen?: string;
  /** The database ExportTable and ImportRows act on. */
  readonly database: OpsDatabase;
  /** The Vault whose tokens RotateKey and GrantRole accept. */
  readonly vaultAddress: string;
  /** The metadata key the sidecar injects the per-action credential under. @default "x-airlock-credential" */
  readonly credentialHeader?: string;
}

/** Defaults of {@link OpsServerOptions}. */
export const opsServerDefaults = { listen: "127.0.0.1:0", credentialHeader: "x-airlock-credential" } as const;

/** A running demo ops upstream. */
export interface OpsServer {
  /** `127.0.0.1:<port>` */
  readonly address: string;
  readonly port: number;
  /** Stops accepting calls, waits up to `graceMs` for running ones, then ends them. */
  close(graceMs?: number): Promise<void>;
}

/** A user name and password for the database, as the database secrets engine issues them. */
interface DatabaseCredential {
  readonly username: string;
  readonly password: string;
}

const identifier = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;

function quoteIdentifier(name: string, field: string): string {
  if (!identifier.test(name)) {
    throw new AirlockError(Code.InvalidArgument, `${field} must be a plain SQL identifier (letters, digits, underscore)`, { details: { field } });
  }
  return `"${name}"`;
}

function toJson(value: unknown): JsonValue {
  if (value === null || value === undefined) return null;
  if (value instanceof Date) return value.toISOString();
  if (typeof value === "bigint") return value.toString();
  if (Buffer.isBuffer(value)) return value.toString("base64");
  if (Array.isArray(value)) return value.map(toJson);
  if (typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toJson(v)]));
  if (typeof value === "number" || typeof value === "string" || typeof value === "boolean") return value;
  return null;
}

/** Starts the demo ops upstream: one unprivileged method, privileged ones that need the injected credential. */
export async function startOpsServer(options: OpsServerOptions): Promise<OpsServer> {
  const header = options.credentialHeader ?? opsServerDefaults.credentialHeader;
  const vault = createVaultClient({ address: options.vaultAddress });
  const startedAt = timestampNow();
  const keyVersions = new Map<string, number>();
  const grants = new Set<string>();
  const recentLines: string[] = [];
  let served = 0n;

  const log = (line: string) => {
    recentLines.push(`${new Date().toISOString()} ${line}`);
    if (recentLines.length > 200) recentLines.shift();
  };

  const injected = (metadata: Metadata, method: string): string => {
    const value = metadata.get(header)[0];
    if (typeof value !== "string" || value === "") {
      throw new AirlockError(Code.Unauthenticated, `${method} is privileged: call it through the Airlock sidecar, which injects a per-action credential`, {
        details: { method },
      });
    }
    return value;
  };

  const databaseCredential = (metadata: Metadata, method: string): DatabaseCredential => {
    const raw = injected(metadata, method);
    try {
      const parsed = JSON.parse(raw) as Partial<DatabaseCredential>;
      if (typeof parsed.username === "string" && typeof parsed.password === "string") return { username: parsed.username, password: parsed.password };
    } catch {
      // falls through to the error below, which does not echo the credential
    }
    throw new AirlockError(Code.Unauthenticated, `${method} needs a database credential ({"username","password"}) in ${header}`);
  };

  const requireLiveToken = async (metadata: Metadata, method: string): Promise<void> => {
    try {
      await vault.lookupSelf(injected(metadata, method));
    } catch (error) {
      const airlock = AirlockError.from(error);
      if (airlock.code === Code.PermissionDenied) {
        throw new AirlockError(Code.PermissionDenied, `${method}: the injected Vault token is not live`, { cause: error });
      }
      throw airlock;
    }
  };

  const withDatabase = async <T>(credential: DatabaseCredential, work: (client: pg.Client) => Promise<T>): Promise<T> => {
    const client = new pg.Client({ ...options.database, user: credential.username, password: credential.password, connectionTimeoutMillis: 5000 });
    try {
      await client.connect();
    } catch (error) {
      await client.end().catch(() => undefined);
      const code = (error as { code?: string }).code;
      if (code === "28P01" || code === "28000") {
        throw new AirlockError(Code.PermissionDenied, "the injected database credential was refused", { cause: error });
      }
      throw new AirlockError(Code.Unavailable, "the database is unreachable", { cause: error });
    }
    try {
      return await work(client);
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code === "42P01") throw new AirlockError(Code.NotFound, "no such table", { cause: error });
      if (code === "42501") throw new AirlockError(Code.PermissionDenied, "the injected database user may not do that", { cause: error });
      if (code === "42703" || code === "22P02") throw new AirlockError(Code.InvalidArgument, (error as Error).message, { cause: error });
      throw error;
    } finally {
      await client.end().catch(() => undefined);
    }
  };

  const unary =
    <Req, Res>(run: (request: Req, metadata: Metadata) => Promise<Res>) =>
    (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
      served++;
      run(call.request, call.metadata).then(
        (response) => callback(null, response),
        (error: unknown) => callback(toServiceError(error)),
      );
    };

  const handlers = {
    getStatus: (call: ServerUnaryCall<GetStatusRequest, GetStatusResponse>, callback: sendUnaryData<GetStatusResponse>) => {
      served++;
      log("GetStatus ok");
      // Echoes x-echo-* metadata back as response headers, so tests can see metadata cross a proxy both ways.
      const echoed = new Metadata();
      for (const [key, value] of Object.entries(call.metadata.getMap())) {
        if (key.startsWith("x-echo-") && typeof value === "string") echoed.set(key, value);
      }
      call.sendMetadata(echoed);
      const trailer = new Metadata();
      trailer.set("x-served-by", "demo.v1.OpsService");
      callback(null, create(GetStatusResponseSchema, { service: "demo.v1.OpsService", version: "1.0.0", startedAt, requestsServed: served }), trailer);
    },

    exportTable: (call: ServerWritableStream<ExportTableRequest, ExportTableResponse>) => {
      served++;
      const run = async () => {
        const table = quoteIdentifier(call.request.table, "table");
        const credential = databaseCredential(call.metadata, "ExportTable");
        const limit = call.request.limit === 0 ? null : call.request.limit;
        const rows = await withDatabase(credential, async (client) => (await client.query<Record<string, unknown>>(`SELECT * FROM ${table} LIMIT $1`, [limit])).rows);
        for (const row of rows) {
          if (call.cancelled) return;
          call.write(create(ExportTableResponseSchema, { row: toJson(row) as JsonObject }));
        }
        log(`ExportTable table=${call.request.table} rows=${rows.length} user=${credential.username}`);
        return rows.length;
      };
      run().then(
        // What the action touched, for the audit trail (Airlock's documented airlock-touched trailer).
        (count) => {
          const trailer = new Metadata();
          if (count !== undefined) trailer.set("airlock-touched", `rows=${count}; table=${call.request.table}`);
          call.end(trailer);
        },
        (error: unknown) => call.emit("error", toServiceError(error)),
      );
    },

    rotateKey: unary<RotateKeyRequest, RotateKeyResponse>(async (request, metadata) => {
      if (request.keyId === "") throw new AirlockError(Code.InvalidArgument, "key_id is required", { details: { field: "key_id" } });
      await requireLiveToken(metadata, "RotateKey");
      const version = (keyVersions.get(request.keyId) ?? 0) + 1;
      keyVersions.set(request.keyId, version);
      log(`RotateKey key=${request.keyId} version=${version}`);
      return create(RotateKeyResponseSchema, { keyId: request.keyId, version, rotatedAt: timestampNow() });
    }),

    importRows: (call: ServerReadableStream<ImportRowsRequest, ImportRowsResponse>, callback: sendUnaryData<ImportRowsResponse>) => {
      served++;
      const run = async () => {
        const credential = databaseCredential(call.metadata, "ImportRows");
        const batch: ImportRowsRequest[] = [];
        for await (const message of call as AsyncIterable<ImportRowsRequest>) batch.push(message);
        return withDatabase(credential, async (client) => {
          await client.query("BEGIN");
          for (const message of batch) {
            const table = quoteIdentifier(message.table, "table");
            const entries = Object.entries(message.row ?? {});
            if (entries.length === 0) throw new AirlockError(Code.InvalidArgument, "row must have at least one column", { details: { field: "row" } });
            const columns = entries.map(([name]) => quoteIdentifier(name, "row column")).join(", ");
            const placeholders = entries.map((_, i) => `$${i + 1}`).join(", ");
            await client.query(`INSERT INTO ${table} (${columns}) VALUES (${placeholders})`, entries.map(([, value]) => value));
          }
          await client.query("COMMIT");
          log(`ImportRows rows=${batch.length} user=${credential.username}`);
          return create(ImportRowsResponseSchema, { rowsImported: batch.length });
        });
      };
      run().then(
        (response) => callback(null, response),
        (error: unknown) => callback(toServiceError(error)),
      );
    },

    grantRole: unary<GrantRoleRequest, GrantRoleResponse>(async (request, metadata) => {
      if (request.user === "" || request.role === "") throw new AirlockError(Code.InvalidArgument, "user and role are required", { details: { field: request.user === "" ? "user" : "role" } });
      await requireLiveToken(metadata, "GrantRole");
      grants.add(`${request.user}\u0000${request.role}`);
      log(`GrantRole user=${request.user} role=${request.role}`);
      return create(GrantRoleResponseSchema, { granted: true });
    }),

    tail: (call: ServerDuplexStream<TailRequest, TailResponse>) => {
      served++;
      call.on("data", (request: TailRequest) => {
        const line = recentLines.findLast((candidate) => candidate.includes(request.filter)) ?? `no line matches "${request.filter}"`;
        call.write(create(TailResponseSchema, { line, at: timestampNow() }));
      });
      call.on("end", () => call.end());
      call.on("error", () => undefined);
    },
  };

  const server = new Server();
  server.addService(grpcServiceDefinition(OpsService), handlers);
  const listen = options.listen ?? opsServerDefaults.listen;
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(listen, ServerCredentials.createInsecure(), (error, bound) => (error === null ? resolve(bound) : reject(error)));
  });
  const host = listen.slice(0, listen.lastIndexOf(":"));
  return {
    address: `${host}:${port}`,
    port,
    async close(graceMs = 2000) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    },
  };
}
