# The official Durable Streams server (crate `durable-streams`, pinned like scripts/test).
FROM rust:1-bookworm AS build
RUN cargo install durable-streams --version 0.1.5 --locked --root /out

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin streams \
    && mkdir /data && chown streams /data
COPY --from=build /out/bin/durable-streams-server /usr/local/bin/durable-streams-server
USER streams
VOLUME /data
EXPOSE 4437
ENTRYPOINT ["durable-streams-server"]
CMD ["--host", "0.0.0.0", "--port", "4437", "--data-dir", "/data", "--durability", "wal", "--long-poll-timeout-ms", "30000"]
