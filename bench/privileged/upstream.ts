/**
 * The privileged benchmark's upstream: the demo ops service, checking each
 * injected Vault token at the Vault given as the first argument.
 * Prints `listening <host:port>` once ready; exits on SIGTERM.
 */
import { startOpsServer } from "../../demo/ops/index.js";

const ops = await startOpsServer({ database: { host: "127.0.0.1", port: 1, database: "unused" }, vaultAddress: process.argv[2] ?? "" });
console.log(`listening ${ops.address}`);
process.once("SIGTERM", () => {
  ops.close().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
