//! The worker's `/metrics` (Prometheus text) and live dashboard: a worker
//! process serves them; the dashboard is checked in headless Chromium
//! (Debian's `chromium`) for the real figures, and screenshotted.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{have, TestEnv};

/// The first of `candidates` that runs.
fn installed(candidates: &[&'static str]) -> Option<&'static str> {
    candidates.iter().copied().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn chromium() -> Option<&'static str> {
    installed(&["chromium", "chromium-browser", "/usr/bin/chromium"])
}

fn chromedriver() -> Option<&'static str> {
    installed(&["chromedriver", "/usr/bin/chromedriver"])
}

/// `exe` as an absolute path (ChromeDriver wants one), looked up on PATH.
fn absolute(exe: &str) -> String {
    if exe.starts_with('/') {
        return exe.to_string();
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(exe))
                .find(|f| f.is_file())
        })
        .map_or_else(|| exe.to_string(), |f| f.display().to_string())
}

/// Headless Chromium with the flags this machine's closed network needs.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1000,1100",
];

/// A ChromeDriver process and one browser session, over the W3C WebDriver
/// protocol (plain HTTP and JSON).
struct WebDriver {
    _driver: common::Worker,
    http: reqwest::Client,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl WebDriver {
    async fn start(driver: &str, chromium: &str) -> Self {
        let port = switchyard_servers::free_port().unwrap();
        let child = common::Worker(
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}");
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": absolute(chromium), "args": CHROMIUM_ARGS},
        }}});
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let session = loop {
            match http.post(format!("{url}/session")).json(&caps).send().await {
                Ok(r) if r.status().is_success() => {
                    let v: serde_json::Value = r.json().await.unwrap();
                    break v["value"]["sessionId"].as_str().unwrap().to_string();
                }
                Ok(r) => panic!("no session: {}", r.text().await.unwrap_or_default()),
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "chromedriver: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Self {
            _driver: child,
            http,
            session: format!("{url}/session/{session}"),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let r = self
            .http
            .request(method, format!("{}{path}", self.session))
            .json(&body)
            .send()
            .await
            .unwrap();
        let ok = r.status().is_success();
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(ok, "WebDriver {path}: {v}");
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(
            reqwest::Method::POST,
            "/url",
            serde_json::json!({ "url": url }),
        )
        .await;
    }

    async fn js(&self, script: &str) -> serde_json::Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            serde_json::json!({"script": script, "args": []}),
        )
        .await
    }

    async fn text(&self, id: &str) -> String {
        let v = self
            .js(&format!(
                "return document.getElementById('{id}').textContent"
            ))
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                serde_json::json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            serde_json::json!({}),
        )
        .await;
    }

    /// Type `token` into the login form and submit it, as a person would.
    async fn sign_in(&self, token: &str) {
        let field = self.element("#token").await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{field}/clear"),
            serde_json::json!({}),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{field}/value"),
            serde_json::json!({ "text": token }),
        )
        .await;
        self.click("#login button[type=submit]").await;
    }

    async fn wait_for(&self, what: &str, script: &str, ok: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.js(script).await;
            let s = v.as_str().unwrap_or_default();
            if ok(s) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waiting for {what}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self
            .http
            .get(format!("{}/screenshot", self.session))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap()
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_the_dashboard_show_real_figures() {
    let env = TestEnv::new(Default::default()).await;
    let port = switchyard_servers::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut vars = env.child_env();
    for (k, v) in common::SINGLE_ROUTES {
        vars.push((k.into(), v.into()));
    }
    env.bus.ensure_streams(&env.config()).await.unwrap();
    let _worker = common::Worker(
        common::switchyard(&vars)
            .args(["worker", "--metrics-listen", &listen])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let n = 30;
    let js = common::jobs("dash", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    assert!(
        switchyard::enqueue::wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );

    // Prometheus: this process finished the 30 jobs and made their calls.
    // Every figure needs a token (Prometheus sends it as a bearer token).
    switchyard::providers::http::install_tls_provider();
    let token = {
        let out = common::switchyard(&env.child_env())
            .args(["token", "create", "--name", "prometheus", "--scope", "read"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let base = format!("http://{listen}");
    let anonymous = reqwest::Client::new();
    for path in ["/metrics", "/api/stats"] {
        let r = anonymous.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
    }
    let scrape = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let metrics = scrape().await;
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    assert_eq!(
        sum("switchyard_jobs_finished_total{"),
        n as f64,
        "{metrics}"
    );
    assert_eq!(sum("switchyard_jobs_received_total{"), n as f64);
    assert_eq!(
        sum("switchyard_calls_total{") as i64,
        env.count("SELECT count(*) FROM calls").await
    );
    assert!(sum("switchyard_cost_usd_total{") > 0.0);
    assert!(metrics.contains("# TYPE switchyard_call_latency_seconds histogram"));
    assert!(metrics.contains("switchyard_database_up 1"));
    // The job and call rollers report how far behind their rolled rows end
    // (their first looks run at start; nothing here is old enough to be
    // dirty).
    common::wait_until(Duration::from_secs(15), "the job rollup gauges", || async {
        let m = scrape().await;
        m.lines()
            .any(|l| l == "switchyard_job_rollups_dirty_hours 0")
            && m.lines()
                .any(|l| l.starts_with("switchyard_job_rollups_lag_seconds "))
            && m.lines()
                .any(|l| l.starts_with("switchyard_call_rollups_lag_seconds "))
    })
    .await;
    // Queue depths are polled every 2 s: wait for a poll after the drain.
    common::wait_until(Duration::from_secs(15), "queue depths of zero", || async {
        let s: serde_json::Value = http
            .get(format!("{base}/api/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let q = &s["queue"];
        q["jobs"]["support"] == 0
            && q["jobs"].as_object().unwrap().values().all(|v| v == 0)
            && q["lanes"].as_object().unwrap().values().all(|v| v == 0)
    })
    .await;
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("switchyard_queue_depth{queue=\"jobs\",category=\"support\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_queue_depth{queue=\"lane\",provider=\"openai\"} 0"),
        "{m}"
    );

    let stats: serde_json::Value = http
        .get(format!("{base}/api/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let today: i64 = stats["jobs_today"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[1].as_i64().unwrap())
        .sum();
    assert_eq!(today, n as i64, "{stats}");
    let cost: String = sqlx::query_scalar("SELECT sum(cost_usd)::text FROM calls")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let cost = rust_decimal::Decimal::from_str_exact(&cost)
        .unwrap()
        .normalize();
    assert_eq!(
        rust_decimal::Decimal::from_str_exact(stats["cost_today_usd"].as_str().unwrap())
            .unwrap()
            .normalize(),
        cost,
        "spent today: {stats}"
    );
    // Savings of the last 24 hours, measured as `switchyard report` does.
    assert_eq!(stats["baseline_model"], "gpt-4o", "{stats}");
    let total = stats["savings_last_24h"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["category"] == "total")
        .unwrap_or_else(|| panic!("a total line: {stats}"));
    let answered = env
        .count("SELECT count(*) FROM job_costs WHERE outcome = 'answered'")
        .await;
    assert_eq!(total["jobs"].as_i64(), Some(answered));
    let (actual, baseline): (String, String) = sqlx::query_as(
        "SELECT sum(actual_cost_usd)::text, sum(baseline_cost_usd)::text
         FROM savings_by_category WHERE baseline_model = 'gpt-4o'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let dec = |s: &str| {
        rust_decimal::Decimal::from_str_exact(s)
            .unwrap()
            .normalize()
    };
    assert_eq!(
        dec(total["actual_cost_usd"].as_str().unwrap()),
        dec(&actual)
    );
    assert_eq!(
        dec(total["baseline_cost_usd"].as_str().unwrap()),
        dec(&baseline)
    );

    // The page in a real browser (headless Chromium driven by
    // ChromeDriver over WebDriver): without a token the login form and no
    // figure; a wrong token is refused; the right one, typed into the form,
    // shows the real figures, and the token never appears in the URL.
    let driver = chromedriver();
    if have(
        "chromium and chromedriver (apt install chromium chromium-driver)",
        chromium().is_some() && driver.is_some(),
    ) {
        let wd = WebDriver::start(driver.unwrap(), chromium().unwrap()).await;
        wd.go(&format!("{base}/")).await;
        assert!(
            wd.js("return !document.getElementById('login').hidden")
                .await
                == true
        );
        assert!(
            wd.js("return document.getElementById('board').hidden")
                .await
                == true
        );
        assert_eq!(
            wd.text("jobs-today").await,
            "–",
            "no figure before signing in"
        );

        wd.sign_in("sy_not-a-token").await;
        wd.wait_for(
            "the refusal",
            "return document.getElementById('login-error').textContent",
            |v| v == "the token was refused",
        )
        .await;
        assert_eq!(wd.text("jobs-today").await, "–");

        wd.sign_in(&token).await;
        wd.wait_for(
            "the figures",
            "return document.getElementById('jobs-today').textContent",
            |v| v == n.to_string().as_str(),
        )
        .await;
        assert!(
            wd.js("return document.getElementById('login').hidden")
                .await
                == true
        );
        let shown = wd.text("cost-today").await;
        assert_eq!(
            dec(shown.trim_start_matches('$')),
            cost,
            "spent today: {shown}"
        );
        let url = wd.js("return location.href").await;
        assert!(!url.as_str().unwrap().contains(&token), "{url}");
        assert!(
            wd.js("return sessionStorage.getItem('switchyard.token')")
                .await
                == token.as_str(),
            "kept in the tab's session"
        );
        // A reload keeps the session; signing out forgets it.
        wd.go(&format!("{base}/")).await;
        wd.wait_for(
            "the figures after a reload",
            "return document.getElementById('jobs-today').textContent",
            |v| v == n.to_string().as_str(),
        )
        .await;
        let png = wd.screenshot().await;
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
        std::fs::write(
            std::env::temp_dir().join(format!("{}-dashboard.png", env.name)),
            &png,
        )
        .unwrap();
        wd.click("#logout").await;
        assert!(wd
            .js("return sessionStorage.getItem('switchyard.token')")
            .await
            .is_null());
        assert!(
            wd.js("return !document.getElementById('login').hidden")
                .await
                == true
        );
        wd.quit().await;
    }
    env.cleanup().await;
}
