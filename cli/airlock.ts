#!/usr/bin/env node
/**
 * The one command-line entry point of every Airlock part:
 *   airlock sidecar --config sidecar.yaml
 *   airlock policy test --policy policy.yaml --call call.json
 */
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import type { JsonObject } from "@bufbuild/protobuf";
import { AirlockError, Code } from "../common/errors.js";
import { explainCall, loadSidecarConfig, Policy, type PolicyCall, startSidecar } from "../sidecar/index.js";

const usage = `usage:
  airlock sidecar --config <sidecar.yaml>
  airlock policy test --policy <policy.yaml> --call <call.json>`;

async function runSidecar(args: string[]): Promise<void> {
  const { values } = parseArgs({ args, options: { config: { type: "string" } }, strict: true });
  if (values.config === undefined) throw new AirlockError(Code.InvalidArgument, "--config is required");
  const sidecar = await startSidecar(await loadSidecarConfig(values.config));
  const stop = () => {
    sidecar.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
}

async function runPolicyTest(args: string[]): Promise<void> {
  const { values } = parseArgs({ args, options: { policy: { type: "string" }, call: { type: "string" } }, strict: true });
  if (values.policy === undefined || values.call === undefined) throw new AirlockError(Code.InvalidArgument, "--policy and --call are required");
  const policy = Policy.parse(await readFile(values.policy, "utf8"), values.policy);
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(await readFile(values.call, "utf8")) as Record<string, unknown>;
  } catch (error) {
    throw new AirlockError(Code.InvalidArgument, `${values.call} is not a JSON call description`, { cause: error });
  }
  const identity = raw.identity as { agent?: string; on_behalf_of?: string; chain?: string[]; authenticated_by?: "mtls" | "jwt" } | undefined;
  if (typeof raw.service !== "string" || typeof raw.method !== "string") throw new AirlockError(Code.InvalidArgument, `${values.call}: "service" and "method" are required`);
  const call: PolicyCall = {
    service: raw.service,
    method: raw.method,
    host: typeof raw.host === "string" ? raw.host : "localhost",
    ...(identity === undefined
      ? {}
      : {
          identity: {
            agent: identity.agent ?? "",
            onBehalfOf: identity.on_behalf_of ?? "",
            chain: identity.chain ?? [identity.agent ?? "", identity.on_behalf_of ?? ""].filter((p) => p !== ""),
            authenticatedBy: identity.authenticated_by ?? "jwt",
          },
        }),
    ...(typeof raw.now === "string" ? { now: new Date(raw.now) } : {}),
    request: () => (raw.request ?? {}) as JsonObject,
  };
  for (const line of explainCall(policy, call)) console.log(line);
  const verdict = policy.evaluate(call);
  console.log(`=> ${verdict.effect} (rule ${verdict.ruleId}): ${verdict.reason}`);
}

async function main(argv: string[]): Promise<void> {
  const [command, sub, ...rest] = argv;
  if (command === "sidecar") return runSidecar(argv.slice(1));
  if (command === "policy" && sub === "test") return runPolicyTest(rest);
  console.error(usage);
  process.exitCode = 2;
}

main(process.argv.slice(2)).catch((error: unknown) => {
  const failure = AirlockError.from(error);
  const field = typeof failure.details.field === "string" ? ` (field: ${failure.details.field})` : "";
  console.error(`airlock: ${failure.rawMessage}${field}`);
  process.exitCode = 1;
});
