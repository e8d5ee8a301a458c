import { existsSync } from "node:fs";
import t from "tap";
import { AirlockError, Code, createVaultClient } from "../../common/index.js";
import { resolveVaultBinary, startVault, useInfra } from "../../harness/index.js";

const { vault } = await useInfra(t, { vault: true });

await t.test("a real Vault dev server answers sys/health, unsealed", async (t) => {
  t.match(vault.address, /^http:\/\/127\.0\.0\.1:\d+$/);
  t.match(vault.version, /^\d+\.\d+\.\d+/);
  t.ok(existsSync(vault.binary.path));
  const health = await createVaultClient({ address: vault.address }).health();
  t.same(health, { initialized: true, sealed: false, version: vault.version });
});

await t.test("tokens are real: a created token looks itself up, and a revoked one is refused", async (t) => {
  const response = await fetch(`${vault.address}/v1/auth/token/create`, {
    method: "POST",
    headers: { "X-Vault-Token": vault.rootToken },
    body: JSON.stringify({ policies: ["default"], ttl: "60s", num_uses: 5, meta: { request_id: "req-1" } }),
  });
  t.equal(response.status, 200);
  const token = ((await response.json()) as { auth: { client_token: string } }).auth.client_token;
  const client = createVaultClient({ address: vault.address });
  const info = await client.lookupSelf(token);
  t.same(info.meta, { request_id: "req-1" });
  t.ok(info.ttl > 0 && info.ttl <= 60);
  t.ok(info.policies.includes("default"));

  const revoke = await fetch(`${vault.address}/v1/auth/token/revoke-self`, { method: "POST", headers: { "X-Vault-Token": token } });
  t.equal(revoke.status, 204);
  const refused = await client.lookupSelf(token).catch((error: unknown) => error);
  t.type(refused, AirlockError);
  t.equal((refused as AirlockError).code, Code.PermissionDenied);
  t.notMatch((refused as AirlockError).message, token, "the token is not echoed in the error");
});

await t.test("an unreachable Vault is UNAVAILABLE, not a crash", async (t) => {
  const other = await startVault();
  const client = createVaultClient({ address: other.address, timeoutMs: 1000 });
  t.equal((await client.health()).sealed, false);
  await other.stop();
  const error = await client.health().catch((e: unknown) => e);
  t.equal((error as AirlockError).code, Code.Unavailable);
});

await t.test("VAULT_BIN wins, and a wrong one is a clear error", async (t) => {
  const saved = process.env.VAULT_BIN;
  t.teardown(() => {
    if (saved === undefined) delete process.env.VAULT_BIN;
    else process.env.VAULT_BIN = saved;
  });
  process.env.VAULT_BIN = vault.binary.path;
  t.same(await resolveVaultBinary(), { path: vault.binary.path, source: "VAULT_BIN" });
  process.env.VAULT_BIN = "/nonexistent/vault";
  await t.rejects(resolveVaultBinary(), /VAULT_BIN is set to \/nonexistent\/vault, which does not exist/);
});
