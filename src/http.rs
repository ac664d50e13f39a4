//! Routes, the page's JSON and the middleware every request goes through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;
use tower_http::timeout::TimeoutLayer;

use crate::store::{Readiness, Store};
use crate::visits::{NotRunning, Visit, Visits};

/// Nothing here reads a body; anything bigger than this is not a request we want.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// Below hyper's own hard limits, so oversized requests get our JSON answer, not a bare one.
const MAX_URI_BYTES: usize = 2 * 1024;
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// The longest path the request log writes; a longer one is cut (see `loggable_path`).
pub const MAX_LOGGED_PATH_BYTES: usize = 128;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub visits: Visits,
    /// Renders the metrics recorder that `main` installed.
    pub metrics: PrometheusHandle,
    /// Longest a request may take; also what bounds the drain at shutdown.
    pub request_timeout: Duration,
}

/// The public listener: the page and liveness, nothing else.
pub fn public_router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/", get(index).head(index_head))
        .route_layer(timeout(state.request_timeout))
        .route("/healthz", get(healthz));
    with_middleware(routes, state)
}

/// The admin listener, for probes and scrapers on the private network: readiness, metrics,
/// and liveness again (so a probe needs one port).
pub fn admin_router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/readyz", get(readyz))
        .route_layer(timeout(state.request_timeout))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics));
    with_middleware(routes, state)
}

/// What every request goes through, on either listener: one layer (`edge`) for its metrics
/// and log line, JSON error bodies, headers that keep answers out of caches and sniffers, and
/// the size limits; and the request timeout, on the routes that can wait (`GET /` and
/// `/readyz` call the dependencies; the others answer from memory). One layer rather than one
/// per concern: each layer boxes and polls another future per request (measured in
/// bench/README.md).
fn with_middleware(routes: Router<AppState>, state: AppState) -> Router {
    routes.layer(middleware::from_fn(edge)).with_state(state)
}

/// The request timeout: an answer not ready in time is a 503 (a JSON error, from `edge`).
fn timeout(request_timeout: Duration) -> TimeoutLayer {
    TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, request_timeout)
}

/// The seed's page. Field order is the contract: `status`, `visitas_cache`, `hora_db`, then
/// `erros` only when something failed. It borrows from the visit, so the healthy page is
/// written without an allocation of its own.
#[derive(Debug, Serialize)]
struct Page<'a> {
    status: &'static str,
    visitas_cache: Option<Count>,
    hora_db: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    erros: Option<Errors>,
}

#[derive(Debug, Serialize)]
struct Errors {
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    db: Option<String>,
}

/// A count, written as a JSON string of its digits (the seed's format).
#[derive(Debug)]
struct Count(i64);

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'a> From<&'a Visit> for (StatusCode, Page<'a>) {
    fn from(visit: &'a Visit) -> Self {
        let batch = &visit.batch;
        let healthy = batch.cache_error.is_none() && batch.clock.is_ok();
        let answered = visit.count.is_some() || batch.clock.is_ok();
        let (code, status) = match (healthy, answered) {
            (true, _) => (StatusCode::OK, "ok"),
            (false, true) => (StatusCode::OK, "degraded"),
            (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "error"),
        };
        let erros = (!healthy).then(|| Errors {
            cache: batch.cache_error.as_ref().map(ToString::to_string),
            db: batch.clock.as_ref().err().map(ToString::to_string),
        });
        let page = Page {
            status,
            visitas_cache: visit.count.map(Count),
            hora_db: batch.clock.as_deref().ok(),
            erros,
        };
        (code, page)
    }
}

async fn index(State(state): State<AppState>) -> Response {
    match state.visits.record().await {
        Ok(visit) => {
            let (code, page): (StatusCode, Page) = (&visit).into();
            (code, Json(page)).into_response()
        }
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `HEAD /` must not count a visit, so it does not share `GET /`'s handler (axum would
/// otherwise run the GET handler and drop the body).
async fn index_head() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], ())
}

/// Alive while the process can still count visits: the batching task is running. Says
/// nothing about Redis or PostgreSQL, so an outage of theirs never restarts `web`.
async fn healthz(State(state): State<AppState>) -> Response {
    if state.visits.is_running() {
        // Written out, not built: liveness is probed often, and is the HTTP path's ceiling.
        (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"ok"}"#,
        )
            .into_response()
    } else {
        error_response(StatusCode::SERVICE_UNAVAILABLE, &NotRunning.to_string())
    }
}

/// Ready only when both dependencies answer now; the body names whichever did not.
async fn readyz(State(state): State<AppState>) -> Response {
    let Readiness { cache, db } = state.store.readiness().await;
    let mut erros = serde_json::Map::new();
    for (name, result) in [("cache", cache), ("db", db)] {
        if let Err(e) = result {
            erros.insert(name.into(), e.to_string().into());
        }
    }
    if erros.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "erros": erros})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    crate::telemetry::publish_dropped_log_lines();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

fn error_response(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({"status": "error", "erro": message}))).into_response()
}

/// The `method` label: the methods the router serves, `other` for the rest. A client can
/// send any token as a method, and each distinct label value is a new series kept forever.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// The `route` label: the route template the router matched (never the raw path, which a
/// client could use to create unbounded label values), as a static string for the routes
/// this service has, so that recording a metric allocates nothing.
fn route_label(matched: Option<&MatchedPath>) -> metrics::SharedString {
    let Some(matched) = matched else {
        return metrics::SharedString::const_str("unmatched");
    };
    match matched.as_str() {
        "/" => metrics::SharedString::const_str("/"),
        "/healthz" => metrics::SharedString::const_str("/healthz"),
        "/readyz" => metrics::SharedString::const_str("/readyz"),
        "/metrics" => metrics::SharedString::const_str("/metrics"),
        other => other.to_owned().into(),
    }
}

/// The `status` label, static for the statuses this service answers with.
fn status_label(status: StatusCode) -> metrics::SharedString {
    let label = match status.as_u16() {
        200 => "200",
        404 => "404",
        405 => "405",
        413 => "413",
        414 => "414",
        431 => "431",
        500 => "500",
        503 => "503",
        _ => return status.as_str().to_owned().into(),
    };
    metrics::SharedString::const_str(label)
}

/// The one layer every request goes through (outermost first): its size limits (a JSON
/// 414, 431 or 413 before any handler runs), the handler, a JSON body for any error answer,
/// the `Cache-Control: no-store` (`GET /` changes state: no cache may keep or replay its
/// answer) and `X-Content-Type-Options: nosniff` headers; then it counts and times the request
/// by method, route and status, and logs it: one event, no span, so that logging at `info`
/// costs one formatted line per request (written in batches by the background writer, see
/// `telemetry`).
async fn edge(request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let uri = tracing::enabled!(tracing::Level::INFO).then(|| request.uri().clone());
    let started = Instant::now();
    let response = match oversized(&request) {
        Some(code) => code.into_response(),
        None => next.run(request).await,
    };
    let mut response = json_errors(response);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let latency = started.elapsed();
    let status = response.status();
    if let Some(uri) = uri {
        let (path, truncated) = loggable_path(uri.path());
        tracing::info!(
            method,
            path = &*path,
            path_truncated = truncated.then_some(true),
            status = status.as_u16(),
            latency_ms = latency.as_secs_f64() * 1000.0,
            "request"
        );
    }
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status_label(status))
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route)
        .record(latency.as_secs_f64());
    response
}

/// `path` as the request log writes it: whole up to `MAX_LOGGED_PATH_BYTES`, else its first
/// bytes up to that bound (on a character boundary) followed by `…`, and `true` for cut. A
/// client chooses the path, and kilobytes of it in every log line would fill memory while
/// stdout is slow, and the disk after that.
fn loggable_path(path: &str) -> (std::borrow::Cow<'_, str>, bool) {
    if path.len() <= MAX_LOGGED_PATH_BYTES {
        return (path.into(), false);
    }
    let cut = (0..=MAX_LOGGED_PATH_BYTES)
        .rev()
        .find(|&i| path.is_char_boundary(i))
        .unwrap_or(0);
    (format!("{}…", &path[..cut]).into(), true)
}

/// Every error answer is a small JSON object, whoever produced it (the router's 404 and 405,
/// the size limits' 413, 414 and 431, the timeout's 503, ...), so clients parse one format.
fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let reason = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase();
    let body = json!({"status": "error", "erro": reason}).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// The status a request too big to serve gets: a URI over `MAX_URI_BYTES`, headers over
/// `MAX_HEADER_BYTES`, or a declared body over `MAX_BODY_BYTES` (nothing here reads a body,
/// so one sent without a length is never read, let alone kept).
fn oversized(request: &Request) -> Option<StatusCode> {
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return Some(StatusCode::URI_TOO_LONG);
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let declared_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared_body.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Some(StatusCode::PAYLOAD_TOO_LARGE);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, CountedIn, DepError};
    use crate::test_support::{metrics, unreachable_store};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;
    use tower::ServiceExt;

    /// The public router with a store that is never reached: the HTTP contract alone.
    fn app() -> (Router, CancellationToken) {
        let (state, close) = state();
        (public_router(state), close)
    }

    fn state() -> (AppState, CancellationToken) {
        let store = unreachable_store();
        let close = CancellationToken::new();
        let visits = Visits::spawn(Arc::clone(&store), &TaskTracker::new(), close.clone());
        let state = AppState {
            store,
            visits,
            metrics: metrics(),
            request_timeout: Duration::from_secs(5),
        };
        (state, close)
    }

    async fn send(router: &Router, request: Request) -> (StatusCode, String, serde_json::Value) {
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, content_type, json)
    }

    fn request(method: &str, uri: &str) -> axum::http::request::Builder {
        Request::builder().method(method).uri(uri)
    }

    #[tokio::test]
    async fn every_client_error_is_a_small_json_answer() {
        let (router, _close) = app();
        let big_body = vec![b'x'; 64 * 1024];
        let cases = [
            (request("GET", "/favicon.ico").body(Body::empty()), 404),
            (request("GET", "/does/not/exist").body(Body::empty()), 404),
            (request("POST", "/").body(Body::empty()), 405),
            (request("DELETE", "/healthz").body(Body::empty()), 405),
            (request("GET", "/metrics").body(Body::empty()), 404),
            (
                request("POST", "/")
                    .header(header::CONTENT_LENGTH, big_body.len())
                    .body(Body::from(big_body)),
                413,
            ),
            (
                request("GET", &format!("/?q={}", "a".repeat(4096))).body(Body::empty()),
                414,
            ),
            (
                request("GET", "/")
                    .header("x-big", "b".repeat(16 * 1024))
                    .body(Body::empty()),
                431,
            ),
        ];
        for (built, expected) in cases {
            let (status, content_type, body) = send(&router, built.unwrap()).await;
            assert_eq!(status.as_u16(), expected, "{body}");
            assert_eq!(content_type, "application/json");
            assert_eq!(body["status"], "error", "{body}");
            assert!(body["erro"].is_string(), "{body}");
        }
    }

    #[tokio::test]
    async fn a_hundred_invented_methods_add_no_metric_series() {
        let (router, _close) = app();
        for i in 0..100 {
            let method = format!("FOO{i}");
            let (status, _, _) =
                send(&router, request(&method, "/").body(Body::empty()).unwrap()).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        }
        let (_, _, _) = send(
            &router,
            request("GET", "/nope").body(Body::empty()).unwrap(),
        )
        .await;
        let text = metrics().render();
        assert!(!text.contains("FOO"), "a client's method became a label");
        assert!(
            text.contains(r#"method="other",route="/",status="405""#),
            "{text}"
        );
        assert!(
            text.contains(r#"method="GET",route="unmatched",status="404""#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn admin_routes_are_absent_from_the_public_listener_and_present_on_the_admin_one() {
        let (state, _close) = state();
        let (public, admin) = (public_router(state.clone()), admin_router(state));
        for path in ["/metrics", "/readyz"] {
            let (status, _, body) =
                send(&public, request("GET", path).body(Body::empty()).unwrap()).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        }
        let (status, content_type, _) = send(
            &admin,
            request("GET", "/metrics").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        // The store is unreachable, so readiness answers, and says no.
        let (status, _, body) = send(
            &admin,
            request("GET", "/readyz").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body["erros"]["cache"].is_string() && body["erros"]["db"].is_string(),
            "{body}"
        );
        for router in [&public, &admin] {
            let (status, _, _) = send(
                router,
                request("GET", "/healthz").body(Body::empty()).unwrap(),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
        }
        let (status, _, _) = send(&admin, request("GET", "/").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "the page is public only");
    }

    /// Every answer `web` produces, on either listener, success or error. (The HTTP parser's
    /// own bare 400 and 431 come before `web` sees a request, and carry nothing.)
    #[tokio::test]
    async fn every_answer_web_produces_forbids_caching_and_sniffing() {
        let (state, _close) = state();
        let (public, admin) = (public_router(state.clone()), admin_router(state));
        let cases = [
            (&public, request("GET", "/").body(Body::empty()), 503),
            (&public, request("GET", "/healthz").body(Body::empty()), 200),
            (&public, request("GET", "/nope").body(Body::empty()), 404),
            (&public, request("POST", "/").body(Body::empty()), 405),
            (
                &public,
                request("POST", "/")
                    .header(header::CONTENT_LENGTH, 64 * 1024)
                    .body(Body::from(vec![b'x'; 64 * 1024])),
                413,
            ),
            (
                &public,
                request("GET", &format!("/?q={}", "a".repeat(4096))).body(Body::empty()),
                414,
            ),
            (
                &public,
                request("GET", "/")
                    .header("x-big", "b".repeat(16 * 1024))
                    .body(Body::empty()),
                431,
            ),
            (&admin, request("GET", "/metrics").body(Body::empty()), 200),
            (&admin, request("GET", "/readyz").body(Body::empty()), 503),
            (&admin, request("GET", "/healthz").body(Body::empty()), 200),
            (&admin, request("GET", "/").body(Body::empty()), 404),
        ];
        for (router, built, expected) in cases {
            let response = router
                .clone()
                .oneshot(built.unwrap())
                .await
                .expect("infallible");
            let status = response.status().as_u16();
            assert_eq!(status, expected);
            let headers = response.headers();
            assert_eq!(headers[header::CACHE_CONTROL], "no-store", "{status}");
            assert_eq!(
                headers[header::X_CONTENT_TYPE_OPTIONS],
                "nosniff",
                "{status}"
            );
        }
    }

    #[tokio::test]
    async fn liveness_fails_once_the_batching_task_is_gone() {
        let (router, close) = app();
        let (status, _, body) = send(
            &router,
            request("GET", "/healthz").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("ok"))
        );
        close.cancel();
        tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let (status, _, _) = send(
                    &router,
                    request("GET", "/healthz").body(Body::empty()).unwrap(),
                )
                .await;
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("/healthz fails once no visit can be counted");
        let (status, _, body) =
            send(&router, request("GET", "/").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["status"], "error");
    }

    #[test]
    fn a_logged_path_is_cut_to_128_bytes_on_a_character_boundary_and_marked() {
        let short = "/".repeat(MAX_LOGGED_PATH_BYTES);
        assert_eq!(loggable_path(&short), (short.as_str().into(), false));
        let long = "/p".repeat(8 * 1024);
        assert_eq!(
            loggable_path(&long),
            (format!("{}…", "/p".repeat(64)).into(), true)
        );
        // 127 bytes, then 3-byte characters: the one that would cross byte 128 is left out.
        let wide = format!("/{}{}", "a".repeat(126), "€".repeat(10));
        assert_eq!(
            loggable_path(&wide),
            (format!("/{}…", "a".repeat(126)).into(), true)
        );
    }

    /// A visit given `count`, of a batch whose clock was read (or PostgreSQL timed out) and
    /// whose Redis count failed or not.
    fn visit(count: Option<i64>, cache: bool, db: bool) -> Visit {
        let batch = Batch {
            total: count.map(|c| (c, CountedIn::Cache)),
            clock: if db {
                Err(DepError::Timeout(Duration::from_secs(1)))
            } else {
                Ok("2025-11-16 18:32:01.123456".to_owned())
            },
            cache_error: cache.then_some(DepError::Unavailable("connection refused")),
        };
        Visit {
            count,
            batch: std::sync::Arc::new(batch),
        }
    }

    fn render(v: Visit) -> (StatusCode, String) {
        let (code, page): (StatusCode, Page) = (&v).into();
        (code, serde_json::to_string(&page).unwrap())
    }

    #[test]
    fn healthy_page_is_the_seed_s_exact_shape() {
        let (code, body) = render(visit(Some(3), false, false));
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"status":"ok","visitas_cache":"3","hora_db":"2025-11-16 18:32:01.123456"}"#
        );
    }

    #[test]
    fn each_line_of_the_outage_table() {
        let (code, body) = render(visit(Some(4), true, false));
        assert_eq!(code, StatusCode::OK);
        assert!(body.starts_with(r#"{"status":"degraded","visitas_cache":"4","hora_db":"2025"#));
        assert!(
            body.ends_with(r#","erros":{"cache":"unavailable (connection refused)"}}"#),
            "{body}"
        );

        let (code, body) = render(visit(Some(5), false, true));
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"status":"degraded","visitas_cache":"5","hora_db":null,"erros":{"db":"timeout"}}"#
        );

        let (code, body) = render(visit(None, true, true));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            r#"{"status":"error","visitas_cache":null,"hora_db":null,"erros":{"cache":"unavailable (connection refused)","db":"timeout"}}"#
        );
    }
}
