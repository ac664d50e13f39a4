#!/usr/bin/env bash
# Builds the stand-ins of the end-to-end suite locally, for an engine that cannot pull the
# official images: desafio3-test/{redis,postgres,prometheus,rust}:latest, on one debootstrap root filesystem
# (cached in ~/.cache/desafio3) plus tests/e2e/standins/*. The web image itself is built from the
# Dockerfile by `docker compose up --build`, as a user builds it. See tests/e2e/README.md.
#   tests/e2e/images.sh [standins|rootfs]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/desafio3"
STANDINS="$HERE/standins"
LABEL=org.desafio3.e2e.standin

# shellcheck source=/dev/null
SUITE="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
# Packages of the stand-ins, on top of the minbase variant (which already has bash, dash and
# util-linux's setpriv, used instead of gosu); prometheus for the monitoring profile; the last
# four are the Rust builder's C toolchain.
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
# The root filesystem. Its cache key is the hash of this function's text and its parameters.
build_rootfs() {
    local out="$1" mirror="$2" work
    work="$(mktemp -d "$CACHE_DIR/rootfs-work.XXXXXX")"
    local r="$work/root"
    # shellcheck disable=SC2064
    trap "as_root umount '$r/proc' 2>/dev/null || true; as_root rm -rf '$work'" EXIT
    log "debootstrap $SUITE ($ARCH, minbase) ${mirror:-<debootstrap default mirror>} — a few minutes"
    as_root debootstrap --variant=minbase --arch="$ARCH" "$SUITE" "$r" ${mirror:+"$mirror"} >"$work/log" 2>&1 ||
        { tail -n 30 "$work/log" >&2; die "debootstrap failed (log above)"; }
    printf '#!/bin/sh\nexit 101\n' | as_root install -m 755 /dev/stdin "$r/usr/sbin/policy-rc.d"  # no daemon starts
    as_root mount -t proc proc "$r/proc"
    local packages
    read -ra packages <<<"$PACKAGES"
    local apt=(env DEBIAN_FRONTEND=noninteractive LC_ALL=C chroot "$r" apt-get -q -y -o APT::Install-Recommends=false
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    log "installing: $PACKAGES"
    # postgresql-common first, set to make no cluster: the entrypoint initialises $PGDATA, like the official one
    { "${apt[@]}" update && "${apt[@]}" install postgresql-common &&
        as_root sed -i -E 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' \
            "$r/etc/postgresql-common/createcluster.conf" &&
        "${apt[@]}" install "${packages[@]}" && "${apt[@]}" clean; } >>"$work/log" 2>&1 ||
        { tail -n 30 "$work/log" >&2; die "apt-get in the chroot failed (log above)"; }
    as_root umount "$r/proc"
    as_root test -x "$r/usr/bin/setpriv" -a -d "$r/usr/lib/postgresql" || die "setpriv or postgres missing"
    # docs, caches, and PostgreSQL's optional LLVM JIT (~140 MB; without it JIT simply stays off)
    as_root rm -rf "$r/usr/sbin/policy-rc.d" "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/log/*.log \
        "$r"/var/log/apt/* "$r"/tmp/* "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/locale/* \
        "$r"/usr/share/i18n "$r"/usr/lib/postgresql/*/lib/llvmjit* "$r"/usr/lib/postgresql/*/lib/bitcode \
        "$r"/usr/lib/*-linux-gnu/libLLVM-*.so* "$r"/usr/lib/*-linux-gnu/libz3.so*
    as_root mkdir -p "$r/data" "$r/var/lib/postgresql/data" "$r/docker-entrypoint-initdb.d" "$r/prometheus"
    as_root chroot "$r" sh -c 'chown redis:redis /data && chown postgres:postgres /var/lib/postgresql /var/lib/postgresql/data'
    as_root chroot "$r" chown nobody:nogroup /prometheus  # the official image's user and data directory
    as_root chmod 700 "$r/var/lib/postgresql/data"
    as_root tar --numeric-owner --xattrs -C "$r" -cf "$work/rootfs.tar" --exclude='./proc/*' --exclude='./sys/*' \
        --exclude='./dev/*' .
    as_root chown "$(id -u):$(id -g)" "$work/rootfs.tar"
    mv "$work/rootfs.tar" "$out"
    as_root rm -rf "$work"
    trap - EXIT
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
    command -v debootstrap >/dev/null || "$ROOT/scripts/ensure-packages" debootstrap \
        || die "cannot install debootstrap"
    local t0=$SECONDS
    build_rootfs "$ROOTFS_TAR" "$(host_mirror || true)"
    log "root filesystem built in $((SECONDS - t0)) s: $ROOTFS_TAR ($(du -m "$ROOTFS_TAR" | cut -f1) MB)"
}

# ---------------------------------------------------------------------------------------------
# The stand-in images: one layer (rootfs + tests/e2e/standins/*.sh), stored once; they differ
# only in their configuration.
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
    # One base image, the root filesystem as it is; each stand-in adds the entrypoints and its
    # configuration with a legacy `docker build` (docker import cannot set STOPSIGNAL), whose
    # cache makes the build instant when nothing changed.
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
    { echo "FROM $base"
      echo "COPY rust /usr/local/rust"
      echo "COPY apk /sbin/apk"
      echo "COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt"
      echo "ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
      echo "LABEL $LABEL=1"; } > "$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t desafio3-test/rust:latest "$ctx" >/dev/null 2>"$CACHE_DIR/build.err" ||
        { grep -v -e DEPRECATED -e BuildKit -e 'legacy builder' "$CACHE_DIR/build.err" >&2; die "docker build failed"; }
    log "desafio3-test/rust:latest: $("$sysroot/bin/rustc" --version)"
)

case "${1:-standins}" in
    rootfs)   ensure_rootfs ;;
    standins) build_standins ;;
    *) die "usage: $0 [standins|rootfs]" ;;
esac
