#!/usr/bin/env node
/**
 * The one command-line entry point of every Airlock part:
 *   airlock sidecar --config sidecar.yaml
 *   airlock broker --config broker.yaml
 *   airlock forwarder --config forwarder.yaml
 *   airlock policy test --policy policy.yaml --call call.json
 *   airlock audit verify (--nats <url> --nats-seed <file> [--nats-ca <file>] | --file <audit.jsonl>) --keys <keyring.yaml> [--checkpoints <dir> [--writers <id,…>]]
 *   airlock audit report --since <ISO> --until <ISO> --out <report.html> (--nats <url> … | --file <audit.jsonl>) --keys <keyring.yaml> [--checkpoints <dir>]
 *   airlock audit keygen --key-id <id> --out <dir>
 *   airlock audit export --nats <url> --nats-seed <file> [--nats-ca <file>] [--since <ISO time>]
 *   airlock nats init --dir <dir> [--server-name <name>]… | add-host <host> --dir <dir> | revoke-host <host> --dir <dir> [--reload-pid <pid>]
 *   airlock nats render-auth --dir <dir> [--reload-pid <pid>]
 *   airlock nats ensure-streams --dir <dir> --nats <url>… [--replicas 1|3|5]
 *   airlock requests ls | show <id> | approve <id> [--reason …] | deny <id> --reason …
 *   airlock login [--url <broker>] [--issuer <url> --client-id <id>] | airlock logout
 */
import { readFile, writeFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import type { JsonObject } from "@bufbuild/protobuf";
import type { NatsConnection } from "@nats-io/transport-node";
import type { AuditEvent } from "../proto/index.js";
import { AuditKeyRing, auditEventsFromJsonl, auditEventTime, auditEventToJsonLine, loadBrokerConfig, readAuditEvents, readCheckpointDirectory, renderAuditReport, startBroker, TrailVerifier, trailVerdictLine, writeAuditKey } from "../broker/index.js";
import { AirlockError, Code } from "../common/errors.js";
import { connectNats } from "../common/nats.js";
import { runForwarder } from "./forwarder.js";
import { runNatsAdmin } from "./nats-admin.js";
import { runLogin, runLogout } from "./login.js";
import { runRequests } from "./requests.js";
import { explainCall, loadSidecarConfig, Policy, type PolicyCall, startSidecar } from "../sidecar/index.js";

const usage = `usage:
  airlock sidecar --config <sidecar.yaml>
  airlock broker --config <broker.yaml>
  airlock forwarder --config <forwarder.yaml>   (the audit trail to Splunk HEC, syslog/TLS, webhooks)
  airlock policy test --policy <policy.yaml> --call <call.json>
  airlock audit verify (--nats <url> | --file <audit.jsonl>) --keys <keyring.yaml> [--checkpoints <dir> [--writers <id,…>]]
                       (verified=yes needs --checkpoints; --writers names the checkpoint chains that must be there)
  airlock audit report --since <ISO time> --until <ISO time> --out <report.html>
                       (--nats <url> | --file <audit.jsonl>) --keys <keyring.yaml> [--checkpoints <dir>]
  airlock audit keygen --key-id <id> --out <dir>
  airlock audit export --nats <url> [--since <ISO time>]
    (NATS as the audit-reader role: --nats-seed <file> or $AIRLOCK_NATS_SEED_FILE,
     the CA: --nats-ca <file> or $AIRLOCK_NATS_CA)
  airlock nats init --dir <dir> [--server-name <dns name or IP>]…
  airlock nats add-host <host> --dir <dir>
  airlock nats revoke-host <host> --dir <dir> [--reload-pid <nats-server pid>]
  airlock nats render-auth --dir <dir> [--reload-pid <nats-server pid>]
  airlock nats ensure-streams --dir <dir> --nats <url>… [--replicas 1|3|5]
    (with the admin credential of <dir>: every stream and bucket to nats.replicas and Airlock's settings)
  airlock requests ls [--state pending] [--mine] [--agent <id>] [--min-risk high]
  airlock requests show <id>
  airlock requests approve <id> [--reason <text>]
  airlock requests deny <id> --reason <text>
    (the broker: --url or $AIRLOCK_URL, default http://127.0.0.1:9465;
     the reviewer token: $AIRLOCK_TOKEN, --token-file <file>, or the one airlock login kept)
  airlock login [--url <broker>] [--issuer <url> --client-id <id>] [--scope "<scopes>"]
    (signs in at the identity provider with the device flow; keeps the token, mode 0600, in
     $XDG_CONFIG_HOME/airlock/ or ~/.config/airlock/)
  airlock logout`;

/** Connects as the read-only audit role: the seed and CA come from flags or the environment, never a command-line secret. */
async function withNats<T>(options: { url: string; seed: string | undefined; ca: string | undefined }, work: (nc: NatsConnection) => Promise<T>): Promise<T> {
  const seedFile = options.seed ?? process.env.AIRLOCK_NATS_SEED_FILE;
  if (seedFile === undefined) throw new AirlockError(Code.InvalidArgument, "--nats-seed (or $AIRLOCK_NATS_SEED_FILE) is required: the audit-reader credential's seed file");
  const caFile = options.ca ?? process.env.AIRLOCK_NATS_CA;
  const nc = await connectNats(
    { servers: [options.url], auth: { kind: "nkey", seedFile }, ...(caFile === undefined ? {} : { tls: { caFile } }) },
    { role: { kind: "audit" }, name: "airlock-audit", extra: { maxReconnectAttempts: 2 } },
  );
  try {
    return await work(nc);
  } finally {
    await nc.close();
  }
}

async function runAudit(sub: string | undefined, args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      nats: { type: "string" },
      "nats-seed": { type: "string" },
      "nats-ca": { type: "string" },
      file: { type: "string" },
      since: { type: "string" },
      until: { type: "string" },
      keys: { type: "string" },
      checkpoints: { type: "string" },
      writers: { type: "string" },
      "key-id": { type: "string" },
      out: { type: "string" },
    },
    strict: true,
  });
  const nats = (url: string) => ({ url, seed: values["nats-seed"], ca: values["nats-ca"] });
  const time = (flag: string, text: string | undefined): Date | undefined => {
    const date = text === undefined ? undefined : new Date(text);
    if (date !== undefined && Number.isNaN(date.getTime())) throw new AirlockError(Code.InvalidArgument, `--${flag} ${text} is not a time`);
    return date;
  };
  /** Verifies the whole trail from --file or --nats, handing each event to `also` as it goes (one read serves both). */
  const verifyTrailFrom = async (also: (event: AuditEvent) => void = () => undefined) => {
    if (values.keys === undefined) throw new AirlockError(Code.InvalidArgument, "--keys is required: the key ring of every broker's audit key (signatures are what make the trail evidence)");
    const keys = await AuditKeyRing.load(values.keys);
    const found = values.checkpoints === undefined ? undefined : await readCheckpointDirectory(values.checkpoints);
    if (values.writers !== undefined && found === undefined) throw new AirlockError(Code.InvalidArgument, "--writers needs --checkpoints: it names the checkpoint writers whose chains must be there");
    const expectedWriters = values.writers?.split(",").map((writer) => writer.trim()).filter((writer) => writer !== "");
    const verifier = new TrailVerifier({ keys, ...(found === undefined ? {} : { checkpoints: found.checkpoints, malformedCheckpoints: found.malformed }), ...(expectedWriters === undefined ? {} : { expectedWriters }) });
    const take = (event: AuditEvent) => {
      verifier.add(event);
      also(event);
    };
    if (values.file !== undefined) {
      for (const event of auditEventsFromJsonl(await readFile(values.file, "utf8"))) take(event);
    } else if (values.nats !== undefined) {
      await withNats(nats(values.nats), async (nc) => {
        for await (const event of readAuditEvents(nc, { onUndecodable: (sequence) => verifier.undecodable(sequence) })) take(event);
      });
    } else {
      throw new AirlockError(Code.InvalidArgument, "--nats or --file is required");
    }
    return { verdict: verifier.finish(), checkpoints: found?.checkpoints };
  };
  if (sub === "verify") {
    const { verdict } = await verifyTrailFrom();
    console.log(trailVerdictLine(verdict));
    if (!verdict.intact) process.exitCode = 1;
    return;
  }
  if (sub === "report") {
    const since = time("since", values.since);
    const until = time("until", values.until);
    if (since === undefined || until === undefined || values.out === undefined) throw new AirlockError(Code.InvalidArgument, "--since, --until and --out are required");
    if (until.getTime() <= since.getTime()) throw new AirlockError(Code.InvalidArgument, "--until must be after --since");
    // The whole trail is verified, but only events from the period's start on are kept:
    // earlier ones cannot appear in the report, and a long trail need not sit in memory.
    const kept: AuditEvent[] = [];
    const { verdict, checkpoints } = await verifyTrailFrom((event) => {
      if (auditEventTime(event).getTime() >= since.getTime()) kept.push(event);
    });
    await writeFile(values.out, renderAuditReport({ events: kept, verdict, checkpoints: checkpoints ?? [], checkpointsGiven: checkpoints !== undefined, since, until, generatedAt: new Date() }));
    console.log(trailVerdictLine(verdict));
    console.log(`report written to ${values.out}`);
    // A broken trail still gets its report (it says BROKEN), and the exit code says so too.
    if (!verdict.intact) process.exitCode = 1;
    return;
  }
  if (sub === "keygen") {
    if (values["key-id"] === undefined || values.out === undefined) throw new AirlockError(Code.InvalidArgument, "--key-id and --out are required");
    const written = await writeAuditKey(values.out, values["key-id"]);
    console.log(`private key ${written.privateKeyFile} (mode 0600: only the broker replica reads it)`);
    console.log(`public key  ${written.publicKeyFile}`);
    console.log(`key ring entry:\n  - key_id: ${values["key-id"]}\n    public_key_file: ${written.publicKeyFile}`);
    return;
  }
  if (sub === "export") {
    if (values.nats === undefined) throw new AirlockError(Code.InvalidArgument, "--nats is required");
    const since = time("since", values.since);
    await withNats(nats(values.nats), async (nc) => {
      for await (const event of readAuditEvents(nc, since === undefined ? {} : { since })) process.stdout.write(`${auditEventToJsonLine(event)}\n`);
    });
    return;
  }
  console.error(usage);
  process.exitCode = 2;
}

/** Starts a long-running part from `--config` and closes it cleanly on SIGINT or SIGTERM. */
async function serveFromConfig(args: string[], start: (configPath: string) => Promise<{ close(): Promise<void> }>): Promise<void> {
  const { values } = parseArgs({ args, options: { config: { type: "string" } }, strict: true });
  if (values.config === undefined) throw new AirlockError(Code.InvalidArgument, "--config is required");
  const running = await start(values.config);
  const stop = () => {
    running.close().then(
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
  if (command === "sidecar") return serveFromConfig(argv.slice(1), async (path) => startSidecar(await loadSidecarConfig(path)));
  if (command === "broker") return serveFromConfig(argv.slice(1), async (path) => startBroker(await loadBrokerConfig(path)));
  if (command === "forwarder") return runForwarder(argv.slice(1));
  if (command === "policy" && sub === "test") return runPolicyTest(rest);
  if (command === "audit") return runAudit(sub, rest);
  if (command === "requests") return runRequests(sub, rest);
  if (command === "login") return runLogin(argv.slice(1));
  if (command === "logout") return runLogout();
  if (command === "nats") return runNatsAdmin(sub, rest);
  console.error(usage);
  process.exitCode = 2;
}

main(process.argv.slice(2)).catch((error: unknown) => {
  const failure = AirlockError.from(error);
  const field = typeof failure.details.field === "string" ? ` (field: ${failure.details.field})` : "";
  console.error(`airlock: ${failure.rawMessage}${field}`);
  process.exitCode = 1;
});
