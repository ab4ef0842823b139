//! The `switchyard` binary as a user runs it: bad config, a worker killed
//! with SIGKILL mid-batch and restarted, a graceful SIGTERM, and the
//! enqueue/report commands.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{jobs, spawn_worker, switchyard, wait_until, TestEnv, Worker};
use switchyard::enqueue::{publish_jobs, wait_finished};
use switchyard::sim::SimProfile;

/// Wait for a child to exit, with a deadline.
async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shipped binary allocates with jemalloc under the options
/// `switchyard::memory` documents (one arena, small-size thread caches,
/// a background purge), and an operator can still override them from the
/// environment: asked for its statistics, jemalloc prints the options it
/// runs with when the process exits.
#[test]
fn the_binary_allocates_with_jemalloc_as_configured() {
    let out = switchyard(&[])
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true,dirty_decay_ms:5000")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    let option = |name: &str| {
        stats
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("opt.{name}: ")))
            .unwrap_or_else(|| panic!("no opt.{name} in jemalloc's statistics:\n{stats}"))
            .to_string()
    };
    assert_eq!(option("narenas"), "1");
    assert_eq!(option("tcache_max"), "4096");
    assert!(option("background_thread").starts_with("true"));
    // The environment is read after the compiled-in options, so it wins.
    assert!(option("dirty_decay_ms").starts_with("5000"));
}

#[test]
fn bad_config_fails_at_start_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("sy-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    let text = common::SHIPPED_CONFIG.replace("rpm = 5000", "rmp = 5000");
    std::fs::write(&path, text).unwrap();
    let out = switchyard(&[])
        .args(["--config", path.to_str().unwrap(), "worker"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("providers.openai") && err.contains("rmp"),
        "{err}"
    );

    // A bad environment override is named too.
    let out = switchyard(&[("SWITCHYARD_PROVIDERS__GEMINI__TPM".into(), "lots".into())])
        .arg("worker")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("providers.gemini.tpm"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run from a directory without `config/`, and given no config path, the
/// binary uses the shipped config built into it (and says so); a path given
/// explicitly that does not exist is still an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_works_from_any_directory_with_the_shipped_config() {
    let env = TestEnv::new(Default::default()).await;
    let elsewhere = std::env::temp_dir().join(format!("sy-anywhere-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.current_dir(&elsewhere)
            .env_remove("SWITCHYARD_CONFIG")
            .env("DATABASE_URL", &env.db_url)
            .env("RUST_LOG", "info")
            .args(args);
        cmd.output().unwrap()
    };
    let out = run(&["migrate"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("shipped config"), "{err}");
    let out = run(&["--config", "config/switchyard.toml", "migrate"]);
    assert!(
        !out.status.success(),
        "an explicit path that is missing fails"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read config/switchyard.toml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&elsewhere);
    env.cleanup().await;
}

/// The docs never suggest serving `/metrics` and the dashboard (spend
/// figures, unauthenticated) on a non-loopback address.
#[test]
fn no_doc_suggests_serving_spend_data_beyond_loopback() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![root.join("README.md"), root.join("config/switchyard.toml")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        docs.push(e.unwrap().path());
    }
    for path in docs {
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let serves = line.contains("metrics-listen") || line.contains("listen =");
            assert!(
                !(serves && line.contains("0.0.0.0")),
                "{}:{}: {line}",
                path.display(),
                n + 1
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_batch_loses_nothing_and_duplicates_nothing() {
    // Slow enough (24 calls in flight, 100-200 ms each) that the kill lands mid-run.
    let env = TestEnv::new(SimProfile {
        latency_ms: 100,
        jitter_ms: 100,
        ..Default::default()
    })
    .await;
    let mut child_env = env.child_env();
    for p in ["OPENAI", "ANTHROPIC", "GEMINI"] {
        child_env.push((
            format!("SWITCHYARD_PROVIDERS__{p}__MAX_CONCURRENCY"),
            "8".into(),
        ));
    }
    // Short ack wait so the killed worker's unacked messages come back
    // quickly, and a short provider timeout: the killed worker's calls count
    // as under way (no second call) for that plus 10 s.
    child_env.push(("SWITCHYARD_NATS__ACK_WAIT_SECS".into(), "3".into()));
    for p in ["OPENAI", "ANTHROPIC", "GEMINI"] {
        child_env.push((
            format!("SWITCHYARD_PROVIDERS__{p}__TIMEOUT_SECS"),
            "3".into(),
        ));
    }
    env.bus.ensure_streams(&env.config()).await.unwrap();
    let worker = spawn_worker(&child_env);

    let js = jobs("kill", 600);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    publish_jobs(&env.bus, &js, None).await.unwrap();
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(60), "first results", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM results")
                .fetch_one(&pool)
                .await
                .unwrap()
                >= 60
        }
    })
    .await;
    drop(worker); // SIGKILL: no drain, no acks
    let done_at_kill = env.count("SELECT count(*) FROM results").await;
    assert!(done_at_kill < 600, "killed mid-run ({done_at_kill} done)");

    let mut worker = spawn_worker(&child_env);
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "every job finished after the restart"
    );
    assert_eq!(env.count("SELECT count(*) FROM results").await, 600);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .await,
        600
    );
    // No job was recorded (or paid) as answered twice.
    assert_eq!(
        env.count("SELECT count(*) FROM (SELECT job_id FROM calls WHERE outcome = 'ok' GROUP BY job_id, step HAVING count(*) > 1) d")
            .await,
        0
    );

    // SIGTERM: a graceful stop exits 0.
    let pid = worker.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait_exit(&mut worker.0, Duration::from_secs(40)).await;
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_waits_for_jobs_and_report_prints_them() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(env.config()).await;
    let dir = std::env::temp_dir().join(format!("sy-enq-{}", env.name));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jobs.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..30 {
        // Half with ids, half without (enqueue assigns one); categories from the line.
        let cat = ["support", "sales", "lookup"][i % 3];
        if i % 2 == 0 {
            writeln!(
                f,
                r#"{{"id":"cli-{i}","category":"{cat}","prompt":"hello {i}"}}"#
            )
            .unwrap();
        } else {
            writeln!(
                f,
                r#"{{"category":"{cat}","messages":[{{"role":"user","content":"hi {i}"}}]}}"#
            )
            .unwrap();
        }
    }
    drop(f);
    let env_vars = env.child_env();
    let path_s = path.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        switchyard(&env_vars)
            .args(["enqueue", &path_s, "--wait", "--timeout-secs", "60"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --wait returned only once all 30 were terminal.
    assert_eq!(env.count("SELECT count(*) FROM results").await, 30);

    let env_vars = env.child_env();
    let out = tokio::task::spawn_blocking(move || {
        switchyard(&env_vars)
            .args(["report", "--format", "json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is JSON only");
    assert_eq!(report["jobs_by_status"][0]["status"], "succeeded");
    assert_eq!(report["jobs_by_status"][0]["jobs"], 30);
    assert_eq!(report["by_category"].as_array().unwrap().len(), 3);

    let env_vars = env.child_env();
    let out = tokio::task::spawn_blocking(move || {
        switchyard(&env_vars)
            .args(["report", "--format", "csv"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("section,key,model,jobs,calls"));
    assert!(
        csv.lines().any(|l| l.starts_with("total,total,,30,")),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("savings,total,gpt-4o,30,")),
        "{csv}"
    );

    let _ = std::fs::remove_dir_all(&dir);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_never_reach_logs_or_the_database() {
    const KEYS: [(&str, &str); 3] = [
        ("OPENAI_API_KEY", "sk-test-DoNotLeak-5f3a9c27e1"),
        ("ANTHROPIC_API_KEY", "sk-ant-test-DoNotLeak-88b2c4"),
        ("GEMINI_API_KEY", "AIzaTest-DoNotLeak-0c9d1e7f"),
    ];
    let env = TestEnv::new(SimProfile {
        error_rate: 0.5,
        ..Default::default()
    })
    .await;
    env.bus.ensure_streams(&env.config()).await.unwrap();
    let mut vars = env.child_env();
    for (var, key) in KEYS {
        vars.push((var.into(), key.into()));
    }
    vars.push(("SWITCHYARD_RETRY__BASE_DELAY_MS".into(), "10".into()));
    let mut child = Worker(
        switchyard(&vars)
            .arg("worker")
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Drain stderr while the worker runs, so it never blocks on a full pipe.
    let mut stderr = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
        logs
    });
    let js = jobs("key", 60);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    publish_jobs(&env.bus, &js, None).await.unwrap();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    // The keys were in play: every lane sent its provider's header.
    let ledger = env.sim.ledger();
    assert!(ledger.iter().all(|e| e.has_auth));
    assert!(
        ledger.iter().any(|e| e.status == 500),
        "some calls failed, so errors were logged"
    );

    let pid = child.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    wait_exit(&mut child.0, Duration::from_secs(30)).await;
    let logs = reader.join().unwrap();
    assert!(logs.contains("gpt-4.1"), "debug logs were captured");
    for (var, key) in KEYS {
        assert!(!logs.contains(key), "{var} appeared in the logs");
        let leaked = env
            .count(&format!(
                "SELECT (SELECT count(*) FROM calls WHERE calls::text LIKE '%{key}%')
                      + (SELECT count(*) FROM jobs WHERE jobs::text LIKE '%{key}%')
                      + (SELECT count(*) FROM results WHERE results::text LIKE '%{key}%')
                      + (SELECT count(*) FROM dead_letters WHERE dead_letters::text LIKE '%{key}%')"
            ))
            .await;
        assert_eq!(leaked, 0, "{var} reached the database");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_killed_mid_run_resumes_at_the_first_unfinished_stage() {
    // Stage `refine` runs on the OpenAI lane, which answers slowly: the kill
    // lands after `draft` is recorded and while `refine` is in flight.
    let mut profile = SimProfile::default();
    profile.formats.insert(
        switchyard::sim::Format::Openai,
        SimProfile {
            latency_ms: 1500,
            ..Default::default()
        },
    );
    let env = TestEnv::new(profile).await;
    let dir = std::env::temp_dir().join(format!("sy-pipe-{}", env.name));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("switchyard.toml");
    let text = format!(
        "{}\n[categories.pipe]\nroute = {{ kind = \"pipeline\", stages = [\n  \
         {{ name = \"draft\", target = \"gemini-2.5-flash-lite\" }},\n  \
         {{ name = \"refine\", target = \"gpt-4.1\" }},\n  \
         {{ name = \"final\", target = \"claude-haiku-4-5\", prompt = \"{{{{stages.draft}}}} / {{{{previous}}}}\" }} ] }}\n",
        common::SHIPPED_CONFIG
    );
    std::fs::write(&cfg_path, text).unwrap();
    let mut vars = env.child_env();
    vars.retain(|(k, _)| k != "SWITCHYARD_CONFIG");
    vars.push((
        "SWITCHYARD_CONFIG".into(),
        cfg_path.to_str().unwrap().into(),
    ));
    vars.push(("SWITCHYARD_NATS__ACK_WAIT_SECS".into(), "3".into()));
    // The killed worker's `refine` calls count as under way for the
    // provider's timeout plus 10 s (no second call meanwhile): keep it short.
    for p in ["OPENAI", "ANTHROPIC", "GEMINI"] {
        vars.push((
            format!("SWITCHYARD_PROVIDERS__{p}__TIMEOUT_SECS"),
            "5".into(),
        ));
    }
    let cfg = switchyard::config::Config::load(Some(&cfg_path)).unwrap();
    env.bus.ensure_streams(&cfg).await.unwrap();

    let worker = spawn_worker(&vars);
    let js: Vec<switchyard::enqueue::Outgoing> = (0..3)
        .map(|i| {
            let e = switchyard::envelope::JobEnvelope::prompt(
                format!("pipe-{i}"),
                "pipe",
                format!("Write about topic {i}"),
            );
            switchyard::enqueue::Outgoing::from_envelope(&e).unwrap()
        })
        .collect();
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    publish_jobs(&env.bus, &js, None).await.unwrap();
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(30), "every draft recorded", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM steps WHERE step = 0")
                .fetch_one(&pool)
                .await
                .unwrap()
                == 3
        }
    })
    .await;
    drop(worker); // SIGKILL while `refine` is in flight
    assert_eq!(
        env.count("SELECT count(*) FROM steps WHERE step = 1").await,
        0,
        "killed mid-pipeline"
    );

    let second = spawn_worker(&vars);
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    assert_eq!(env.count("SELECT count(*) FROM results").await, 3);
    assert_eq!(
        env.count("SELECT count(*) FROM steps WHERE outcome = 'ok'")
            .await,
        9
    );
    // The recorded stage was neither re-run nor re-paid.
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE step = 0").await,
        3
    );
    let drafts = env
        .sim
        .ledger()
        .iter()
        .filter(|e| e.model == "gemini-2.5-flash-lite")
        .count();
    assert_eq!(drafts, 3, "the provider was asked for each draft once");
    let _ = std::fs::remove_dir_all(&dir);
    drop(second); // stopped before its database and streams go
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_a_new_worker_finishes_exactly_once() {
    let env = TestEnv::new(SimProfile {
        latency_ms: 300,
        jitter_ms: 200,
        ..Default::default()
    })
    .await;
    let mut child_env = env.child_env();
    child_env.push(("SWITCHYARD_NATS__ACK_WAIT_SECS".into(), "10".into()));
    env.bus.ensure_streams(&env.config()).await.unwrap();
    let mut worker = spawn_worker(&child_env);
    let js = jobs("drain", 300);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    publish_jobs(&env.bus, &js, None).await.unwrap();
    wait_until(Duration::from_secs(60), "work under way", || async {
        env.count("SELECT count(*) FROM results").await >= 20
    })
    .await;
    // SIGTERM with calls in flight: they finish and commit, the rest stays
    // in NATS, and the worker exits 0 within its drain deadline.
    let pid = worker.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait_exit(&mut worker.0, Duration::from_secs(40)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "graceful shutdown under load exits 0"
    );
    let done_at_stop = env.count("SELECT count(*) FROM results").await;
    assert!(done_at_stop < 300, "stopped mid-run ({done_at_stop} done)");
    // Nothing half-written: every answered call has its row, and every job
    // with a result is marked succeeded.
    let answered = env.sim.ledger().iter().filter(|e| e.status == 200).count() as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE outcome = 'ok'")
            .await,
        answered
    );
    assert_eq!(
        env.count("SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.status <> 'succeeded'")
            .await,
        0
    );
    let second = spawn_worker(&child_env);
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(120), None)
            .await
            .unwrap()
    );
    assert_eq!(env.count("SELECT count(*) FROM results").await, 300);
    let answered = env.sim.ledger().iter().filter(|e| e.status == 200).count() as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE outcome = 'ok'")
            .await,
        answered,
        "every answer recorded once"
    );
    drop(second); // stopped before its database and streams go
    env.cleanup().await;
}
