// Builds the approver console into approver-console/dist, which the broker serves at /console/.
//   npx vite build --config approver-console/vite.config.ts
// During development, `npx vite --config approver-console/vite.config.ts` serves it with the API
// proxied to a broker at $AIRLOCK_BROKER_URL (default http://127.0.0.1:9465).
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

const broker = process.env.AIRLOCK_BROKER_URL ?? "http://127.0.0.1:9465";

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  base: "/console/",
  publicDir: false,
  clearScreen: false,
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
    reportCompressedSize: false,
  },
  server: {
    proxy: { "/api": { target: broker, changeOrigin: false } },
  },
});
