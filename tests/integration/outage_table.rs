//! README.md's outage table is the one place the page's answer to each outage is written. Its
//! rows for the plain states (each dependency up or down) are read here and each state is made
//! with real servers; the other documents are held to linking to the table, or, where they
//! argue fault by fault (docs/counting.md), to agreeing with it.

use std::time::Duration;

use crate::support::{Env, Postgres, Redis, TestApp, inject, repo_file};
use desafio3::store::REDIS_LEASE;

/// What `Env` sets: every dependency call gives up after this long.
const TIMEOUT: Duration = Duration::from_millis(500);
/// Where other documents point instead of restating the table.
const TABLE_LINK: &str = "README.md#what-web-answers";

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The rows of the markdown table that follows `header` in `text`, as trimmed cells.
fn table_rows(text: &str, header: &str) -> Vec<Vec<String>> {
    let (_, table) = text
        .split_once(header)
        .unwrap_or_else(|| panic!("no table headed {header}"));
    table
        .lines()
        .skip(2) // the rest of the header line, the |---| line
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells = line.trim().trim_matches('|').split('|');
            cells.map(|cell| cell.trim().to_string()).collect()
        })
        .collect()
}

/// What README.md's table says the page is once a state has settled.
#[derive(Debug)]
struct Answer {
    http: u16,
    status: String,
    count: bool,
    clock: bool,
}

/// A `visitas_cache` or `hora_db` cell ends up `null` if it starts with `null`, or if what
/// follows its last "then" does ("`null` for up to 1 s …, then counted in PostgreSQL" does not).
fn settles_to_null(cell: &str) -> bool {
    let settled = cell.rsplit("then ").next().unwrap_or(cell);
    settled.starts_with("`null`")
}

/// README.md's row for `cache` / `db` up (`true`) or down; exactly one row each.
fn table_answer(cache_up: bool, db_up: bool) -> Answer {
    let readme = read("README.md");
    let header = "| cache | db | HTTP | `status` | `visitas_cache` | `hora_db` |";
    let word = |up: bool| if up { "up" } else { "down" };
    let rows: Vec<_> = table_rows(&readme, header)
        .into_iter()
        .filter(|cells| cells[0] == word(cache_up) && cells[1] == word(db_up))
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "README.md: one row for cache {} db {}",
        word(cache_up),
        word(db_up)
    );
    let cells = &rows[0];
    Answer {
        http: cells[2].parse().expect("the HTTP cell is a status code"),
        status: cells[3]
            .split('`')
            .nth(1)
            .expect("`status` in backticks")
            .into(),
        count: !settles_to_null(&cells[4]),
        clock: !settles_to_null(&cells[5]),
    }
}

/// Makes the state with real servers (stopped as an operator would), waits out the transients
/// the table names (Redis's lease, a dependency call timing out), then holds three pages to it.
async fn answers_as_the_table_says(cache_up: bool, db_up: bool) {
    let want = table_answer(cache_up, db_up);
    let mut redis = Redis::start();
    let mut pg = Postgres::start();
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    assert_eq!(app.visit().await.0, 200, "healthy before the outage");
    if !cache_up {
        inject(|| redis.stop());
    }
    if !db_up {
        inject(|| pg.stop());
    }
    tokio::time::sleep(REDIS_LEASE + 2 * TIMEOUT).await;
    for _ in 0..3 {
        let (http, page) = app.visit().await;
        let got = Answer {
            http,
            status: page["status"].as_str().unwrap_or_default().into(),
            count: page["visitas_cache"].is_string(),
            clock: page["hora_db"].is_string(),
        };
        assert!(
            (got.http, &got.status, got.count, got.clock)
                == (want.http, &want.status, want.count, want.clock),
            "cache up: {cache_up}, db up: {db_up}: README.md's table says {want:?}, the page is \
             {got:?}: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_up_answers_as_the_table_says() {
    answers_as_the_table_says(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_answers_as_the_table_says() {
    answers_as_the_table_says(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_answers_as_the_table_says() {
    answers_as_the_table_says(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_down_answers_as_the_table_says() {
    answers_as_the_table_says(false, false).await;
}

/// The Kubernetes docs say only what is specific to Kubernetes: they link to the table (a link
/// that resolves to the top-level README.md) and use none of its answer words.
#[test]
fn the_kubernetes_docs_link_to_the_table_and_restate_no_answer() {
    let readme = repo_file("README.md").canonicalize().expect("README.md");
    assert!(
        read("README.md").contains("\n## What `web` answers\n"),
        "the heading behind #what-web-answers"
    );
    for doc in [
        "deploy/kubernetes/README.md",
        "deploy/kubernetes/base/web/deployment.yaml",
    ] {
        let text = read(doc);
        let links: Vec<&str> = text
            .match_indices(TABLE_LINK)
            .map(|(at, _)| {
                let start = text[..at].rfind(['(', ' ']).map_or(0, |i| i + 1);
                &text[start..at]
            })
            .collect();
        assert!(!links.is_empty(), "{doc} does not link to {TABLE_LINK}");
        let dir = repo_file(doc).parent().expect("a directory").to_path_buf();
        for prefix in links {
            let target = dir.join(format!("{prefix}README.md")).canonicalize();
            assert_eq!(
                target.ok().as_ref(),
                Some(&readme),
                "{doc}: {prefix}{TABLE_LINK}"
            );
        }
        for word in ["degraded", "null", "503"] {
            assert!(
                !text.contains(word),
                "{doc} restates an answer ({word}): link instead"
            );
        }
    }
}

/// docs/counting.md argues fault by fault, with its own "page meanwhile" column: its rows for a
/// stopped Redis and a stopped PostgreSQL agree with README.md's.
#[test]
fn the_fault_table_of_counting_md_agrees_with_the_table() {
    let counting = read("docs/counting.md");
    let rows = table_rows(&counting, "| fault | what happens | page meanwhile |");
    for (fault, cache_up, db_up) in [
        ("Redis stopped", false, true),
        ("PostgreSQL stopped", true, false),
    ] {
        let want = table_answer(cache_up, db_up);
        let row = rows.iter().find(|cells| cells[0].starts_with(fault));
        let page = &row.unwrap_or_else(|| panic!("docs/counting.md: no row {fault}"))[2];
        let says = |s: &str| page.contains(s);
        let status = says(&format!("`{}`", want.status)) || says(&format!("\"{}\"", want.status));
        let http = says(&format!("`{}`", want.http)) || (want.http == 200 && !says("`503`"));
        let count = if want.count {
            says("counted")
        } else {
            says("no count") && !says("counted")
        };
        let clock = says("no clock") != want.clock;
        assert!(
            status && http && count && clock,
            "docs/counting.md, {fault}: {page:?}; README.md's table: {want:?}"
        );
    }
}
