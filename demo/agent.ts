/**
 * The demo agent: a short, readable script of tool calls an AI agent makes
 * through the Airlock sidecar, each with its reason. It holds no credential for
 * the upstream and no signing key: its token comes from the identity provider
 * (demo/issuer.ts), which exchanges the human's session for a token naming the
 * human as subject and the agent as actor. Privileged calls wait for a human.
 *
 * Run by `npm run demo` in-process, or on its own (docker compose) with
 * `AIRLOCK_SIDECAR_ADDR`, `AIRLOCK_ISSUER_URL`, `AIRLOCK_AGENT_CLIENT_SECRET` and
 * `AIRLOCK_HUMAN_SESSION_FILE` set.
 * @module
 */
import { readFile } from "node:fs/promises";
import { pathToFileURL } from "node:url";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import { AirlockError, Code, codeName } from "../common/errors.js";
import { callServerStream, callUnary } from "../common/grpc.js";
import { OpsService } from "../proto/gen/demo/v1/ops_pb.js";
import { demoIssuerDefaults, exchangeToken } from "./issuer.js";

/** Who the demo agent is and where its sidecar listens. */
export interface DemoAgentOptions {
  /** `host:port` of the sidecar. */
  readonly sidecarAddress: string;
  /** Gets the agent's token for the sidecar from the identity provider (once per step: it may have expired). */
  readonly token: () => Promise<string>;
  /** Where progress lines go. @default console.log */
  readonly print?: (line: string) => void;
  /** How long one call may wait, approval included, in ms. @default 900000 (15 minutes: a human is deciding) */
  readonly callTimeoutMs?: number;
  /** Stops the script: no further step starts, and the step running is cancelled. */
  readonly signal?: AbortSignal;
}

/** Defaults of {@link DemoAgentOptions}. */
export const demoAgentDefaults = {
  callTimeoutMs: 900_000,
} as const;

/** What one step of the script did. */
export interface AgentStepResult {
  /** The step's name, e.g. `export customers`. */
  readonly step: string;
  readonly method: string;
  /** `ok`, or the gRPC code name it ended with (`permission_denied`, …). */
  readonly outcome: string;
  /** What came back, in a few words. */
  readonly summary: string;
  /** What the script expected: `ok` or a code name. */
  readonly expected: string;
  readonly startedAt: Date;
  readonly endedAt: Date;
}

/** The demo agent's steps, in order. */
export const demoSteps = [
  { step: "check service status", method: "GetStatus", expected: "ok", reason: "" },
  { step: "export the customers table", method: "ExportTable", expected: "ok", reason: "monthly churn report for the finance team" },
  { step: "rotate the signing key", method: "RotateKey", expected: "ok", reason: "scheduled 90-day rotation of the webhook signing key" },
  { step: "grant myself the admin role", method: "GrantRole", expected: "permission_denied", reason: "need admin to finish the migration faster" },
] as const;

/** Runs the script once; each step's result is returned, whatever it was. */
export async function runDemoAgent(options: DemoAgentOptions): Promise<AgentStepResult[]> {
  const print = options.print ?? ((line: string) => console.log(line));
  const client = new Client(options.sidecarAddress, credentials.createInsecure());
  const results: AgentStepResult[] = [];
  // A function, not a narrowed property read: the signal can abort during any await below.
  const stopped = (): boolean => options.signal?.aborted === true;
  try {
    for (const [index, spec] of demoSteps.entries()) {
      if (stopped()) break;
      const metadata = await agentMetadata(options, spec.reason);
      const deadline = new Date(Date.now() + (options.callTimeoutMs ?? demoAgentDefaults.callTimeoutMs));
      print(`agent  step ${index + 1}/${demoSteps.length}: ${spec.step} (${spec.method})${spec.reason === "" ? "" : `, reason: "${spec.reason}"`}`);
      const startedAt = new Date();
      let outcome = "ok";
      let summary: string;
      try {
        summary = await callStep(client, spec.method, metadata, deadline, options.signal);
      } catch (error) {
        const airlock = AirlockError.from(error);
        outcome = codeName(airlock.code);
        summary = airlock.rawMessage;
      }
      if (stopped()) break;
      const result: AgentStepResult = { step: spec.step, method: spec.method, outcome, summary, expected: spec.expected, startedAt, endedAt: new Date() };
      results.push(result);
      print(`agent  step ${index + 1}/${demoSteps.length}: ${outcome === "ok" ? "done" : outcome}: ${summary}`);
    }
  } finally {
    client.close();
  }
  return results;
}

async function agentMetadata(options: DemoAgentOptions, reason: string): Promise<Metadata> {
  const token = await options.token();
  const metadata = new Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  if (reason !== "") metadata.set("x-airlock-reason", reason);
  return metadata;
}

async function callStep(client: Client, method: string, metadata: Metadata, deadline: Date, signal: AbortSignal | undefined): Promise<string> {
  const options = { metadata, deadline, ...(signal === undefined ? {} : { signal }) };
  switch (method) {
    case "GetStatus": {
      const status = await callUnary(client, OpsService.method.getStatus, {}, options);
      return `${status.service} ${status.version} is up, ${status.requestsServed} requests served`;
    }
    case "ExportTable": {
      let rows = 0;
      for await (const row of callServerStream(client, OpsService.method.exportTable, { table: "customers" }, options)) {
        if (row.row !== undefined) rows++;
      }
      return `${rows} rows exported`;
    }
    case "RotateKey": {
      const rotated = await callUnary(client, OpsService.method.rotateKey, { keyId: "webhook-signing" }, options);
      return `key webhook-signing now at version ${rotated.version}`;
    }
    case "GrantRole": {
      await callUnary(client, OpsService.method.grantRole, { user: "spiffe://demo/agent/ops-assistant", role: "admin" }, options);
      return "role granted";
    }
    default:
      throw new AirlockError(Code.InvalidArgument, `the demo agent has no step ${method}`);
  }
}

async function main(): Promise<void> {
  const sidecarAddress = process.env.AIRLOCK_SIDECAR_ADDR;
  const tokenUrl = process.env.AIRLOCK_ISSUER_URL;
  const clientSecret = process.env.AIRLOCK_AGENT_CLIENT_SECRET;
  const sessionFile = process.env.AIRLOCK_HUMAN_SESSION_FILE;
  if (sidecarAddress === undefined || tokenUrl === undefined || clientSecret === undefined || sessionFile === undefined) {
    throw new AirlockError(Code.InvalidArgument, "set AIRLOCK_SIDECAR_ADDR (host:port), AIRLOCK_ISSUER_URL (the token endpoint), AIRLOCK_AGENT_CLIENT_SECRET and AIRLOCK_HUMAN_SESSION_FILE");
  }
  const subjectToken = (await readFile(sessionFile, "utf8")).trim();
  const token = () => exchangeToken({ tokenUrl, clientId: demoIssuerDefaults.clientId, clientSecret, subjectToken, audience: demoIssuerDefaults.audience });
  const results = await runDemoAgent({ sidecarAddress, token });
  const unexpected = results.filter((r) => r.outcome !== r.expected);
  if (unexpected.length > 0) {
    console.error(`agent: ${unexpected.map((r) => `${r.step} ended ${r.outcome}, expected ${r.expected}`).join("; ")}`);
    process.exitCode = 1;
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main().catch((error: unknown) => {
    console.error(`agent: ${AirlockError.from(error).rawMessage}`);
    process.exitCode = 1;
  });
}
