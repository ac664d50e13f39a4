//! The service under test in-process (port 0, as zero2prod does), its environment, and the
//! HTTP helpers the tests share.

use super::*;

/// Environment for the service, pointing at the given servers.
pub struct Env {
    pub vars: HashMap<String, String>,
    _password_dir: TempDir,
}

impl Env {
    pub fn new(redis_url: &str, database_url: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pw = dir.path().join("db_password");
        std::fs::write(&pw, format!("{DB_PASSWORD}\n")).expect("password file");
        let mut vars = HashMap::new();
        vars.insert("REDIS_URL".into(), redis_url.into());
        vars.insert("DATABASE_URL".into(), database_url.into());
        vars.insert(
            "DATABASE_PASSWORD_FILE".into(),
            pw.to_str().expect("utf-8 path").into(),
        );
        vars.insert("DEPENDENCY_TIMEOUT_MS".into(), "500".into());
        Self {
            vars,
            _password_dir: dir,
        }
    }

    pub fn for_servers(redis: &Redis, pg: &Postgres) -> Self {
        Self::new(&redis.url(), &pg.url())
    }

    /// Gives `redis` the stack's users (its ACL file, see `Redis::apply_acl`), and the app
    /// logs in to it as `web`, with its password file, as in the compose stack.
    pub fn as_web_user(redis: &Redis, pg: &Postgres) -> Self {
        redis.apply_acl(&stack_secret("cache/redis_users.acl"));
        let password = stack_secret("web/redis_password");
        Self::new(
            &format!("redis://web@127.0.0.1:{}/0", redis.port),
            &pg.url(),
        )
        .set(
            "REDIS_PASSWORD_FILE",
            password.to_str().expect("utf-8 path"),
        )
    }

    /// Dependencies that refuse every connection (closed loopback ports): for what never
    /// needs them, or must do without them.
    pub fn unreachable() -> Self {
        Self::new(
            &format!("redis://127.0.0.1:{}/0", free_port()),
            &format!("postgres://admin@127.0.0.1:{}/desafio3", free_port()),
        )
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    pub fn config(&self) -> Config {
        let mut config = Config::from_lookup(|k| self.vars.get(k).map(OsString::from))
            .expect("test configuration parses");
        config.port = 0;
        config.admin_port = 0;
        config
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// The app running in-process on a random port; stops when dropped.
pub struct TestApp {
    pub address: String,
    /// The admin listener: `/readyz`, `/metrics`.
    pub admin_address: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _env: Env,
}

impl TestApp {
    pub async fn spawn(env: Env) -> Self {
        let app = Application::build(env.config(), metrics())
            .await
            .expect("app builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let admin_address = format!("http://127.0.0.1:{}", app.admin_port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            address,
            admin_address,
            client: http_client(),
            stop: Some(stop),
            task: Some(task),
            _env: env,
        }
    }

    /// Starts the app and waits until both dependencies have been reached.
    pub async fn spawn_ready(env: Env) -> Self {
        let app = Self::spawn(env).await;
        app.wait_ready(Duration::from_secs(10)).await;
        app
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        wait_ready(&self.client, &self.admin_address, timeout).await;
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("request reaches the app")
    }

    /// A request to the admin listener.
    pub async fn get_admin(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.admin_address))
            .send()
            .await
            .expect("request reaches the admin listener")
    }

    /// `GET /`, as status code and parsed body.
    pub async fn visit(&self) -> (u16, Value) {
        get_page(&self.client, &self.address).await
    }

    /// Graceful stop, as on SIGTERM; returns once the app has shut down (queued visits answered,
    /// background tasks joined).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app stops cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `/readyz` until it answers 200: both dependencies reached, schema in place.
pub async fn wait_ready(client: &reqwest::Client, base: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = client.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base} not ready after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn get_page(client: &reqwest::Client, base: &str) -> (u16, Value) {
    try_get_page(client, base)
        .await
        .expect("request reaches the app, and it answers JSON")
}

/// `GET /`, for callers that expect the app to be gone or cut off at times.
pub async fn try_get_page(
    client: &reqwest::Client,
    base: &str,
) -> Result<(u16, Value), reqwest::Error> {
    let response = client.get(format!("{base}/")).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// The count a page carries, if any (it is a JSON string, by contract).
pub fn count_of(page: &Value) -> Option<i64> {
    page["visitas_cache"]
        .as_str()
        .map(|s| s.parse().expect("numeric count"))
}

/// The count of an answer that must be `200` and `ok`, which always carries one.
pub fn ok_count((status, page): &(u16, Value)) -> i64 {
    assert_eq!(
        (*status, page["status"].as_str()),
        (200, Some("ok")),
        "{page}"
    );
    count_of(page).expect("an ok page carries a count")
}

/// Fresh Redis and PostgreSQL, and the app in-process, ready.
pub async fn healthy_app() -> (Redis, Postgres, TestApp) {
    let redis = Redis::start();
    let pg = Postgres::start();
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    (redis, pg, app)
}
