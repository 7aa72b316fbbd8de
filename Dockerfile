# The PayStream engine. Not built in CI here (no Docker engine on the build machines); the
# compose file is validated offline.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin paystream

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/paystream /usr/local/bin/paystream
COPY examples/serve.toml /etc/paystream/serve.toml
EXPOSE 8080
ENTRYPOINT ["paystream"]
CMD ["serve", "--config", "/etc/paystream/serve.toml"]
