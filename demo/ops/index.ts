/**
 * The demo upstream: `demo.v1.OpsService`, what tests, benchmarks and the demo
 * drive through the sidecar.
 * @module
 */
export { type OpsDatabase, type OpsServer, type OpsServerOptions, opsServerDefaults, startOpsServer } from "./server.js";
