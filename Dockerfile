# syntax=docker/dockerfile:1
# The `fracture` binary (all five stages, `fracture serve <stage>`) on Debian 12.
#   docker build -t fracture .
#   docker run --rm fracture --help
# Build context: the repository root (see .dockerignore). BuildKit (Docker 23+ default) caches
# the cargo registry and target folder between builds.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm
# `s3`: the claim-check store on S3-compatible storage, which a multi-node cluster needs (a shared
# folder works too); an empty value builds the leaner binary without it.
ARG FEATURES=s3

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG FEATURES
# The bundled librdkafka and SQLite build with what the image has: gcc, make, perl, zlib.
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    set -eux; \
    cargo build --release --locked --bin fracture --features "${FEATURES}"; \
    install -D -m 0755 target/release/fracture /out/usr/local/bin/fracture; \
    mkdir -p /out/usr/share/fracture/models; \
    cp -r models/demo models/untrained models/null /out/usr/share/fracture/models/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 fracture; \
    useradd --system --uid 10001 --gid fracture --home-dir /var/lib/fracture \
        --shell /usr/sbin/nologin fracture; \
    mkdir -p /data/store /var/lib/fracture/audit /var/lib/fracture/edge /input; \
    chown -R fracture:fracture /data /var/lib/fracture
COPY --from=builder /out/ /
# Named volumes mounted on these folders start out owned by the fracture user (docker-compose.yml:
# the claim-check store on /data/store, the audit database under /var/lib/fracture/audit).
USER 10001:10001
WORKDIR /var/lib/fracture
ENV RUST_BACKTRACE=1
# The demo ensemble (trained on synthetic phantoms only: it has never seen a real fracture).
ENV FRACTURE__MODEL__MANIFEST=/usr/share/fracture/models/demo/ensemble.toml
EXPOSE 9100
ENTRYPOINT ["fracture"]
CMD ["--help"]
