#!/bin/bash
# TEST-ONLY stand-in for the official redis image's entrypoint (desafio3-test/redis).
# Like the official one: a first argument that is an option or a *.conf file means redis-server;
# as root, /data is given to user redis and the server runs as redis; and when no config file
# sets protected-mode, "--protected-mode no" is added so other containers can connect.
set -euo pipefail

if [ "${1:0:1}" = '-' ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$BASH_SOURCE" "$@"
fi

if [ "$1" = 'redis-server' ]; then
    doProtectedMode=1
    configFile=
    if [ -f "${2:-}" ]; then
        configFile="$2"
        if grep -q '^protected-mode' "$configFile"; then
            doProtectedMode=
        fi
    fi
    if [ "$doProtectedMode" ]; then
        shift # redis-server
        if [ "$configFile" ]; then shift; fi
        set -- --protected-mode no "$@"
        if [ "$configFile" ]; then set -- "$configFile" "$@"; fi
        set -- redis-server "$@" # redis-server [config file] --protected-mode no [options]
    fi
fi

umask 0077
exec "$@"
