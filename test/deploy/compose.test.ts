// docker-compose.yml and the Dockerfile, checked without Docker: the structure compose
// needs, that every path they name exists in the repo, and that the environment each
// Airlock service gets makes its config in demo/config/ parse with the real parsers.
import { generateKeyPairSync } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, normalize, posix } from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";
import { natsServerRelease } from "../../harness/index.js";
import { parse as parseYaml } from "yaml";
import { parseBrokerConfig } from "../../broker/server.js";
import { type ConfigEnv, expandConfigVariables, readConfigFile } from "../../common/index.js";
import { demoIssuerDefaults } from "../../demo/issuer.js";
import { parseSidecarConfig } from "../../sidecar/index.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

type Mapping = Record<string, unknown>;

function isMapping(value: unknown): value is Mapping {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function mapping(value: unknown): Mapping {
  return isMapping(value) ? value : {};
}

function strings(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((entry): entry is string => typeof entry === "string") : [];
}

const compose = mapping(parseYaml(readFileSync(join(root, "docker-compose.yml"), "utf8")));
const services = mapping(compose.services);
const names = Object.keys(services);
const service = (name: string): Mapping => mapping(services[name]);
/** One-shot services run to completion and are never restarted; they need no healthcheck. */
const oneShot = new Set(names.filter((name) => service(name).restart === "no"));
const airlockServices = ["nats-setup", "setup", "ops", "broker", "sidecar", "agent"];

/** A service's environment as the container sees it: compose's `${NAME:-default}` resolved with nothing set in the shell. */
function environment(name: string): Record<string, string> {
  const raw = service(name).environment;
  const entries: [string, string][] = Array.isArray(raw)
    ? strings(raw).map((line) => [line.slice(0, line.indexOf("=")), line.slice(line.indexOf("=") + 1)])
    : Object.entries(mapping(raw)).map(([key, value]) => [key, String(value)]);
  return mapping(expandConfigVariables(Object.fromEntries(entries), "docker-compose.yml", { env: {} })) as Record<string, string>;
}

/** Where a service's command and entrypoint name repo files (`cli/airlock.ts`, `demo/config/broker.yaml`). */
function repoPathsIn(name: string): string[] {
  const words = [...strings(service(name).command), ...strings(service(name).entrypoint)].flatMap((word) => word.split(/[\s"']+/));
  return words.filter((word) => /^[\w-]+(\/[\w.-]+)+\.(ts|yaml|yml|sh)$/.test(word));
}

interface Mount {
  readonly kind: "bind" | "volume";
  readonly source: string;
  readonly target: string;
  readonly readOnly: boolean;
}

function mounts(name: string): Mount[] {
  const raw = service(name).volumes;
  if (!Array.isArray(raw)) return [];
  return raw.map((entry: unknown): Mount => {
    if (typeof entry === "string") {
      const [source = "", target = "", mode = ""] = entry.split(":");
      const kind = /^[./~]/.test(source) ? "bind" : "volume";
      return { kind, source, target, readOnly: mode.split(",").includes("ro") };
    }
    const long = mapping(entry);
    return { kind: long.type === "bind" ? "bind" : "volume", source: String(long.source), target: String(long.target), readOnly: long.read_only === true };
  });
}

interface Port {
  readonly hostIp: string;
  readonly hostPort: number;
  readonly containerPort: number;
}

function ports(name: string): Port[] {
  return strings(service(name).ports).map((text) => {
    const parts = text.split(":");
    const containerPort = Number(parts.at(-1));
    const hostPort = Number(parts.at(-2));
    return { hostIp: parts.length === 3 ? (parts[0] ?? "") : "0.0.0.0", hostPort, containerPort };
  });
}

/** The Dockerfile's instructions: keyword and argument text, continuation lines joined. */
function dockerfileInstructions(text: string): { keyword: string; args: string }[] {
  const joined = text.replace(/\\\n/g, " ");
  return joined
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("#"))
    .map((line) => {
      const space = line.search(/\s/);
      return { keyword: line.slice(0, space).toUpperCase(), args: line.slice(space + 1).trim() };
    });
}

const dockerfilePath = join(root, "Dockerfile");
const dockerfile = existsSync(dockerfilePath) ? dockerfileInstructions(readFileSync(dockerfilePath, "utf8")) : [];
const workdir = dockerfile.findLast((instruction) => instruction.keyword === "WORKDIR")?.args ?? "/";
const packageJson = mapping(JSON.parse(readFileSync(join(root, "package.json"), "utf8")));
const dependencies = { ...mapping(packageJson.dependencies), ...mapping(packageJson.devDependencies) };

await t.test("the expected services exist, each with an image or a build", async (t) => {
  for (const name of ["nats", "vault", "postgres", "setup", "ops", "broker", "sidecar", "agent"]) t.ok(names.includes(name), `service ${name}`);
  for (const name of names) t.ok(typeof service(name).image === "string" || service(name).build !== undefined, `${name} has image or build`);
  t.equal(service("nats").image, `nats:${natsServerRelease.version.slice(1)}-alpine`, "the nats-server release the project pins");
  t.ok(strings(service("nats").command).includes("-js"), "NATS runs with JetStream");
  t.same(strings(service("nats").command).slice(0, 2), ["-c", "/nats/nats-server.conf"], "with the generated config: TLS and a user per role and host");
  t.match(strings(service("nats-setup").command).join(" "), /airlock\.ts nats init --dir \/nats/, "the material is made by airlock nats init");
  t.equal(service("vault").image, "hashicorp/vault:1.21");
  t.same(strings(service("vault").command), ["server", "-dev"], "Vault in dev mode");
  t.ok(environment("vault").VAULT_DEV_ROOT_TOKEN_ID !== undefined && environment("vault").VAULT_DEV_ROOT_TOKEN_ID !== "", "with a known root token");
  t.equal(service("postgres").image, "postgres:15");
});

await t.test("every Airlock part is built from the one Dockerfile", async (t) => {
  const images = new Set<unknown>();
  for (const name of airlockServices) {
    const build = mapping(service(name).build);
    t.equal(build.context, ".", `${name}: the repo is the build context`);
    t.equal(build.dockerfile, "Dockerfile", `${name}: the one Dockerfile`);
    images.add(service(name).image);
  }
  t.equal(images.size, 1, "one image tag for all of them");
  t.ok(existsSync(dockerfilePath), "the Dockerfile exists");
  t.ok(existsSync(join(root, ".dockerignore")), "and a .dockerignore keeps node_modules out of the context");
  t.match(readFileSync(join(root, ".dockerignore"), "utf8"), /^node_modules$/m);
});

await t.test("the Dockerfile: node 20 on bookworm-slim, npm ci, and an ENTRYPOINT/CMD naming what exists", async (t) => {
  t.equal(dockerfile[0]?.keyword, "FROM");
  t.equal(dockerfile[0]?.args, "node:20-bookworm-slim");
  t.ok(
    dockerfile.some((instruction) => instruction.keyword === "RUN" && /\bnpm ci\b/.test(instruction.args)),
    "dependencies from the lock file (npm ci)",
  );
  const copied = dockerfile.filter((instruction) => instruction.keyword === "COPY").flatMap((instruction) => instruction.args.split(/\s+/).slice(0, -1));
  for (const source of copied) t.ok(existsSync(join(root, source)), `COPY source ${source} exists`);
  const entrypoint = dockerfile.findLast((instruction) => instruction.keyword === "ENTRYPOINT");
  const cmd = dockerfile.findLast((instruction) => instruction.keyword === "CMD");
  t.ok(entrypoint !== undefined && cmd !== undefined, "ENTRYPOINT and CMD are set");
  const entrypointArgs = JSON.parse(entrypoint?.args ?? "null") as unknown;
  const cmdArgs = JSON.parse(cmd?.args ?? "null") as unknown;
  t.ok(Array.isArray(entrypointArgs) && Array.isArray(cmdArgs), "both in exec (JSON) form, so signals reach the process");
  const words = [...strings(entrypointArgs), ...strings(cmdArgs)];
  t.same(strings(entrypointArgs), ["node", "--import", "tsx"], "node runs the TypeScript through tsx's loader");
  t.ok("tsx" in dependencies, "tsx is a dependency the image installs");
  const files = words.filter((word) => /\.(ts|js|sh)$/.test(word));
  t.ok(files.length > 0, "the CMD names a file");
  for (const file of files) t.ok(existsSync(join(root, file)), `${file} exists (relative to WORKDIR ${workdir})`);
  t.same(strings(cmdArgs), ["cli/airlock.ts"]);
});

await t.test("commands name files that exist", async (t) => {
  for (const name of airlockServices) {
    const paths = repoPathsIn(name);
    t.ok(paths.length > 0, `${name} runs a file from the repo`);
    for (const path of paths) t.ok(existsSync(join(root, path)), `${name}: ${path} exists`);
  }
});

await t.test("ports: the console on localhost 9465, nothing published on every interface", async (t) => {
  t.same(ports("broker"), [{ hostIp: "127.0.0.1", hostPort: 9465, containerPort: 9465 }]);
  for (const name of names) {
    for (const port of ports(name)) t.equal(port.hostIp, "127.0.0.1", `${name}: ${port.hostPort} is published on loopback only`);
  }
});

await t.test("every long-running service has a healthcheck", async (t) => {
  t.same([...oneShot].sort(), ["agent", "nats-setup", "setup"], "the one-shot services");
  for (const name of names) {
    const healthcheck = mapping(service(name).healthcheck);
    if (oneShot.has(name)) {
      t.equal(service(name).healthcheck, undefined, `${name} is one-shot: no healthcheck`);
      continue;
    }
    const test = strings(healthcheck.test);
    t.ok(test[0] === "CMD" || test[0] === "CMD-SHELL", `${name} has a healthcheck command`);
    t.ok(test.length > 1, `${name}: the healthcheck runs something`);
    t.equal(service(name).restart, "unless-stopped", `${name} is restarted`);
  }
});

await t.test("depends_on: existing services, each with a condition that fits it, and no cycle", async (t) => {
  const conditions = ["service_started", "service_healthy", "service_completed_successfully"];
  for (const name of names) {
    const dependsOn = service(name).depends_on;
    if (dependsOn === undefined) continue;
    t.ok(isMapping(dependsOn), `${name}: depends_on is a mapping (so each entry can carry a condition)`);
    for (const [dependency, spec] of Object.entries(mapping(dependsOn))) {
      t.ok(names.includes(dependency), `${name} depends on ${dependency}, which exists`);
      const condition = mapping(spec).condition;
      t.ok(typeof condition === "string" && conditions.includes(condition), `${name} → ${dependency} has a condition (${String(condition)})`);
      if (condition === "service_healthy") t.ok(service(dependency).healthcheck !== undefined, `${dependency} has the healthcheck ${name} waits for`);
      if (condition === "service_completed_successfully") t.ok(oneShot.has(dependency), `${dependency} is one-shot, so it completes`);
    }
  }
  const visiting = new Set<string>();
  const done = new Set<string>();
  const cycle = (name: string): boolean => {
    if (done.has(name)) return false;
    if (visiting.has(name)) return true;
    visiting.add(name);
    const found = Object.keys(mapping(service(name).depends_on)).some(cycle);
    visiting.delete(name);
    done.add(name);
    return found;
  };
  t.notOk(names.some(cycle), "no dependency cycle");
  t.same(Object.keys(mapping(service("agent").depends_on)).sort(), ["broker", "issuer", "sidecar"], "the agent starts once the sidecar, the broker and the identity provider (with the human's session written) are healthy");
});

await t.test("mounts: bind sources exist, named volumes are declared, the configs are read-only", async (t) => {
  const declared = Object.keys(mapping(compose.volumes));
  for (const name of names) {
    for (const mount of mounts(name)) {
      if (mount.kind === "bind") {
        t.ok(existsSync(join(root, mount.source)), `${name}: ${mount.source} exists in the repo`);
        t.ok(mount.readOnly, `${name}: ${mount.source} is mounted read-only`);
        // Mounted over the image's own copy, at the same path under WORKDIR.
        t.equal(mount.target, posix.join(workdir, normalize(mount.source).replace(/\\/g, "/")), `${name}: ${mount.source} lands where the image has it`);
      } else {
        t.ok(declared.includes(mount.source), `${name}: volume ${mount.source} is declared`);
      }
    }
  }
  for (const name of ["broker", "sidecar"]) {
    t.ok(
      mounts(name).some((mount) => mount.kind === "bind" && normalize(mount.source) === normalize("demo/config")),
      `${name} mounts demo/config/`,
    );
  }
  for (const name of ["setup", "broker", "sidecar", "issuer"]) {
    const dir = environment(name).AIRLOCK_DIR;
    t.ok(dir !== undefined && mounts(name).some((mount) => mount.target === dir), `${name}: AIRLOCK_DIR (${String(dir)}) is a mounted volume`);
  }
  t.notOk(mounts("setup").find((mount) => mount.target === environment("setup").AIRLOCK_DIR)?.readOnly, "setup can write the keys");
});

// A real-looking key for what the sidecar's entrypoint reads from the keys volume at start.
const idpPublicKey = generateKeyPairSync("ed25519").publicKey.export({ type: "spki", format: "pem" }).toString();

async function configOf(name: string, env: ConfigEnv): Promise<ReturnType<typeof readConfigFile>> {
  const path = repoPathsIn(name).find((word) => word.endsWith(".yaml"));
  if (path === undefined) throw new Error(`${name} names no config`);
  return readConfigFile(join(root, path), { env });
}

await t.test("the broker's environment makes demo/config/broker.yaml valid, listening where the port and healthcheck point", async (t) => {
  const config = parseBrokerConfig(await configOf("broker", environment("broker")));
  t.same(config.http, { host: "0.0.0.0", port: 9465 }, "reachable from the published port");
  t.match(strings(mapping(service("broker").healthcheck).test).join(" "), `:${config.http.port}/readyz`);
  t.same(config.nats.servers, ["tls://nats:4222"]);
  t.equal(config.nats.auth.seedFile, "/nats/broker.nk", "the broker role's credential");
  t.ok(mounts("broker").some((mount) => mount.source === "nats-security" && mount.target === "/nats" && mount.readOnly), "from its own part of the material");
  t.equal(config.vault.address, "http://vault:8200");
  t.equal(config.vault.auth.kind === "token" ? config.vault.auth.token : "", environment("vault").VAULT_DEV_ROOT_TOKEN_ID, "the broker's token is Vault's dev root token");
});

await t.test("the sidecar's environment makes demo/config/sidecar.yaml valid; the agent's matches it", async (t) => {
  const raw = strings(service("sidecar").entrypoint).join(" ");
  // Compose interpolates `$NAME` from the host's environment: the container's shell gets `$` only when written `$$`.
  t.notMatch(raw.replace(/\$\$/g, ""), /\$/, "every $ meant for the container's shell is escaped as $$");
  const entrypoint = raw.replace(/\$\$/g, "$");
  t.match(entrypoint, /AIRLOCK_IDP_PUBLIC_KEY="\$\(cat "\$AIRLOCK_DIR\/idp\.pub\.pem"\)"/, "the entrypoint sets AIRLOCK_IDP_PUBLIC_KEY from the keys volume");
  t.match(entrypoint, /export AIRLOCK_IDP_PUBLIC_KEY/);
  t.match(entrypoint, /exec node --import tsx cli\/airlock\.ts sidecar --config demo\/config\/sidecar\.yaml/, "the same program as the image's entrypoint");
  const config = parseSidecarConfig(await configOf("sidecar", { ...environment("sidecar"), AIRLOCK_IDP_PUBLIC_KEY: idpPublicKey }));
  t.same(config.listen, { host: "0.0.0.0", port: 7443 });
  t.same(
    ports("sidecar").map((port) => port.containerPort),
    [config.listen.port],
  );
  t.match(strings(mapping(service("sidecar").healthcheck).test).join(" "), `:${config.metrics.port}/readyz`);
  t.equal(config.upstreams[0]?.address, `ops:${environment("ops").AIRLOCK_OPS_LISTEN?.split(":").at(-1)}`, "the upstream is the ops service's port");
  t.match(strings(mapping(service("ops").healthcheck).test).join(" "), /connect\(50051,/);
  t.equal(config.nats.auth.seedFile, `/nats/${config.host}.nk`, "this host's own NATS credential");
  t.match(strings(service("nats-setup").command).join(" "), new RegExp(`add-host ${config.host} `), "made for this host by airlock nats add-host");
  const agent = environment("agent");
  t.equal(agent.AIRLOCK_SIDECAR_ADDR, `sidecar:${config.listen.port}`);
  const auth = config.agentAuth[0];
  t.ok(auth?.kind === "jwt" && auth.issuer === demoIssuerDefaults.issuer && auth.audience === demoIssuerDefaults.audience && auth.delegation === "token_exchange", "the identity provider issues tokens for this sidecar's issuer and audience, by token exchange");
  t.equal(agent.AIRLOCK_ISSUER_URL, `http://issuer:${environment("issuer").AIRLOCK_ISSUER_LISTEN?.split(":").at(-1)}/token`, "the agent reaches the provider's token endpoint");
  t.equal(agent.AIRLOCK_AGENT_CLIENT_SECRET, environment("issuer").AIRLOCK_AGENT_CLIENT_SECRET, "with the client secret the provider knows");
  t.notOk(mounts("agent").some((mount) => mount.source === "airlock-keys"), "the agent does not mount the keys: it holds no signing key");
});

await t.test("setup and ops get what they read", async (t) => {
  const setup = environment("setup");
  for (const name of ["AIRLOCK_DIR", "AIRLOCK_VAULT_ADDR", "AIRLOCK_VAULT_TOKEN", "AIRLOCK_DEMO_PG_URL"]) t.ok(setup[name] !== undefined && setup[name] !== "", `setup: ${name}`);
  const pgUrl = new URL(setup.AIRLOCK_DEMO_PG_URL ?? "");
  const postgres = environment("postgres");
  t.equal(decodeURIComponent(pgUrl.password), postgres.POSTGRES_PASSWORD, "setup logs in with the postgres service's password");
  t.equal(pgUrl.pathname, `/${postgres.POSTGRES_DB}`);
  t.equal(setup.AIRLOCK_VAULT_TOKEN, environment("vault").VAULT_DEV_ROOT_TOKEN_ID);
  const ops = environment("ops");
  for (const name of ["AIRLOCK_OPS_LISTEN", "AIRLOCK_OPS_DATABASE_URL", "AIRLOCK_VAULT_ADDR"]) t.ok(ops[name] !== undefined && ops[name] !== "", `ops: ${name}`);
  t.equal(new URL(ops.AIRLOCK_OPS_DATABASE_URL ?? "").password, "", "ops holds no database password: the sidecar injects one per action");
});
