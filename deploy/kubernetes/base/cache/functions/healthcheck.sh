#!/bin/sh
# The cache's healthcheck (compose) and readiness probe (Kubernetes): healthy when Redis
# answers and holds this release's counting functions (desafio3.lua, beside this file). It
# loads them, as the `admin` user, whenever they are missing or differ from this file: on the
# first start, after the data was lost or replaced, and after an upgrade. Functions are stored
# in Redis's data, so a restart that keeps its data keeps them.
# Arguments go to redis-cli before everything else: how to reach the server (e.g. `-p 6380`,
# `--tls --cacert ca.crt`); none for the server in this container on its default port.
# The password is read from REDIS_ADMIN_PASSWORD_FILE and reaches redis-cli through its
# environment (REDISCLI_AUTH), never a command line. The user is REDIS_ADMIN_USER (`admin`
# unless set: a managed Redis may name its administrator otherwise). Run once by hand against a
# managed Redis, it loads the functions there (deploy/kubernetes/README.md).
set -eu
lua="$(dirname "$0")/desafio3.lua"
REDISCLI_AUTH=$(cat "${REDIS_ADMIN_PASSWORD_FILE:-/run/secrets/redis_admin_password}")
export REDISCLI_AUTH
user=${REDIS_ADMIN_USER:-admin}
version=$(sha256sum < "$lua" | cut -c1-16)
loaded() {
  [ "$1" = "$version" ]
}
if ! loaded "$(redis-cli "$@" --user "$user" FCALL_RO desafio3_version 0)"; then
  sed "s/@VERSION@/$version/" "$lua" | redis-cli "$@" --user "$user" -x FUNCTION LOAD REPLACE >/dev/null
  loaded "$(redis-cli "$@" --user "$user" FCALL_RO desafio3_version 0)"
fi
