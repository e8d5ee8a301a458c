# One image for every Airlock part: the command picks the role.
#   broker:   cli/airlock.ts broker --config demo/config/broker.yaml
#   sidecar:  cli/airlock.ts sidecar --config demo/config/sidecar.yaml
#   ops:      demo/ops/main.ts             (the demo upstream)
#   setup:    deploy/compose/setup.ts      (demo keys, table, Vault database engine; one shot)
#   agent:    demo/agent.ts                (the demo agent; one shot)
# The TypeScript sources run as they are, through tsx's loader (no build step).
# docker-compose.yml builds it (one tag, airlock-demo:local) and runs each part from it.
FROM node:20-bookworm-slim

WORKDIR /app

# Dependencies first, so a source change does not reinstall them. The dev dependencies
# are needed: tsx runs the sources.
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund && npm cache clean --force

COPY . .
# The approver console the broker serves at /console/ (its build output is not in git).
RUN npm run build:console

# The keys directory (AIRLOCK_DIR). A named volume mounted here starts with this
# directory's owner, so the unprivileged user can write the demo keys into it.
# /checkpoints and /session: new named volumes take this ownership, so the broker can write its
# audit checkpoints and the demo identity provider the human's session (both run as node).
RUN mkdir -p /airlock /checkpoints /session && chown node:node /airlock /checkpoints /session
USER node
ENV AIRLOCK_DIR=/airlock

# node itself (not the tsx CLI wrapper) is the process, so SIGTERM reaches the part directly.
ENTRYPOINT ["node", "--import", "tsx"]
CMD ["cli/airlock.ts"]
