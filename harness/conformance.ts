/**
 * The target `npm run conformance` and its test point h2spec at: a real
 * sidecar (NATS from the harness) in front of a real HTTP/2 upstream that
 * answers every call with a gRPC message and trailers (harness/recording-upstream.ts),
 * with a policy that lets `GetStatus` through for anyone, so every h2spec
 * request that is well-formed reaches the upstream through the sidecar's data
 * plane and gets a response with a body (several h2spec cases need DATA).
 * @module
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ConfigReader } from "../common/config.js";
import { generateDecisionKey } from "../common/decision.js";
import { natsConfigSection, type NatsConnectionConfig } from "../common/nats.js";
import { descriptorSetPath } from "../proto/index.js";
import { parseSidecarConfig, startSidecar } from "../sidecar/index.js";
import { startRecordingUpstream } from "./recording-upstream.js";
import { makeTempDir } from "./resources.js";

/** The `:path` h2spec requests: a method the conformance policy allows anonymously. */
export const conformancePath = "/demo.v1.OpsService/GetStatus";

/** A sidecar and its upstream for conformance runs. */
export interface ConformanceTarget {
  readonly port: number;
  close(): Promise<void>;
}

/** The host the conformance target runs as (its NATS credential must be this host's). */
export const conformanceHost = "conformance";

/** Starts the conformance target with `nats`, the connection config of host {@link conformanceHost}'s sidecar. */
export async function startConformanceSidecar(nats: NatsConnectionConfig): Promise<ConformanceTarget> {
  const dir = await makeTempDir("conformance");
  const upstream = await startRecordingUpstream();
  try {
    await writeFile(join(dir.path, "broker.pem"), generateDecisionKey("k1").publicKeyPem);
    await writeFile(
      join(dir.path, "policy.yaml"),
      "version: 1\ndefault: deny\nrules:\n  - id: status\n    match: { service: demo.v1.OpsService, method: GetStatus }\n    effect: allow\n    anonymous: true\n",
    );
    const sidecar = await startSidecar(
      parseSidecarConfig(
        new ConfigReader(
          {
            listen: "127.0.0.1:0",
            upstreams: [{ name: "ops", address: upstream.address, descriptor_sets: [descriptorSetPath] }],
            nats: natsConfigSection(nats),
            vault: { address: "http://127.0.0.1:1" },
            broker_keys: { k1: "broker.pem" },
            host: conformanceHost,
            policy: "policy.yaml",
            metrics: { listen: "127.0.0.1:0" },
            log_level: "error",
          },
          "",
          join(dir.path, "sidecar.yaml"),
        ),
      ),
    );
    return {
      port: sidecar.port,
      close: async () => {
        await sidecar.close();
        await upstream.close();
        await dir.remove();
      },
    };
  } catch (error) {
    await upstream.close();
    await dir.remove();
    throw error;
  }
}
