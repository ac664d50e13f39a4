#!/bin/bash
# TEST-ONLY stand-in for the entrypoint of postgres:17, where docker-compose.yml relies on it; each
# step is named after the function of docker-library/postgres 17/bookworm/docker-entrypoint.sh it
# reproduces (tests/e2e/README.md).
set -Eeuo pipefail

# docker_setup_env (file_env): POSTGRES_* from VAR or the file VAR_FILE, read as root, before the drop
from_env_or_file() {
    local var=$1 file_var=${1}_FILE value=${2:-}
    if [ -n "${!var:-}" ]; then value=${!var}; elif [ -n "${!file_var:-}" ]; then value=$(<"${!file_var}"); fi
    export "$var=$value"   # exported: the server inherits it (secrets/README.md)
    unset "$file_var"
}

[ "$1" = postgres ] || exec "$@"

from_env_or_file POSTGRES_PASSWORD
from_env_or_file POSTGRES_USER postgres
from_env_or_file POSTGRES_DB "$POSTGRES_USER"

if [ "$(id -u)" = 0 ]; then
    # docker_create_db_directories, then _main's re-exec as postgres (setpriv for gosu)
    mkdir -p "$PGDATA" /var/run/postgresql
    chmod 00700 "$PGDATA"
    chmod 03775 /var/run/postgresql
    find "$PGDATA" /var/run/postgresql \! -user postgres -exec chown postgres '{}' +
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

# docker_setup_env's DATABASE_ALREADY_EXISTS: a data directory with PG_VERSION is used as it is
[ ! -s "$PGDATA/PG_VERSION" ] || { echo "stand-in: $PGDATA holds a database; skipping initialisation"; exec "$@"; }

# docker_verify_minimum_env
[ -n "$POSTGRES_PASSWORD" ] ||
    { echo "Error: Database is uninitialized and superuser password is not specified." >&2; exit 1; }
ls /docker-entrypoint-initdb.d/ >/dev/null   # fail before initdb if the directory is unreadable

# docker_init_database_dir
initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") >/dev/null
# the image's postgresql.conf listens on all addresses (its Dockerfile edits the sample)
printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
# pg_setup_hba_conf: host connections need the method of password_encryption
printf '\nhost all all all %s\n' "$(postgres -C password_encryption)" >>"$PGDATA/pg_hba.conf"

# docker_temp_server_start: socket only
export PGPASSWORD=$POSTGRES_PASSWORD
pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start >/dev/null
sql() { psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc "$@"; }

# docker_setup_db: POSTGRES_DB, unless it exists already
if [ -z "$(sql --dbname postgres --set db="$POSTGRES_DB" -tA <<<"SELECT 1 FROM pg_database WHERE datname = :'db'")" ]; then
    sql --dbname postgres --set db="$POSTGRES_DB" -q <<<'CREATE DATABASE :"db";'
fi

# docker_process_init_files
# shellcheck disable=SC1090 # the init scripts are the mounted directory's, unknown here
for f in /docker-entrypoint-initdb.d/*; do
    case $f in
        *.sh) if [ -x "$f" ]; then echo "stand-in: running $f"; "$f"; else echo "stand-in: sourcing $f"; . "$f"; fi ;;
        */\*) ;;
        *) echo "stand-in: ignoring $f" ;;
    esac
done

# docker_temp_server_stop
pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
# only PGPASSWORD: file_env's export of POSTGRES_PASSWORD stays, on every start, in the environment
# of the server (PID 1) and of every process it forks, as in the official entrypoint
unset PGPASSWORD
echo "stand-in: PostgreSQL init process complete; ready for start up."
exec "$@"
