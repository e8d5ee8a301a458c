/**
 * The demo's proof that its audit trail is evidence: it reads the trail as the
 * read-only audit role, and verifies the chain, every signature (against a key
 * ring naming the demo broker's public key) and the checkpoints the broker
 * wrote outside NATS, as `airlock audit verify --checkpoints` would.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { AuditKeyRing, readAuditEvents, readCheckpointDirectory, TrailVerifier, type TrailVerdict } from "../broker/index.js";
import { connectNats, type NatsConnectionConfig } from "../common/nats.js";

/** Where the demo's audit evidence is: the keys directory and the checkpoint directory. */
export interface DemoAuditEvidence {
  /** The demo broker's key id and its SPKI public key file. */
  readonly keyId: string;
  readonly publicKeyFile: string;
  readonly checkpointDir: string;
  /** The key ring file to write (the same one `airlock audit verify --keys` takes). */
  readonly keyringFile: string;
}

/** Writes the key ring, reads the whole trail as the audit role, and verifies it. */
export async function checkAuditTrail(reader: NatsConnectionConfig, evidence: DemoAuditEvidence): Promise<TrailVerdict> {
  await writeFile(evidence.keyringFile, `keys:\n  - key_id: ${evidence.keyId}\n    public_key_file: ${evidence.publicKeyFile}\n`);
  const found = await readCheckpointDirectory(evidence.checkpointDir);
  const verifier = new TrailVerifier({ keys: await AuditKeyRing.load(evidence.keyringFile), checkpoints: found.checkpoints, malformedCheckpoints: found.malformed });
  const nc = await connectNats(reader, { role: { kind: "audit" }, name: "airlock-demo-audit-check", extra: { reconnect: false } });
  try {
    for await (const event of readAuditEvents(nc, { onUndecodable: (sequence) => verifier.undecodable(sequence) })) verifier.add(event);
  } finally {
    await nc.close();
  }
  return verifier.finish();
}

/** The demo's default checkpoint folder inside its keys directory. */
export function demoCheckpointDir(keysDir: string): string {
  return join(keysDir, "checkpoints");
}
