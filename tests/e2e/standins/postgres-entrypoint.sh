#!/bin/bash
# TEST-ONLY stand-in for the official postgres image's entrypoint (desafio3-test/postgres).
# It mimics what docker-compose.yml relies on:
#   - POSTGRES_USER (default postgres) is the superuser, its password from POSTGRES_PASSWORD or
#     POSTGRES_PASSWORD_FILE; POSTGRES_DB (default $POSTGRES_USER) is created;
#   - the cluster in $PGDATA is initialised only when it is empty (first start);
#   - pg_hba: initdb's local (unix socket) trust + "host all all all scram-sha-256";
#   - listen_addresses '*', port 5432; *.sh/*.sql in /docker-entrypoint-initdb.d run on init;
#   - postgres is exec'ed as user postgres so it is PID 1 and receives STOPSIGNAL SIGINT.
set -Eeuo pipefail

# file_env VAR [default]: VAR from $VAR or from the file named by $VAR_FILE (not both)
file_env() {
    local var="$1" fileVar="${1}_FILE" def="${2:-}"
    if [ -n "${!var:-}" ] && [ -n "${!fileVar:-}" ]; then
        echo >&2 "error: both $var and $fileVar are set (but are exclusive)"
        exit 1
    fi
    local val="$def"
    if [ -n "${!var:-}" ]; then
        val="${!var}"
    elif [ -n "${!fileVar:-}" ]; then
        val="$(<"${!fileVar}")"
    fi
    export "$var"="$val"
    unset "$fileVar"
}

if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" = 'postgres' ] && [ "$(id -u)" = '0' ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chmod 00700 "$PGDATA"
    find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
    chown postgres:postgres /var/run/postgresql
    chmod 03775 /var/run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
fi

if [ "$1" = 'postgres' ]; then
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        file_env POSTGRES_PASSWORD
        file_env POSTGRES_USER postgres
        file_env POSTGRES_DB "$POSTGRES_USER"
        if [ -z "$POSTGRES_PASSWORD" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
            cat >&2 <<'EOM'
Error: Database is uninitialized and superuser password is not specified.
       You must specify POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) to a non-empty value
       for the superuser, or POSTGRES_HOST_AUTH_METHOD=trust (not recommended).
EOM
            exit 1
        fi
        echo "stand-in entrypoint: initialising $PGDATA"
        initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
            --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" ${POSTGRES_INITDB_ARGS:-} >/dev/null
        printf '\nhost all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"
        printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"

        # temporary server, unix socket only, to create the database and run init scripts
        pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start >/dev/null
        psql=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
        if [ "$POSTGRES_DB" != postgres ]; then
            "${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" -q <<<'CREATE DATABASE :"db";'
        fi
        for f in /docker-entrypoint-initdb.d/*; do
            case "$f" in
                *.sh)  echo "running $f"; . "$f" ;;
                *.sql) echo "running $f"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
                *) ;;
            esac
        done
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
        unset POSTGRES_PASSWORD
        echo "stand-in entrypoint: PostgreSQL init process complete; ready for start up."
    else
        echo "stand-in entrypoint: $PGDATA holds a database; skipping initialisation"
    fi
fi

exec "$@"
