// The step-up label when the *risk* asks for it, in headless Chromium against the whole stack
// (real NATS, Vault, PostgreSQL, broker, sidecar): the broker's `reviewers.step_up.min_risk` is
// `high` and no rule has `approve.step_up`, so the high-risk export needs a step-up by its risk
// alone and the medium-risk key rotation needs none. The request's page says so in advance
// ("Step-up to approve", and the hint by the buttons) exactly when the broker will ask for it.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { Page } from "playwright-core";
import t from "tap";
import { launchBrowser, newPage, screenshot } from "../helpers/browser.js";
import { startStack } from "../helpers/stack.js";

if (!existsSync(fileURLToPath(new URL("../../approver-console/dist/index.html", import.meta.url)))) {
  throw new Error("approver-console/dist is missing: run `npm run build:console` first (`npm test` does)");
}

const tokens = { dana: "dana-dev-token-0001", sam: "sam-dev-token-0001" };
const stack = await startStack(t, {
  brokerConfig: {
    reviewers: {
      auth: {
        kind: "static",
        tokens: [
          { token: tokens.dana, reviewer: "dana@example.com", groups: ["data-owners"] },
          { token: tokens.sam, reviewer: "sam@example.com", groups: ["security"] },
        ],
      },
      // Approvals of high and critical requests need a step-up; no rule asks for one itself.
      step_up: { rp_id: "localhost", min_risk: "high" },
    },
  },
});
const consoleUrl = stack.brokerUrl.replace("127.0.0.1", "localhost");
const browser = await launchBrowser(t);

interface Answer {
  readonly status: number;
  readonly body: Record<string, unknown>;
}

async function api(token: string, method: string, path: string, body?: unknown): Promise<Answer> {
  const response = await fetch(`${stack.brokerUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await response.text();
  return { status: response.status, body: text === "" ? {} : (JSON.parse(text) as Record<string, unknown>) };
}

interface PendingView {
  readonly record: { readonly request: { readonly id: string; readonly reason: string; readonly risk: string; readonly stepUp?: { readonly required?: boolean } } };
}

/** Waits until the held call with this reason is a pending request, and returns it. */
async function pending(token: string, reason: string): Promise<PendingView> {
  for (;;) {
    const answer = await api(token, "GET", "/api/v1/requests?state=pending");
    const found = (answer.body.requests as PendingView[]).find((view) => view.record.request.reason === reason);
    if (found !== undefined) return found;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A page signed in with `token` and showing request `id`, once its badges are drawn. */
async function detailPage(token: string, id: string): Promise<Page> {
  const page = await newPage(t, browser);
  page.setDefaultTimeout(20_000);
  await page.goto(`${consoleUrl}/console/#/requests/${id}`);
  await page.getByTestId("token-input").fill(token);
  await page.getByTestId("sign-in").click();
  await page.locator(`[data-testid="detail"][data-request-id="${id}"]`).waitFor();
  // The countdown is drawn with the badges of a pending request: the step-up label, if any, is there by then.
  await page.getByTestId("countdown").waitFor();
  await page.getByTestId("decision-form").waitFor();
  return page;
}

await t.test("a request at min_risk shows 'Step-up to approve' although its rule asks for none; one below it does not", async (t) => {
  const exportCall = stack.callExportTable("high-risk export, step-up by risk");
  const rotateCall = stack.callRotateKey("medium-risk rotation, no step-up");
  const high = await pending(tokens.dana, "high-risk export, step-up by risk");
  const medium = await pending(tokens.sam, "medium-risk rotation, no step-up");
  t.equal(high.record.request.risk, "RISK_HIGH");
  t.not(high.record.request.stepUp?.required, true, "the export's rule does not ask for step-up: only its risk does");
  t.equal(medium.record.request.risk, "RISK_MEDIUM");

  const highPage = await detailPage(tokens.dana, high.record.request.id);
  const badge = highPage.getByTestId("step-up-badge");
  await badge.waitFor();
  t.equal(await badge.textContent(), "Step-up to approve", "the high-risk request carries the step-up label");
  t.match(await badge.getAttribute("title"), /passkey, or a fresh sign-in/, "saying what confirms the approval");
  t.equal(await highPage.getByTestId("step-up-hint").count(), 1, "and the form says it by the buttons");
  await screenshot(t, highPage, "step-up-by-risk");

  const mediumPage = await detailPage(tokens.sam, medium.record.request.id);
  t.equal(await mediumPage.getByTestId("step-up-badge").count(), 0, "the medium-risk request has no step-up label");
  t.equal(await mediumPage.getByTestId("step-up-hint").count(), 0, "nor the hint");

  // The labels say what the broker does: the high-risk approval is refused for its risk, the medium one is taken.
  const refused = await api(tokens.dana, "POST", `/api/v1/requests/${high.record.request.id}/decision`, { approve: true });
  t.match(refused, { status: 403, body: { code: "step_up_required", details: { causes: ["risk"] } } }, "approving the export without step-up is refused, for its risk");
  const taken = await api(tokens.sam, "POST", `/api/v1/requests/${medium.record.request.id}/decision`, { approve: true, reason: "routine rotation" });
  t.equal(taken.status, 200, "approving the rotation needs no step-up");
  t.equal((await rotateCall).code, 0, "the rotation ran");
  t.equal((await api(tokens.dana, "POST", `/api/v1/requests/${high.record.request.id}/decision`, { approve: false, reason: "cleanup" })).status, 200);
  t.not((await exportCall).code, 0, "the export was denied");
  await mediumPage.getByTestId("decision-result").waitFor();
  t.equal(await mediumPage.getByTestId("step-up-badge").count(), 0, "a decided request never shows the label");
});
