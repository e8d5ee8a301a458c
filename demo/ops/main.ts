/**
 * Runs the demo upstream `demo.v1.OpsService` as its own process (the `ops`
 * service of docker-compose.yml): `node --import tsx demo/ops/main.ts`.
 *
 * Environment:
 * - `AIRLOCK_OPS_LISTEN`: where it serves gRPC (plaintext). @default 127.0.0.1:50051
 * - `AIRLOCK_OPS_DATABASE_URL`: the database ExportTable and ImportRows act on,
 *   `postgres://host[:port]/database`, without credentials: the sidecar injects them per action.
 * - `AIRLOCK_VAULT_ADDR`: the Vault whose tokens RotateKey and GrantRole accept.
 * - `AIRLOCK_OPS_CREDENTIAL_HEADER`: the metadata key of the injected credential. @default x-airlock-credential
 *
 * Stops on SIGTERM or SIGINT, letting running calls finish for up to 2 s.
 * @module
 */
import { AirlockError, Code } from "../../common/errors.js";
import { opsServerDefaults, startOpsServer } from "./server.js";

function required(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") throw new AirlockError(Code.InvalidArgument, `the environment variable ${name} is required`, { details: { field: name } });
  return value;
}

function database(text: string): { host: string; port: number; database: string } {
  let url: URL;
  try {
    url = new URL(text);
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, "AIRLOCK_OPS_DATABASE_URL must be a URL like postgres://host:5432/database", { cause: error, details: { field: "AIRLOCK_OPS_DATABASE_URL" } });
  }
  const name = decodeURIComponent(url.pathname.replace(/^\//, ""));
  if (!/^postgres(ql)?:$/.test(url.protocol) || url.hostname === "" || name === "") {
    throw new AirlockError(Code.InvalidArgument, "AIRLOCK_OPS_DATABASE_URL must be a URL like postgres://host:5432/database", { details: { field: "AIRLOCK_OPS_DATABASE_URL" } });
  }
  return { host: url.hostname, port: url.port === "" ? 5432 : Number(url.port), database: name };
}

async function main(): Promise<void> {
  const listen = process.env.AIRLOCK_OPS_LISTEN ?? "127.0.0.1:50051";
  const header = process.env.AIRLOCK_OPS_CREDENTIAL_HEADER ?? opsServerDefaults.credentialHeader;
  const server = await startOpsServer({
    listen,
    database: database(required("AIRLOCK_OPS_DATABASE_URL")),
    vaultAddress: required("AIRLOCK_VAULT_ADDR"),
    credentialHeader: header,
  });
  console.log(`demo.v1.OpsService listening on ${server.address}`);
  const stop = (signal: NodeJS.Signals) => {
    console.log(`${signal}: stopping`);
    server.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

main().catch((error: unknown) => {
  const failure = AirlockError.from(error);
  console.error(`ops: ${failure.rawMessage}`);
  process.exitCode = 1;
});
