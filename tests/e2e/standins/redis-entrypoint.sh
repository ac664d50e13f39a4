#!/bin/bash
# TEST-ONLY stand-in for the entrypoint of the official redis:8.2 image (desafio3-test/redis),
# following redis/docker-library-redis debian/docker-entrypoint.sh where docker-compose.yml relies
# on it (list in tests/e2e/README.md).
set -euo pipefail

# a first argument that is an option or a *.conf file means: redis-server with these arguments
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then set -- redis-server "$@"; fi

if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    # fix_data_dir_perms: the work dir (/data) becomes the redis user's, but only when it
    # holds nothing except *.rdb files and appendonlydir
    if [ -z "$(find . -mindepth 1 -maxdepth 1 ! -name '*.rdb' ! \( -type d -name appendonlydir \) -print -quit)" ]; then
        find . \! -user redis -exec chown redis '{}' +
    fi
    # then the server runs as redis, without privileges (setpriv, as the official script)
    exec setpriv --reuid=redis --regid=redis --clear-groups --nnp "$BASH_SOURCE" "$@"
fi

if [ "$1" = redis-server ]; then
    # The official image's redis-server is compiled with protected-mode off (its Dockerfile
    # patches the default); Debian's is not, so say it on the command line, before the options.
    # (A config file that sets protected-mode itself keeps its own value.)
    shift
    conf=()
    if [ -f "${1:-}" ]; then conf=("$1"); shift; fi
    if ! grep -qs '^protected-mode' "${conf[@]:-/dev/null}"; then set -- --protected-mode no "$@"; fi
    set -- redis-server "${conf[@]}" "$@"
fi

[ "$(umask)" != 0022 ] || umask 0077   # files the server writes are its own only
exec "$@"
