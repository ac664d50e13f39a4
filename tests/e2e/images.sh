#!/usr/bin/env bash
# The e2e suite's stand-ins for an engine that cannot pull the official images (tests/e2e/README.md):
# desafio3-test/{redis,postgres,prometheus,rust}:latest, one mmdebstrap root filesystem (cached in
# ~/.cache/desafio3) plus tests/e2e/standins/*. The web image is built by `docker compose up --build`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/desafio3"
STANDINS="$HERE/standins"
LABEL=org.desafio3.e2e.standin

# shellcheck source=/dev/null
SUITE="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
# On top of minbase (which has bash, dash and util-linux's setpriv, used for gosu); prometheus for the
# monitoring profile; the last four are the Rust builder's C toolchain.
PACKAGES="redis-server redis-tools postgresql postgresql-client prometheus procps tzdata gcc libc6-dev binutils ca-certificates"

log() { printf 'images: %s\n' "$*" >&2; }
die() { printf 'images: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "building the root filesystem needs root (or sudo)"; fi
}

# The Debian mirror of the host's apt sources that serves $SUITE itself (not -security/-updates).
host_mirror() {
    # shellcheck disable=SC2016 # apt's own $(FIELD) placeholders, not the shell's
    apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 'Identifier: Packages' 2>/dev/null |
        awk -v suite="$SUITE" '$2 == suite { print $1; exit }'
}

# ---------------------------------------------------------------------------------------------
# The root filesystem, cached by the hash of this function's text and parameters. The hooks: no
# cluster (the entrypoint initialises $PGDATA, like the official one), no docs nor PostgreSQL's optional
# LLVM JIT (~140 MB; JIT then stays off); the official images' data directories and owners.
build_rootfs() {
    local out="$1" mirror="$2"
    log "mmdebstrap $SUITE ($ARCH, minbase) ${mirror:-<the default mirror>} — a few minutes"
    # shellcheck disable=SC2016 # "$1" is the root filesystem, for mmdebstrap's hooks
    as_root mmdebstrap --variant=minbase --format=tar --architectures="$ARCH" --include="${PACKAGES// /,}" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/i18n/*' \
        --customize-hook='test -x "$1/usr/bin/setpriv" -a -d "$1/usr/lib/postgresql"' \
        --customize-hook='rm -rf "$1"/etc/postgresql/* "$1"/var/lib/postgresql/* "$1"/var/log/postgresql/* \
            "$1"/usr/lib/postgresql/*/lib/llvmjit* "$1"/usr/lib/postgresql/*/lib/bitcode \
            "$1"/usr/lib/*-linux-gnu/libLLVM-*.so* "$1"/usr/lib/*-linux-gnu/libz3.so* "$1"/var/log/*.log "$1"/var/log/apt/*' \
        --customize-hook='mkdir -p "$1/data" "$1/var/lib/postgresql/data" "$1/docker-entrypoint-initdb.d" "$1/prometheus" &&
            chmod 700 "$1/var/lib/postgresql/data" && chroot "$1" chown nobody:nogroup /prometheus &&
            chroot "$1" sh -c "chown redis:redis /data && chown postgres:postgres /var/lib/postgresql /var/lib/postgresql/data"' \
        "$SUITE" "$out.part" ${mirror:+"$mirror"} >"$CACHE_DIR/rootfs.log" 2>&1 </dev/null ||
        { tail -n 30 "$CACHE_DIR/rootfs.log" >&2; die "mmdebstrap failed (log above)"; }
    as_root chown "$(id -u):$(id -g)" "$out.part"
    mv "$out.part" "$out"
}

rootfs_hash() {
    { declare -f build_rootfs; echo "$SUITE $ARCH $PACKAGES"; } | sha256sum | cut -c1-16
}

ensure_rootfs() {
    mkdir -p "$CACHE_DIR"
    ROOTFS_TAR="$CACHE_DIR/rootfs-$(rootfs_hash).tar"
    if [ -s "$ROOTFS_TAR" ]; then
        log "root filesystem cached: $ROOTFS_TAR"
        return
    fi
    "$ROOT/scripts/ensure-packages" mmdebstrap:mmdebstrap || die "cannot install mmdebstrap"
    local t0=$SECONDS
    build_rootfs "$ROOTFS_TAR" "$(host_mirror || true)"
    log "root filesystem built in $((SECONDS - t0)) s: $ROOTFS_TAR ($(du -m "$ROOTFS_TAR" | cut -f1) MB)"
}

# ---------------------------------------------------------------------------------------------
# The stand-in images: one layer (rootfs + standins/*.sh), stored once; only their configuration differs.
PG_BIN_DIR=""
changes_redis() {
    printf '%s\n' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'ENV LANG=C.UTF-8' \
        'WORKDIR /data' 'VOLUME /data' 'EXPOSE 6379' 'STOPSIGNAL SIGTERM' \
        'ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]' 'CMD ["redis-server"]'
}
changes_postgres() {
    printf '%s\n' "ENV PATH=/usr/local/sbin:/usr/local/bin:$PG_BIN_DIR:/usr/sbin:/usr/bin:/sbin:/bin" 'ENV LANG=C.UTF-8' \
        'ENV PGDATA=/var/lib/postgresql/data' 'WORKDIR /' 'VOLUME /var/lib/postgresql/data' 'EXPOSE 5432' \
        'STOPSIGNAL SIGINT' 'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]' 'CMD ["postgres"]'
}

# prom/prometheus: /bin/prometheus as the entrypoint (merged /usr: Debian's /usr/bin/prometheus),
# run as nobody in /prometheus, its data volume; the official image's default arguments.
changes_prometheus() {
    printf '%s\n' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'USER nobody' \
        'WORKDIR /prometheus' 'VOLUME /prometheus' 'EXPOSE 9090' 'ENTRYPOINT ["/bin/prometheus"]' \
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
}

build_standins() {
    ensure_rootfs
    local pgver name base
    pgver="$(tar -tf "$ROOTFS_TAR" | sed -nE 's#^\./usr/lib/postgresql/([0-9]+)/bin/postgres$#\1#p' | head -n1)"
    [ -n "$pgver" ] || die "no postgres in $ROOTFS_TAR"
    PG_BIN_DIR="/usr/lib/postgresql/$pgver/bin"
    # A base image, the root filesystem as it is; each stand-in adds the entrypoints and its configuration
    # by a legacy `docker build` (docker import cannot set STOPSIGNAL), instant from its cache when unchanged.
    base="desafio3-test/base:$(basename "$ROOTFS_TAR" .tar)"
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        log "docker import $base"
        docker import -m "desafio3 e2e stand-ins base (test-only)" "$ROOTFS_TAR" "$base" >/dev/null
    fi
    log "docker build desafio3-test/rust:latest"
    build_rust "$base"
    for name in redis postgres prometheus; do
        log "docker build desafio3-test/$name:latest"
        { echo "FROM $base"; echo "COPY *-entrypoint.sh /usr/local/bin/"; "changes_$name"; echo "LABEL $LABEL=1"; } |
            DOCKER_BUILDKIT=0 docker build -q -t "desafio3-test/$name:latest" -f - "$STANDINS" >/dev/null 2>"$CACHE_DIR/build.err" ||
            { grep -v -e DEPRECATED -e BuildKit -e 'legacy builder' "$CACHE_DIR/build.err" >&2; die "docker build failed"; }
    done
    # drop older bases (untagged only if still in use) and replaced stand-ins
    docker image ls --format '{{.Repository}}:{{.Tag}}' desafio3-test/base | grep -vxF "$base" |
        xargs -r docker image rm >/dev/null 2>&1 || true
    docker image prune -f --filter "label=$LABEL" >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------------
# The builder stand-in for rust:1-alpine, which the Dockerfile builds FROM: the root filesystem's
# gcc and C library, this machine's Rust toolchain (no other can be fetched here; docs left out),
# its trust store (cargo downloads crates through this machine's network), and standins/apk.
build_rust() (  # a subshell: its EXIT trap removes the context
    local base="$1" sysroot ctx
    sysroot="$(rustc --print sysroot)"
    ctx="$(mktemp -d "$CACHE_DIR/rust-context.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$ctx'" EXIT
    mkdir -p "$ctx/rust/lib"
    cp -a "$sysroot/bin" "$ctx/rust/"
    cp -a "$sysroot"/lib/*.so* "$sysroot/lib/rustlib" "$ctx/rust/lib/"
    cp "$STANDINS/apk" /etc/ssl/certs/ca-certificates.crt "$ctx/"
    printf '%s\n' "FROM $base" 'COPY rust /usr/local/rust' 'COPY apk /sbin/apk' \
        'COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt' "LABEL $LABEL=1" \
        'ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        >"$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t desafio3-test/rust:latest "$ctx" >/dev/null 2>"$CACHE_DIR/build.err" ||
        { grep -v -e DEPRECATED -e BuildKit -e 'legacy builder' "$CACHE_DIR/build.err" >&2; die "docker build failed"; }
    log "desafio3-test/rust:latest: $("$sysroot/bin/rustc" --version)"
)

build_standins
