import { existsSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";
import { type Browser, type BrowserContextOptions, chromium, type Page } from "playwright-core";
import type { Test } from "tap";

/** The Chromium the browser tests drive: Debian's, unless `AIRLOCK_CHROMIUM` names another binary. */
export const chromiumPath: string = process.env.AIRLOCK_CHROMIUM ?? "/usr/bin/chromium";

/** Where {@link screenshot} writes: `test-output/screenshots/` at the repository root. */
export const screenshotDir: string = fileURLToPath(new URL("../../test-output/screenshots/", import.meta.url));

/**
 * Launches headless Chromium through playwright-core and closes it when `t`
 * ends (teardowns run last-in first-out, so a browser launched after the
 * servers it talks to is closed before they stop).
 */
export async function launchBrowser(t: Test): Promise<Browser> {
  if (!existsSync(chromiumPath)) throw new Error(`Chromium is missing at ${chromiumPath}: install it with \`sudo apt-get install chromium\` (or set AIRLOCK_CHROMIUM)`);
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    // A busy 2-core machine can take a while to start Chromium.
    timeout: 120_000,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
  t.teardown(() => browser.close());
  return browser;
}

/**
 * A page in a fresh browser context (its own cookies and storage, so two
 * reviewers never share a session), closed when `t` ends. Uncaught page errors
 * and console errors are reported as test comments.
 */
export async function newPage(t: Test, browser: Browser, options: BrowserContextOptions = {}): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
  t.teardown(() => context.close());
  const page = await context.newPage();
  page.on("pageerror", (error) => t.comment(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") t.comment(`browser console: ${message.text()}`);
  });
  // Registered after the context's close, so it runs first: a failing test leaves a picture of the page.
  t.teardown(async () => {
    if (t.passing() || page.isClosed()) return;
    const path = await savePng(page, `failed-${t.name}`).catch(() => undefined);
    if (path !== undefined) t.comment(`screenshot of the failing page: ${path}`);
  });
  return page;
}

/**
 * Saves a full-page PNG of `page` as
 * `test-output/screenshots/<test file>-<name>.png`, notes it in `t`'s output and
 * returns its path.
 */
export async function screenshot(t: Test, page: Page, name: string): Promise<string> {
  const path = await savePng(page, name);
  t.comment(`screenshot: ${path}`);
  return path;
}

async function savePng(page: Page, name: string): Promise<string> {
  await mkdir(screenshotDir, { recursive: true });
  // tap runs each test file as the main script.
  const file = basename(process.argv[1] ?? "test").replace(/\.test\.[cm]?[jt]s$/, "");
  const safe = `${file}-${name}`.replace(/[^A-Za-z0-9._-]+/g, "-");
  const path = join(screenshotDir, `${safe}.png`);
  await page.screenshot({ path, fullPage: true });
  return path;
}
