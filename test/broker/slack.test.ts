import { createHmac } from "node:crypto";
import { createServer, type IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import t from "tap";
import { KvSlackModalTickets } from "../../broker/notify/index.js";
import { Code } from "../../common/index.js";
import { startStack } from "../helpers/stack.js";

// A local receiver stands in for Slack's Web API and for the interaction's response_url:
// the broker's real HTTP client posts the real Block Kit payloads to it.
interface Received {
  path: string;
  authorization: string;
  body: Record<string, unknown>;
}
const received: Received[] = [];
const slackApi = createServer((request: IncomingMessage, response) => {
  let text = "";
  request.on("data", (chunk: Buffer) => (text += chunk.toString()));
  request.on("end", () => {
    const body = text === "" ? {} : (JSON.parse(text) as Record<string, unknown>);
    received.push({ path: request.url ?? "", authorization: request.headers.authorization ?? "", body });
    // Slack refusing a modal: a trigger_id used too late (Slack's own answer), or Slack failing outright.
    const trigger = typeof body.trigger_id === "string" ? body.trigger_id : "";
    if (request.url === "/api/views.open" && trigger.startsWith("expired-")) {
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify({ ok: false, error: "expired_trigger_id" }));
      return;
    }
    if (request.url === "/api/views.open" && trigger.startsWith("broken-")) {
      response.writeHead(500, { "content-type": "text/plain" });
      response.end("internal error");
      return;
    }
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({ ok: true, channel: "C0DATA", ts: `17000000${received.length}.000100` }));
  });
});
await new Promise<void>((resolve) => slackApi.listen(0, "127.0.0.1", resolve));
t.teardown(() => new Promise<void>((resolve) => slackApi.close(() => resolve())));
const slackUrl = `http://127.0.0.1:${(slackApi.address() as AddressInfo).port}`;

const signingSecret = "slack-signing-secret-for-the-e2e-test";
const stack = await startStack(t, {
  brokerConfig: {
    notifications: {
      console_url: "http://127.0.0.1:9465/console/",
      slack: {
        bot_token: "xoxb-e2e-bot-token-0000",
        api_url: `${slackUrl}/api`,
        signing_secret: signingSecret,
        channels: { "data-owners": "C0DATA", security: "C0SEC" },
        users: { U0DANA: "dana@example.com", U0ALICE: "alice@example.com", U0SAM: "sam@example.com" },
      },
    },
  },
  // Deny forms opened on one replica are submitted to the other: the binding is in KV.
  secondReplica: true,
});
const secondUrl = stack.secondBrokerUrl ?? "";

function signed(body: string, timestamp: number, secret = signingSecret): Record<string, string> {
  return {
    "content-type": "application/x-www-form-urlencoded",
    "x-slack-request-timestamp": String(timestamp),
    "x-slack-signature": `v0=${createHmac("sha256", secret).update(`v0:${timestamp}:${body}`).digest("hex")}`,
  };
}

function click(user: string, requestId: string, approve: boolean): string {
  const payload = {
    type: "block_actions",
    user: { id: user },
    container: { type: "message", message_ts: "170000001.000100", channel_id: "C0DATA" },
    channel: { id: "C0DATA" },
    response_url: `${slackUrl}/response/${requestId}`,
    actions: [{ type: "button", action_id: approve ? "airlock_approve" : "airlock_deny", value: requestId, action_ts: "1700000001.0002" }],
  };
  return `payload=${encodeURIComponent(JSON.stringify(payload))}`;
}

async function interact(body: string, headers: Record<string, string>, url = stack.brokerUrl): Promise<{ status: number; text: string; reason: string }> {
  const response = await fetch(`${url}/slack/interactions`, { method: "POST", headers, body });
  return { status: response.status, text: await response.text(), reason: response.headers.get("x-airlock-reason") ?? "" };
}

/** A Deny click as Slack sends it: with the trigger_id a modal is opened with. */
function denyClick(user: string, requestId: string, triggerId: string): string {
  const payload = {
    type: "block_actions",
    trigger_id: triggerId,
    user: { id: user },
    container: { type: "message", message_ts: "170000001.000100", channel_id: "C0DATA" },
    channel: { id: "C0DATA" },
    response_url: `${slackUrl}/response/${requestId}`,
    actions: [{ type: "button", action_id: "airlock_deny", value: requestId, action_ts: "1700000001.0002" }],
  };
  return `payload=${encodeURIComponent(JSON.stringify(payload))}`;
}

/** The modal's view_submission as Slack sends it: the view's private_metadata returned unchanged, the typed reason in its state. */
function submission(user: string, privateMetadata: string, reason: string): string {
  const payload = {
    type: "view_submission",
    user: { id: user },
    view: {
      id: "V0MODAL",
      type: "modal",
      callback_id: "airlock_deny_reason",
      private_metadata: privateMetadata,
      state: { values: { airlock_reason: { reason: { type: "plain_text_input", value: reason } } } },
    },
  };
  return `payload=${encodeURIComponent(JSON.stringify(payload))}`;
}

async function record(requestId: string): Promise<{ state: string; votes: Array<{ reviewer: string; approve: boolean; reason: string }> }> {
  const response = await fetch(`${stack.brokerUrl}/api/v1/requests/${requestId}`, { headers: { authorization: `Bearer ${stack.tokens.sam}` } });
  return ((await response.json()) as { record: { state: string; votes?: Array<{ reviewer: string; approve: boolean; reason: string }> } }).record as never;
}

async function posted(predicate: (r: Received) => boolean): Promise<Received> {
  for (let i = 0; i < 200; i++) {
    const found = received.find(predicate);
    if (found !== undefined) return found;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error("nothing matching reached the Slack receiver");
}

const now = (): number => Math.floor(Date.now() / 1000);

await t.test("a held call is posted to its group's channel with buttons; a signed click approves it and the message is updated", async (t) => {
  const call = stack.callExportTable("export for the board pack");
  const message = await posted((r) => r.path === "/api/chat.postMessage" && r.body.channel === "C0DATA");
  t.equal(message.authorization, "Bearer xoxb-e2e-bot-token-0000", "the Web API call carries the bot token");
  const blocks = JSON.stringify(message.body.blocks);
  t.match(blocks, /export for the board pack/, "the message shows the agent's reason");
  t.match(blocks, /airlock_approve/);
  t.match(blocks, /airlock_deny/);
  const requestId = /"value":"([0-9a-f-]{36})"/.exec(blocks)?.[1] ?? "";
  t.ok(requestId !== "", "the buttons carry the request id");

  const body = click("U0DANA", requestId, true);
  const stale = await interact(body, signed(body, now() - 6 * 60));
  t.equal(stale.status, 401, "a click signed 6 minutes ago is refused");
  const forged = await interact(body, signed(body, now(), "not-the-signing-secret-at-all"));
  t.equal(forged.status, 401, "a click signed with another secret is refused");
  const tampered = await interact(click("U0DANA", requestId, false), signed(body, now()));
  t.equal(tampered.status, 401, "a body that does not match its signature is refused");
  const unsigned = await interact(body, { "content-type": "application/x-www-form-urlencoded" });
  t.equal(unsigned.status, 401, "an unsigned click is refused");

  const pendingBefore = await fetch(`${stack.brokerUrl}/api/v1/requests/${requestId}`, { headers: { authorization: `Bearer ${stack.tokens.dana}` } });
  t.match(await pendingBefore.json(), { record: { state: "REQUEST_STATE_PENDING" } }, "refused clicks changed nothing");

  const accepted = await interact(body, signed(body, now()));
  t.equal(accepted.status, 200, `a valid click is accepted (${accepted.text})`);
  const outcome = await call;
  t.equal(outcome.code, 0, "the agent's export ran: Slack's approval counted");
  t.equal(outcome.rows, 2);
  const update = await posted((r) => r.path === "/api/chat.update");
  t.match(JSON.stringify(update.body), /dana@example\.com/, "the message is updated with who approved");
  const dm = await posted((r) => r.path === "/api/chat.postMessage" && r.body.channel === "U0ALICE");
  t.match(JSON.stringify(dm.body), /approved/i, "the human the agent acts for is told the result");
});

await t.test("a click by the requester's own human is refused and changes nothing", async (t) => {
  const call = stack.callExportTable("self-approval attempt");
  const message = await posted((r) => r.path === "/api/chat.postMessage" && r.body.channel === "C0DATA" && JSON.stringify(r.body.blocks).includes("self-approval attempt"));
  const requestId = /"value":"([0-9a-f-]{36})"/.exec(JSON.stringify(message.body.blocks))?.[1] ?? "";
  const body = click("U0ALICE", requestId, true);
  const refused = await interact(body, signed(body, now()));
  t.equal(refused.status, 200, "Slack gets a 200 with an ephemeral explanation");
  t.match(refused.text, /identity chain|may not/i);
  const record = (await (await fetch(`${stack.brokerUrl}/api/v1/requests/${requestId}`, { headers: { authorization: `Bearer ${stack.tokens.dana}` } })).json()) as { record: { state: string } };
  t.equal(record.record.state, "REQUEST_STATE_PENDING");
  const deny = denyClick("U0DANA", requestId, "trigger-self-approval");
  t.equal((await interact(deny, signed(deny, now()))).status, 200);
  const opened = await posted((r) => r.path === "/api/views.open" && r.body.trigger_id === "trigger-self-approval");
  const metadata = String((opened.body.view as Record<string, unknown>).private_metadata);
  const submit = submission("U0DANA", metadata, "no self-service exports");
  t.equal((await interact(submit, signed(submit, now()))).status, 200);
  t.equal((await call).code, Code.PermissionDenied, "a Slack denial reaches the agent");
});

await t.test("Deny opens a reason form bound to its request and user; any replica takes it once; forged, stale, replayed or foreign submissions cast nothing", async (t) => {
  const other = stack.callExportTable("another export, held meanwhile");
  const otherMessage = await posted((r) => r.path === "/api/chat.postMessage" && JSON.stringify(r.body.blocks).includes("another export, held meanwhile"));
  const otherId = /"value":"([0-9a-f-]{36})"/.exec(JSON.stringify(otherMessage.body.blocks))?.[1] ?? "";
  const call = stack.callExportTable("export that will be denied with a reason");
  const message = await posted((r) => r.path === "/api/chat.postMessage" && JSON.stringify(r.body.blocks).includes("export that will be denied with a reason"));
  const blocks = JSON.stringify(message.body.blocks);
  const requestId = /"value":"([0-9a-f-]{36})"/.exec(blocks)?.[1] ?? "";
  t.notMatch(blocks, /Deny this action\?/, "Deny has no confirm dialog: the reason form is the confirmation");

  const click = denyClick("U0DANA", requestId, "trigger-0001");
  const clicked = await interact(click, signed(click, now()));
  t.equal(clicked.status, 200, `the click is acknowledged (${clicked.text})`);
  const opened = await posted((r) => r.path === "/api/views.open" && r.body.trigger_id === "trigger-0001");
  t.equal(opened.authorization, "Bearer xoxb-e2e-bot-token-0000", "views.open is called as the bot, with the click's trigger_id");
  const view = opened.body.view as Record<string, unknown>;
  t.equal(view.callback_id, "airlock_deny_reason");
  t.match(JSON.stringify(view.blocks), /plain_text_input/, "the modal asks for a reason");
  const metadata = String(view.private_metadata);
  const { request: named, ticket } = JSON.parse(metadata) as { request: string; ticket: string };
  t.equal(named, requestId, "the modal names its request");
  t.match((await record(requestId)).state, "PENDING", "opening the form cast nothing");

  const refusals: Array<[string, { status: number; reason: string }, string, Record<string, string>?]> = [];
  const good = submission("U0DANA", metadata, "the board pack does not need raw customer rows");
  const attempt = async (what: string, body: string, headers: Record<string, string>, expected: { status: number; reason: string }) => {
    const answer = await interact(body, headers, secondUrl);
    t.equal(answer.status, expected.status, `${what}: status ${expected.status}`);
    t.equal(answer.reason, expected.reason, `${what}: refused as ${expected.reason}`);
    refusals.push([what, answer, answer.text]);
  };
  await attempt("a bad signature", good, signed(good, now(), "not-the-signing-secret-at-all"), { status: 401, reason: "slack_bad_signature" });
  await attempt("a stale timestamp", good, signed(good, now() - 6 * 60), { status: 401, reason: "slack_stale_timestamp" });
  await attempt("another body under a valid signature", submission("U0DANA", metadata, "x"), signed(good, now()), { status: 401, reason: "slack_bad_signature" });
  const sam = submission("U0SAM", metadata, "sam denies with dana's form");
  await attempt("another user's submission of the form", sam, signed(sam, now()), { status: 200, reason: "slack_modal_mismatch" });
  const elsewhere = submission("U0DANA", JSON.stringify({ request: otherId, ticket }), "aimed at another request");
  await attempt("the form's ticket aimed at another request", elsewhere, signed(elsewhere, now()), { status: 200, reason: "slack_modal_mismatch" });
  const forged = submission("U0DANA", JSON.stringify({ request: requestId, ticket: "AAAAAAAAAAAAAAAAAAAAAAAA" }), "a made-up form");
  await attempt("a made-up ticket", forged, signed(forged, now()), { status: 200, reason: "slack_modal_unknown" });
  const empty = submission("U0DANA", metadata, "   ");
  await attempt("an empty reason", empty, signed(empty, now()), { status: 200, reason: "slack_reason_missing" });
  t.match(refusals.find(([what]) => what === "another user's submission of the form")?.[2] ?? "", /response_action.*errors/, "a refusal is shown in the modal");
  t.same((await record(requestId)).votes ?? [], [], "no refused submission cast a vote");
  t.same((await record(otherId)).votes ?? [], [], "nor touched the other request");

  const goodHeaders = signed(good, now());
  const accepted = await interact(good, goodHeaders, secondUrl);
  t.equal(accepted.status, 200, `the submission is accepted on the other replica (${accepted.text})`);
  t.equal(accepted.text, "{}", "an empty answer closes the modal");
  t.equal((await call).code, Code.PermissionDenied, "the denial reaches the agent");
  const votes = (await record(requestId)).votes;
  t.match(votes, [{ reviewer: "dana@example.com", reason: "the board pack does not need raw customer rows" }], "the vote carries the typed reason");
  t.notOk(votes[0]?.approve, "a denial");

  const replay = await interact(good, goodHeaders, stack.brokerUrl);
  t.equal(replay.reason, "slack_modal_replayed", "the same signed submission again is refused as a replay");
  const resigned = await interact(good, signed(good, now()), secondUrl);
  t.equal(resigned.reason, "slack_modal_replayed", "so is the same submission signed anew");
  t.equal((await record(requestId)).votes.length, 1, "a replay casts nothing");

  const undecided = denyClick("U0DANA", otherId, "trigger-0002");
  t.equal((await interact(undecided, signed(undecided, now()))).status, 200);
  t.equal((await record(otherId)).state, "REQUEST_STATE_PENDING", "a Deny click alone never votes");
  const otherDeny = await posted((r) => r.path === "/api/views.open" && r.body.trigger_id === "trigger-0002");
  const otherSubmit = submission("U0DANA", String((otherDeny.body.view as Record<string, unknown>).private_metadata), "cleanup");
  await interact(otherSubmit, signed(otherSubmit, now()));
  await other;
});

await t.test("Deny when Slack cannot open the reason form (expired_trigger_id, HTTP 500): nothing is voted, the form is void, the clicker is told", async (t) => {
  const call = stack.callExportTable("export whose deny form will not open");
  const message = await posted((r) => r.path === "/api/chat.postMessage" && JSON.stringify(r.body.blocks).includes("export whose deny form will not open"));
  const requestId = /"value":"([0-9a-f-]{36})"/.exec(JSON.stringify(message.body.blocks))?.[1] ?? "";
  for (const [trigger, why] of [
    ["expired-0001", /^Slack took too long to open the reason form, so nothing was recorded\. Click Deny again, or deny in the console\.$/],
    ["broken-0001", /^The reason form could not be opened \(.*500.*\), so nothing was recorded\. Click Deny again, or deny in the console\.$/],
  ] as const) {
    const click = denyClick("U0DANA", requestId, trigger);
    const answer = await interact(click, signed(click, now()));
    t.equal(answer.status, 200, `${trigger}: Slack gets its 200`);
    t.equal(answer.reason, "slack_modal_unavailable", `${trigger}: refused with a stable reason`);
    t.match(JSON.parse(answer.text), { response_type: "ephemeral", text: why }, `${trigger}: the answer says what happened and what to do`);
    const told = await posted((r) => r.path === `/response/${requestId}` && typeof r.body.text === "string" && why.test(r.body.text));
    t.match(told.body, { response_type: "ephemeral", replace_original: false }, `${trigger}: the clicker alone is told, through the response_url`);
    t.equal((await record(requestId)).state, "REQUEST_STATE_PENDING", `${trigger}: the request is still pending`);
    t.same((await record(requestId)).votes ?? [], [], `${trigger}: and nothing was voted`);
    // Slack may have opened the form after all (a lost answer): its submission must cast nothing.
    const tried = await posted((r) => r.path === "/api/views.open" && r.body.trigger_id === trigger);
    const metadata = String((tried.body.view as Record<string, unknown>).private_metadata);
    const late = submission("U0DANA", metadata, "submitted from a form Slack said it could not open");
    const refused = await interact(late, signed(late, now()), secondUrl);
    t.equal(refused.reason, "slack_modal_withdrawn", `${trigger}: the form's ticket was withdrawn, on every replica`);
    t.match(refused.text, /response_action.*errors/, `${trigger}: the refusal is shown in the form`);
    t.same((await record(requestId)).votes ?? [], [], `${trigger}: its submission cast nothing`);
  }
  // A Deny that opens its form still works afterwards.
  const click = denyClick("U0DANA", requestId, "trigger-after-failures");
  t.equal((await interact(click, signed(click, now()))).status, 200);
  const opened = await posted((r) => r.path === "/api/views.open" && r.body.trigger_id === "trigger-after-failures");
  const submit = submission("U0DANA", String((opened.body.view as Record<string, unknown>).private_metadata), "denied once the form opened");
  const accepted = await interact(submit, signed(submit, now()));
  t.equal(accepted.text, "{}", "accepted");
  t.equal((await call).code, Code.PermissionDenied, "the denial reaches the agent");
  t.match((await record(requestId)).votes, [{ reviewer: "dana@example.com", reason: "denied once the form opened" }], "one vote, from the form that opened");
});

await t.test("a deny form expires: a submission after its lifetime is refused (injected clock, real KV)", async (t) => {
  const nc = await stack.nats.connect({ kind: "broker" });
  t.teardown(() => nc.close());
  let clock = Date.now();
  const tickets = await KvSlackModalTickets.open(nc, { now: () => clock });
  const id = await tickets.issue({ requestId: "r-1", slackUserId: "U0DANA", reviewer: "dana@example.com", responseUrl: "https://hooks.slack.test/x" });
  clock += 16 * 60_000;
  await t.rejects(tickets.spend(id, "r-1", "U0DANA"), { name: "AirlockError", details: { reason: "slack_modal_expired" } });
  clock -= 16 * 60_000;
  t.match(await tickets.spend(id, "r-1", "U0DANA"), { requestId: "r-1", reviewer: "dana@example.com" }, "the refused late submission spent nothing");
  await t.rejects(tickets.spend(id, "r-1", "U0DANA"), { name: "AirlockError", details: { reason: "slack_modal_replayed" } });
});

await t.test("withdrawing a deny form: an unspent ticket is void for every later submission; a spent one stays spent (real KV)", async (t) => {
  const nc = await stack.nats.connect({ kind: "broker" });
  t.teardown(() => nc.close());
  const tickets = await KvSlackModalTickets.open(nc);
  const ticket = { requestId: "r-2", slackUserId: "U0DANA", reviewer: "dana@example.com", responseUrl: "https://hooks.slack.test/x" };
  const withdrawn = await tickets.issue(ticket);
  t.equal(await tickets.withdraw(withdrawn), true, "withdrawn");
  t.equal(await tickets.withdraw(withdrawn), true, "withdrawing again is harmless");
  await t.rejects(tickets.spend(withdrawn, "r-2", "U0DANA"), { name: "AirlockError", details: { reason: "slack_modal_withdrawn" } });
  const spent = await tickets.issue(ticket);
  await tickets.spend(spent, "r-2", "U0DANA");
  t.equal(await tickets.withdraw(spent), false, "a ticket spent first stays spent: its denial was cast");
  await t.rejects(tickets.spend(spent, "r-2", "U0DANA"), { name: "AirlockError", details: { reason: "slack_modal_replayed" } });
});
