# pgds: build with the Rust toolchain, run on a slim Debian as a non-root user.
#   docker build -t pgds .
#   docker run -v ./pgds.toml:/etc/pgds/pgds.toml:ro -e PGDS__POSTGRES__URL=postgres://… pgds
# curl is there for health checks of the ops endpoint (with `[metrics] listen` set), e.g.
#   curl -fsS http://127.0.0.1:9187/readyz   (see docker-compose.yml)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgds
COPY --from=build /src/target/release/pgds /usr/local/bin/pgds
USER pgds
ENTRYPOINT ["pgds"]
CMD ["run", "--config", "/etc/pgds/pgds.toml"]
