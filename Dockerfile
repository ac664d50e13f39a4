# Build of desafio3-web:latest for machines without Nix:
#     docker compose up --build        (or: docker build -t desafio3-web:latest .)
# The image is the same as the Nix one (nix/image.nix): a static binary, the CA bundle,
# /etc/passwd + /etc/group for uid/gid 65532 and an empty /tmp, nothing else.
# Every fact below must agree with nix/image-facts.json: the end-to-end suite builds this
# file and holds the image to it (nix/check-image.py), as CI's dockerfile job does.
#
# RUST_IMAGE: the builder. The official Rust image on Alpine (musl) by default, pinned by the
# digest of its multi-platform index (rust:1-alpine of 2026-08-20: Rust 1.98.0, Alpine 3.24);
# the end-to-end suite passes a local stand-in where no image can be pulled (tests/e2e/README.md).
ARG RUST_IMAGE=rust@sha256:a10e64dd139b7387337c7fbe8aca31b959b57b2fd4c8ae20a02cf1d6ea424dce

# --- build: a static binary for the builder's own target ---
FROM ${RUST_IMAGE} AS builder
# Versions follow the builder's Alpine release, fixed by RUST_IMAGE's digest. cargo auditable
# embeds the dependency list (.dep-v0) in the binary, for scanners such as `cargo audit bin`,
# Trivy and Grype; it is built before RUSTFLAGS below, which it must not get.
# hadolint ignore=DL3018
RUN apk add --no-cache gcc musl-dev binutils ca-certificates \
 && cargo install --locked --quiet cargo-auditable@0.7.7
WORKDIR /src
# The target is named on every cargo command: with --target, RUSTFLAGS reach only the target's
# code, not build scripts and proc-macros, which cannot be built with +crt-static (rustc
# refuses: "cannot produce proc-macro ... does not support these crate types"). Static is
# musl's default; the flag says so explicitly, and makes a glibc builder link statically too.
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN rustc --print host-tuple > /rust-target

# Dependencies first, in their own layer: rebuilt only when Cargo.toml/Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo auditable build --release --locked --bin web --target "$(cat /rust-target)" \
 && rm -rf src

COPY src ./src
# COPY keeps the sources' old mtimes; touch them so cargo rebuilds over the stub build.
RUN touch src/main.rs src/lib.rs \
 && cargo auditable build --release --locked --bin web --target "$(cat /rust-target)"

# The image's whole root filesystem, assembled under /rootfs.
RUN mkdir -p /rootfs/bin /rootfs/etc/ssl/certs /rootfs/tmp \
 && cp "target/$(cat /rust-target)/release/web" /rootfs/bin/web \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt \
 && printf 'web:x:65532:65532:web:/nonexistent:/sbin/nologin\n' > /rootfs/etc/passwd \
 && printf 'web:x:65532:\n' > /rootfs/etc/group \
 && chmod 0555 /rootfs/bin/web \
 && chmod 0444 /rootfs/etc/ssl/certs/ca-certificates.crt /rootfs/etc/passwd /rootfs/etc/group \
 && chmod 1777 /rootfs/tmp \
 && readelf -lW /rootfs/bin/web > /tmp/program-headers \
 && if grep -q 'program interpreter' /tmp/program-headers; then echo 'web is not static' >&2; exit 1; fi

# --- the image: nothing but /rootfs ---
FROM scratch
COPY --from=builder /rootfs/ /
USER 65532:65532
EXPOSE 5000/tcp
ENV PORT=5000
ENTRYPOINT ["/bin/web"]
