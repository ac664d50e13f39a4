#!/bin/bash
# TEST-ONLY stand-in for the entrypoint of redis:8.2, after redis/docker-library-redis
# debian/docker-entrypoint.sh where docker-compose.yml relies on it (tests/e2e/README.md).
set -euo pipefail

if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    # fix_data_dir_perms: /data becomes redis's when it holds only *.rdb and appendonlydir
    if [ -z "$(find . -mindepth 1 -maxdepth 1 ! -name '*.rdb' ! \( -type d -name appendonlydir \) -print -quit)" ]; then
        find . \! -user redis -exec chown redis '{}' +
    fi
    exec setpriv --reuid=redis --regid=redis --clear-groups --nnp "${BASH_SOURCE[0]}" "$@"
fi

if [ "$1" = redis-server ]; then  # the official redis-server is patched to protected-mode off
    shift
    set -- redis-server --protected-mode no "$@"
fi

[ "$(umask)" != 0022 ] || umask 0077   # files the server writes are its own only
exec "$@"
