/**
 * `airlock nats init | add-host | revoke-host | render-auth | ensure-streams`: the operator's
 * commands for the deployment's NATS security material (see
 * `common/bus-material.ts` for the directory's layout) and for bringing the
 * streams and buckets to the configured settings with the admin credential.
 * They print paths, public keys and settings, never a seed.
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { jetstreamManager } from "@nats-io/jetstream";
import { ensureAuditStream } from "../broker/audit/log.js";
import { ensurePasskeyBucket, ensureSingleUseBucket } from "../broker/stepup/index.js";
import { historyStreamSettings } from "../broker/history.js";
import { ensureChatPositionsBucket } from "../broker/notify/index.js";
import { ensureStateBucket } from "../broker/store.js";
import { addBusHost, busMaterialFiles, busSeedFile, initBusMaterial, renderBusAuth, revokeBusHost } from "../common/bus-material.js";
import { AirlockError, Code } from "../common/errors.js";
import { connectNats } from "../common/nats.js";
import { bucketStream, chatBucket, type EnsureOptions, ensureDefaults, ensureStream, ensureStreams, natsReplicaChoices, passkeyBucket, stepUpBucket } from "../common/subjects.js";

function requireDir(dir: string | undefined): string {
  if (dir === undefined) throw new AirlockError(Code.InvalidArgument, "--dir is required: the NATS security material directory");
  return dir;
}

/**
 * Has nats-server reload its config, twice a second apart: nats-server 2.15.3 wires the
 * imports of an account a reload adds only on the next reload. Without a pid, says how.
 */
async function reloadServer(pid: number | undefined): Promise<void> {
  if (pid === undefined) {
    console.log("reload nats-server twice to apply it (kill -HUP <pid>, a second later again; or pass --reload-pid)");
    return;
  }
  process.kill(pid, "SIGHUP");
  await new Promise((resolve) => setTimeout(resolve, 1000));
  process.kill(pid, "SIGHUP");
  console.log(`reloaded nats-server (pid ${pid}) twice`);
}

/** Runs one `airlock nats …` subcommand. */
export async function runNatsAdmin(sub: string | undefined, args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args,
    options: { dir: { type: "string" }, "server-name": { type: "string", multiple: true }, "reload-pid": { type: "string" }, nats: { type: "string", multiple: true }, replicas: { type: "string" } },
    allowPositionals: true,
    strict: true,
  });
  const dir = requireDir(values.dir);
  if (sub === "init") {
    const registry = await initBusMaterial(dir, { serverNames: values["server-name"] ?? [] });
    console.log(`nats security material in ${dir}:`);
    console.log(`  server config   ${dir}/${busMaterialFiles.serverConf} (TLS required; users in ${busMaterialFiles.authConf})`);
    console.log(`  clients trust   ${dir}/${busMaterialFiles.caCert}`);
    for (const kind of ["broker", "audit", "admin"] as const) console.log(`  ${kind.padEnd(15)} ${busSeedFile(dir, { kind })} (${registry.roles[kind]})`);
    console.log(`add each sidecar host with: airlock nats add-host <host> --dir ${dir}`);
    return;
  }
  if (sub === "ensure-streams") {
    await ensureAll(dir, values.nats ?? [], values.replicas);
    return;
  }
  const pid = values["reload-pid"] === undefined ? undefined : Number.parseInt(values["reload-pid"], 10);
  if (pid !== undefined && (!Number.isInteger(pid) || pid <= 0)) throw new AirlockError(Code.InvalidArgument, `--reload-pid ${values["reload-pid"] ?? ""} is not a process id`, { details: { field: "reload-pid" } });
  if (sub === "render-auth") {
    const registry = await renderBusAuth(dir);
    console.log(`wrote ${dir}/${busMaterialFiles.authConf} with this version's permissions (${Object.keys(registry.hosts).length} hosts, every key kept)`);
    await reloadServer(pid);
    console.log("copy it to every node and reload each");
    return;
  }
  const host = positionals[0];
  if (host === undefined) throw new AirlockError(Code.InvalidArgument, `airlock nats ${sub ?? ""} needs a host name`);
  if (sub === "add-host") {
    const added = await addBusHost(dir, host);
    console.log(`${added.created ? "added" : "already present:"} host ${host}: seed ${added.seedFile} (${added.publicKey})`);
    await reloadServer(pid);
    console.log("give the seed file and ca.pem to that host's sidecar only");
    return;
  }
  if (sub === "revoke-host") {
    const revoked = await revokeBusHost(dir, host);
    console.log(`revoked host ${host} (${revoked.publicKey}); its seed file is deleted`);
    await reloadServer(pid);
    return;
  }
  throw new AirlockError(Code.InvalidArgument, `unknown subcommand: airlock nats ${sub ?? ""} (init, add-host, revoke-host, render-auth, ensure-streams)`);
}

/**
 * `airlock nats ensure-streams --dir <material> --nats <url>… [--replicas 1|3|5]`: with the
 * admin credential of the material, creates every stream and bucket Airlock uses or brings an
 * existing one's owned settings up to date (the same `ensureStream` the broker runs at start,
 * which the broker's own role may not apply), printing each change.
 */
async function ensureAll(dir: string, urls: readonly string[], replicasFlag: string | undefined): Promise<void> {
  if (urls.length === 0) throw new AirlockError(Code.InvalidArgument, "--nats <url> is required (once per node)", { details: { field: "nats" } });
  const replicas = replicasFlag === undefined ? ensureDefaults.replicas : Number(replicasFlag);
  if (!(natsReplicaChoices as readonly number[]).includes(replicas)) {
    throw new AirlockError(Code.InvalidArgument, `--replicas must be one of ${natsReplicaChoices.join(", ")}`, { details: { field: "replicas" } });
  }
  const role = { kind: "admin" } as const;
  const nc = await connectNats({ servers: urls, auth: { kind: "nkey", seedFile: busSeedFile(dir, role) }, tls: { caFile: join(dir, busMaterialFiles.caCert) } }, { role, name: "airlock-nats-ensure" });
  try {
    const options: EnsureOptions = { replicas, log: { warn: (fields) => console.log(`updated ${fields.stream}: ${JSON.stringify(fields.changed)}`) } };
    const jsm = await jetstreamManager(nc);
    await ensureStreams(jsm, options);
    await ensureAuditStream(jsm, options);
    await ensureStateBucket(nc, options);
    await ensureStream(jsm, historyStreamSettings, options);
    // The step-up, single-use and chat position buckets exist only where step-up, Slack or a Teams bot is configured: brought up to date, never made here.
    const exists = (bucket: string) =>
      jsm.streams.info(bucketStream(bucket)).then(
        () => true,
        () => false,
      );
    if (await exists(passkeyBucket)) await ensurePasskeyBucket(nc, options);
    if (await exists(stepUpBucket)) await ensureSingleUseBucket(nc, options);
    if (await exists(chatBucket)) await ensureChatPositionsBucket(nc, options);
    console.log(`every stream and bucket has ${replicas} replica(s) and Airlock's settings`);
  } finally {
    await nc.close();
  }
}
