# The web demo (examples/web): the page, bundled with esbuild at start-up, and a read-only proxy
# of /v1/stream/… to the streams server (see examples/web/server.mjs).
FROM node:20-bookworm-slim
WORKDIR /app
COPY examples/web/package.json examples/web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY examples/web/server.mjs ./
COPY examples/web/src ./src
COPY examples/web/public ./public
USER node
EXPOSE 8089
CMD ["node", "server.mjs", "--host", "0.0.0.0", "--port", "8089", "--streams", "http://streams:4437"]
