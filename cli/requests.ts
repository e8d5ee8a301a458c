/**
 * `airlock requests …`: reviewers decide from a terminal, through the same
 * HTTP API and authentication as the console.
 * @module
 */
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import { AirlockError, Code } from "../common/errors.js";
import { storedToken } from "./login.js";
import { ReviewerClient, type RequestViewJson } from "./reviewer-client.js";

/** Defaults of the `requests` commands. */
export const requestsCommandDefaults = { url: "http://127.0.0.1:9465" } as const;

async function reviewerToken(tokenFile: string | undefined): Promise<string> {
  if (tokenFile !== undefined) {
    const token = (await readFile(tokenFile, "utf8").catch((error: unknown) => {
      throw new AirlockError(Code.InvalidArgument, `cannot read the token file ${tokenFile}`, { cause: error, details: { field: "--token-file" } });
    })).trim();
    if (token === "") throw new AirlockError(Code.InvalidArgument, `the token file ${tokenFile} is empty`, { details: { field: "--token-file" } });
    return token;
  }
  const token = process.env.AIRLOCK_TOKEN?.trim() ?? "";
  if (token !== "") return token;
  // Else the login `airlock login` kept (refreshed when due).
  const stored = await storedToken();
  if (stored === undefined) throw new AirlockError(Code.Unauthenticated, "no reviewer token: run `airlock login`, set AIRLOCK_TOKEN or pass --token-file");
  return stored;
}

/** Text from requests and votes is other people's input: no control characters reach the terminal. */
function printable(text: string | undefined): string {
  // eslint-disable-next-line no-control-regex
  return (text ?? "").replace(/[\u0000-\u001f\u007f-\u009f]/g, "?");
}

function risk(view: RequestViewJson): string {
  return (view.record.request?.risk ?? "RISK_UNSPECIFIED").replace("RISK_", "").toLowerCase();
}

function state(view: RequestViewJson): string {
  return view.record.state.replace("REQUEST_STATE_", "").toLowerCase();
}

/** "5 min", "90 s", "2 h" from a protobuf JSON duration ("300s"). */
function durationWords(json: string | undefined): string {
  const seconds = Number((json ?? "").replace(/s$/, ""));
  if (!Number.isFinite(seconds) || seconds <= 0) return "";
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds >= 60 && seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

/** What the credential allows, in words: "SELECT on customers, lives 5 min (Vault database role export)". */
function credentialText(view: RequestViewJson): string {
  const credential = view.record.request?.credential;
  if (credential === undefined) return "none";
  const technical =
    credential.database !== undefined
      ? `Vault database role ${credential.database.role ?? ""} on mount ${credential.database.mount ?? ""}`
      : `Vault token with policies ${(credential.vaultToken?.policies ?? []).join(", ")}`;
  const uses = credential.vaultToken === undefined ? "" : `, ${credential.vaultToken.numUses ?? 1} use${(credential.vaultToken.numUses ?? 1) === 1 ? "" : "s"}`;
  const life = durationWords(credential.ttl);
  return `${credential.description ?? technical}${life === "" ? "" : `, lives ${life}`}${uses}${credential.description === undefined ? "" : ` (${technical})`}`;
}

function describe(view: RequestViewJson): string[] {
  const request = view.record.request;
  const votes = view.record.votes ?? [];
  const outstanding = view.record.outstanding ?? [];
  return [
    `request   ${request?.id ?? ""}`,
    `state     ${state(view)}${view.needsMe ? " (needs you)" : ""}`,
    `action    ${request?.service ?? ""}/${request?.method ?? ""} on ${request?.host ?? ""}`,
    `agent     ${request?.identity?.agent ?? ""} for ${request?.identity?.onBehalfOf ?? "(nobody)"}`,
    `reason    ${request?.reason ?? ""}`,
    `risk      ${risk(view)}   rule ${request?.ruleId ?? ""}${request?.ruleDescription === undefined ? "" : `: ${request.ruleDescription}`}`,
    `grants    ${credentialText(view)}`,
    `request   ${JSON.stringify(request?.request ?? {})}${(request?.redactedFields ?? []).length > 0 ? `  (redacted: ${(request?.redactedFields ?? []).join(", ")})` : ""}`,
    `votes     ${votes.length === 0 ? "none" : votes.map((v) => `${v.reviewer} ${v.approve === true ? "approved" : "denied"}${v.group === undefined ? "" : ` for ${v.group}`}${v.reason === undefined ? "" : `: ${v.reason}`}`).join("; ")}`,
    `needs     ${outstanding.length === 0 ? "nothing more" : outstanding.map((g) => `${g.minApprovals ?? 0} more from ${g.group}`).join(", ")}`,
    `expires   ${view.expiresAt}`,
  ].map(printable);
}

/**
 * An ambiguous shortened id, told as a terminal user needs it: the matching requests one per
 * line. Other errors pass through unchanged.
 */
function withMatches(reason: unknown): AirlockError {
  const error = AirlockError.from(reason);
  if (error.details.code !== "ambiguous_id" || !Array.isArray(error.details.matches)) return error;
  const matches = error.details.matches as readonly { id?: unknown; state?: unknown; call?: unknown; agent?: unknown }[];
  const lines = matches.map((match) => printable(`  ${String(match.id)}  ${String(match.state).padEnd(9)}  ${String(match.call)}  ${String(match.agent)}`));
  const count = typeof error.details.count === "number" ? error.details.count : matches.length;
  return new AirlockError(error.code, [`${count} requests have ids starting with that prefix; give more of the id:`, ...lines, ...(count > matches.length ? ["  …"] : [])].join("\n"), {
    details: error.details,
  });
}

/**
 * Runs `airlock requests <sub> …`. `show`, `approve` and `deny` take a request id or a
 * unique prefix of one (at least 6 characters; the broker resolves it).
 */
export async function runRequests(sub: string | undefined, args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    strict: true,
    options: {
      url: { type: "string" },
      "token-file": { type: "string" },
      reason: { type: "string" },
      state: { type: "string" },
      mine: { type: "boolean" },
      agent: { type: "string" },
      "min-risk": { type: "string" },
      json: { type: "boolean" },
    },
  });
  const client = new ReviewerClient(values.url ?? process.env.AIRLOCK_URL ?? requestsCommandDefaults.url, await reviewerToken(values["token-file"]));
  const id = positionals[0];
  const needId = (): string => {
    if (id === undefined || id === "") throw new AirlockError(Code.InvalidArgument, `airlock requests ${sub ?? ""} needs a request id`, { details: { field: "id" } });
    return id;
  };
  switch (sub) {
    case "ls": {
      const views = await client.list({
        ...(values.state === undefined ? {} : { state: values.state }),
        ...(values.mine === true ? { needsMe: "true" } : {}),
        ...(values.agent === undefined ? {} : { agent: values.agent }),
        ...(values["min-risk"] === undefined ? {} : { minRisk: values["min-risk"] }),
      });
      if (values.json === true) {
        console.log(JSON.stringify(views, null, 2));
        return;
      }
      if (views.length === 0) console.log("no requests");
      for (const view of views) {
        const request = view.record.request;
        console.log(printable([request?.id ?? "", state(view).padEnd(9), risk(view).padEnd(8), `${request?.service ?? ""}/${request?.method ?? ""}`, request?.identity?.agent ?? "", view.needsMe ? "← needs you" : ""].join("  ").trimEnd()));
      }
      return;
    }
    case "show": {
      const view = await client.get(needId()).catch((error: unknown) => {
        throw withMatches(error);
      });
      for (const line of values.json === true ? [JSON.stringify(view, null, 2)] : describe(view)) console.log(line);
      return;
    }
    case "approve": {
      const view = await client.decide(needId(), true, values.reason).catch((error: unknown) => {
        throw withMatches(error);
      });
      console.log(printable(`voted to approve ${view.record.request?.id ?? needId()}: now ${state(view)}`));
      return;
    }
    case "deny": {
      if (values.reason === undefined || values.reason.trim() === "") throw new AirlockError(Code.InvalidArgument, "a denial needs --reason", { details: { field: "--reason" } });
      const view = await client.decide(needId(), false, values.reason).catch((error: unknown) => {
        throw withMatches(error);
      });
      console.log(printable(`denied ${view.record.request?.id ?? needId()}: now ${state(view)}`));
      return;
    }
    default:
      throw new AirlockError(Code.InvalidArgument, "usage: airlock requests ls | show <id> | approve <id> [--reason …] | deny <id> --reason … (an id may be shortened to a unique prefix of at least 6 characters)");
  }
}
