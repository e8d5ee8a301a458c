// The approver console in headless Chromium against the whole stack: real NATS,
// Vault, PostgreSQL, broker (API + console), sidecar and the demo upstream.
// Screenshots go to test-output/screenshots/.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { Page } from "playwright-core";
import t, { type Test } from "tap";
import { join } from "node:path";
import { launchBrowser, newPage, screenshot, screenshotDir } from "../helpers/browser.js";
import { startStack } from "../helpers/stack.js";

if (!existsSync(fileURLToPath(new URL("../../approver-console/dist/index.html", import.meta.url)))) {
  throw new Error("approver-console/dist is missing: run `npm run build:console` first (`npm test` does)");
}

const stack = await startStack(t);
const browser = await launchBrowser(t);

/** How long a held call may take to show up in an open inbox. Generous: the test machine is small and busy. */
const arrivalMs = 10_000;

async function signIn(page: Page, token: string, hash = ""): Promise<void> {
  page.setDefaultTimeout(20_000);
  await page.goto(`${stack.brokerUrl}/console/${hash}`);
  await page.getByTestId("token-input").fill(token);
  await page.getByTestId("sign-in").click();
  await page.locator('[data-testid="live-status"][data-status="live"]').waitFor();
  // Set once; still there later means the page was never reloaded. (A string: this file has no DOM types.)
  await page.evaluate("window.airlockTestMarker = true");
}

async function notReloaded(page: Page): Promise<boolean> {
  return (await page.evaluate("window.airlockTestMarker === true")) === true;
}

function hashOf(page: Page): string {
  return new URL(page.url()).hash;
}

function inboxRow(page: Page, reason: string) {
  return page.getByTestId("inbox-row").filter({ hasText: reason });
}

/** A decision through the API with a bearer token, as another reviewer's tool would make it. */
async function decideByApi(token: string, id: string, approve: boolean, reason: string): Promise<number> {
  const response = await fetch(`${stack.brokerUrl}/api/v1/requests/${id}/decision`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ approve, reason }),
  });
  await response.body?.cancel();
  return response.status;
}

/** Where an element's box is on the screen now (the viewport's coordinates), and whether the page is scrolled. */
interface ScreenBox {
  readonly top: number;
  readonly bottom: number;
  readonly left: number;
  readonly right: number;
  readonly scrollY: number;
  readonly innerHeight: number;
  readonly innerWidth: number;
}

async function onScreen(page: Page, testid: string): Promise<ScreenBox> {
  // A string, evaluated in the page: this file has no DOM types.
  return page.evaluate<ScreenBox>(`(() => {
    const box = document.querySelector('[data-testid="${testid}"]').getBoundingClientRect();
    return { top: box.top, bottom: box.bottom, left: box.left, right: box.right, scrollY: window.scrollY, innerHeight: window.innerHeight, innerWidth: window.innerWidth };
  })()`);
}

/** What the screen shows now, no scrolling (the full-page pictures stretch the viewport, and a fixed bar with it). */
async function viewportShot(t: Test, page: Page, name: string): Promise<void> {
  const path = join(screenshotDir, `console-${name}.png`);
  await page.screenshot({ path });
  t.comment(`screenshot: ${path}`);
}

/** A phone: 390×844, touch, no hover. */
const phone = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true } as const;

await t.test("dana sees an export arrive live, reads it and approves it; the agent's call completes", async (t) => {
  // A reviewer in New York: every time on the page says which zone it is in.
  const page = await newPage(t, browser, { timezoneId: "America/New_York", locale: "en-US" });
  await signIn(page, stack.tokens.dana);
  t.equal(await page.getByTestId("need-count").textContent(), "0", "nothing needs dana yet");

  const reason = "quarterly revenue report for finance";
  const started = Date.now();
  const call = stack.callExportTable(reason);
  const row = inboxRow(page, reason);
  await row.waitFor({ timeout: arrivalMs });
  t.comment(`the held request appeared in the open inbox after ${Date.now() - started} ms`);
  t.ok(await notReloaded(page), "it arrived without a reload");
  const id = await row.getAttribute("data-request-id");
  t.ok(id, "the row carries the request id");
  t.equal(await row.getAttribute("data-needs-me"), "true");
  t.equal(await row.getByTestId("risk").textContent(), "high", "risk shown at a glance");
  await page.getByTestId("need-count").filter({ hasText: /^1$/ }).waitFor();
  t.match(await page.title(), /^\(1\) /, "the count is in the title too");
  t.match(await row.locator(".countdown").textContent(), /^decide within \d+ s$|^decide within 1 min$/, "the inbox labels the time left");
  t.ok(await page.getByTestId("keyboard-hint").isVisible(), "with a mouse and keyboard, the j / k hint shows");
  await screenshot(t, page, "inbox-1280");

  // By keyboard: j focuses the newest row, Enter opens it.
  await page.keyboard.press("j");
  t.equal(await page.locator(`[data-request-id="${id}"] a:focus`).count(), 1, "j moves focus to the row");
  await page.keyboard.press("Enter");
  await page.getByTestId("decision-form").waitFor();
  t.equal(hashOf(page), `#/requests/${id}`, "Enter opens its page");
  t.equal(await page.getByTestId("agent").textContent().then((text) => text?.startsWith("spiffe://example/agent/reporter")), true, "the agent");
  t.equal(await page.getByTestId("on-behalf-of").textContent(), "alice@example.com", "the human it acts for");
  t.equal(await page.getByTestId("host").textContent(), "stack-host");
  t.equal(await page.getByTestId("call").textContent(), "demo.v1.OpsService/ExportTable");
  t.equal(await page.getByTestId("rule").textContent(), "export", "the rule that held it");
  t.equal(await page.getByTestId("risk-description").textContent(), "Why high risk: An export copies customer records out of the database for good.", "the rule's description explains the risk");
  t.equal(
    await page.getByTestId("credential").textContent(),
    "SELECT on customers · lives 5 min (a database user from Vault role export, mount database)",
    "what an approval grants, in plain words first, then the Vault terms",
  );
  t.match(await page.getByTestId("requested-at").textContent(), /^[A-Z][a-z]{2} \d{1,2}, \d{4}, \d{1,2}:\d\d:\d\d [AP]M E[SD]T$/, "the request time carries the reviewer's zone");
  t.match(await page.getByTestId("deadline").textContent(), /^decide by .* E[SD]T$/, "so does the deadline");
  t.equal(await page.getByTestId("recent-empty").textContent(), "None before this one.", "the agent's first request: no history yet");
  t.equal(await page.getByTestId("agent-reason").textContent(), reason);
  t.match(await page.getByTestId("request-json").textContent(), /"table": "customers"/, "the decoded request");
  t.match(await page.getByTestId("outstanding").textContent(), /data-owners: 1 more approval needed/);
  t.equal(await page.getByTestId("votes").textContent(), "No votes yet.");
  const countdown = page.getByTestId("countdown");
  const before = await countdown.textContent();
  t.match(before, /^decide within (\d+ s|1 min)$/, "the time left is labelled");
  await page.getByTestId("countdown").filter({ hasNotText: before ?? "" }).waitFor();
  t.pass("the countdown ticks");
  const bar = await onScreen(page, "decision-bar");
  t.ok(bar.bottom <= bar.innerHeight, "on a wide screen the decision form is in view at the top of its column");
  await screenshot(t, page, "decision-1280");

  await page.getByTestId("reason-input").fill("fine for the quarterly report");
  await page.getByTestId("approve-button").click();
  await page.getByTestId("decision-result").filter({ hasText: /^You approved it\. It is now (approved|executing|completed)\.$/ }).waitFor();
  t.pass("the console confirms the approval");
  await page.getByTestId("approvals").getByText("dana@example.com").waitFor();

  const outcome = await call;
  t.equal(outcome.code, 0, `the agent's call completed (${outcome.details})`);
  t.equal(outcome.rows, 2, "and streamed the table");

  await page.getByTestId("nav-inbox").click();
  await page.getByTestId("inbox-list").waitFor({ state: "attached" });
  t.equal(await page.locator(`[data-request-id="${id}"]`).count(), 0, "the decided request left the inbox");
  t.equal(await page.getByTestId("need-count").textContent(), "0");
  t.ok(await notReloaded(page), "all without a reload");
});

await t.test("sam must give a reason to deny a key rotation; the agent gets it with PERMISSION_DENIED", async (t) => {
  const page = await newPage(t, browser);
  await signIn(page, stack.tokens.sam);
  const call = stack.callRotateKey("rotate the signing key after the drill");
  const row = inboxRow(page, "rotate the signing key after the drill");
  await row.waitFor({ timeout: arrivalMs });
  t.equal(await row.getByTestId("risk").textContent(), "medium");
  await row.getByRole("link").click();
  await page.getByTestId("decision-form").waitFor();

  await page.getByTestId("deny-button").click();
  t.match(await page.getByTestId("decision-error").textContent(), /denial needs a reason/, "no denial without a reason");
  t.equal(await page.locator('[data-testid="reason-input"]:focus').count(), 1, "focus goes to the reason");

  const denial = "not during the change freeze";
  await page.getByTestId("reason-input").fill(denial);
  await page.getByTestId("deny-button").click();
  await page.getByTestId("decision-result").filter({ hasText: "You denied it. It is now denied." }).waitFor();
  t.pass("the console confirms the denial");
  t.equal(await page.getByTestId("decision-form").count(), 0, "nothing left to decide");

  const outcome = await call;
  t.equal(outcome.code, 7, "PERMISSION_DENIED");
  t.match(outcome.details, denial, "with the reviewer's reason");
});

await t.test("alice cannot approve her own agent's request; one decided elsewhere leaves her inbox", async (t) => {
  const page = await newPage(t, browser, phone);
  await signIn(page, stack.tokens.alice);
  t.notOk(await page.getByTestId("keyboard-hint").isVisible(), "a touch screen shows no j / k keyboard hint");
  // Alice is in data-owners but is the human the agent acts for: nothing needs her, so show every pending request.
  await page.getByTestId("only-mine").uncheck();
  const reason = "export for alice's own dashboard";
  const call = stack.callExportTable(reason);
  const row = inboxRow(page, reason);
  await row.waitFor({ timeout: arrivalMs });
  t.equal(await row.getAttribute("data-needs-me"), "false", "not hers to approve");
  const id = (await row.getAttribute("data-request-id")) ?? "";
  t.equal(await page.getByTestId("need-count").textContent(), "0");

  await screenshot(t, page, "inbox-390");
  await row.getByRole("link").click();
  await page.getByTestId("decision-form").waitFor();
  t.equal(await page.getByTestId("not-yours").count(), 1, "the page says she cannot vote");
  for (const button of ["approve-button", "deny-button"]) {
    const box = await onScreen(page, button);
    t.equal(box.scrollY, 0, `${button}: the page is not scrolled`);
    t.ok(box.top >= 0 && box.bottom <= box.innerHeight && box.left >= 0 && box.right <= box.innerWidth, `${button} is on screen at 390×844 without scrolling (${Math.round(box.top)}–${Math.round(box.bottom)} of ${box.innerHeight})`);
  }
  // The agent's earlier requests in this file: dana's approved export and sam's denied rotation.
  const recent = page.getByTestId("recent-request");
  await recent.nth(1).waitFor();
  const states = await page.evaluate<string[]>(`[...document.querySelectorAll('[data-testid="recent-request"]')].map((item) => item.dataset.state)`);
  t.ok(states.includes("denied") && states.some((state) => state === "completed" || state === "executing"), `the agent's recent requests and their outcomes are listed (${states.join(", ")})`);
  t.match(await page.getByTestId("recent-requests").textContent(), /OpsService\.RotateKey/, "with what each was");
  await screenshot(t, page, "decision-390");
  await viewportShot(t, page, "decision-390-screen");
  // Scrolled to the end, the bar still holds both buttons and hides nothing under it.
  await page.getByTestId("recent-requests").scrollIntoViewIfNeeded();
  const end = await onScreen(page, "approve-button");
  t.ok(end.bottom <= end.innerHeight, "after scrolling, Approve is still on screen");
  await page.getByTestId("approve-button").click();
  const error = page.getByTestId("decision-error");
  await error.waitFor();
  t.match(await error.textContent(), /\(403 permission_denied\)$/, "the broker's refusal is shown with its message");
  await screenshot(t, page, "phone-self-approval");

  await page.getByTestId("nav-inbox").click();
  await row.waitFor();
  t.equal(await decideByApi(stack.tokens.dana, id, false, "alice should ask the BI team"), 200, "dana denies it through the API");
  await page.locator(`[data-request-id="${id}"]`).waitFor({ state: "detached", timeout: arrivalMs });
  t.pass("it left alice's inbox live");
  const outcome = await call;
  t.equal(outcome.code, 7);
  t.match(outcome.details, "alice should ask the BI team");
  t.ok(await notReloaded(page));
});

await t.test("history filters by agent and outcome, and lists calls the sidecar denied; the audit trail verifies", async (t) => {
  t.equal((await stack.callGrantRole()).code, 7, "GrantRole is denied by policy at the sidecar");
  const page = await newPage(t, browser);
  await signIn(page, stack.tokens.dana, "#/history?outcome=denied");
  await page.getByTestId("history-row").first().waitFor();
  const denied = await page.getByTestId("history-row").count();
  t.equal(denied, 2, "the two denials");
  t.equal(await page.getByTestId("history-outcome").inputValue(), "denied", "the filter shows in the form");
  // The sidecar reports its denial in a batch: reload until it is in the trail.
  const sidecarDenial = page.getByTestId("sidecar-decision").filter({ hasText: "GrantRole" });
  for (const until = Date.now() + 15_000; (await sidecarDenial.count()) === 0 && Date.now() < until; ) {
    await page.reload();
    await page.getByTestId("sidecar-decisions").locator("li").first().waitFor();
  }
  t.match(await sidecarDenial.first().textContent(), /denied by policy.*OpsService\.GrantRole.*rule default: policy_deny/s, "the policy denial is in the history");

  await page.getByTestId("history-outcome").selectOption("");
  await page.getByTestId("history-agent").fill("spiffe://example/agent/reporter");
  await page.getByTestId("history-apply").click();
  await page.waitForURL(/#\/history\?agent=/);
  await page.getByTestId("history-row").nth(2).waitFor();
  t.equal(await page.getByTestId("history-row").count(), 3, "every decided request of that agent");
  await page.getByTestId("history-agent").fill("spiffe://example/agent/nobody");
  await page.getByTestId("history-apply").click();
  await page.getByTestId("history-empty").waitFor();
  t.pass("another agent has none");

  await page.getByTestId("nav-audit").click();
  const verify = page.getByTestId("audit-verify");
  await verify.waitFor();
  t.equal(await verify.getAttribute("data-intact"), "true");
  t.match(await verify.textContent(), /^✓ Chain intact: (\d+) events checked, \1 signatures verified\.$/);
  await page.getByTestId("audit-row").first().waitFor();
  t.ok((await page.getByTestId("audit-row").count()) > 5, "the trail is listed");
  await screenshot(t, page, "audit-1280");
  await page.getByTestId("audit-filter").fill("dana@example.com");
  t.ok((await page.getByTestId("audit-row").count()) >= 1, "and filters by actor");

  // On a phone: each event is a card, nothing scrolls sideways.
  const small = await newPage(t, browser, phone);
  await signIn(small, stack.tokens.dana, "#/audit");
  await small.getByTestId("audit-row").nth(5).waitFor();
  const widths = await small.evaluate<{ page: [number, number]; wrap: [number, number] }>(`(() => {
    const wrap = document.querySelector(".table-wrap");
    return { page: [document.documentElement.scrollWidth, document.documentElement.clientWidth], wrap: [wrap.scrollWidth, wrap.clientWidth] };
  })()`);
  t.ok(widths.wrap[0] <= widths.wrap[1], `the audit list does not scroll sideways at 390 px (scrollWidth ${widths.wrap[0]}, clientWidth ${widths.wrap[1]})`);
  t.ok(widths.page[0] <= widths.page[1], `nor does the page (scrollWidth ${widths.page[0]}, clientWidth ${widths.page[1]})`);
  t.equal(await small.evaluate(`getComputedStyle(document.querySelector('[data-testid="audit-row"] td[data-label="When"]'), "::before").content`), '"When"', "each value is labelled");
  await screenshot(t, small, "audit-390");
  await viewportShot(t, small, "audit-390-screen");

  // A shortened id in the address opens the request, and the address then holds its full id.
  await page.goto(`${stack.brokerUrl}/console/#/history`);
  const someId = (await page.getByTestId("history-row").first().getAttribute("data-request-id")) ?? "";
  await page.goto(`${stack.brokerUrl}/console/#/requests/${someId.slice(0, 8)}`);
  await page.locator(`[data-testid="detail"][data-request-id="${someId}"] [data-testid="facts"]`).waitFor();
  t.equal(hashOf(page), `#/requests/${someId}`, "a unique prefix in the URL opens the request and the URL gets its full id");
  await page.goto(`${stack.brokerUrl}/console/#/requests/${someId.slice(0, 4)}`);
  t.match(await page.getByTestId("error").textContent(), /a shortened id needs at least 6 characters/, "a too short prefix is refused with the broker's reason");

  await page.getByTestId("sign-out").click();
  await page.getByTestId("sign-in-form").waitFor();
  const status = await page.evaluate(async () => (await fetch("/api/v1/me")).status);
  t.equal(status, 401, "signed out: the cookie is gone");
});
