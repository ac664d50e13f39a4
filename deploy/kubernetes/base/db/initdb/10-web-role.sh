#!/usr/bin/env bash
# The PostgreSQL login role of the `web` service, with only the rights it needs: it owns the
# schema `web` (first on its search_path, as "$user"), where web creates its one table, and it
# is not a superuser (so no `COPY ... TO PROGRAM`, no reading files, no other roles' data).
# `admin` (POSTGRES_USER) stays for people.
#
# The official postgres image runs this once, on the first start of an empty data directory
# (from /docker-entrypoint-initdb.d), as POSTGRES_USER over the local socket. It is idempotent:
# run it again by hand to migrate a database created before the role existed; it then moves
# the counter from schema public into web's schema (README.md, "Upgrading an existing volume"):
#   docker compose exec -T db bash /docker-entrypoint-initdb.d/10-web-role.sh
# The password is read from a file (WEB_DB_PASSWORD_FILE, a secret), never from the command line.
set -euo pipefail
password_file=${WEB_DB_PASSWORD_FILE:-/run/secrets/web_db_password}
[ -r "$password_file" ] || { echo "10-web-role.sh: cannot read $password_file" >&2; exit 1; }
export PGUSER=${POSTGRES_USER:-postgres} PGDATABASE=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
# psql reads the password itself (a backquoted \set): it never appears in a process list.
psql -v ON_ERROR_STOP=1 --no-psqlrc -q <<SQL
SET client_min_messages = warning;
\set web_password \`cat '$password_file'\`
SELECT 'CREATE ROLE web' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'web') \gexec
ALTER ROLE web WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'web_password';
CREATE SCHEMA IF NOT EXISTS web AUTHORIZATION web;
DO \$\$
BEGIN
    IF to_regclass('public.visit_counter') IS NOT NULL
       AND to_regclass('web.visit_counter') IS NULL THEN
        ALTER TABLE public.visit_counter SET SCHEMA web;
    END IF;
    IF to_regclass('web.visit_counter') IS NOT NULL THEN
        ALTER TABLE web.visit_counter OWNER TO web;
    END IF;
END
\$\$;
SQL
echo "10-web-role.sh: role web ready (schema web)"
