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
    `risk      ${risk(view)}   rule ${request?.ruleId ?? ""}`,
    `request   ${JSON.stringify(request?.request ?? {})}${(request?.redactedFields ?? []).length > 0 ? `  (redacted: ${(request?.redactedFields ?? []).join(", ")})` : ""}`,
    `votes     ${votes.length === 0 ? "none" : votes.map((v) => `${v.reviewer} ${v.approve === true ? "approved" : "denied"}${v.group === undefined ? "" : ` for ${v.group}`}${v.reason === undefined ? "" : `: ${v.reason}`}`).join("; ")}`,
    `needs     ${outstanding.length === 0 ? "nothing more" : outstanding.map((g) => `${g.minApprovals ?? 0} more from ${g.group}`).join(", ")}`,
    `expires   ${view.expiresAt}`,
  ].map(printable);
}

/** Runs `airlock requests <sub> …`. */
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
      const view = await client.get(needId());
      for (const line of values.json === true ? [JSON.stringify(view, null, 2)] : describe(view)) console.log(line);
      return;
    }
    case "approve": {
      const view = await client.decide(needId(), true, values.reason);
      console.log(`voted to approve ${needId()}: now ${state(view)}`);
      return;
    }
    case "deny": {
      if (values.reason === undefined || values.reason.trim() === "") throw new AirlockError(Code.InvalidArgument, "a denial needs --reason", { details: { field: "--reason" } });
      const view = await client.decide(needId(), false, values.reason);
      console.log(`denied ${needId()}: now ${state(view)}`);
      return;
    }
    default:
      throw new AirlockError(Code.InvalidArgument, "usage: airlock requests ls | show <id> | approve <id> [--reason …] | deny <id> --reason …");
  }
}
