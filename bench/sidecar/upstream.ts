/**
 * The benchmark's upstream: the demo ops service in a process of its own.
 * Prints `listening <host:port>` once ready; exits on SIGTERM.
 */
import { startOpsServer } from "../../demo/ops/index.js";

// GetStatus touches neither the database nor Vault; these addresses are never dialled.
const ops = await startOpsServer({ database: { host: "127.0.0.1", port: 1, database: "unused" }, vaultAddress: "http://127.0.0.1:1" });
console.log(`listening ${ops.address}`);
process.once("SIGTERM", () => {
  ops.close().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
