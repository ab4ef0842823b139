//! The analysts' views (migration 0006) on known rows, and `switchyard
//! feedback` storing ratings against results.

mod common;

use common::TestEnv;
use rust_decimal::Decimal;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Two support jobs (one fell back from Haiku to Sonnet after a retry),
/// three sales jobs (ok, waiting for review with an `unknown` call, failed),
/// on two days; four ratings.
const FIXTURE: &str = r#"
INSERT INTO jobs (id, category, status, route_decision) VALUES
  ('j1', 'support', 'succeeded', '{"kind": "fallback"}'),
  ('j2', 'support', 'succeeded', '{"kind": "fallback"}'),
  ('j3', 'sales', 'succeeded', '{"kind": "single"}'),
  ('j4', 'sales', 'needs_review', '{"kind": "single", "review": "low confidence"}'),
  ('j5', 'sales', 'failed', '{"kind": "single"}');
INSERT INTO steps (job_id, step, model, outcome) VALUES
  ('j1', 0, 'claude-haiku-4-5', 'failed'), ('j1', 1, 'claude-sonnet-4-5', 'ok'),
  ('j2', 0, 'claude-haiku-4-5', 'ok');
INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens, output_tokens,
                   cached_input_tokens, price_input_per_mtok, price_output_per_mtok,
                   price_cached_input_per_mtok, cost_usd, latency_ms, outcome, created_at) VALUES
  ('j1', 'support', 'anthropic', 'claude-haiku-4-5', 0, 1, 100, 0, 0, 1, 5, 0.1, 0.001, 100, 'terminal_error', '2026-11-01 10:00Z'),
  ('j1', 'support', 'anthropic', 'claude-sonnet-4-5', 1, 1, 100, 0, 0, 3, 15, 0.3, 0, 200, 'retryable_error', '2026-11-01 10:00Z'),
  ('j1', 'support', 'anthropic', 'claude-sonnet-4-5', 1, 2, 1000, 400, 0, 3, 15, 0.3, 0.010, 300, 'ok', '2026-11-01 23:59Z'),
  ('j2', 'support', 'anthropic', 'claude-haiku-4-5', 0, 1, 1000, 200, 0, 1, 5, 0.1, 0.002, 150, 'ok', '2026-11-01 00:00Z'),
  ('j3', 'sales', 'openai', 'gpt-4o-mini', 0, 1, 1000, 500, 0, 0.15, 0.6, 0.075, 0.0005, 50, 'ok', '2026-11-02 12:00Z'),
  ('j4', 'sales', 'openai', 'gpt-4o-mini', 0, 1, 1000, 1000, 0, 0.15, 0.6, 0.075, 0.0007, 0, 'unknown', '2026-11-02 12:00Z'),
  ('j5', 'sales', 'openai', 'gpt-4o-mini', 0, 1, 0, 0, 0, 0.15, 0.6, 0.075, 0, 20, 'terminal_error', '2026-11-02 12:00Z');
INSERT INTO results (job_id, category, output, model, cost_usd, input_tokens, output_tokens, latency_ms) VALUES
  ('j1', 'support', 'a', 'claude-sonnet-4-5', 0.011, 1200, 400, 1000),
  ('j2', 'support', 'b', 'claude-haiku-4-5', 0.002, 1000, 200, 500),
  ('j3', 'sales', 'c', 'gpt-4o-mini', 0.0005, 1000, 500, 200);
"#;

async fn fixture() -> TestEnv {
    let env = TestEnv::new(Default::default()).await;
    sqlx::raw_sql(FIXTURE).execute(&env.pool).await.unwrap();
    for (job, score) in [("j1", 5), ("j1", 3), ("j2", 2), ("j3", 4)] {
        switchyard::ops::feedback::record(&env.pool, job, score, Some("looked at it"))
            .await
            .unwrap();
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_usage_rates_and_cost_per_job() {
    let env = fixture().await;
    let p = &env.pool;

    type Daily = (String, String, String, i64, i64, i64, i64, Decimal, Decimal);
    let daily: Vec<Daily> = sqlx::query_as(
        "SELECT day::text, category, model, calls, ok_calls, error_calls, unknown_calls,
                input_tokens, cost_usd FROM cost_daily ORDER BY day, category, model",
    )
    .fetch_all(p)
    .await
    .unwrap();
    let row = |day: &str, cat: &str, model: &str, n: [i64; 4], input: i64, usd: &str| -> Daily {
        (
            day.into(),
            cat.into(),
            model.into(),
            n[0],
            n[1],
            n[2],
            n[3],
            Decimal::from(input),
            d(usd),
        )
    };
    assert_eq!(
        daily,
        vec![
            row(
                "2026-11-01",
                "support",
                "claude-haiku-4-5",
                [2, 1, 1, 0],
                1100,
                "0.003"
            ),
            row(
                "2026-11-01",
                "support",
                "claude-sonnet-4-5",
                [2, 1, 1, 0],
                1100,
                "0.010"
            ),
            row(
                "2026-11-02",
                "sales",
                "gpt-4o-mini",
                [3, 1, 1, 1],
                2000,
                "0.0012"
            ),
        ]
    );

    let usage: Vec<(String, String, i64, Decimal)> = sqlx::query_as(
        "SELECT category, model, results, share FROM model_usage ORDER BY category, model",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        usage,
        vec![
            ("sales".into(), "gpt-4o-mini".into(), 1, d("1.0000")),
            ("support".into(), "claude-haiku-4-5".into(), 1, d("0.5000")),
            ("support".into(), "claude-sonnet-4-5".into(), 1, d("0.5000")),
        ]
    );

    type Rates = (
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        Decimal,
        Decimal,
        Decimal,
        Decimal,
    );
    let rates: Vec<Rates> = sqlx::query_as(
        "SELECT category, jobs, succeeded, failed, needs_review, calls,
                fallback_rate, retry_rate, error_rate, review_rate
         FROM category_rates ORDER BY category",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        rates,
        vec![
            (
                "sales".into(),
                3,
                1,
                1,
                1,
                3,
                d("0"),
                d("0"),
                d("0.6667"),
                d("0.3333")
            ),
            (
                "support".into(),
                2,
                2,
                0,
                0,
                4,
                d("0.5"),
                d("0.25"),
                d("0.5"),
                d("0")
            ),
        ]
    );

    let per_job: Vec<(String, i64, Decimal, Decimal)> = sqlx::query_as(
        "SELECT category, jobs, cost_usd, cost_per_job_usd FROM cost_per_job ORDER BY category",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        per_job,
        vec![
            ("sales".into(), 3, d("0.0012"), d("0.0004")),
            ("support".into(), 2, d("0.013"), d("0.0065")),
        ]
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_percentiles_and_satisfaction() {
    let env = fixture().await;
    let p = &env.pool;
    let by_model: Vec<(String, i64, f64, f64, f64)> = sqlx::query_as(
        "SELECT model, calls, p50_ms, p95_ms, p99_ms FROM latency_by_model ORDER BY model",
    )
    .fetch_all(p)
    .await
    .unwrap();
    // From the rollups' histograms (migration 0023): each percentile is
    // the representative latency of its bucket, within 9% of the call's
    // own (150, 300 and 50 ms).
    assert_eq!(
        by_model,
        vec![
            ("claude-haiku-4-5".into(), 1, 138.6, 138.6, 138.6),
            ("claude-sonnet-4-5".into(), 1, 278.2, 278.2, 278.2),
            ("gpt-4o-mini".into(), 1, 48.4, 48.4, 48.4),
        ]
    );
    let exact: Vec<(String, i64, f64, f64, f64)> = sqlx::query_as(
        "SELECT model, calls, p50_ms, p95_ms, p99_ms FROM latency_by_model_exact ORDER BY model",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        exact,
        vec![
            ("claude-haiku-4-5".into(), 1, 150.0, 150.0, 150.0),
            ("claude-sonnet-4-5".into(), 1, 300.0, 300.0, 300.0),
            ("gpt-4o-mini".into(), 1, 50.0, 50.0, 50.0),
        ]
    );
    type Lat = (String, f64, f64, i64, f64, f64);
    let by_cat: Vec<Lat> = sqlx::query_as(
        "SELECT category, call_p50_ms, call_p95_ms, results, e2e_p50_ms, e2e_p99_ms
         FROM latency_by_category ORDER BY category",
    )
    .fetch_all(p)
    .await
    .unwrap();
    // Support's answered calls took 150 and 300 ms, its results 500 and
    // 1000 ms end to end: every percentile comes from the rollups'
    // histograms, the representative value of the bucket of 150, 300, 500
    // and 1000 ms (sales' one result: 200 ms).
    assert_eq!(
        by_cat,
        vec![
            ("sales".into(), 48.4, 48.4, 1, 196.4, 196.4),
            ("support".into(), 138.6, 278.2, 2, 468.5, 938.0),
        ]
    );

    let sat: Vec<(String, i64, Decimal, i64, i64)> = sqlx::query_as(
        "SELECT model, ratings, avg_score, good, bad FROM satisfaction_by_model ORDER BY model",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        sat,
        vec![
            ("claude-haiku-4-5".into(), 1, d("2.000"), 0, 1),
            ("claude-sonnet-4-5".into(), 2, d("4.000"), 1, 0),
            ("gpt-4o-mini".into(), 1, d("4.000"), 1, 0),
        ]
    );
    let routes: Vec<(String, String, String, i64, Decimal)> = sqlx::query_as(
        "SELECT category, variant, route, ratings, avg_score FROM satisfaction_by_route ORDER BY 1",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        routes,
        vec![
            ("sales".into(), "-".into(), "single".into(), 1, d("4.000")),
            (
                "support".into(),
                "-".into(),
                "fallback".into(),
                3,
                d("3.333")
            ),
        ]
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_command_rates_results_and_refuses_what_it_cannot_rate() {
    let env = fixture().await;
    let vars = env.child_env();
    let run = |args: &[&str]| {
        let out = common::switchyard(&vars).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stdout, _) = run(&["feedback", "j3", "--score", "1", "--comment", "wrong tone"]);
    assert!(ok, "{stdout}");
    assert!(stdout.contains("job j3 scored 1"), "{stdout}");
    let (ok, _, err) = run(&["feedback", "j3", "--score", "6"]);
    assert!(!ok && err.contains("--score must be 1 to 5"), "{err}");
    let (ok, _, err) = run(&["feedback", "j5", "--score", "3"]);
    assert!(
        !ok && err.contains("no result to rate (status failed)"),
        "{err}"
    );
    let (ok, _, err) = run(&["feedback", "nope", "--score", "3"]);
    assert!(!ok && err.contains("no job `nope`"), "{err}");
    let stored: Vec<(i16, Option<String>)> =
        sqlx::query_as("SELECT score, comment FROM feedback WHERE job_id = 'j3' ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        vec![
            (4, Some("looked at it".into())),
            (1, Some("wrong tone".into()))
        ]
    );
    let avg: Decimal = sqlx::query_scalar(
        "SELECT avg_score FROM satisfaction_by_model WHERE model = 'gpt-4o-mini'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(avg, d("2.500"));
    env.cleanup().await;
}

/// A demo run on the shipped config: the report's savings (from `switchyard
/// report --format json`) equal the SQL views' totals, every succeeded job's
/// result is attributed to the call that answered it, and every cent spent
/// is in the savings or shown apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_report_and_the_savings_views_agree() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = env.config();
    let outcome = switchyard::demo::run(
        cfg.clone(),
        env.pool.clone(),
        &common::nats_url(),
        90,
        switchyard::sim::SimProfile::demo(),
        std::time::Duration::from_secs(120),
    )
    .await
    .unwrap();
    assert!(outcome.finished, "the demo finished");
    let r = &outcome.report;
    assert_eq!(r.baseline_model.as_deref(), Some("gpt-4o"));

    // The answer of every succeeded job is a recorded step's (or, for a
    // single call, the job's only answered call's) output.
    let unattributed = env
        .count(
            "SELECT count(*) FROM job_costs
             WHERE status = 'succeeded' AND outcome <> 'answered'",
        )
        .await;
    assert_eq!(unattributed, 0);
    let mismatched = env
        .count(
            "SELECT count(*) FROM results r JOIN steps s
                 ON s.job_id = r.job_id AND s.step = r.answer_step
             WHERE s.output <> r.output OR s.model <> r.model",
        )
        .await;
    assert_eq!(mismatched, 0);
    let pipeline_answers = env
        .count(
            "SELECT count(*) FROM job_costs
             WHERE route = 'pipeline' AND outcome = 'answered' AND answer_step <> 2",
        )
        .await;
    assert_eq!(
        pipeline_answers, 0,
        "a pipeline's answer is its last stage's"
    );

    // The command's JSON, and the views' totals.
    let out = common::switchyard(&env.child_env())
        .args(["report", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let field = |k: &str| d(v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}")));
    type Totals = (i64, Decimal, Decimal, Decimal, Decimal, Decimal);
    let view: Totals = sqlx::query_as(
        "SELECT sum(jobs)::int8, sum(actual_cost_usd), sum(baseline_cost_usd), sum(savings_usd),
                sum(overhead_cost_usd), sum(no_result_cost_usd)
         FROM savings_by_category WHERE baseline_model = 'gpt-4o'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(view.0 > 80, "most of the 90 jobs answered: {}", view.0);
    assert_eq!(v["savings_jobs"].as_i64(), Some(view.0));
    assert_eq!(field("actual_cost_usd"), view.1.normalize());
    assert_eq!(field("baseline_cost_usd"), view.2.normalize());
    assert_eq!(field("savings_usd"), view.3.normalize());
    let total = &v["savings_total"];
    let total_field = |k: &str| d(total[k].as_str().unwrap_or_else(|| panic!("{k}")));
    assert_eq!(total_field("overhead_cost_usd"), view.4.normalize());
    assert_eq!(total_field("no_result_cost_usd"), view.5.normalize());
    assert_eq!(
        (r.baseline_cost_usd, r.actual_cost_usd),
        (Some(view.2.normalize()), Some(view.1.normalize()))
    );
    // Every cent spent is in the savings or shown apart.
    assert_eq!(
        total_field("actual_cost_usd")
            + total_field("person_cost_usd")
            + total_field("no_result_cost_usd"),
        d(v["total"]["cost_usd"].as_str().unwrap())
    );
    // The what-if per model, against the view.
    let what_if: Vec<(String, String, Decimal)> =
        sqlx::query_as("SELECT category, model, cost_usd FROM what_if_by_model")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        what_if.len(),
        r.savings_by_category.len() * cfg.models.len()
    );
    for (category, model, cost) in what_if {
        let line = v["what_if"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["category"] == category.as_str() && w["model"] == model.as_str())
            .unwrap_or_else(|| panic!("what-if {category} {model}"));
        assert_eq!(d(line["cost_usd"].as_str().unwrap()), cost.normalize());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_windows_and_categories() {
    let env = fixture().await;
    let vars = env.child_env();
    let report = |args: &[&str]| -> Result<serde_json::Value, String> {
        let out = common::switchyard(&vars)
            .args(["report", "--format", "json"])
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    };
    let total = |v: &serde_json::Value| {
        (
            v["total"]["calls"].as_i64().unwrap(),
            d(v["total"]["cost_usd"].as_str().unwrap()),
        )
    };
    let all = report(&[]).unwrap();
    assert_eq!(total(&all), (7, d("0.0142")));
    let sales = report(&["--since", "2026-11-02", "--category", "sales"]).unwrap();
    assert_eq!(total(&sales), (3, d("0.0012")));
    assert_eq!(sales["savings_by_category"].as_array().unwrap().len(), 1);
    let day1 = report(&["--until", "2026-11-02T00:00:00Z"]).unwrap();
    assert_eq!(total(&day1), (4, d("0.013")));
    // The fixture's calls are weeks old; its jobs were created just now.
    let recent = report(&["--since", "7d"]).unwrap();
    assert_eq!(total(&recent), (0, d("0")));
    let jobs: i64 = recent["jobs_by_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["jobs"].as_i64().unwrap())
        .sum();
    assert_eq!(jobs, 5);
    let err = report(&["--since", "yesterday"]).unwrap_err();
    assert!(err.contains("--since `yesterday`"), "{err}");
    let err = report(&["--until", "2026-13-45"]).unwrap_err();
    assert!(
        err.contains("--until `2026-13-45` is not a date or time"),
        "{err}"
    );
    let err = report(&["--baseline", "gpt-9"]).unwrap_err();
    assert!(err.contains("`gpt-9` is not one of `models`"), "{err}");
    env.cleanup().await;
}

/// `report --html`: one self-contained page (no script, no external
/// resource) whose inline SVG charts carry the fixture's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_is_self_contained_with_its_charts() {
    let env = fixture().await;
    let path = std::env::temp_dir().join(format!("{}.html", env.name));
    let out = common::switchyard(&env.child_env())
        .args(["report", "--html"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(html.starts_with("<!doctype html>"));
    for banned in [
        "<script", "src=", "href=", "http:", "https:", "@import", "url(",
    ] {
        assert!(!html.contains(banned), "the page must not contain {banned}");
    }
    assert_eq!(html.matches("<svg").count(), 3, "three charts");
    // Spend per day and model: one bar per (day, model) with spend, each
    // titled with its figure.
    for t in [
        "<title>2026-11-01 claude-haiku-4-5: $0.003</title>",
        "<title>2026-11-01 claude-sonnet-4-5: $0.01</title>",
        "<title>2026-11-02 gpt-4o-mini: $0.0012</title>",
    ] {
        assert!(html.contains(t), "missing {t}");
    }
    // Usage shares and latency percentiles.
    assert!(html.contains("<title>support claude-haiku-4-5: 1 results (50.0%)</title>"));
    // (300 ms, read from the rollups' histogram bucket: 278 ms)
    assert!(html.contains("<title>claude-sonnet-4-5 p95: 278 ms</title>"));
    // Savings against the baseline, and the total spent.
    assert!(html.contains("Savings against one gpt-4o call per answered job"));
    assert!(html.contains("What if one model alone had served each category"));
    assert!(html.contains("<b>$0.0142</b>"), "total spend shown");
    env.cleanup().await;
}

/// Retention: `switchyard prune` deletes what ended before the cutoff with
/// everything recorded about it, and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_old_finished_jobs_with_their_rows() {
    let env = fixture().await;
    sqlx::raw_sql(
        "UPDATE jobs SET finished_at = now() - interval '40 days' WHERE id IN ('j1', 'j3', 'j4');
         UPDATE jobs SET finished_at = now() - interval '2 days' WHERE id IN ('j2', 'j5');
         INSERT INTO jobs (id, category, status, created_at) VALUES ('old-running', 'sales', 'running', now() - interval '90 days');
         INSERT INTO dead_letters (source, subject, payload, reason, created_at) VALUES
           ('s:1', 'x.jobs.sales', 'x', 'bad', now() - interval '40 days'),
           ('s:2', 'x.jobs.sales', 'y', 'bad', now());
         INSERT INTO provider_batches (id, provider, model, state, flush_at, ended_at) VALUES
           ('syb_old', 'openai', 'gpt-4o-mini', 'ended', now(), now() - interval '40 days'),
           ('syb_new', 'openai', 'gpt-4o-mini', 'ended', now(), now() - interval '2 days'),
           ('syb_run', 'openai', 'gpt-4o-mini', 'submitted', now() - interval '60 days', NULL);
         INSERT INTO batch_items (batch_id, custom_id, job_id, step, attempt, call, state) VALUES
           ('syb_old', 'i0', 'j1', 0, 1, '{}', 'done'),
           ('syb_old', 'i1', 'j3', 0, 1, '{}', 'done'),
           ('syb_run', 'i0', 'old-running', 0, 1, '{}', 'pending');",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let run = |dry: bool| {
        let mut c = common::switchyard(&env.child_env());
        c.args(["prune", "--older-than-days", "30", "--batch", "2"]);
        if dry {
            c.arg("--dry-run");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let expected =
        "3 jobs, 5 calls, 2 steps, 2 results, 3 ratings, 0 webhook deliveries, 1 dead letters, \
                    1 provider batches with 2 items";
    let dry = run(true);
    assert!(dry.contains(&format!("would delete {expected}")), "{dry}");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs").await,
        6,
        "a dry run deletes nothing"
    );
    let done = run(false);
    assert!(done.contains(&format!("deleted {expected}")), "{done}");
    let left: Vec<String> = sqlx::query_scalar("SELECT id FROM jobs ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, ["j2", "j5", "old-running"]);
    assert_eq!(env.count("SELECT count(*) FROM calls").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM results").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM feedback").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 1);
    let batches: Vec<String> = sqlx::query_scalar("SELECT id FROM provider_batches ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        batches,
        ["syb_new", "syb_run"],
        "a running batch is kept, whatever its age"
    );
    assert_eq!(env.count("SELECT count(*) FROM batch_items").await, 1);
    env.cleanup().await;
}

/// `switchyard demo` with the default settings, where a real job waits on
/// the same (default) prefix: the demo's worker must not take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_never_takes_jobs_it_did_not_publish() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = env.config();
    env.bus.ensure_streams(&cfg).await.unwrap();
    let waiting = common::jobs("real-work", 3);
    switchyard::enqueue::publish_jobs(&env.bus, &waiting, None)
        .await
        .unwrap();
    let outcome = switchyard::demo::run(
        cfg,
        env.pool.clone(),
        &common::nats_url(),
        30,
        switchyard::sim::SimProfile::default(),
        std::time::Duration::from_secs(120),
    )
    .await
    .unwrap();
    assert!(outcome.finished, "the demo finished its own jobs");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'real-work-%'")
            .await,
        0,
        "the demo's worker took a job it did not publish"
    );
    let mut st = env
        .bus
        .js
        .get_stream(env.bus.names.jobs_stream())
        .await
        .unwrap();
    assert_eq!(
        st.info().await.unwrap().state.messages,
        3,
        "the jobs still wait"
    );
    env.cleanup().await;
}
