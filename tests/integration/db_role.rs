//! PostgreSQL's role `web` as the stack sets it up: the real init script, which the official
//! image runs from `/docker-entrypoint-initdb.d` on a new volume (and people run again to
//! upgrade one), run on a real server over its local socket, as the image runs it. `web` logs
//! in as a role that is no superuser, owns the schema its table lands in, has its sessions
//! bounded and is refused the rest of the cluster; the superuser is refused over TCP, so that
//! nothing on the network can log in as it with its password; the script stops on a bad
//! password file, changing nothing, and reads a path with quotes and spaces as it is.

use std::path::Path;
use std::process::Output;

use crate::support::{
    DB_NAME, Env, Postgres, Redis, TestApp, ok_count, repo_file, stack_password, stack_secret,
};

const SCRIPT: &str = "deploy/kubernetes/base/db/initdb/10-web-role.sh";

/// The superuser the script runs as and shuts out of TCP (`POSTGRES_USER`, `admin` in the
/// stack). Not the harness's own superuser, though that one is named `admin` too: the harness
/// reaches its servers over TCP as it (`Postgres::execute`, `Postgres::query_text`, ...),
/// which the script's `pg_hba.conf` rule would refuse from then on. A second superuser, with
/// a password, plays the stack's `admin`.
const STACK_ADMIN: &str = "stack_admin";
const STACK_ADMIN_PASSWORD: &str = "stack-admin-Vt3-pw";

/// A server with the stack's superuser, before the script ran.
fn server() -> Postgres {
    let pg = Postgres::start();
    pg.execute(&format!(
        "CREATE ROLE {STACK_ADMIN} SUPERUSER LOGIN PASSWORD '{STACK_ADMIN_PASSWORD}'"
    ));
    pg
}

/// Runs the script as the official image does: as `POSTGRES_USER` over the local socket, in
/// `POSTGRES_DB`, `web`'s password read from `WEB_DB_PASSWORD_FILE`.
fn run_script(pg: &Postgres, password_file: &Path) -> Output {
    pg.local_command("bash")
        .arg(repo_file(SCRIPT))
        .env("POSTGRES_USER", STACK_ADMIN)
        .env("POSTGRES_DB", DB_NAME)
        .env("WEB_DB_PASSWORD_FILE", password_file)
        .output()
        .expect("running 10-web-role.sh")
}

fn assert_ran(output: &Output) {
    assert!(
        output.status.success(),
        "10-web-role.sh failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A server the script set up, `web`'s password from the stack's file (`web secrets`).
fn server_with_role_web() -> Postgres {
    let pg = server();
    assert_ran(&run_script(&pg, &stack_secret("db/web_db_password")));
    pg
}

/// `web`'s password, as its own file gives it to the service.
fn web_password() -> String {
    stack_password("web/web_db_password")
}

/// Role `web`'s password verifier: salted afresh by every `ALTER ROLE ... PASSWORD`.
fn web_verifier(pg: &Postgres) -> Option<String> {
    pg.query_text("SELECT rolpassword FROM pg_authid WHERE rolname = 'web'")
}

/// A session over TCP, as the service reaches `db`.
async fn connect(
    pg: &Postgres,
    user: &str,
    password: &str,
    database: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.port)
        .user(user)
        .password(password)
        .dbname(database)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("SELECT current_user")
        .get(0)
}

/// A refusal as `psql` shows it: the server's message and its detail.
fn refusal(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}", db.message(), db.detail().unwrap_or_default()),
        None => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_is_no_superuser_in_its_own_schema_with_its_sessions_bounded() {
    let pg = server_with_role_web();
    let web = connect(&pg, "web", &web_password(), DB_NAME)
        .await
        .expect("web logs in");
    let role = web
        .query_one(
            "SELECT rolsuper, current_schema()::text, rolconnlimit FROM pg_roles \
             WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("web's role");
    let role: (bool, String, i32) = (role.get(0), role.get(1), role.get(2));
    assert_eq!(role, (false, "web".to_owned(), 64));
    // The defaults of every session of web, and what this one got.
    let defaults: String = web
        .query_one(
            "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting \
             WHERE setrole = 'web'::regrole AND setdatabase = 0",
            &[],
        )
        .await
        .expect("web's session defaults")
        .get(0);
    assert_eq!(defaults, "statement_timeout=5s,temp_file_limit=16MB");
    for (setting, value) in [("statement_timeout", "5s"), ("temp_file_limit", "16MB")] {
        let shown: String = web
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("SHOW")
            .get(0);
        assert_eq!(shown, value, "{setting}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_is_refused_what_it_does_not_need() {
    let pg = server_with_role_web();
    let password = web_password();
    let web = connect(&pg, "web", &password, DB_NAME)
        .await
        .expect("web logs in to its database");
    for (sql, refused) in [
        (
            "COPY (SELECT 1) TO PROGRAM 'id'",
            "pg_execute_server_program",
        ),
        (
            "CREATE TEMP TABLE probe (x int)",
            "permission denied to create temporary tables",
        ),
        // It cannot raise its own limit.
        (
            "SET temp_file_limit = -1",
            "permission denied to set parameter \"temp_file_limit\"",
        ),
    ] {
        let error = web.batch_execute(sql).await.expect_err(sql);
        assert!(refusal(&error).contains(refused), "{sql}: {error:?}");
    }
    for database in ["postgres", "template1"] {
        let Err(error) = connect(&pg, "web", &password, database).await else {
            panic!("web may connect to {database}");
        };
        let refused = refusal(&error);
        assert!(
            refused.contains(&format!("permission denied for database \"{database}\""))
                && refused.contains("CONNECT privilege"),
            "{refused}"
        );
    }
}

#[test]
fn the_script_stops_on_an_empty_or_missing_password_file_and_changes_nothing() {
    let pg = server_with_role_web();
    let before = web_verifier(&pg);
    assert!(before.is_some(), "role web has no password");
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").expect("empty password file");
    for (file, says) in [
        (empty, "empty"),
        (dir.path().join("missing"), "cannot read"),
    ] {
        let output = run_script(&pg, &file);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            matches!(lines[..], [line] if line.starts_with("10-web-role.sh: ") && line.contains(says)),
            "one line saying {says:?}: {lines:?}"
        );
        assert_eq!(web_verifier(&pg), before, "role web's password changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_script_reads_a_password_file_whose_path_has_quotes_and_spaces() {
    let pg = server_with_role_web();
    let before = web_verifier(&pg);
    let dir = tempfile::tempdir().expect("temp dir");
    let quoted = dir.path().join("it's \"quoted\" here");
    std::fs::create_dir(&quoted).expect("a directory with quotes and spaces");
    let file = quoted.join("web_db_password");
    // Another password than the stack's, so that logging in with it proves this file was read.
    let password = "pw-Kd2-from-the-quoted-path";
    std::fs::write(&file, format!("{password}\n")).expect("password file");

    assert_ran(&run_script(&pg, &file));
    let web = connect(&pg, "web", password, DB_NAME)
        .await
        .expect("web logs in with the password of that file");
    assert_eq!(current_user(&web).await, "web");
    assert_ne!(web_verifier(&pg), before, "role web's password unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_superuser_is_refused_over_tcp_and_web_is_not() {
    let pg = server();
    connect(&pg, STACK_ADMIN, STACK_ADMIN_PASSWORD, DB_NAME)
        .await
        .expect("the superuser logs in over TCP before the script");
    assert_ran(&run_script(&pg, &stack_secret("db/web_db_password")));

    let Err(error) = connect(&pg, STACK_ADMIN, STACK_ADMIN_PASSWORD, DB_NAME).await else {
        panic!("the superuser still logs in over TCP with its password");
    };
    let refused = refusal(&error);
    assert!(
        refused.contains("pg_hba.conf rejects connection")
            && refused.contains(&format!("user \"{STACK_ADMIN}\"")),
        "{refused}"
    );
    let web = connect(&pg, "web", &web_password(), DB_NAME)
        .await
        .expect("web logs in over TCP");
    assert_eq!(current_user(&web).await, "web");
    // People still reach the superuser over the local socket (`docker exec db psql`).
    let output = pg
        .local_command("psql")
        .args([
            "-U",
            STACK_ADMIN,
            "-d",
            DB_NAME,
            "-XtAc",
            "SELECT current_user",
        ])
        .output()
        .expect("running psql");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        STACK_ADMIN,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The service logged in as `web`, with its password file, as in the stack: its table lands
/// in `web`'s schema, owned by `web`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_creates_its_table_in_its_own_schema() {
    let pg = server_with_role_web();
    let redis = Redis::start();
    let password_file = stack_secret("web/web_db_password");
    let env = Env::as_web_user(&redis, &pg)
        .set(
            "DATABASE_URL",
            &format!("postgres://web@127.0.0.1:{}/{DB_NAME}", pg.port),
        )
        .set(
            "DATABASE_PASSWORD_FILE",
            password_file.to_str().expect("utf-8 path"),
        );
    let app = TestApp::spawn_ready(env).await;
    ok_count(&app.visit().await);
    let tables = pg.query_text(
        "SELECT string_agg(schemaname || '.' || tablename || ' owned by ' || tableowner, ', ') \
         FROM pg_tables WHERE tablename = 'visit_counter'",
    );
    assert_eq!(tables.as_deref(), Some("web.visit_counter owned by web"));
}
