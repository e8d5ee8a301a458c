/**
 * The chaos run's counting (chaos/tally.ts), on its own: how a call is classified from what
 * the agent saw and what the upstream's table holds, how Vault's audit lines become created
 * credentials, and which of those count as alive or unknown. The run itself (`npm run chaos`)
 * drives real processes and is not part of `npm test`.
 */
import t from "tap";
import {
  type CallOutcome,
  chaosPassed,
  chaosTotals,
  classifyCall,
  faultLine,
  isClearFailure,
  judgeCredentials,
  parseVaultAuditLine,
  stringsIn,
  tallyCalls,
  totalsLine,
} from "../../chaos/tally.js";
import { Code } from "../../common/errors.js";

const ok: CallOutcome = { kind: "ok" };
const clear: CallOutcome = { kind: "error", code: Code.DeadlineExceeded, airlockCode: "deadline_exceeded", message: "approval request x expired undecided" };
const dropped: CallOutcome = { kind: "error", code: Code.Unavailable, airlockCode: undefined, message: "Connection dropped" };
const mislabelled: CallOutcome = { kind: "error", code: Code.Unavailable, airlockCode: "permission_denied", message: "header names another code" };
const unanswered: CallOutcome = { kind: "unanswered" };

await t.test("a failure is clear only with Airlock's code naming the status it came with", async (t) => {
  t.equal(isClearFailure(clear), true);
  t.equal(isClearFailure(dropped), false, "a dropped connection has no Airlock code");
  t.equal(isClearFailure(mislabelled), false, "a code header that disagrees with the status is not a stable code");
  t.equal(isClearFailure(ok), false);
});

await t.test("each call lands by what the agent saw and what the upstream did", async (t) => {
  t.equal(classifyCall(ok, 1), "ok");
  t.equal(classifyCall(ok, 2), "ok", "a duplicate still answered ok; it is counted as duplicated apart");
  t.equal(classifyCall(ok, 0), "lost", "success without the upstream having done it");
  t.equal(classifyCall(unanswered, 0), "lost", "no answer within the bound");
  t.equal(classifyCall(unanswered, 1), "lost");
  t.equal(classifyCall(dropped, 1), "lost", "done upstream while the agent saw a failure without a code");
  t.equal(classifyCall(clear, 1), "lost", "done upstream while the agent was told, clearly, it failed");
  t.equal(classifyCall(clear, 0), "failed_clearly");
  t.equal(classifyCall(dropped, 0), "failed_unclear", "nothing happened, but the agent cannot tell");
  const toldUnknown: CallOutcome = { kind: "error", code: Code.Aborted, airlockCode: "aborted", message: "outcome unknown", reason: "outcome_unknown" };
  t.equal(classifyCall(toldUnknown, 1), "failed_clearly", "done upstream, and the agent was told it may have been");
  t.equal(classifyCall(toldUnknown, 0), "failed_clearly");
  t.equal(classifyCall({ ...toldUnknown, airlockCode: undefined }, 1), "lost", "the reason without Airlock's code is no answer the agent can trust");
  t.equal(classifyCall({ ...clear, reason: "denied" }, 1), "lost", "only outcome_unknown says the action may have run");
  const tally = tallyCalls(
    [
      { callId: "a", outcome: toldUnknown },
      { callId: "b", outcome: toldUnknown },
    ],
    new Map([["a", 1]]),
  );
  t.match(tally, { failedClearly: 2, lost: 0, toldUnknown: 2, toldUnknownRan: 1, executedButFailed: 0 });
});

await t.test("a window's calls add up against executions per call id", async (t) => {
  const calls = [
    { callId: "a", outcome: ok },
    { callId: "b", outcome: ok },
    { callId: "c", outcome: clear },
    { callId: "d", outcome: dropped },
    { callId: "e", outcome: dropped },
    { callId: "f", outcome: unanswered },
    { callId: "g", outcome: ok },
  ];
  // b ran twice; e ran although its agent saw a dropped connection; g never ran; "stray" was never started.
  const executions = new Map([
    ["a", 1],
    ["b", 2],
    ["e", 1],
    ["stray", 1],
  ]);
  const tally = tallyCalls(calls, executions);
  t.same(
    { actions: tally.actions, ok: tally.ok, failedClearly: tally.failedClearly, failedUnclear: tally.failedUnclear, lost: tally.lost, duplicated: tally.duplicated },
    { actions: 7, ok: 2, failedClearly: 1, failedUnclear: 1, lost: 3, duplicated: 1 },
  );
  t.equal(tally.actions, tally.ok + tally.failedClearly + tally.failedUnclear + tally.lost, "every call lands in exactly one class");
  t.same({ unanswered: tally.unanswered, executedButFailed: tally.executedButFailed, okWithoutExecution: tally.okWithoutExecution }, { unanswered: 1, executedButFailed: 1, okWithoutExecution: 1 });
  t.same(Object.fromEntries(tally.failureCodes), { deadline_exceeded: 1, "unavailable(no_airlock_code)": 2 });
});

await t.test("Vault's audit lines: dynamic leases and created tokens are credentials, wrapping tokens are not", async (t) => {
  const leaseLine = JSON.stringify({
    type: "response",
    request: { path: "database/creds/chaos", operation: "read" },
    response: { secret: { lease_id: "database/creds/chaos/abc" }, data: { username: "hmac-sha256:x" } },
  });
  t.same(parseVaultAuditLine(leaseLine), { credential: { kind: "lease", id: "database/creds/chaos/abc", path: "database/creds/chaos" } });
  const tokenLine = JSON.stringify({
    type: "response",
    request: { path: "auth/token/create-orphan", operation: "update" },
    response: { auth: { accessor: "tok-acc", client_token: "hmac-sha256:y" }, wrap_info: { accessor: "wrap-acc", token: "hmac-sha256:z" } },
  });
  t.same(parseVaultAuditLine(tokenLine), { credential: { kind: "token", id: "tok-acc", path: "auth/token/create-orphan" }, wrappingAccessor: "wrap-acc" });
  const wrapLine = JSON.stringify({ type: "response", request: { path: "sys/wrapping/wrap" }, response: { wrap_info: { accessor: "wrap-2" } } });
  t.same(parseVaultAuditLine(wrapLine), { wrappingAccessor: "wrap-2" });
  const renewal = JSON.stringify({ type: "response", request: { path: "sys/leases/renew" }, response: { secret: { lease_id: "database/creds/chaos/abc" } } });
  t.same(parseVaultAuditLine(renewal), {}, "a renewal answers about an existing lease");
  // An unwrap or a lookup answers with an existing token's accessor: not a creation.
  const lookupLine = JSON.stringify({ type: "response", request: { path: "auth/token/lookup-self" }, response: { auth: { accessor: "old" } } });
  t.same(parseVaultAuditLine(lookupLine), {});
  t.same(parseVaultAuditLine(JSON.stringify({ type: "request", request: { path: "database/creds/chaos" } })), {}, "the request half says nothing");
  const failed = JSON.stringify({ type: "response", error: "permission denied", request: { path: "database/creds/chaos" }, response: { secret: { lease_id: "x" } } });
  t.same(parseVaultAuditLine(failed), {}, "a failed response created nothing");
  t.same(parseVaultAuditLine("not json {"), {});
});

await t.test("alive and unknown credentials are judged apart, each credential once", async (t) => {
  const created = [
    { kind: "lease" as const, id: "L1", path: "database/creds/chaos" },
    { kind: "lease" as const, id: "L2", path: "database/creds/chaos" },
    { kind: "lease" as const, id: "L2", path: "database/creds/chaos" },
    { kind: "token" as const, id: "T1", path: "auth/token/create-orphan" },
  ];
  const verdict = judgeCredentials(created, new Set(["L2", "root-accessor"]), new Set(["L1", "L2"]));
  t.same(
    verdict.aliveAfter.map((c) => c.id),
    ["L2"],
    "only credentials the window created count as alive (root's token is not one)",
  );
  t.same(
    verdict.unknown.map((c) => c.id),
    ["T1"],
    "a credential nobody names is unknown, dead or alive",
  );
});

await t.test("audit event details are searched for every id they name", async (t) => {
  t.same([...stringsIn({ kind: "database", lease: { id: "L9" }, list: ["a", 3, { b: "c" }] })].sort(), ["L9", "a", "c", "database"]);
});

await t.test("the lines and the verdict use the real totals", async (t) => {
  const base = { actions: 10, ok: 10, failedClearly: 0, failedUnclear: 0, lost: 0, duplicated: 0, unanswered: 0, executedButFailed: 0, okWithoutExecution: 0, toldUnknown: 0, toldUnknownRan: 0, failureCodes: new Map<string, number>() };
  const clean = { fault: "none", calls: base, credentials: { aliveAfter: [], unknown: [] }, auditIntact: true };
  const bad = { fault: "vault_pause", calls: { ...base, ok: 8, lost: 2, duplicated: 1 }, credentials: { aliveAfter: [{ kind: "lease" as const, id: "x", path: "p" }], unknown: [] }, auditIntact: true };
  t.equal(faultLine(clean), "chaos: fault=none actions=10 ok=10 failed_clearly=0 lost=0 duplicated=0 credentials_alive_after=0 unknown_credentials=0 audit=intact");
  t.equal(totalsLine(chaosTotals([clean, bad])), "chaos: lost=2 duplicated=1 credentials_alive_after=1 unknown_credentials=0");
  t.equal(chaosPassed([clean]), true);
  t.equal(chaosPassed([clean, bad]), false);
  t.equal(chaosPassed([{ ...clean, auditIntact: false }]), false, "a broken trail fails the run even with zero totals");
});
