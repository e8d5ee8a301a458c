/**
 * `npm run demo`: the end-to-end demo (agent → sidecar → broker → Vault →
 * upstream) arrives with the sidecar, broker, reviewers and demo issues. Until
 * then it says so plainly instead of pretending, and points at what runs today.
 */
console.error(
  [
    "The Airlock demo is not runnable yet: the sidecar, broker and approver console are still being built.",
    "What runs today:",
    "  npm run infra:check   start real NATS, Vault and PostgreSQL through the harness and stop them",
    "  npm test              the test suite against those real servers",
  ].join("\n"),
);
process.exitCode = 1;
