# auth-service container image.
#
#   chef     Rust toolchain + cargo-chef (pinned), built once and cached
#   planner  reduces the workspace to a "recipe": manifests and lock file only
#   builder  compiles the dependencies from the recipe (a layer that stays cached
#            while only our own code changes), then compiles auth-service
#   runtime  distroless cc: glibc, libgcc, CA certificates, tzdata; no shell, no
#            package manager; runs as the numeric non-root user 65532
#
# Build (BuildKit):
#   docker build \
#     --build-arg VERSION="$(git describe --always --dirty)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     -t auth-service:dev .
#
# The builder and the runtime use the same Debian release (12, bookworm), so the
# binary links against the glibc it runs with. For production, pin both base images
# by digest (rust:...@sha256:..., cc-debian12@sha256:...) in your registry mirror.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
ARG CARGO_CHEF_VERSION=0.1.78
RUN cargo install cargo-chef --version "${CARGO_CHEF_VERSION}" --locked
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# sqlx query macros must never try to reach a database while the image builds;
# sqlx::migrate! only reads migrations/, which is part of the build context.
ENV SQLX_OFFLINE=true
COPY --from=planner /build/recipe.json recipe.json
# Dependencies only: this layer is rebuilt when Cargo.toml or Cargo.lock change,
# not when src/ does.
RUN cargo chef cook --release --locked --bin auth-service --recipe-path recipe.json
COPY . .
# /out/data becomes /data, owned by the runtime user: the embedded (SQLite) mode's
# only writable path, so `docker run --read-only` works with a volume there.
RUN cargo build --release --locked --bin auth-service \
    && install -D -m 0755 target/release/auth-service /out/auth-service \
    && install -d -m 0700 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="auth-service" \
      org.opencontainers.image.description="Authentication service: tokens, sessions and identity that survive pod evictions" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/auth-service /usr/local/bin/auth-service
COPY --from=builder --chown=65532:65532 /out/data /data

# Defaults for a plain `docker run`; Kubernetes sets its own from the ConfigMap.
# AUTH_DATA_DIR only matters without AUTH_DATABASE_URL (embedded mode).
ENV AUTH_LISTEN=0.0.0.0:8080 \
    AUTH_DATA_DIR=/data \
    AUTH_LOG_FORMAT=json
VOLUME ["/data"]

# Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd lookup.
USER 65532:65532
EXPOSE 8080

# Exec form: the image has no shell. `auth-service healthcheck` exits 0 iff the local
# /health answers 200 (healthy or degraded); 503 while starting or draining fails it.
# Kubernetes ignores HEALTHCHECK and uses the probes in k8s/base/deployment.yaml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/auth-service", "healthcheck"]

# SIGTERM starts the graceful shutdown (AUTH_SHUTDOWN_DELAY, then AUTH_DRAIN_TIMEOUT);
# give `docker stop` a matching timeout: docker stop -t 30.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/auth-service"]
