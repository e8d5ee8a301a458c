/**
 * Code shared by every Airlock part: the error model, logging, the gRPC
 * adapter for protoc-gen-es services, and the typed Vault client.
 * @module
 */
export { AirlockError, type AirlockErrorOptions, Code, codeFromName, codeName, httpStatusFor, isCode } from "./errors.js";
export {
  type CallOptions,
  callBidiStream,
  callClientStream,
  callServerStream,
  callUnary,
  fromServiceError,
  grpcServiceDefinition,
  toServiceError,
} from "./grpc.js";
export { type CreateLoggerOptions, createLogger, defaultRedactPaths, type Logger } from "./logger.js";
export {
  createVaultClient,
  type VaultClient,
  type VaultClientOptions,
  vaultClientDefaults,
  vaultError,
  type VaultHealth,
  type VaultTokenInfo,
  type UnwrappedSecret,
} from "./vault.js";
export { auditStream, ensureStreams, hostPattern, stateBucket, streams, subjects } from "./subjects.js";
export { type BusPermissions, type BusRole, busInboxPrefix, busPermissions } from "./bus.js";
export { addBusHost, type BusRegistry, busMaterialFiles, busSeedFile, initBusMaterial, renderAuthConfig, renderServerConfig, revokeBusHost } from "./bus-material.js";
export { type ConnectNatsOptions, connectNats, natsConfigSection, type NatsConnectionConfig, natsRefusal, parseNatsConfig } from "./nats.js";
export { type ConfigEnv, ConfigReader, expandConfigVariables, type ListenAddress, parseAddress, type ReadConfigOptions, readConfigFile } from "./config.js";
export {
  type DecisionExpectation,
  DecisionKeyRing,
  type DecisionRejection,
  type DecisionSigningKey,
  generateDecisionKey,
  ReplayGuard,
  signDecision,
  verifyDecision,
} from "./decision.js";
export { parseDuration } from "./duration.js";
export { type ReadinessChecks, startHealthServer } from "./health.js";
