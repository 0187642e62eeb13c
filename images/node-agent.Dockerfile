# syntax=docker/dockerfile:1
# The deskvirt node-agent. Build from the repository root:
#   docker build -f images/node-agent.Dockerfile -t ghcr.io/deskvirt/node-agent:0.1.0 .
# Links libvirt (the `virt` crate) and calls qemu-img for the desktops' disks; the libvirt
# daemon and QEMU themselves run on the host, not in this image.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace: cargo resolves every member's manifest even to build one package
# (.dockerignore keeps target/ and .git/ out).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p deskvirt-node-agent \
    && install -D -m 0755 target/release/deskvirt-node-agent /out/deskvirt-node-agent

# Same Debian release as the build stage, so libvirt0 matches the libvirt-dev it linked against.
# e2fsprogs (debugfs) and fdisk (sfdisk) seal the images captured from template desktops.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt0 qemu-utils e2fsprogs fdisk \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/deskvirt-node-agent /usr/local/bin/deskvirt-node-agent
# Root on purpose: libvirt's socket and the disk directories on the host belong to root. The
# chart drops every capability but DAC_OVERRIDE and mounts the root filesystem read-only.
USER 0:0
# /healthz, /readyz and /metrics
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/deskvirt-node-agent"]
