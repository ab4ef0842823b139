//! Test harness: every test gets its own Postgres database (created and
//! dropped), its own NATS subject/stream prefix, and its own simulator on an
//! ephemeral loopback port. Real NATS, real Postgres; only the LLM provider
//! is simulated. Set TEST_LOG=1 to see the worker's logs.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use switchyard::bus::Bus;
use switchyard::config::Config;
use switchyard::enqueue::Outgoing;
use switchyard::envelope::JobEnvelope;
use switchyard::pipeline::worker::{self, WorkerHandle, WorkerOptions};
use switchyard::sim::{SimProfile, SimServer};

pub const SHIPPED_CONFIG: &str = include_str!("../../config/switchyard.toml");

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| switchyard::config::DEFAULT_NATS_URL.into())
}

/// The Postgres server of `DATABASE_URL` (or the default), with another database name.
pub fn database_url_for(db: &str) -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| switchyard::config::DEFAULT_DATABASE_URL.into());
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a path");
    format!("{server}/{db}")
}

pub struct TestEnv {
    pub name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub bus: Bus,
    pub sim: SimServer,
}

impl TestEnv {
    pub async fn new(profile: SimProfile) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            switchyard::init_logging();
        }
        let name = format!("sy_t_{}", &switchyard::ids::new_job_id()[..12]);
        let db_url = database_url_for(&name);
        let pool = switchyard::store::connect_and_migrate(&db_url, 8)
            .await
            .expect("test database");
        let bus = Bus::connect(&nats_url(), &name).await.expect("NATS");
        let sim = SimServer::start("127.0.0.1:0", profile).await.expect("sim");
        Self {
            name,
            db_url,
            pool,
            bus,
            sim,
        }
    }

    /// The shipped config with this test's prefix, every provider on this
    /// test's simulator, and `extra` TOML-style env overrides applied.
    pub fn config_with(&self, extra: &[(&str, &str)]) -> Config {
        let mut env: Vec<(String, String)> =
            vec![("SWITCHYARD_NATS__PREFIX".to_string(), self.name.clone())];
        for p in ["OPENAI", "ANTHROPIC", "GEMINI"] {
            env.push((
                format!("SWITCHYARD_PROVIDERS__{p}__BASE_URL"),
                self.sim.base_url(),
            ));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Config::from_toml_with_env(SHIPPED_CONFIG, &env).expect("test config")
    }

    /// `text` (a whole config) with this test's prefix and every provider on
    /// this test's simulator.
    pub fn config_from(&self, text: &str) -> Config {
        let mut env: Vec<(String, String)> =
            vec![("SWITCHYARD_NATS__PREFIX".to_string(), self.name.clone())];
        let cfg = Config::from_toml(text).expect("test config");
        for p in cfg.providers.keys() {
            env.push((
                format!("SWITCHYARD_PROVIDERS__{}__BASE_URL", p.to_uppercase()),
                self.sim.base_url(),
            ));
        }
        Config::from_toml_with_env(text, &env).expect("test config")
    }

    pub fn config(&self) -> Config {
        self.config_with(&[])
    }

    /// Environment for a `switchyard` child process pointed at this test's
    /// database, prefix and simulator.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL".to_string(), self.db_url.clone()),
            ("NATS_URL".to_string(), nats_url()),
            ("SWITCHYARD_NATS__PREFIX".to_string(), self.name.clone()),
            (
                "SWITCHYARD_CONFIG".to_string(),
                format!("{}/config/switchyard.toml", env!("CARGO_MANIFEST_DIR")),
            ),
        ];
        for p in ["OPENAI", "ANTHROPIC", "GEMINI"] {
            env.push((
                format!("SWITCHYARD_PROVIDERS__{p}__BASE_URL"),
                self.sim.base_url(),
            ));
        }
        env
    }

    pub async fn start_worker(&self, cfg: Config) -> WorkerHandle {
        worker::start(
            Arc::new(cfg),
            self.pool.clone(),
            self.bus.clone(),
            WorkerOptions::default(),
        )
        .await
        .expect("worker starts")
    }

    /// The state of one of this test's streams (messages held, last sequence).
    pub async fn stream_state(&self, stream: &str) -> async_nats::jetstream::stream::State {
        let mut st = self.bus.js.get_stream(stream).await.unwrap();
        st.info().await.unwrap().state.clone()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The HTTP API (`switchyard serve`'s routes) on a free loopback port:
    /// its base URL, and the tasks serving it (dropped: still served until
    /// stopped; `stop` them to end it).
    pub async fn serve_http(&self, cfg: &Config) -> (String, switchyard::tasks::Tasks) {
        let port = switchyard_servers::free_port().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let tasks = switchyard::tasks::Tasks::new();
        switchyard::ops::dashboard::serve(
            &listen,
            self.pool.clone(),
            self.bus.clone(),
            cfg,
            &tasks,
        )
        .await
        .unwrap();
        switchyard::providers::http::install_tls_provider();
        (format!("http://{listen}"), tasks)
    }

    /// Drop the database and the streams.
    pub async fn cleanup(self) {
        self.sim.stop();
        self.bus.delete_streams().await;
        self.pool.close().await;
        drop_database(&self.name).await;
    }
}

/// Drop database `name` on the test server, whoever is still connected.
pub async fn drop_database(name: &str) {
    let admin = sqlx::PgPool::connect(&database_url_for("postgres"))
        .await
        .expect("admin");
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    admin.close().await;
}

/// Overrides that serve each shipped category by one model (no fallback,
/// pipeline, consensus or A/B split), for tests about one call per job.
pub const SINGLE_ROUTES: [(&str, &str); 4] = [
    (
        "SWITCHYARD_CATEGORIES__SUPPORT__ROUTE",
        r#"{ kind = "single", target = "claude-sonnet-4-5" }"#,
    ),
    ("SWITCHYARD_CATEGORIES__SUPPORT__VARIANT__PERCENT", "0"),
    (
        "SWITCHYARD_CATEGORIES__SALES__ROUTE",
        r#"{ kind = "single", target = "gpt-4.1" }"#,
    ),
    (
        "SWITCHYARD_CATEGORIES__LOOKUP__ROUTE",
        r#"{ kind = "single", target = "gemini-2.5-flash-lite" }"#,
    ),
];

/// `n` prompt jobs spread over support, sales and lookup, ids `<tag>-<i>`.
pub fn jobs(tag: &str, n: usize) -> Vec<Outgoing> {
    let cats = ["support", "sales", "lookup"];
    (0..n)
        .map(|i| {
            let env = JobEnvelope::prompt(
                format!("{tag}-{i:05}"),
                cats[i % 3],
                format!("Question number {i}: how do I do thing {}?", i * 7),
            );
            Outgoing::from_envelope(&env).unwrap()
        })
        .collect()
}

/// A simulator that fails a fifth of its calls (Haiku a third, for good,
/// so support falls back to Sonnet), caches and disagrees: retries,
/// fallbacks, several steps per job.
#[allow(dead_code)]
pub fn mixed_profile(extra: SimProfile) -> SimProfile {
    let mut profile = SimProfile {
        error_rate: 0.2,
        cached_share: 0.3,
        jitter_ms: 20,
        agreement: 0.7,
        ..extra
    };
    profile.model_errors.insert("claude-haiku-4-5".into(), 0.3);
    profile
}

/// Run `n` jobs tagged `tag` through a worker of `env` until they finish,
/// then stop it; the jobs' ids.
#[allow(dead_code)]
pub async fn run_jobs(env: &TestEnv, tag: &str, n: usize) -> Vec<String> {
    let worker = env.start_worker(env.config()).await;
    let js = jobs(tag, n);
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    assert!(
        switchyard::enqueue::wait_finished(&env.pool, &ids, Duration::from_secs(90), None)
            .await
            .unwrap(),
        "jobs finished"
    );
    assert!(worker.shutdown().await);
    ids
}

/// A test database after `n` jobs tagged `tag` ran through a worker
/// against the [`mixed_profile`] simulator. The worker is stopped; returns
/// the environment and the jobs' ids.
#[allow(dead_code)]
pub async fn mixed_run(tag: &str, n: usize, extra: SimProfile) -> (TestEnv, Vec<String>) {
    let env = TestEnv::new(mixed_profile(extra)).await;
    let ids = run_jobs(&env, tag, n).await;
    (env, ids)
}

/// Poll `cond` until it is true or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `switchyard` binary with `env`, quiet unless TEST_LOG is set.
pub fn switchyard(env: &[(String, String)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    if std::env::var_os("TEST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    cmd
}

/// Run `switchyard <args>` with `env` to its end; its stdout, after
/// asserting that it succeeded (its stderr in the failure).
pub fn switchyard_ok(env: &[(String, String)], args: &[&str]) -> String {
    let out = switchyard(env).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "switchyard {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child worker process, killed if the test ends early.
pub struct Worker(pub std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_worker(env: &[(String, String)]) -> Worker {
    Worker(
        switchyard(env)
            .arg("worker")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn worker"),
    )
}

#[allow(unused_imports)]
pub use switchyard_servers::have;

/// A gpt-4o-mini cost record of step 0 (100 tokens in, 50 out, at its
/// prices), as the writer takes them: an intent when `outcome` is
/// `Unknown`, a final record otherwise.
pub fn call_row(
    job: &str,
    attempt: i32,
    outcome: switchyard::store::CallOutcome,
) -> switchyard::store::CallRow {
    use rust_decimal::Decimal;
    switchyard::store::CallRow {
        job_id: job.into(),
        category: "support".into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        step: 0,
        attempt,
        usage: switchyard::pricing::Usage {
            input_tokens: 100,
            output_tokens: 50,
            ..Default::default()
        },
        prices: switchyard::pricing::Prices {
            input_per_mtok: Decimal::new(15, 2),
            output_per_mtok: Decimal::new(60, 2),
            cached_input_per_mtok: Decimal::ZERO,
            cache_write_per_mtok: Decimal::ZERO,
        },
        latency_ms: 0,
        http_status: None,
        outcome,
        error: None,
        batch_id: None,
    }
}
