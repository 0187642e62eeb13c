# syntax=docker/dockerfile:1
# The deskvirt operator. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/deskvirt/operator:0.1.0 .
# Pure Rust (rustls, no OpenSSL): the runtime image needs only libc and libgcc.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole workspace: cargo resolves every member's manifest even to build one package
# (.dockerignore keeps target/ and .git/ out).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p deskvirt-operator \
    && install -D -m 0755 target/release/deskvirt-operator /out/deskvirt-operator

# distroless: no shell, no package manager; `nonroot` is uid/gid 65532, as the chart expects.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/deskvirt-operator /usr/local/bin/deskvirt-operator
USER 65532:65532
# /healthz, /readyz and /metrics
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/deskvirt-operator"]
