/**
 * `airlock nats init | add-host | revoke-host`: the operator's commands for the
 * deployment's NATS security material (see `common/bus-material.ts` for the
 * directory's layout). They print paths and public keys, never a seed.
 */
import { parseArgs } from "node:util";
import { addBusHost, busMaterialFiles, busSeedFile, initBusMaterial, revokeBusHost } from "../common/bus-material.js";
import { AirlockError, Code } from "../common/errors.js";

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
    options: { dir: { type: "string" }, "server-name": { type: "string", multiple: true }, "reload-pid": { type: "string" } },
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
  const host = positionals[0];
  if (host === undefined) throw new AirlockError(Code.InvalidArgument, `airlock nats ${sub ?? ""} needs a host name`);
  const pid = values["reload-pid"] === undefined ? undefined : Number.parseInt(values["reload-pid"], 10);
  if (pid !== undefined && (!Number.isInteger(pid) || pid <= 0)) throw new AirlockError(Code.InvalidArgument, `--reload-pid ${values["reload-pid"] ?? ""} is not a process id`, { details: { field: "reload-pid" } });
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
  throw new AirlockError(Code.InvalidArgument, `unknown subcommand: airlock nats ${sub ?? ""} (init, add-host, revoke-host)`);
}
