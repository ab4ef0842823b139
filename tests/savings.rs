//! Savings you can defend: on known rows for every routing pattern, the
//! report's baseline (one call per job on the baseline model), actual cost,
//! overhead split, the spend kept apart and the what-if per model match a
//! hand computation; the SQL views give the same numbers.

mod common;

use common::TestEnv;
use rust_decimal::Decimal;
use std::str::FromStr;
use switchyard::ops::report::{self, Filter, SavingsLine};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// One job per pattern, with the rows a worker writes for it.
///
/// - `s1` support, single: one gpt-4o-mini call.
/// - `f1` support, fallback: Haiku answered but was rejected, Sonnet timed
///   out once (`unknown`, charged) and then answered.
/// - `p1` sales, 3-stage pipeline: the last stage's answer is the result.
/// - `c1` lookup, consensus: three voters disagreed, the judge picked voter 1.
/// - `a1` published to `auto`: the classifier (step -1, category `auto`)
///   moved it to sales, single.
/// - `x1` sales, failed: a charged `unknown` call, then a terminal error.
/// - `h1` lookup, consensus that went to review; a person resolved it.
const ROWS: &str = r#"
INSERT INTO jobs (id, category, status, route_decision) VALUES
  ('s1', 'support', 'succeeded', '{"kind": "single"}'),
  ('f1', 'support', 'succeeded', '{"kind": "fallback"}'),
  ('p1', 'sales', 'succeeded', '{"kind": "pipeline"}'),
  ('c1', 'lookup', 'succeeded', '{"kind": "consensus", "plan": {"kind": "consensus", "voters": [{}, {}, {}], "min_agree": 2}}'),
  ('a1', 'sales', 'succeeded', '{"kind": "single", "classifier": {"category": "sales"}}'),
  ('x1', 'sales', 'failed', '{"kind": "single"}'),
  ('h1', 'lookup', 'succeeded', '{"kind": "consensus", "plan": {"kind": "consensus", "voters": [{}, {}, {}], "min_agree": 2}, "review": {"by": "ana"}}');
INSERT INTO steps (job_id, step, model, outcome, output) VALUES
  ('f1', 0, 'claude-haiku-4-5', 'failed', 'meh'), ('f1', 1, 'claude-sonnet-4-5', 'ok', 'F'),
  ('p1', 0, 'gpt-4o-mini', 'ok', 'd'), ('p1', 1, 'claude-sonnet-4-5', 'ok', 'r'),
  ('p1', 2, 'gemini-2.5-flash-lite', 'ok', 'P'),
  ('c1', 0, 'gemini-2.5-flash-lite', 'ok', 'x'), ('c1', 1, 'gpt-4o-mini', 'ok', 'C'),
  ('c1', 2, 'claude-haiku-4-5', 'ok', 'z'), ('c1', 3, 'gpt-4.1', 'ok', '{"answer": 2}');
INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens, output_tokens,
                   cached_input_tokens, cache_write_input_tokens, price_input_per_mtok,
                   price_output_per_mtok, price_cached_input_per_mtok, cost_usd, latency_ms, outcome) VALUES
  ('s1', 'support', 'openai', 'gpt-4o-mini', 0, 1, 1000, 300, 200, 0, 0.15, 0.6, 0.075, 0.0003, 10, 'ok'),
  ('f1', 'support', 'anthropic', 'claude-haiku-4-5', 0, 1, 500, 100, 0, 0, 1, 5, 0.1, 0.001, 10, 'ok'),
  ('f1', 'support', 'anthropic', 'claude-sonnet-4-5', 1, 1, 600, 0, 0, 0, 3, 15, 0.3, 0.002, 10, 'unknown'),
  ('f1', 'support', 'anthropic', 'claude-sonnet-4-5', 1, 2, 600, 200, 0, 100, 3, 15, 0.3, 0.0048, 10, 'ok'),
  ('p1', 'sales', 'openai', 'gpt-4o-mini', 0, 1, 400, 250, 100, 0, 0.15, 0.6, 0.075, 0.0002, 10, 'ok'),
  ('p1', 'sales', 'anthropic', 'claude-sonnet-4-5', 1, 1, 300, 280, 0, 0, 3, 15, 0.3, 0.005, 10, 'ok'),
  ('p1', 'sales', 'gemini', 'gemini-2.5-flash-lite', 2, 1, 320, 150, 0, 0, 0.1, 0.4, 0.01, 0.0001, 10, 'ok'),
  ('c1', 'lookup', 'gemini', 'gemini-2.5-flash-lite', 0, 1, 200, 60, 0, 0, 0.1, 0.4, 0.01, 0.00004, 10, 'ok'),
  ('c1', 'lookup', 'openai', 'gpt-4o-mini', 1, 1, 200, 40, 0, 0, 0.15, 0.6, 0.075, 0.00005, 10, 'ok'),
  ('c1', 'lookup', 'anthropic', 'claude-haiku-4-5', 2, 1, 220, 50, 0, 0, 1, 5, 0.1, 0.0005, 10, 'ok'),
  ('c1', 'lookup', 'openai', 'gpt-4.1', 3, 1, 500, 10, 0, 0, 2, 8, 0.5, 0.00108, 10, 'ok'),
  ('a1', 'auto', 'gemini', 'gemini-2.5-flash-lite', -1, 1, 150, 20, 0, 0, 0.1, 0.4, 0.01, 0.000023, 10, 'ok'),
  ('a1', 'sales', 'openai', 'gpt-4o-mini', 0, 1, 100, 80, 0, 0, 0.15, 0.6, 0.075, 0.000063, 10, 'ok'),
  ('x1', 'sales', 'openai', 'gpt-4o-mini', 0, 1, 900, 500, 0, 0, 0.15, 0.6, 0.075, 0.0004, 10, 'unknown'),
  ('x1', 'sales', 'openai', 'gpt-4o-mini', 0, 2, 900, 0, 0, 0, 0.15, 0.6, 0.075, 0, 10, 'terminal_error'),
  ('h1', 'lookup', 'gemini', 'gemini-2.5-flash-lite', 0, 1, 100, 30, 0, 0, 0.1, 0.4, 0.01, 0.0001, 10, 'ok'),
  ('h1', 'lookup', 'openai', 'gpt-4o-mini', 1, 1, 100, 30, 0, 0, 0.15, 0.6, 0.075, 0.0001, 10, 'ok'),
  ('h1', 'lookup', 'anthropic', 'claude-haiku-4-5', 2, 1, 100, 30, 0, 0, 1, 5, 0.1, 0.0001, 10, 'ok');
INSERT INTO results (job_id, category, output, model, cost_usd, input_tokens, output_tokens,
                     latency_ms, answer_step) VALUES
  ('s1', 'support', 'S', 'gpt-4o-mini', 0, 0, 0, 1, 0),
  ('f1', 'support', 'F', 'claude-sonnet-4-5', 0, 0, 0, 1, 1),
  ('p1', 'sales', 'P', 'gemini-2.5-flash-lite', 0, 0, 0, 1, 2),
  ('c1', 'lookup', 'C', 'gpt-4o-mini', 0, 0, 0, 1, 1),
  ('a1', 'sales', 'A', 'gpt-4o-mini', 0, 0, 0, 1, 0),
  ('h1', 'lookup', 'H', 'human', 0, 0, 0, 1, NULL);
INSERT INTO feedback (job_id, score) VALUES ('s1', 4), ('f1', 2);
"#;

/// The figures of one savings line a test states by hand.
struct Expect {
    jobs: i64,
    actual: &'static str,
    baseline: &'static str,
    answer: &'static str,
    /// retries, classifier, fallback, stages, voters, judge
    overhead: [&'static str; 6],
    person: (i64, &'static str),
    no_result: (i64, &'static str),
    all_jobs: i64,
}

fn check(l: &SavingsLine, e: &Expect) {
    let c = &l.category;
    assert_eq!(l.jobs, e.jobs, "{c}: answered jobs");
    assert_eq!(l.actual_cost_usd, d(e.actual), "{c}: actual");
    assert_eq!(l.baseline_cost_usd, Some(d(e.baseline)), "{c}: baseline");
    assert_eq!(
        l.savings_usd,
        Some(d(e.baseline) - d(e.actual)),
        "{c}: savings"
    );
    assert_eq!(l.answer_cost_usd, d(e.answer), "{c}: answer calls");
    let o = &l.overhead;
    let got = [
        o.retries_usd,
        o.classifier_usd,
        o.fallback_usd,
        o.stages_usd,
        o.voters_usd,
        o.judge_usd,
    ];
    assert_eq!(got, e.overhead.map(d), "{c}: overhead split");
    assert_eq!(l.overhead_cost_usd, d(e.actual) - d(e.answer), "{c}");
    assert_eq!(l.overhead_cost_usd, o.total(), "{c}: the split adds up");
    assert_eq!(
        (l.person_jobs, l.person_cost_usd),
        (e.person.0, d(e.person.1)),
        "{c}: resolved by a person"
    );
    assert_eq!(
        (l.no_result_jobs, l.no_result_cost_usd),
        (e.no_result.0, d(e.no_result.1)),
        "{c}: without a result"
    );
    assert_eq!(l.all_jobs, e.all_jobs, "{c}: all jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pattern_is_measured_against_one_baseline_call_per_job() {
    let env = TestEnv::new(Default::default()).await;
    sqlx::raw_sql(ROWS).execute(&env.pool).await.unwrap();
    let cfg = env.config();
    let r = report::build(&env.pool, &Filter::default(), &cfg, None)
        .await
        .unwrap();
    assert_eq!(r.baseline_model.as_deref(), Some("gpt-4o"));
    // gpt-4o: $2.50 input, $1.25 cached input, $10.00 output per 1M tokens.
    // One call per answered job: the first answered call's input (step >= 0;
    // cache writes count as uncached), the answer call's output.
    let lines: Vec<&SavingsLine> = r.savings_by_category.iter().collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l.category.as_str())
            .collect::<Vec<_>>(),
        ["lookup", "sales", "support"],
        "the classified job counts in its final category; `auto` has no line"
    );
    // lookup: c1 = voter 0's input 200, the winning voter 1's output 40:
    // (200 * 2.5 + 40 * 10) / 1e6 = 0.0009. Its four calls cost 0.00167:
    // the answer 0.00005, the other voters 0.00054, the judge 0.00108.
    // h1 (resolved by a person, 0.0003) is kept apart.
    check(
        lines[0],
        &Expect {
            jobs: 1,
            actual: "0.00167",
            baseline: "0.0009",
            answer: "0.00005",
            overhead: ["0", "0", "0", "0", "0.00054", "0.00108"],
            person: (1, "0.0003"),
            no_result: (0, "0"),
            all_jobs: 2,
        },
    );
    // sales: p1 = stage 0's input (300 uncached, 100 cached), the last
    // stage's output 150: (300 * 2.5 + 100 * 1.25 + 150 * 10) / 1e6 =
    // 0.002375; a1 = (100 * 2.5 + 80 * 10) / 1e6 = 0.00105 (the
    // classifier's call is overhead, not the baseline's input).
    // Actual 0.0053 + 0.000086; answers 0.0001 + 0.000063; earlier stages
    // 0.0052; classifier 0.000023. x1 failed: 0.0004 spent apart.
    check(
        lines[1],
        &Expect {
            jobs: 2,
            actual: "0.005386",
            baseline: "0.003425",
            answer: "0.000163",
            overhead: ["0", "0.000023", "0", "0.0052", "0", "0"],
            person: (0, "0"),
            no_result: (1, "0.0004"),
            all_jobs: 3,
        },
    );
    // support: s1 = (800 * 2.5 + 200 * 1.25 + 300 * 10) / 1e6 = 0.00525;
    // f1 = Haiku's input 500 (its first answered call), Sonnet's output 200:
    // (500 * 2.5 + 200 * 10) / 1e6 = 0.00325. Actual 0.0003 + 0.0078:
    // answers 0.0003 + 0.0048, the rejected Haiku answer 0.001, the charged
    // `unknown` attempt 0.002.
    check(
        lines[2],
        &Expect {
            jobs: 2,
            actual: "0.0081",
            baseline: "0.0085",
            answer: "0.0051",
            overhead: ["0.002", "0", "0.001", "0", "0", "0"],
            person: (0, "0"),
            no_result: (0, "0"),
            all_jobs: 2,
        },
    );
    check(
        &r.savings_total,
        &Expect {
            jobs: 5,
            actual: "0.015156",
            baseline: "0.012825",
            answer: "0.005313",
            overhead: ["0.002", "0.000023", "0.001", "0.0052", "0.00054", "0.00108"],
            person: (1, "0.0003"),
            no_result: (1, "0.0004"),
            all_jobs: 7,
        },
    );
    assert_eq!(r.baseline_cost_usd, Some(d("0.012825")));
    assert_eq!(r.actual_cost_usd, Some(d("0.015156")));
    assert_eq!(r.savings_usd, Some(d("-0.002331")));
    assert_eq!(r.savings_jobs, Some(5));
    // Every cent is somewhere: answered + person + no result = all calls.
    let t = &r.savings_total;
    assert_eq!(
        t.actual_cost_usd + t.person_cost_usd + t.no_result_cost_usd,
        r.total.cost_usd
    );
    // Ratios: sales cost 1.573 times one gpt-4o call per job.
    assert_eq!(lines[1].cost_ratio, Some(d("1.573")));
    // What the routes bought: f1 fell back, h1 went to review, two ratings.
    assert_eq!(lines[2].fallback_rate, 0.5);
    assert_eq!(lines[0].review_rate, 0.5);
    assert_eq!((lines[2].ratings, lines[2].avg_score), (2, Some(3.0)));

    // What-if: support's jobs on gpt-4o-mini alone ($0.15 / $0.075 / $0.60):
    // uncached 800 + 500, cached 200, output 300 + 200:
    // (1300 * 0.15 + 200 * 0.075 + 500 * 0.6) / 1e6 = 0.00051.
    let what_if = |category: &str, model: &str| {
        r.what_if
            .iter()
            .find(|w| w.category == category && w.model == model)
            .unwrap_or_else(|| panic!("what-if {category} {model}"))
            .clone()
    };
    let mini = what_if("support", "gpt-4o-mini");
    assert_eq!(
        (mini.jobs, mini.cost_usd, mini.actual_cost_usd),
        (2, d("0.00051"), d("0.0081"))
    );
    assert_eq!(mini.savings_usd, d("0.00051") - d("0.0081"));
    assert_eq!(what_if("total", "gpt-4o").cost_usd, d("0.012825"));
    // Cheapest first, per category.
    let support: Vec<Decimal> = r
        .what_if
        .iter()
        .filter(|w| w.category == "support")
        .map(|w| w.cost_usd)
        .collect();
    assert_eq!(support.len(), cfg.models.len());
    assert!(support.windows(2).all(|w| w[0] <= w[1]), "{support:?}");

    // The views give SQL users the same numbers.
    switchyard::pipeline::worker::sync_prices(&env.pool, &cfg)
        .await
        .unwrap();
    type ViewLine = (
        String,
        i64,
        Decimal,
        Decimal,
        Decimal,
        Decimal,
        Decimal,
        i64,
        Decimal,
    );
    let view: Vec<ViewLine> = sqlx::query_as(
        "SELECT category, jobs, actual_cost_usd, baseline_cost_usd, savings_usd,
                answer_cost_usd, overhead_cost_usd, no_result_jobs, no_result_cost_usd
         FROM savings_by_category WHERE baseline_model = 'gpt-4o' ORDER BY category",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let cli: Vec<ViewLine> = r
        .savings_by_category
        .iter()
        .map(|l| {
            (
                l.category.clone(),
                l.jobs,
                l.actual_cost_usd,
                l.baseline_cost_usd.unwrap(),
                l.savings_usd.unwrap(),
                l.answer_cost_usd,
                l.overhead_cost_usd,
                l.no_result_jobs,
                l.no_result_cost_usd,
            )
        })
        .collect();
    let norm = |v: Vec<ViewLine>| -> Vec<ViewLine> {
        v.into_iter()
            .map(|mut l| {
                for x in [&mut l.2, &mut l.3, &mut l.4, &mut l.5, &mut l.6, &mut l.8] {
                    *x = x.normalize();
                }
                l
            })
            .collect()
    };
    assert_eq!(norm(view), norm(cli));
    let mini_view: Decimal = sqlx::query_scalar(
        "SELECT cost_usd FROM what_if_by_model WHERE category = 'support' AND model = 'gpt-4o-mini'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(mini_view.normalize(), d("0.00051"));

    // The CSV carries the same lines.
    let csv = r.render(report::Format::Csv);
    assert!(
        csv.contains("savings,sales,gpt-4o,2,,,,,,,,0.005386,0.003425,-0.001961,0.000163,0.005223,0,0.000023,0,0.0052,0,0,\n"),
        "{csv}"
    );
    assert!(csv.contains("no_result,sales,,1,,,,,,,,0.0004,"), "{csv}");
    assert!(
        csv.contains("what_if,support,gpt-4o-mini,2,,,,,,,,0.0081,0.00051,-0.00759,"),
        "{csv}"
    );
    env.cleanup().await;
}

/// A changed config replaces the prices the views use, and its baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_views_price_at_the_last_synced_config() {
    let env = TestEnv::new(Default::default()).await;
    sqlx::raw_sql(ROWS).execute(&env.pool).await.unwrap();
    let first = env.config();
    switchyard::pipeline::worker::sync_prices(&env.pool, &first)
        .await
        .unwrap();
    let text = common::SHIPPED_CONFIG
        .replace(
            "baseline_model = \"gpt-4o\"",
            "baseline_model = \"gpt-4o-mini\"",
        )
        .replace(
            "[models.\"gpt-4.1\"]\nprovider = \"openai\"\ninput_per_mtok = \"2.00\"\noutput_per_mtok = \"8.00\"\ncached_input_per_mtok = \"0.50\"\n",
            "",
        )
        .replace("judge = \"gpt-4.1\"", "judge = \"gpt-4o\"");
    let second = env.config_from(&text);
    assert!(!second.models.contains_key("gpt-4.1"));
    switchyard::pipeline::worker::sync_prices(&env.pool, &second)
        .await
        .unwrap();
    let models: Vec<(String, bool)> =
        sqlx::query_as("SELECT model, is_baseline FROM model_prices ORDER BY model")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(models.len(), second.models.len());
    assert_eq!(
        models
            .iter()
            .filter(|m| m.1)
            .map(|m| m.0.as_str())
            .collect::<Vec<_>>(),
        ["gpt-4o-mini"]
    );
    let base: (String, Decimal) = sqlx::query_as(
        "SELECT baseline_model, baseline_cost_usd FROM savings_by_category WHERE category = 'support'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (base.0.as_str(), base.1.normalize()),
        ("gpt-4o-mini", d("0.00051"))
    );
    env.cleanup().await;
}
