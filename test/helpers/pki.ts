import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A throwaway PKI made with the openssl CLI: two CAs and leaf certificates for TLS tests. */
export interface TestPki {
  readonly dir: string;
  /** The PEM bytes of `<name>.crt` or `<name>.key`. */
  file(name: string): Buffer;
  path(name: string): string;
  remove(): void;
}

function openssl(cwd: string, ...args: string[]): void {
  execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"] });
}

/**
 * Issues, under CA `ca` (and a second, untrusted `rogue-ca`): `server` (IP SAN
 * 127.0.0.1), `agent` (URI SANs spiffe://corp/agent/etl and
 * airlock://on-behalf-of/alice@corp.com), `nouri` (DNS SAN only), and `rogue`
 * (issued by rogue-ca).
 */
export function makeTestPki(): TestPki {
  const dir = mkdtempSync(join(tmpdir(), "airlock-pki-"));
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  const ca = (name: string) =>
    openssl(dir, "req", "-x509", ...ec, "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", "1", "-subj", `/CN=${name}`, "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign");
  const leaf = (name: string, issuer: string, ext: string) => {
    writeFileSync(join(dir, `${name}.ext`), ext);
    openssl(dir, "req", "-new", ...ec, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
    openssl(dir, "x509", "-req", "-in", `${name}.csr`, "-CA", `${issuer}.crt`, "-CAkey", `${issuer}.key`, "-set_serial", `0x${randomBytes(8).toString("hex")}`, "-days", "1", "-out", `${name}.crt`, "-extfile", `${name}.ext`);
  };
  ca("ca");
  ca("rogue-ca");
  leaf("server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
  leaf("agent", "ca", "subjectAltName=URI:spiffe://corp/agent/etl,URI:airlock://on-behalf-of/alice@corp.com\nextendedKeyUsage=clientAuth\n");
  leaf("nouri", "ca", "subjectAltName=DNS:etl.corp\nextendedKeyUsage=clientAuth\n");
  leaf("rogue", "rogue-ca", "subjectAltName=URI:spiffe://corp/agent/etl\nextendedKeyUsage=clientAuth\n");
  return {
    dir,
    file: (name) => readFileSync(join(dir, name)),
    path: (name) => join(dir, name),
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}
