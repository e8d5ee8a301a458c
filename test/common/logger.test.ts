import { Writable } from "node:stream";
import t from "tap";
import { createLogger } from "../../common/index.js";

function capture(): { stream: Writable; lines: () => Array<Record<string, unknown>> } {
  const chunks: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      chunks.push(chunk.toString("utf8"));
      done();
    },
  });
  return { stream, lines: () => chunks.join("").trim().split("\n").map((line) => JSON.parse(line) as Record<string, unknown>) };
}

await t.test("secret fields never reach a log line", async (t) => {
  const out = capture();
  const log = createLogger({ name: "sidecar", level: "info", destination: out.stream });
  log.info(
    {
      requestId: "req-1",
      password: "hunter2",
      credential: { token: "hvs.SECRET", password: "pw-SECRET" },
      delivery: { wrapping_token: "hvs.WRAP" },
      headers: { authorization: "Bearer SECRET" },
    },
    "credential injected",
  );
  const [line] = out.lines();
  const text = JSON.stringify(line);
  t.equal(line?.requestId, "req-1", "non-secret fields stay");
  t.equal(line?.name, "sidecar");
  for (const secret of ["hunter2", "hvs.SECRET", "pw-SECRET", "hvs.WRAP", "Bearer SECRET"]) t.notMatch(text, secret, `${secret} is redacted`);
  t.match(text, "[redacted]");
});

await t.test("extra redact paths add to the defaults", async (t) => {
  const out = capture();
  const log = createLogger({ name: "broker", level: "info", destination: out.stream, redact: ["approval.note"] });
  log.info({ approval: { note: "private", by: "alice" }, token: "t0k" }, "vote");
  const text = JSON.stringify(out.lines()[0]);
  t.notMatch(text, "private");
  t.notMatch(text, "t0k");
  t.match(text, "alice");
});
