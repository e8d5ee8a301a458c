import { Metadata } from "@grpc/grpc-js";
import { type CryptoKey, SignJWT } from "jose";

/** Who a test agent claims to be in its token. */
export interface TestAgent {
  readonly privateKey: CryptoKey;
  readonly issuer: string;
  readonly audience: string;
  /** @default "spiffe://corp/agent/etl" */
  readonly subject?: string;
  /** @default "alice@corp" */
  readonly actFor?: string;
  /** A jose time span or an epoch in seconds. @default "5m" */
  readonly expiresIn?: string | number;
}

/** Call metadata carrying a freshly signed agent token (EdDSA, 5 minutes), plus any extra entries. */
export async function agentMetadata(agent: TestAgent, extra: Record<string, string> = {}): Promise<Metadata> {
  const token = await new SignJWT({ act_for: agent.actFor ?? "alice@corp" })
    .setProtectedHeader({ alg: "EdDSA" })
    .setSubject(agent.subject ?? "spiffe://corp/agent/etl")
    .setIssuer(agent.issuer)
    .setAudience(agent.audience)
    .setIssuedAt()
    .setExpirationTime(agent.expiresIn ?? "5m")
    .sign(agent.privateKey);
  const metadata = new Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  for (const [key, value] of Object.entries(extra)) metadata.set(key, value);
  return metadata;
}

/** Runs a server-streaming call to its end: the error it ended with, or undefined. */
export async function streamOutcome(stream: AsyncIterable<unknown>): Promise<Error | undefined> {
  try {
    for await (const _ of stream) void _;
    return undefined;
  } catch (error) {
    return error as Error;
  }
}
