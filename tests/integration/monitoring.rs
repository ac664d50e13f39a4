//! What the monitoring in deploy/monitoring reads is what `web` exports: every metric that an
//! alert, a recording rule or a dashboard panel queries is on a running `web`'s `/metrics`
//! (after the events that create its series), and every metric family `web` exports is on the
//! dashboard. (That the queries parse as PromQL, and the alerts' own tests: deploy/monitoring/check.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::{Env, Postgres, Redis, TestApp, count_of, inject, repo_file};

/// Series `web` cannot export: Prometheus makes `up` itself, per scrape target.
const MADE_BY_PROMETHEUS: &[&str] = &["up"];

async fn metrics_text(app: &TestApp) -> String {
    let response = app.get_admin("/metrics").await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The value of one exact series line (`name{labels}`), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every `web` series there is: a visit counted by Redis (and the fence before it), a count
/// withheld, Redis gone (errors, `dependency_up` 0, PostgreSQL counting once the lease ran
/// out), PostgreSQL gone (answers without a count).
async fn every_series(redis: &mut Redis, pg: &mut Postgres, app: &TestApp) -> String {
    assert_eq!(app.visit().await.0, 200);
    pg.execute("UPDATE visit_counter SET fence = 'someone else''s' WHERE id = 1");
    let (_, page) = app.visit().await;
    assert!(count_of(&page).is_none(), "withheld: {page}");
    inject(|| redis.kill());
    let killed = Instant::now();
    let mut uncounted_by_cache = 0;
    loop {
        let (status, page) = app.visit().await;
        assert_eq!(status, 200, "{page}");
        if count_of(&page).is_some() {
            break;
        }
        uncounted_by_cache += 1;
        assert!(killed.elapsed() < Duration::from_secs(5), "{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_db = metrics_text(app).await;
    inject(|| pg.kill());
    let (status, page) = app.visit().await;
    assert_eq!(status, 503, "{page}");
    let text = metrics_text(app).await;

    // The reasons, each counted where it happened (the recorder is shared by this binary's
    // tests, hence "at least").
    let uncounted = |text: &str, reason: &str| {
        value(
            text,
            &format!("visits_uncounted_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(uncounted(&text, "withheld") >= 1.0, "{text}");
    assert!(
        uncounted(&text, "db") >= uncounted(&before_db, "db") + 1.0,
        "{text}"
    );
    if uncounted_by_cache > 0 {
        assert!(
            uncounted(&text, "cache") >= f64::from(uncounted_by_cache),
            "{uncounted_by_cache} answers without a count while Redis's lease held: {text}"
        );
    }
    text
}

/// Metric names a PromQL expression selects: what remains once strings, label matchers,
/// ranges, the label lists of `by`/`without`/`on`/`ignoring`/`group_*`, function and
/// aggregation names, keywords and numbers are left out. Enough for the queries in
/// deploy/monitoring (promtool parses them for real).
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Aggregations may be followed by `by (...)` instead of their `(`.
    const KEYWORDS: &[&str] = &[
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Strings, {...} and [...] out.
    let mut bare = String::new();
    let (mut quote, mut nesting) = (None, 0);
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{' | '[') => nesting += 1,
            (None, '}' | ']') => {
                nesting -= 1;
                bare.push(' ');
            }
            (None, c) if nesting == 0 => bare.push(c),
            (None, _) => {}
        }
    }
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let bytes: Vec<char> = bare.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let starts = (c.is_ascii_alphabetic() || c == '_' || c == ':')
            && (i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == '.'));
        if !starts {
            i += 1;
            continue;
        }
        let end = (i..bytes.len())
            .find(|&j| !is_ident(bytes[j]))
            .unwrap_or(bytes.len());
        let word: String = bytes[i..end].iter().collect();
        let next = bytes[end..].iter().find(|c| !c.is_whitespace());
        i = end;
        if LABEL_LISTS.contains(&word.as_str()) {
            if next == Some(&'(') {
                i = (end..bytes.len())
                    .find(|&j| bytes[j] == ')')
                    .map_or(bytes.len(), |j| j + 1);
            }
            continue;
        }
        if next == Some(&'(') || KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
            continue;
        }
        names.insert(word);
    }
    names
}

/// The `expr` of every rule in a rules file: one line, or a `|` block.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        if rest.trim() != "|" {
            exprs.push(rest.trim().to_owned());
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                break;
            }
            block.push_str(lines.next().unwrap());
            block.push('\n');
        }
        exprs.push(block);
    }
    exprs
}

fn dashboard_exprs(json: &str) -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(json).unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// Series names on `/metrics`, and the families they belong to (from `# TYPE`).
fn exported(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let families = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .map(str::to_owned)
        .collect();
    (series, families)
}

#[test]
fn the_name_extraction_finds_metrics_and_nothing_else() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{route="/",x=~"b(c)"}[5m])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum(rate(x[1m])) by (reason) / on (job) group_left (y) z or up == bool 1e3"),
        ["up", "x", "z"]
    );
    assert_eq!(names("max(d) != min(d) unless e offset 5m"), ["d", "e"]);
    assert_eq!(names(r#"rate(a{l="}, b"}[$__rate_interval])"#), ["a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rules_and_dashboard_read_only_metrics_web_exports_and_show_them_all() {
    let (mut redis, mut pg) = (Redis::start(), Postgres::start());
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    let text = every_series(&mut redis, &mut pg, &app).await;
    let (series, families) = exported(&text);

    let dir = repo_file("deploy/monitoring");
    let dashboard =
        dashboard_exprs(&std::fs::read_to_string(dir.join("grafana/dashboards/web.json")).unwrap());
    let mut rules = Vec::new();
    for entry in std::fs::read_dir(dir.join("rules")).unwrap() {
        rules.extend(rule_exprs(
            &std::fs::read_to_string(entry.unwrap().path()).unwrap(),
        ));
    }
    assert!(
        dashboard.len() >= 10 && rules.len() >= 14,
        "{dashboard:?} {rules:?}"
    );
    let recorded: BTreeSet<String> = std::fs::read_dir(dir.join("rules"))
        .unwrap()
        .flat_map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            text.lines()
                .filter_map(|l| Some(l.trim().strip_prefix("- record:")?.trim().to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();

    let known =
        |name: &String| series.contains(name) || MADE_BY_PROMETHEUS.contains(&name.as_str());
    for (what, exprs, also) in [
        ("dashboard", &dashboard, &BTreeSet::new()),
        ("rules", &rules, &recorded),
    ] {
        for expr in exprs {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{what}: no metric in {expr}");
            for name in names {
                assert!(
                    known(&name) || also.contains(&name),
                    "{what}: {name} (in {expr}) is not on web's /metrics:\n{text}"
                );
            }
        }
    }
    let on_dashboard: BTreeSet<String> = dashboard.iter().flat_map(|e| metric_names(e)).collect();
    for family in &families {
        assert!(
            on_dashboard.iter().any(|n| n == family
                || n.strip_prefix(family.as_str())
                    .is_some_and(|s| s.starts_with('_'))),
            "web exports {family}, which no dashboard panel shows"
        );
    }
    assert!(families.len() >= 8, "{families:?}");
}
