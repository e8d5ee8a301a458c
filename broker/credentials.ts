/**
 * The broker's per-action credentials: on final approval, one Vault secret
 * described by the rule's credential template, response-wrapped so only the
 * sidecar can unwrap it, once; and its revocation the moment the action ends.
 * @module
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { AirlockError, Code } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { VaultClient } from "../common/vault.js";
import { type ApprovalRequest, type CredentialDelivery, CredentialDeliverySchema } from "../proto/index.js";

/** Which kind of secret an approval bought: the `CredentialTemplate.kind` oneof, as `CredentialDelivery.kind` spells it. */
export type CredentialKind = "vault_token" | "database";

/** What the broker keeps of an issued credential to revoke it: never the secret. */
export interface IssuedLease {
  readonly kind: CredentialKind;
  /** The token's accessor (`vault_token`) or the lease id (`database`). */
  readonly leaseId: string;
}

/** One issued per-action credential. */
export interface IssuedCredential extends IssuedLease {
  /** What goes into the signed decision: a single-use wrapping token, never the secret. */
  readonly delivery: CredentialDelivery;
  /** When Vault revokes the secret by itself, if nobody revokes it first. */
  readonly expiresAt: Date;
}

/** Options of {@link CredentialIssuer}. */
export interface CredentialIssuerOptions {
  /** Vault, with the broker's token (see {@link brokerVaultPolicy} for what it needs). */
  readonly vault: VaultClient;
  /**
   * TTL of the wrapping token in a decision: long enough for the decision to
   * reach the sidecar, short enough that an intercepted one is soon worthless.
   * @default 60
   */
  readonly wrapTtlSeconds?: number;
  /**
   * The token role per-action tokens are created through (see
   * {@link configureTokenRole}). Without one, `auth/token/create-orphan`, which
   * a non-root broker may use only for policies it holds itself.
   */
  readonly tokenRole?: string;
  /** Receives one line per issuance and revocation (lease ids and accessors, never secrets). */
  readonly logger?: Logger;
}

/** Defaults of {@link CredentialIssuerOptions}, and of a template without `inject_header`. */
export const credentialIssuerDefaults = {
  wrapTtlSeconds: 60,
  /** The sidecar's own default header (`policyDefaults.injectHeader`). */
  injectHeader: "x-airlock-credential",
} as const;

function invalid(request: ApprovalRequest, message: string, field: string): AirlockError {
  return new AirlockError(Code.InvalidArgument, `request ${request.id}: ${message}`, { details: { requestId: request.id, field } });
}

/**
 * Issues and revokes the one Vault secret an approved action gets. Holds no
 * state: what revocation needs ({@link IssuedLease}) is returned to the caller,
 * which stores it (JetStream KV), so any broker replica can revoke it.
 */
export class CredentialIssuer {
  readonly #vault: VaultClient;
  readonly #wrapTtlSeconds: number;
  readonly #tokenRole: string | undefined;
  readonly #logger: Logger | undefined;

  constructor(options: CredentialIssuerOptions) {
    this.#vault = options.vault;
    this.#wrapTtlSeconds = options.wrapTtlSeconds ?? credentialIssuerDefaults.wrapTtlSeconds;
    this.#tokenRole = options.tokenRole;
    this.#logger = options.logger;
  }

  /**
   * Has Vault issue the secret the request's credential template describes and
   * response-wrap it. `vault_token`: an orphan, non-renewable token with the
   * template's policies (plus `default`), TTL and use count, and metadata
   * `airlock_request_id`, `airlock_rule_id`, `airlock_agent` and, given one, the issuance
   * `intent` (`airlock_intent`, which {@link CredentialIssuer.sweep} finds it by). `database`:
   * dynamic credentials from the template's engine role, their lease shortened
   * to the template's TTL. Rejects with `invalid_argument` for a missing or
   * malformed template and with Vault's failure (`unavailable`, …) otherwise;
   * nothing is issued then.
   */
  async issue(request: ApprovalRequest, intent = ""): Promise<IssuedCredential> {
    const template = request.credential;
    if (template === undefined || template.kind.case === undefined) throw invalid(request, "has no credential template", "credential");
    const ttl = template.ttl;
    const ttlSeconds = ttl === undefined ? 0 : Number(ttl.seconds) + ttl.nanos / 1e9;
    // No TTL means no bound from the policy: refuse rather than let Vault's mount default decide.
    if (!(ttlSeconds > 0)) throw invalid(request, "the credential template has no positive ttl", "credential.ttl");
    const injectHeader = template.injectHeader === "" ? credentialIssuerDefaults.injectHeader : template.injectHeader;

    let issued: IssuedCredential;
    if (template.kind.case === "vaultToken") {
      const { policies, numUses } = template.kind.value;
      if (policies.length === 0) throw invalid(request, "a vault_token template needs at least one policy", "credential.vault_token.policies");
      if (policies.includes("root")) throw invalid(request, "a vault_token template may not grant the root policy", "credential.vault_token.policies");
      const token = await this.#vault.createToken({
        policies,
        ttlSeconds,
        numUses,
        meta: { airlock_request_id: request.id, airlock_rule_id: request.ruleId, airlock_agent: request.identity?.agent ?? "", ...(intent === "" ? {} : { [intentMetaKey]: intent }) },
        wrapTtlSeconds: this.#wrapTtlSeconds,
        displayName: `airlock-${request.ruleId === "" ? "action" : request.ruleId}`,
        ...(this.#tokenRole === undefined ? {} : { role: this.#tokenRole }),
      });
      issued = {
        kind: "vault_token",
        leaseId: token.tokenAccessor,
        // Measured after Vault answered, so it is never earlier than the token's real end.
        expiresAt: new Date(Date.now() + Math.ceil(ttlSeconds) * 1000),
        delivery: delivery(token, "vault_token", injectHeader),
      };
    } else {
      const { mount, role } = template.kind.value;
      if (mount === "" || role === "") throw invalid(request, "a database template needs a mount and a role", "credential.database");
      const credentials = await this.#vault.databaseCredentials({ mount, role, wrapTtlSeconds: this.#wrapTtlSeconds, ttlSeconds });
      issued = { kind: "database", leaseId: credentials.leaseId, expiresAt: credentials.leaseExpiresAt, delivery: delivery(credentials, "database", injectHeader) };
    }
    this.#logger?.info(
      { requestId: request.id, ruleId: request.ruleId, kind: issued.kind, leaseId: issued.leaseId, expiresAt: issued.expiresAt.toISOString(), wrapAccessor: issued.delivery.wrappingAccessor },
      "per-action credential issued",
    );
    return issued;
  }

  /**
   * Revokes an issued credential now: the token by accessor, or the database
   * lease (whose revocation statements end the user's sessions and drop it).
   * Idempotent: an already revoked or expired credential is success.
   */
  async revoke(issued: IssuedLease): Promise<void> {
    if (issued.leaseId === "") throw new AirlockError(Code.InvalidArgument, "no lease id to revoke", { details: { field: "leaseId" } });
    const started = performance.now();
    try {
      if (issued.kind === "vault_token") await this.#vault.revokeAccessor(issued.leaseId);
      else await this.#vault.revokeLease(issued.leaseId);
    } catch (error) {
      // Vault answers success for both when the secret is already gone; a not_found is the same fact.
      if (!(error instanceof AirlockError) || error.code !== Code.NotFound) throw error;
    }
    this.#logger?.info({ kind: issued.kind, leaseId: issued.leaseId, ms: Math.round(performance.now() - started) }, "per-action credential revoked");
  }

  /**
   * Finds and revokes what Vault may have created for an issuance whose call ended without an
   * answer (a stalled or cut-off Vault can still act on the request later). Run it once Vault
   * answers again; `settled` false means it must run again later.
   * - `vault_token`: every live token whose metadata carries `intent` (`LIST
   *   auth/token/accessors`, then a lookup of each): exact.
   * - `database`: Vault lets no per-request mark into a dynamic secret the broker reads with
   *   its own token, so the leases under the template's `<mount>/creds/<role>/` issued since
   *   `since` (less `clockSlackMs`) that `known` does not claim are revoked; a lease younger than
   *   `settleMs` is not judged yet (its issuer may be about to record it) and leaves the sweep
   *   unsettled. The role must be Airlock's alone.
   * Resolves with the accessors or lease ids it revoked, for the audit trail to name; a lookup
   * or revocation that failed (other than "gone") leaves it unsettled, and it goes on.
   */
  async sweep(request: ApprovalRequest, intent: string, since: Date, known: (leaseId: string) => boolean): Promise<{ revoked: string[]; settled: boolean }> {
    const template = request.credential;
    const revoked: string[] = [];
    // A lookup or revocation that fails (a slow Vault) leaves the sweep unsettled, to be run
    // again, but does not stop it: what it did revoke is still reported, to be named in the trail.
    let settled = true;
    const unless = (): undefined => {
      settled = false;
      return undefined;
    };
    // Gone since the list, or not a token anyone can look up by accessor (Vault answers a
    // response-wrapping token's accessor with 403; a wrapper of a revoked token delivers nothing).
    // Refusals count as that only when other lookups of the pass were answered: a policy that
    // refuses every lookup leaves the sweep unsettled, never "nothing found".
    let answered = 0;
    let refused = 0;
    const unlessGone = (error: unknown): undefined => {
      if (error instanceof AirlockError && error.code === Code.NotFound) return undefined;
      if (error instanceof AirlockError && error.code === Code.PermissionDenied) {
        refused++;
        return undefined;
      }
      return unless();
    };
    const judged = () => {
      if (refused > 0 && answered === 0) settled = false;
    };
    if (template?.kind.case === "vaultToken") {
      const accessors = await this.#vault.listTokenAccessors();
      for (let i = 0; i < accessors.length; i += sweepLimits.concurrency) {
        await Promise.all(
          accessors.slice(i, i + sweepLimits.concurrency).map(async (accessor) => {
            const info = await this.#vault.lookupAccessor(accessor).catch(unlessGone);
            if (info !== undefined) answered++;
            if (info === undefined || info.meta[intentMetaKey] !== intent) return;
            if (await this.revoke({ kind: "vault_token", leaseId: accessor }).then(() => true, unless)) revoked.push(accessor);
          }),
        );
      }
      judged();
      this.#logger?.warn({ requestId: request.id, intent, revoked: revoked.length, settled, refused }, "swept Vault for tokens of an issuance that got no answer");
      return { revoked, settled };
    }
    if (template?.kind.case !== "database") return { revoked, settled: true };
    const { mount, role } = template.kind.value;
    const now = Date.now();
    for (const leaseId of await this.#vault.listLeases(`${mount}/creds/${role}`)) {
      if (known(leaseId)) continue;
      const info = await this.#vault.lookupLease(leaseId).catch(unlessGone);
      if (info !== undefined) answered++;
      if (info === undefined || info.issueTime.getTime() < since.getTime() - sweepLimits.clockSlackMs) continue;
      if (now - info.issueTime.getTime() < sweepLimits.settleMs) {
        settled = false;
        continue;
      }
      if (await this.revoke({ kind: "database", leaseId }).then(() => true, unless)) revoked.push(leaseId);
    }
    judged();
    this.#logger?.warn({ requestId: request.id, intent, revoked: revoked.length, settled, refused }, "swept Vault for database leases of an issuance that got no answer");
    return { revoked, settled };
  }
}

/** The token metadata key that names the issuance intent a per-action token was made for. */
export const intentMetaKey = "airlock_intent";

/** Bounds of {@link CredentialIssuer.sweep}. */
export const sweepLimits = {
  /** Token lookups at once. */
  concurrency: 8,
  /** How far before the intent a lease's issue time may be and still be the intent's (clocks differ), in ms. */
  clockSlackMs: 5_000,
  /** How old an unclaimed lease must be before it is judged nobody's, in ms. */
  settleMs: 10_000,
} as const;

function delivery(wrapped: { wrappingToken: string; wrappingAccessor: string; wrapExpiresAt: Date }, kind: CredentialKind, injectHeader: string): CredentialDelivery {
  return create(CredentialDeliverySchema, {
    wrappingToken: wrapped.wrappingToken,
    wrappingAccessor: wrapped.wrappingAccessor,
    wrapExpiresAt: timestampFromDate(wrapped.wrapExpiresAt),
    injectHeader,
    kind,
  });
}

/** The SQL a PostgreSQL role of the Vault database engine runs, from {@link postgresRoleStatements}. */
export interface PostgresRoleStatements {
  readonly creationStatements: readonly string[];
  readonly revocationStatements: readonly string[];
}

/**
 * Creation and revocation statements for a PostgreSQL role of Vault's database
 * engine. `{{name}}`, `{{password}}` and `{{expiration}}` are Vault's templating.
 *
 * Creation: a LOGIN role whose password stops working at the lease's end
 * (`VALID UNTIL`, a bound that holds even if revocation never runs), then `grants`
 * (e.g. `GRANT SELECT ON customers TO "{{name}}";`), in the database of the
 * engine's connection URL.
 *
 * Revocation (Vault's default only revokes privileges and drops the role, leaving
 * open sessions running), in one `DO` block so that it is a no-op when the role
 * is already gone (a revocation that fails keeps the lease alive and retried):
 * 1. `NOLOGIN`, so no new session starts;
 * 2. terminate the role's open sessions;
 * 3. `REASSIGN OWNED` to the engine's connection user, so objects the action
 *    created survive, then `DROP OWNED`, which revokes the role's privileges
 *    (DROP ROLE refuses a role that still holds any);
 * 4. `DROP ROLE`.
 * Vault runs all of it in one transaction. Steps 3–4 reach only the connection's
 * database, so grants must live there. A non-superuser connection user needs
 * `pg_signal_backend` (step 2) and admin rights over the roles it creates.
 * A session that logs in between step 2 and the commit (milliseconds) outlives
 * the role, with no privileges left but PUBLIC's.
 */
export function postgresRoleStatements(grants: string): PostgresRoleStatements {
  const creation = [`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`];
  if (grants.trim() !== "") creation.push(grants.trim());
  // Vault treats a statement containing $$ as one statement instead of splitting it on ';'.
  const revocation = `DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{{name}}') THEN
    EXECUTE format('ALTER ROLE %I NOLOGIN', '{{name}}');
    PERFORM pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE usename = '{{name}}' AND pid <> pg_catalog.pg_backend_pid();
    EXECUTE format('REASSIGN OWNED BY %I TO CURRENT_USER', '{{name}}');
    EXECUTE format('DROP OWNED BY %I', '{{name}}');
    EXECUTE format('DROP ROLE %I', '{{name}}');
  END IF;
END
$$;`;
  return { creationStatements: creation, revocationStatements: [revocation] };
}

/** One role of {@link DatabaseEngineConfig}. */
export interface DatabaseRoleConfig {
  readonly name: string;
  /** e.g. `postgresRoleStatements(grants).creationStatements`. */
  readonly creationStatements: readonly string[];
  /** @default postgresRoleStatements("").revocationStatements for the PostgreSQL plugin (ends open sessions), else Vault's default */
  readonly revocationStatements?: readonly string[];
  readonly defaultTtlSeconds: number;
  readonly maxTtlSeconds: number;
}

/** What {@link configureDatabaseEngine} sets up. */
export interface DatabaseEngineConfig {
  /** Where the engine is mounted, e.g. `database`. */
  readonly mount: string;
  /** The connection's name (`<mount>/config/<name>`). */
  readonly connectionName: string;
  /** With Vault's templating: `postgresql://{{username}}:{{password}}@host:5432/db?sslmode=…`. */
  readonly connectionUrl: string;
  readonly username: string;
  /** Vault's password for the connection. In production, call `<mount>/rotate-root/<name>` afterwards so only Vault knows it. */
  readonly password: string;
  readonly roles: readonly DatabaseRoleConfig[];
  /** @default "postgresql-database-plugin" */
  readonly pluginName?: string;
}

/** Defaults of {@link DatabaseEngineConfig}. */
export const databaseEngineDefaults = { pluginName: "postgresql-database-plugin" } as const;

/**
 * Mounts the database secrets engine (if it is not there yet) and writes the
 * connection and its roles. Idempotent: running it again rewrites the same
 * configuration. Vault checks the connection while writing it.
 */
export async function configureDatabaseEngine(vault: VaultClient, config: DatabaseEngineConfig): Promise<void> {
  const pluginName = config.pluginName ?? databaseEngineDefaults.pluginName;
  await vault.mount(config.mount, "database");
  await vault.writeConfig(`${config.mount}/config/${config.connectionName}`, {
    plugin_name: pluginName,
    connection_url: config.connectionUrl,
    username: config.username,
    password: config.password,
    allowed_roles: config.roles.map((role) => role.name),
    verify_connection: true,
  });
  const defaultRevocation = pluginName === databaseEngineDefaults.pluginName ? postgresRoleStatements("").revocationStatements : [];
  for (const role of config.roles) {
    await vault.writeConfig(`${config.mount}/roles/${role.name}`, {
      db_name: config.connectionName,
      creation_statements: [...role.creationStatements],
      revocation_statements: [...(role.revocationStatements ?? defaultRevocation)],
      default_ttl: `${role.defaultTtlSeconds}s`,
      max_ttl: `${role.maxTtlSeconds}s`,
    });
  }
}

/** What {@link configureTokenRole} sets up. */
export interface TokenRoleConfig {
  /** The role's name, i.e. {@link CredentialIssuerOptions.tokenRole}. */
  readonly name: string;
  /** Globs of the policies per-action tokens may carry, e.g. `["airlock-action-*"]`. */
  readonly allowedPoliciesGlob: readonly string[];
  /** No per-action token outlives this, whatever a template says. */
  readonly maxTtlSeconds: number;
}

/**
 * Writes the token role per-action tokens are created through: orphan (a
 * non-sudo broker may then create orphans), non-renewable, capped, with its
 * policies confined to `allowedPoliciesGlob` and `root` refused. The broker then
 * needs no sudo and cannot grant any policy outside the globs.
 */
export async function configureTokenRole(vault: VaultClient, config: TokenRoleConfig): Promise<void> {
  await vault.writeConfig(`auth/token/roles/${config.name}`, {
    allowed_policies_glob: [...config.allowedPoliciesGlob],
    disallowed_policies: ["root"],
    orphan: true,
    renewable: false,
    token_type: "service",
    token_explicit_max_ttl: `${config.maxTtlSeconds}s`,
  });
}

/** What {@link brokerVaultPolicy} grants. */
export interface BrokerPolicyOptions {
  /** The token role the broker creates per-action tokens through; without one, `auth/token/create-orphan`. */
  readonly tokenRole?: string;
  /** Database engine mounts the broker reads credentials from. */
  readonly databaseMounts: readonly string[];
}

/**
 * The least-privilege Vault policy (HCL) the broker's token needs to issue,
 * shorten, look up and revoke per-action credentials, and to sweep for what an
 * unanswered issuance made: `list` with `sudo` only on `auth/token/accessors`
 * and on the engines' `sys/leases/lookup/<mount>/creds/` prefixes. The broker's token should be periodic and renewed, and not revoked
 * while actions run: database leases belong to the token that read them, so
 * revoking it revokes them (which fails closed).
 */
export function brokerVaultPolicy(options: BrokerPolicyOptions): string {
  // The names land inside HCL strings: a quote or a glob would change what the policy grants.
  for (const name of [...(options.tokenRole === undefined ? [] : [options.tokenRole]), ...options.databaseMounts]) {
    if (!/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/.test(name)) throw new AirlockError(Code.InvalidArgument, `${JSON.stringify(name)} is not a plain Vault path`, { details: { field: "brokerPolicy" } });
  }
  const create = options.tokenRole === undefined ? "auth/token/create-orphan" : `auth/token/create/${options.tokenRole}`;
  return [
    `# Per-action tokens${options.tokenRole === undefined ? " (only policies the broker holds itself, unless it has sudo)" : ", confined by the token role"}.`,
    `path "${create}" { capabilities = ["update"] }`,
    `path "auth/token/revoke-accessor" { capabilities = ["update"] }`,
    `path "auth/token/lookup-accessor" { capabilities = ["update"] }`,
    "# Sweeping for tokens an issuance Vault never answered may have made (LIST needs sudo, on this path alone).",
    `path "auth/token/accessors" { capabilities = ["list", "sudo"] }`,
    "# Dynamic database credentials: read, shorten to the template's TTL, wrap, look up, revoke.",
    ...options.databaseMounts.map((mount) => `path "${mount}/creds/*" { capabilities = ["read"] }`),
    "# Sweeping the engine's leases after an issuance Vault never answered (LIST needs sudo, on these prefixes alone).",
    ...options.databaseMounts.map((mount) => `path "sys/leases/lookup/${mount}/creds/*" { capabilities = ["list", "sudo"] }`),
    `path "sys/leases/renew" { capabilities = ["update"] }`,
    `path "sys/leases/lookup" { capabilities = ["update"] }`,
    `path "sys/leases/revoke" { capabilities = ["update"] }`,
    `path "sys/wrapping/wrap" { capabilities = ["update"] }`,
    "",
  ].join("\n");
}
