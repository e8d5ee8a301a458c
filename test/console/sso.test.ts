// Single sign-on in real Chromium against a real OpenID Provider (oidc-provider) and the whole
// stack: "Sign in with <provider>", the provider's login page, the inbox; a vote through the SSO
// session; sign-out; a session that ends while the console is open; and `airlock login` with the
// device flow, the test playing the person at the provider's pages.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Page } from "playwright-core";
import t from "tap";
import { Sealer, sessionPurpose } from "../../broker/index.js";
import { readSessionKey } from "../../broker/reviewers/session.js";
import { launchBrowser, newPage, screenshot } from "../helpers/browser.js";
import { ssoUsers, startSsoStack } from "../helpers/sso.js";

if (!existsSync(fileURLToPath(new URL("../../approver-console/dist/index.html", import.meta.url)))) {
  throw new Error("approver-console/dist is missing: run `npm run build:console` first (`npm test` does)");
}

const stack = await startSsoStack(t);
const browser = await launchBrowser(t);
const sealer = new Sealer([await readSessionKey(stack.sessionKeyFile, "test")]);

async function signInWithSso(page: Page, user: { email: string; password: string }, hash = ""): Promise<void> {
  page.setDefaultTimeout(20_000);
  await page.goto(`${stack.brokerUrl}/console/${hash}`);
  await page.getByTestId("sso-sign-in").click();
  await page.waitForURL(`${stack.op.issuer}/interaction/**`);
  await page.locator("#email").fill(user.email);
  await page.locator("#password").fill(user.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator('[data-testid="live-status"][data-status="live"]').waitFor();
}

await t.test("dana signs in with the provider, lands in her inbox and approves through the SSO session", async (t) => {
  const page = await newPage(t, browser);
  page.setDefaultTimeout(20_000);
  await page.goto(`${stack.brokerUrl}/console/`);
  const button = page.getByTestId("sso-sign-in");
  t.equal(await button.textContent(), `Sign in with ${stack.providerName}`, "the sign-in is the provider's button");
  t.equal(await page.getByTestId("token-input").count(), 0, "no token field for people");
  await screenshot(t, page, "sign-in");

  await button.click();
  await page.waitForURL(`${stack.op.issuer}/interaction/**`);
  t.pass("the browser is at the provider's login page");
  await page.locator("#email").fill(ssoUsers.dana.email);
  await page.locator("#password").fill("not her password");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "Wrong email or password." }).waitFor();
  t.pass("a wrong password is the provider's business: it says so and Airlock sees nothing");
  await screenshot(t, page, "provider-login");
  await page.locator("#email").fill(ssoUsers.dana.email);
  await page.locator("#password").fill(ssoUsers.dana.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator('[data-testid="live-status"][data-status="live"]').waitFor();
  t.match(page.url(), /\/console\/#\/inbox$/, "back in the console's inbox");
  t.equal(await page.getByTestId("reviewer").textContent(), "dana@example.com");
  t.equal(await page.getByTestId("reviewer").getAttribute("title"), "Groups: data-owners", "groups from the provider's claim");

  const reason = "monthly churn numbers for the board";
  const call = stack.callExportTable(reason);
  const row = page.getByTestId("inbox-row").filter({ hasText: reason });
  await row.waitFor({ timeout: 15_000 });
  await screenshot(t, page, "inbox");
  await row.getByRole("link").click();
  await page.getByTestId("decision-form").waitFor();
  await page.getByTestId("reason-input").fill("ok for the board pack");
  await page.getByTestId("approve-button").click();
  await page.getByTestId("decision-result").filter({ hasText: /^You approved it\./ }).waitFor();
  t.pass("a write through the SSO session (with its CSRF token) is accepted");
  const outcome = await call;
  t.equal(outcome.code, 0, `the agent's call completed (${outcome.details})`);
});

await t.test("a deep link survives the sign-in; sign-out ends the session", async (t) => {
  const page = await newPage(t, browser, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  await page.goto(`${stack.brokerUrl}/console/#/history`);
  await page.getByTestId("sso-sign-in").waitFor();
  await screenshot(t, page, "phone-sign-in");
  await signInWithSso(page, ssoUsers.sam, "#/history");
  t.match(page.url(), /#\/history$/, "the page the reviewer opened, after signing in");
  await page.getByTestId("sign-out").click();
  await page.getByTestId("sso-sign-in").waitFor();
  t.match(await page.getByRole("status").first().textContent(), /signed out/i);
  const status = await page.evaluate(async () => (await fetch("/api/v1/me")).status);
  t.equal(status, 401, "signed out: the cookie is gone");
});

await t.test("a session that ends while the console is open sends the reviewer back to sign-in", async (t) => {
  const page = await newPage(t, browser);
  page.setDefaultTimeout(20_000);
  // A session sealed with the broker's key, ending in 4 s: what a sign-in 8 h ago looks like now.
  const now = Date.now();
  const session = sealer.seal(sessionPurpose, { sid: "expiring-session-1", reviewer: "dana@example.com", groups: ["data-owners"], iat: now - 8 * 3_600_000, exp: now + 4000, via: "sso" });
  await page.context().addCookies([{ name: "airlock_session", value: session, url: stack.brokerUrl, httpOnly: true, sameSite: "Strict" }]);
  await page.goto(`${stack.brokerUrl}/console/`);
  await page.locator('[data-testid="live-status"][data-status="live"]').waitFor();
  t.pass("the console opens with the session");
  await page.getByText("Your session has ended. Sign in again.").waitFor({ timeout: 30_000 });
  t.pass("at its end the console says so, without a reload");
  t.equal(await page.getByTestId("sso-sign-in").count(), 1, "and offers the provider's sign-in");
  const cookies = await page.context().cookies(stack.brokerUrl);
  t.equal(cookies.filter((c) => c.name === "airlock_session").length, 0, "the broker cleared the ended session's cookie (it refused it with session_expired: test/broker/sso.test.ts)");
});

await t.test("airlock login: the device flow, the person at the provider in Chromium; requests then use the kept token", async (t) => {
  const home = await mkdtemp(join(tmpdir(), "airlock-login-"));
  t.teardown(() => rm(home, { recursive: true, force: true }));
  const cli = fileURLToPath(new URL("../../cli/airlock.ts", import.meta.url));
  const env: NodeJS.ProcessEnv = { ...process.env, XDG_CONFIG_HOME: home, AIRLOCK_URL: stack.brokerUrl };
  delete env.AIRLOCK_TOKEN;
  const run = (args: string[]) => {
    const child = spawn(process.execPath, ["--import", import.meta.resolve("tsx"), cli, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    const watchers = new Set<() => void>();
    const take = (chunk: Buffer) => {
      output += chunk.toString();
      for (const watcher of watchers) watcher();
    };
    child.stdout.on("data", take);
    child.stderr.on("data", take);
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    t.teardown(async () => {
      if (child.exitCode === null) child.kill("SIGKILL");
      await exited;
    });
    /** Resolves with the first match of `pattern` in the output; rejects when the process exits first or after `timeoutMs`. */
    const waitForOutput = (pattern: RegExp, timeoutMs: number) =>
      new Promise<RegExpExecArray>((resolve, reject) => {
        const timer = setTimeout(() => done(new Error(`no ${String(pattern)} within ${timeoutMs} ms:\n${output}`)), timeoutMs);
        const check = () => {
          const match = pattern.exec(output);
          if (match !== null) done(undefined, match);
        };
        const done = (error?: Error, match?: RegExpExecArray) => {
          clearTimeout(timer);
          watchers.delete(check);
          if (match !== undefined) resolve(match);
          else reject(error ?? new Error("no match"));
        };
        watchers.add(check);
        void exited.then(() => done(new Error(`the command exited first:\n${output}`)));
        check();
      });
    return { output: () => output, exited, waitForOutput };
  };

  const login = run(["login"]);
  const uri = (await login.waitForOutput(/\(or open (\S+)\)/, 60_000))[1];
  t.ok(uri, "airlock login shows where to sign in");
  t.match(login.output(), /enter the code [A-Z]{4}-[A-Z]{4}/, "and the code");

  const page = await newPage(t, browser, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  page.setDefaultTimeout(20_000);
  await page.goto(uri ?? "about:blank");
  await page.getByRole("button", { name: "Confirm" }).click();
  await page.locator("#email").fill(ssoUsers.dana.email);
  await page.locator("#password").fill(ssoUsers.dana.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("You can close this window").waitFor();
  t.pass("the person confirmed the device at the provider");
  t.equal(await login.exited, 0, `airlock login finished:\n${login.output()}`);
  t.match(login.output(), /Signed in as dana@example\.com/);

  const file = join(home, "airlock", "credentials.json");
  t.equal((await stat(file)).mode & 0o777, 0o600, "the token file is 0600");
  t.equal((await stat(join(home, "airlock"))).mode & 0o777, 0o700, "its directory 0700");

  const list = run(["requests", "ls", "--state", "completed"]);
  t.equal(await list.exited, 0, `airlock requests works with the kept token:\n${list.output()}`);
  t.match(list.output(), /demo\.v1\.OpsService\/ExportTable/, "and sees the export dana approved");

  const logout = run(["logout"]);
  t.equal(await logout.exited, 0);
  t.notOk(existsSync(file), "airlock logout removes the token file");
  const after = run(["requests", "ls"]);
  t.equal(await after.exited, 1);
  t.match(after.output(), /run `airlock login`/, "and then requests says how to sign in");
});

await t.test("from a notification to a decision on a phone: the taps and the time, signed out and signed in", async (t) => {
  const { consoleLink } = await import("../../broker/notify/summary.js");
  const { RequestState } = await import("../../proto/index.js");
  /** Holds an export and returns the link its review notification carries. */
  const notified = async (reason: string) => {
    const call = stack.callExportTable(reason);
    let id = "";
    for (const until = Date.now() + 20_000; id === "" && Date.now() < until; ) {
      id = (await stack.broker.broker.list()).find((r) => r.state === RequestState.PENDING && r.request?.reason === reason)?.request?.id ?? "";
      if (id === "") await new Promise((resolve) => setTimeout(resolve, 50));
    }
    if (id === "") throw new Error("the export was never held");
    return { call, link: consoleLink(`${stack.brokerUrl}/console/`, id) };
  };
  const page = await newPage(t, browser, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  page.setDefaultTimeout(20_000);
  let taps = 0;
  const tap = async (locator: ReturnType<Page["locator"]>) => {
    taps++;
    await locator.tap();
  };
  /** Opens the link as a tap in the notification would, and approves; signs in on the way when asked. */
  const decide = async (link: string) => {
    taps = 1; // the tap on the notification's link
    const started = performance.now();
    await page.goto(link);
    const signIn = page.getByTestId("sso-sign-in");
    const form = page.getByTestId("decision-form");
    await Promise.race([signIn.waitFor(), form.waitFor()]);
    if (await signIn.isVisible()) {
      await tap(signIn);
      await page.waitForURL(`${stack.op.issuer}/interaction/**`);
      // Typing the email and password: two taps into fields, counted as taps.
      await tap(page.locator("#email"));
      await page.locator("#email").fill(ssoUsers.dana.email);
      await tap(page.locator("#password"));
      await page.locator("#password").fill(ssoUsers.dana.password);
      await tap(page.getByRole("button", { name: "Sign in" }));
      await form.waitFor();
    }
    const approve = page.getByTestId("approve-button");
    const box = await approve.boundingBox();
    t.ok(box !== null && box.y + box.height <= 844, "Approve is on screen without scrolling");
    await tap(approve);
    await page.getByTestId("decision-result").filter({ hasText: /^You approved it\./ }).waitFor();
    return { taps, seconds: (performance.now() - started) / 1000 };
  };
  const first = await notified("phone: signed out");
  const signedOut = await decide(first.link);
  t.equal((await first.call).code, 0, "the first export ran");
  const second = await notified("phone: signed in");
  const signedIn = await decide(second.link);
  t.equal((await second.call).code, 0, "the second export ran");
  t.comment(`phone 390x844: signed out taps=${signedOut.taps} seconds=${signedOut.seconds.toFixed(2)}; signed in taps=${signedIn.taps} seconds=${signedIn.seconds.toFixed(2)} (machine time, no reading or typing time)`);
  t.ok(signedIn.taps <= 2, `signed in, the notification's link and Approve are all it takes (${signedIn.taps} taps)`);
  t.ok(signedOut.taps <= 6, `signed out, the provider's sign-in adds its own taps (${signedOut.taps})`);
});
