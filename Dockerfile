FROM rust:1-slim-bookworm AS build
# make: jemalloc's C sources (tikv-jemalloc-sys) build with it.
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The shipped binary only; the measuring harness (switchyard-bench) stays out.
RUN cargo build --release --locked -p switchyard --bin switchyard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config /etc/switchyard
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml
ENTRYPOINT ["switchyard"]
