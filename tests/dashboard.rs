//! The worker's `/metrics` (Prometheus text) and live dashboard: a worker
//! process serves them; the dashboard is checked in headless Chromium
//! (Debian's `chromium`) for the real figures, and screenshotted.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{have, TestEnv};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "/usr/bin/chromium"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Headless Chromium with the flags this machine's closed network needs.
fn headless(exe: &str, profile: &std::path::Path) -> Command {
    let mut c = Command::new(exe);
    c.args([
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
        "--virtual-time-budget=6000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
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
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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

    // The page, rendered by a real browser without a token: the login
    // form, and no figure (the figures need the token the form keeps in the
    // tab's session; logging in through the form in Chromium is not driven
    // here: `--dump-dom` cannot type).
    if have("chromium (apt install chromium)", chromium().is_some()) {
        let exe = chromium().unwrap();
        let dir = std::env::temp_dir().join(format!("{}-chromium", env.name));
        let dom = headless(exe, &dir)
            .arg("--dump-dom")
            .arg(format!("{base}/"))
            .output()
            .unwrap();
        let dom = String::from_utf8_lossy(&dom.stdout);
        assert!(
            dom.contains("<form id=\"login\">"),
            "the login form shows: {dom}"
        );
        assert!(dom.contains("<div id=\"board\" hidden=\"\">"), "{dom}");
        assert!(
            dom.contains("<b id=\"jobs-today\">–</b>"),
            "no figure: {dom}"
        );
        assert!(
            dom.contains("<div id=\"status\">loading…</div>"),
            "nothing fetched: {dom}"
        );
        let shot = dir.join("dashboard.png");
        let out = headless(exe, &dir)
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("{base}/"))
            .output()
            .unwrap();
        let png = std::fs::read(&shot).unwrap_or_else(|e| {
            panic!(
                "no screenshot ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    env.cleanup().await;
}
