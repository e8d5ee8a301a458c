import type { ApprovalRequest } from "../../proto/index.js";

/**
 * The form in which two principal ids (reviewer emails, agent ids, the human an agent
 * acts for) are compared: trimmed and lower-cased, so `Alice@Example.com ` and
 * `alice@example.com` are one person.
 */
export function principalKey(id: string): string {
  return id.trim().toLowerCase();
}

/** Everyone who asks for the request: the agent, the human it acts for, and the whole identity chain. */
export function requesterKeys(request: ApprovalRequest): ReadonlySet<string> {
  const identity = request.identity;
  const keys = new Set<string>();
  if (identity === undefined) return keys;
  for (const id of [identity.agent, identity.onBehalfOf, ...identity.chain]) {
    const key = principalKey(id);
    if (key !== "") keys.add(key);
  }
  return keys;
}

/** A group's members by key, with the spelling the configuration uses. */
export type MemberIndex = ReadonlyMap<string, string>;

/** Indexes a member list by {@link principalKey}; the first spelling wins. */
export function indexMembers(members: readonly string[] | undefined): MemberIndex {
  const index = new Map<string, string>();
  for (const member of members ?? []) {
    const key = principalKey(member);
    if (key !== "" && !index.has(key)) index.set(key, member.trim());
  }
  return index;
}
