#!/usr/bin/env bash
# The PostgreSQL login role of the `web` service, with only the rights it needs: it owns the
# schema `web` (first on its search_path, as "$user"), where web creates its one table, and it
# is not a superuser (so no `COPY ... TO PROGRAM`, no reading files, no other roles' data).
# It may connect to this database only (CONNECT on `postgres` and `template1` is revoked from
# PUBLIC), may not create temporary tables here (TEMPORARY revoked from PUBLIC), holds at most
# WEB_CONNECTION_LIMIT sessions, and its sessions start with statement_timeout and
# temp_file_limit set (README.md, "Passwords and users", says why these values).
# `admin` (POSTGRES_USER) stays for people, over the local socket only (`docker exec db psql
# -U admin`): pg_hba.conf rejects it over TCP, so that nothing on the network (a compromised
# web included) can log in as the superuser with its password, which would be code execution
# in db (`COPY ... FROM PROGRAM`).
#
# The official postgres image runs this once, on the first start of an empty data directory
# (from /docker-entrypoint-initdb.d), as POSTGRES_USER over the local socket. It is idempotent:
# run it again by hand to migrate a database created before the role existed (or before one of
# the limits above); it then moves the counter from schema public into web's schema
# (README.md, "Upgrading an existing volume"):
#   docker compose exec -T db bash /docker-entrypoint-initdb.d/10-web-role.sh
# The password is read from a file (WEB_DB_PASSWORD_FILE, a secret), never from the command line
# or the environment. On any problem it exits 1 with one line on stderr and changes nothing.
set -euo pipefail
die() { echo "10-web-role.sh: $*" >&2; exit 1; }
password_file=${WEB_DB_PASSWORD_FILE:-/run/secrets/web_db_password}
# Sessions: web's pool holds 8 connections per replica; Kubernetes runs up to 6 replicas (the
# autoscaler's maximum) plus 1 during a rolling update, 56 connections, and a replica that
# reconnects may briefly hold more: 64, well under PostgreSQL's default max_connections (100).
connection_limit=${WEB_CONNECTION_LIMIT:-64}
[[ $connection_limit =~ ^[1-9][0-9]{0,5}$ ]] || die "WEB_CONNECTION_LIMIT must be a positive whole number, not '$connection_limit'"
{ [ -f "$password_file" ] && [ -r "$password_file" ]; } || die "cannot read the password file $password_file (WEB_DB_PASSWORD_FILE)"
password=$(<"$password_file") || die "cannot read the password file $password_file (WEB_DB_PASSWORD_FILE)"
[ -n "$password" ] || die "the password file $password_file (WEB_DB_PASSWORD_FILE) is empty: role web would have no password"
unset password
export PGUSER=${POSTGRES_USER:-postgres} PGDATABASE=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
# psql reads the password itself: the file's path is a psql variable, shell-quoted by psql
# (:'pwfile' inside backquotes), so the value never appears in a process list or in the SQL
# text, and a path with quotes or spaces is read as it is. The password reaches SQL as the
# variable :'web_password' (quoted by psql); an empty one (the file emptied meanwhile, or cat
# failed) stops the script before ALTER ROLE.
psql -v ON_ERROR_STOP=1 --no-psqlrc -q -v pwfile="$password_file" -v connlimit="$connection_limit" <<'SQL'
SET client_min_messages = warning;
\set web_password `cat -- :'pwfile'`
SELECT :'web_password' = '' AS password_empty \gset
\if :password_empty
    DO $$ BEGIN RAISE EXCEPTION '10-web-role.sh: the password read from the file is empty: role web left unchanged'; END $$;
\endif
BEGIN;
SELECT 'CREATE ROLE web' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'web') \gexec
ALTER ROLE web WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    CONNECTION LIMIT :connlimit PASSWORD :'web_password';
-- defaults for every session of web: web sets its own (shorter) statement_timeout when it
-- connects; temp_file_limit only a superuser can change, so web cannot raise it.
ALTER ROLE web SET statement_timeout = '5s';
ALTER ROLE web SET temp_file_limit = '16MB';
-- only this database: every role may connect to `postgres` and `template1` by default
SELECT format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', datname) FROM pg_database
    WHERE datname IN ('postgres', 'template1') AND datname <> current_database() \gexec
-- no temporary tables (web creates none); granted to PUBLIC by default
SELECT format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()) \gexec
CREATE SCHEMA IF NOT EXISTS web AUTHORIZATION web;
DO $$
BEGIN
    IF to_regclass('public.visit_counter') IS NOT NULL
       AND to_regclass('web.visit_counter') IS NULL THEN
        ALTER TABLE public.visit_counter SET SCHEMA web;
    END IF;
    IF to_regclass('web.visit_counter') IS NOT NULL THEN
        ALTER TABLE web.visit_counter OWNER TO web;
    END IF;
END
$$;
COMMIT;
SQL
# The superuser over the local socket only. pg_hba.conf is read top down, first match wins:
# the rule goes first, once, and the server rereads the file.
hba=$(psql -X -qtAc 'SHOW hba_file') || die "cannot ask PostgreSQL where pg_hba.conf is"
rule="host all \"$PGUSER\" all reject"
if ! grep -qxF "$rule" "$hba"; then
    sed -i "1i $rule" "$hba" || die "cannot write $hba"
    psql -X -qtAc 'SELECT pg_reload_conf()' >/dev/null || die "cannot reload pg_hba.conf"
fi
echo "10-web-role.sh: role web ready (schema web, connection limit $connection_limit); $PGUSER local only"
