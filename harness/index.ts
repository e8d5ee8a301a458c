/**
 * The test harness: real NATS, Vault and PostgreSQL servers on free loopback
 * ports, each paired with its cleanup, and a leak check. Used by every
 * integration test, by `npm run infra:check` and by the demo. Never mocks.
 * @module
 */
export { findLeaks, type HandleBaseline, handleBaseline } from "./leaks.js";
export { defaultCacheDir, goInstall, type GoInstallSpec } from "./gobuild.js";
export {
  type NatsBus,
  type NatsCluster,
  natsClusterDefaults,
  type NatsClusterNode,
  type NatsClusterOptions,
  type NatsServer,
  type NatsServerOptions,
  natsServerDefaults,
  natsServerRelease,
  natsServerVersion,
  resolveNatsServer,
  startNats,
  startNatsCluster,
} from "./nats.js";
export { type PostgresOptions, type PostgresServer, postgresDefaults, startPostgres, type TestDatabase } from "./postgres.js";
export { delay, freePort, ManagedProcess, makeTempDir, type TempDir, unreleased, waitUntil } from "./resources.js";
export { type Infra, type InfraNeeds, useInfra } from "./tap.js";
export {
  buildVault,
  type ResolveVaultOptions,
  resolveVaultBinary,
  startVault,
  type VaultBinary,
  type VaultBinarySource,
  type VaultServer,
  type VaultServerOptions,
  vaultServerDefaults,
} from "./vault.js";
export { approveDevice, FormBrowser, newSigningKey, type OidcClient, type OidcProviderOptions, oidcProviderDefaults, type OidcProviderServer, type OidcUser, startOidcProvider } from "./oidc.js";
