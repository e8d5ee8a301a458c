/**
 * Builds the approver console (Vite) into `approver-console/dist`, which the
 * broker serves at `/console/`. Used by `npm test` (always, so tests drive the
 * current sources) and `npm run demo` (only when no build exists yet).
 * @module
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** Where the built console lands. */
export const consoleDistDir = fileURLToPath(new URL("./dist/", import.meta.url));

/** Builds the console; with `ifMissing`, only when `dist/index.html` does not exist. Rejects naming the exit code. */
export async function buildConsole(options: { readonly ifMissing?: boolean } = {}): Promise<void> {
  if (options.ifMissing === true && existsSync(`${consoleDistDir}index.html`)) return;
  const root = fileURLToPath(new URL("..", import.meta.url));
  const vite = spawn(`${root}node_modules/.bin/vite`, ["build", "--config", fileURLToPath(new URL("./vite.config.ts", import.meta.url)), "--logLevel", "warn"], { cwd: root, stdio: "inherit" });
  const code = await new Promise<number | null>((resolve, reject) => {
    vite.once("error", reject);
    vite.once("exit", resolve);
  });
  if (code !== 0) throw new Error(`the approver console did not build (vite exited ${String(code)}); run npm run build:console to see why`);
}
