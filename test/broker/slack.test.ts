import { createHmac } from "node:crypto";
import { createServer, type IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import t from "tap";
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
    received.push({ path: request.url ?? "", authorization: request.headers.authorization ?? "", body: text === "" ? {} : (JSON.parse(text) as Record<string, unknown>) });
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
        users: { U0DANA: "dana@example.com", U0ALICE: "alice@example.com" },
      },
    },
  },
});

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

async function interact(body: string, headers: Record<string, string>): Promise<{ status: number; text: string }> {
  const response = await fetch(`${stack.brokerUrl}/slack/interactions`, { method: "POST", headers, body });
  return { status: response.status, text: await response.text() };
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
  const deny = click("U0DANA", requestId, false);
  t.equal((await interact(deny, signed(deny, now()))).status, 200);
  t.equal((await call).code, Code.PermissionDenied, "a Slack denial reaches the agent");
});
