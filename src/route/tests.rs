use super::*;
use crate::config::{Config, RetryConfig};

fn t(model: &str) -> Target {
    Target {
        model: model.into(),
        provider: format!("p-{model}"),
    }
}

fn conv(q: &str) -> Vec<Message> {
    vec![
        Message {
            role: Role::System,
            content: "tone".into(),
            parts: Vec::new(),
        },
        Message {
            role: Role::User,
            content: q.into(),
            parts: Vec::new(),
        },
    ]
}

fn ok(step: i32, model: &str, out: &str) -> StepRecord {
    StepRecord {
        step,
        model: model.into(),
        outcome: StepOutcome::Ok,
        output: Some(out.into()),
        reason: None,
    }
}

fn failed(step: i32, model: &str) -> StepRecord {
    StepRecord {
        step,
        model: model.into(),
        outcome: StepOutcome::Failed,
        output: None,
        reason: Some("HTTP 500".into()),
    }
}

fn calls(d: &Decision) -> Vec<(i32, String)> {
    match d {
        Decision::Calls(c) => c.iter().map(|c| (c.step, c.target.model.clone())).collect(),
        other => panic!("expected calls, got {other:?}"),
    }
}

fn retry() -> RetryConfig {
    RetryConfig {
        max_attempts: 3,
        base_delay_ms: 100,
        max_delay_ms: 1000,
    }
}

// ---- retries within a step ----

#[test]
fn success_completes_the_step_at_any_attempt() {
    for a in 1..=5 {
        assert_eq!(
            decide(&retry(), a, &Outcome::Success, 0.5),
            Action::Complete
        );
    }
}

#[test]
fn terminal_errors_fail_the_step_at_once() {
    let o = Outcome::Terminal {
        error: "quota".into(),
    };
    assert_eq!(
        decide(&retry(), 1, &o, 0.0),
        Action::Fail {
            error: "quota".into()
        }
    );
}

#[test]
fn retryable_errors_honour_retry_after_until_retries_are_exhausted() {
    let o = Outcome::Retryable {
        retry_after: Some(Duration::from_secs(7)),
        error: "429".into(),
    };
    for a in 1..3 {
        assert_eq!(
            decide(&retry(), a, &o, 0.0),
            Action::Retry {
                delay: Duration::from_secs(7)
            }
        );
    }
    assert!(
        matches!(decide(&retry(), 3, &o, 0.0), Action::Fail { error } if error.contains("3 attempts"))
    );
    let no_hint = Outcome::Retryable {
        retry_after: None,
        error: "500".into(),
    };
    assert_eq!(
        decide(&retry(), 2, &no_hint, 1.0),
        Action::Retry {
            delay: Duration::from_millis(200)
        }
    );
}

#[test]
fn backoff_grows_and_caps() {
    let r = retry();
    assert_eq!(backoff(&r, 1, 1.0), Duration::from_millis(100));
    assert_eq!(backoff(&r, 2, 1.0), Duration::from_millis(200));
    assert_eq!(backoff(&r, 3, 1.0), Duration::from_millis(400));
    assert_eq!(backoff(&r, 9, 1.0), Duration::from_millis(1000));
    assert_eq!(backoff(&r, 2, 0.0), Duration::from_millis(100));
    assert_eq!(backoff(&r, 64, 1.0), Duration::from_millis(1000));
}

// ---- single ----

#[test]
fn single_calls_then_completes_or_fails() {
    let p = Plan::Single { target: t("a") };
    let c = conv("q");
    assert_eq!(calls(&next(&p, &c, &[])), vec![(0, "a".into())]);
    assert_eq!(
        next(&p, &c, &[ok(0, "a", "yes")]),
        Decision::Complete {
            output: "yes".into(),
            model: "a".into(),
            step: 0
        }
    );
    assert!(matches!(
        next(&p, &c, &[failed(0, "a")]),
        Decision::Fail { .. }
    ));
}

// ---- fallback ----

fn fallback(check: Option<Check>) -> Plan {
    Plan::Fallback {
        targets: vec![t("cheap"), t("mid"), t("strong")],
        max_wait_ms: Some(5000),
        check,
    }
}

#[test]
fn fallback_starts_cheapest_and_stops_at_the_first_good_answer() {
    let p = fallback(None);
    let c = conv("q");
    assert_eq!(calls(&next(&p, &c, &[])), vec![(0, "cheap".into())]);
    assert_eq!(
        next(&p, &c, &[ok(0, "cheap", "fine")]),
        Decision::Complete {
            output: "fine".into(),
            model: "cheap".into(),
            step: 0
        }
    );
}

#[test]
fn fallback_moves_on_after_failure_and_too_slow() {
    let p = fallback(None);
    let c = conv("q");
    assert_eq!(
        calls(&next(&p, &c, &[failed(0, "cheap")])),
        vec![(1, "mid".into())]
    );
    let slow = StepRecord {
        step: 1,
        model: "mid".into(),
        outcome: StepOutcome::TooSlow,
        output: None,
        reason: Some("limiter wait 9s exceeds max_wait 5s".into()),
    };
    assert_eq!(
        calls(&next(&p, &c, &[failed(0, "cheap"), slow.clone()])),
        vec![(2, "strong".into())]
    );
    assert_eq!(
        next(&p, &c, &[failed(0, "cheap"), slow, ok(2, "strong", "done")]),
        Decision::Complete {
            output: "done".into(),
            model: "strong".into(),
            step: 2
        }
    );
}

#[test]
fn fallback_past_the_last_target_goes_to_review() {
    let p = fallback(None);
    let d = next(
        &p,
        &conv("q"),
        &[failed(0, "cheap"), failed(1, "mid"), failed(2, "strong")],
    );
    assert!(matches!(d, Decision::Review { reason } if reason.contains("all 3")));
}

#[test]
fn fallback_rejects_answers_that_fail_the_schema_or_confidence() {
    let schema = serde_json::json!({"type": "object", "required": ["answer"]});
    let p = fallback(Some(Check::JsonSchema { schema }));
    let c = conv("q");
    assert_eq!(
        calls(&next(&p, &c, &[ok(0, "cheap", "not json")])),
        vec![(1, "mid".into())]
    );
    assert_eq!(
        calls(&next(&p, &c, &[ok(0, "cheap", r#"{"other":1}"#)])),
        vec![(1, "mid".into())]
    );
    assert!(matches!(
        next(&p, &c, &[ok(0, "cheap", "x"), ok(1, "mid", r#"{"answer":"42"}"#)]),
        Decision::Complete { model, .. } if model == "mid"
    ));
    assert!(matches!(
        verdict(&p, &ok(0, "cheap", "x")),
        Verdict::Rejected(r) if r.contains("not JSON")
    ));
    let p = fallback(Some(Check::Confidence { min: 0.7 }));
    assert_eq!(
        calls(&next(&p, &c, &[ok(0, "cheap", "Paris\nconfidence: 0.4")])),
        vec![(1, "mid".into())]
    );
    assert!(matches!(
        next(
            &p,
            &c,
            &[ok(0, "cheap", r#"{"answer":"Paris","confidence":0.93}"#)]
        ),
        Decision::Complete { .. }
    ));
    assert_eq!(
        calls(&next(&p, &c, &[ok(0, "cheap", "Paris")])),
        vec![(1, "mid".into())]
    );
}

#[test]
fn only_non_final_fallback_steps_may_be_skipped_for_waiting() {
    let p = fallback(None);
    assert_eq!(p.max_wait(), Some(Duration::from_secs(5)));
    assert!(p.may_skip(0) && p.may_skip(1) && !p.may_skip(2));
    assert_eq!(Plan::Single { target: t("a") }.max_wait(), None);
}

// ---- pipeline ----

fn pipeline() -> Plan {
    Plan::Pipeline {
        stages: vec![
            Stage {
                name: "draft".into(),
                target: t("a"),
                template: "Draft a reply to: {{input}}".into(),
            },
            Stage {
                name: "refine".into(),
                target: t("b"),
                template: "Improve: {{previous}}".into(),
            },
            Stage {
                name: "format".into(),
                target: t("c"),
                template: "Format {{stages.draft}} / {{stages.refine}} for: {{input}}".into(),
            },
        ],
    }
}

fn last_user(d: &Decision) -> String {
    match d {
        Decision::Calls(c) => {
            assert_eq!(c[0].messages[0].content, "tone", "system prompt kept");
            c[0].messages.last().unwrap().content.clone()
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn pipeline_runs_stages_in_order_with_templates() {
    let p = pipeline();
    let c = conv("late parcel");
    let d = next(&p, &c, &[]);
    assert_eq!(calls(&d), vec![(0, "a".into())]);
    assert_eq!(last_user(&d), "Draft a reply to: late parcel");
    let h = vec![ok(0, "a", "D1")];
    let d = next(&p, &c, &h);
    assert_eq!(calls(&d), vec![(1, "b".into())]);
    assert_eq!(last_user(&d), "Improve: D1");
    let h = vec![ok(0, "a", "D1"), ok(1, "b", "R1")];
    assert_eq!(
        last_user(&next(&p, &c, &h)),
        "Format D1 / R1 for: late parcel"
    );
    let h = vec![ok(0, "a", "D1"), ok(1, "b", "R1"), ok(2, "c", "F1")];
    assert_eq!(
        next(&p, &c, &h),
        Decision::Complete {
            output: "F1".into(),
            model: "c".into(),
            step: 2
        }
    );
}

#[test]
fn pipeline_resumed_after_a_crash_starts_at_the_first_unfinished_stage() {
    // The worker died after stage `refine` was recorded: history comes back
    // from the database in any order, and no recorded stage runs again.
    let p = pipeline();
    let h = vec![ok(1, "b", "R1"), ok(0, "a", "D1")];
    assert_eq!(calls(&next(&p, &conv("q"), &h)), vec![(2, "c".into())]);
}

#[test]
fn pipeline_stage_failure_goes_to_review() {
    let d = next(&pipeline(), &conv("q"), &[ok(0, "a", "D1"), failed(1, "b")]);
    assert!(matches!(d, Decision::Review { reason } if reason.contains("refine")));
}

// ---- consensus ----

fn consensus(judge: bool) -> Plan {
    Plan::Consensus {
        voters: vec![t("x"), t("y"), t("z")],
        min_agree: 2,
        judge: judge.then(|| t("j")),
    }
}

#[test]
fn consensus_asks_every_voter_at_once_and_waits_for_all() {
    let p = consensus(false);
    let c = conv("q");
    assert_eq!(
        calls(&next(&p, &c, &[])),
        vec![(0, "x".into()), (1, "y".into()), (2, "z".into())]
    );
    assert_eq!(next(&p, &c, &[ok(0, "x", "Paris")]), Decision::Wait);
    // A classifier step before the plan does not count as a vote.
    let classified = [ok(
        CLASSIFY_STEP,
        "cls",
        r#"{"category":"lookup","confidence":0.9}"#,
    )];
    assert_eq!(calls(&next(&p, &c, &classified)).len(), 3);
}

#[test]
fn consensus_majority_of_normalised_answers_wins() {
    let p = consensus(false);
    let h = vec![
        ok(0, "x", "Paris."),
        ok(1, "y", "London"),
        ok(2, "z", "  paris "),
    ];
    assert_eq!(
        next(&p, &conv("q"), &h),
        Decision::Complete {
            output: "Paris.".into(),
            model: "x".into(),
            step: 0
        }
    );
}

#[test]
fn partial_consensus_with_one_failed_voter_still_decides() {
    let p = consensus(false);
    let h = vec![ok(0, "x", "Paris"), failed(1, "y"), ok(2, "z", "paris")];
    assert!(matches!(
        next(&p, &conv("q"), &h),
        Decision::Complete { .. }
    ));
    // But two failures leave one vote: not enough.
    let h = vec![ok(0, "x", "Paris"), failed(1, "y"), failed(2, "z")];
    assert!(matches!(next(&p, &conv("q"), &h), Decision::Review { .. }));
}

#[test]
fn no_consensus_without_a_judge_goes_to_review() {
    let h = vec![ok(0, "x", "a"), ok(1, "y", "b"), ok(2, "z", "c")];
    assert!(
        matches!(next(&consensus(false), &conv("q"), &h), Decision::Review { reason } if reason.contains("no consensus"))
    );
}

#[test]
fn a_judge_settles_disagreement() {
    let p = consensus(true);
    let c = conv("q");
    let h = vec![ok(0, "x", "a"), failed(1, "y"), ok(2, "z", "c")];
    let d = next(&p, &c, &h);
    assert_eq!(calls(&d), vec![(3, "j".into())]);
    let prompt = last_user(&d);
    assert!(prompt.contains("1. a") && prompt.contains("2. c") && prompt.contains("\"answer\""));
    let mut h2 = h.clone();
    h2.push(ok(3, "j", r#"Sure: {"answer": 2, "confidence": 0.8}"#));
    assert_eq!(
        next(&p, &c, &h2),
        Decision::Complete {
            output: "c".into(),
            model: "z".into(),
            step: 2
        }
    );
    let mut h3 = h.clone();
    h3.push(ok(3, "j", "I cannot decide"));
    assert!(matches!(next(&p, &c, &h3), Decision::Review { .. }));
    let mut h4 = h;
    h4.push(ok(3, "j", r#"{"answer": 9}"#));
    assert!(matches!(next(&p, &c, &h4), Decision::Review { .. }));
}

// ---- classifier ----

fn classify() -> Plan {
    Plan::Classify {
        classifier: t("cls"),
        categories: vec!["sales".into(), "support".into()],
        threshold: 0.8,
        default_category: "support".into(),
    }
}

#[test]
fn classifier_asks_the_model_then_reclassifies() {
    let p = classify();
    let c = conv("how much is it?");
    let d = next(&p, &c, &[]);
    assert_eq!(calls(&d), vec![(CLASSIFY_STEP, "cls".into())]);
    assert!(last_user_plain(&d).contains("sales, support"));
    let high = ok(
        CLASSIFY_STEP,
        "cls",
        r#"{"category":"sales","confidence":0.93}"#,
    );
    assert_eq!(
        next(&p, &c, &[high]),
        Decision::Reclassify {
            category: "sales".into(),
            confidence: 0.93,
            by: "model"
        }
    );
}

fn last_user_plain(d: &Decision) -> String {
    match d {
        Decision::Calls(c) => c[0].messages.last().unwrap().content.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn low_confidence_or_garbage_goes_to_the_safe_default() {
    let p = classify();
    let c = conv("?");
    for answer in [
        r#"{"category":"sales","confidence":0.5}"#,
        "sales!",
        r#"{"category":"billing","confidence":0.99}"#,
    ] {
        let d = next(&p, &c, &[ok(CLASSIFY_STEP, "cls", answer)]);
        assert!(
            matches!(&d, Decision::Reclassify { category, by: "default", .. } if category == "support"),
            "{answer}: {d:?}"
        );
    }
    let d = next(&p, &c, &[failed(CLASSIFY_STEP, "cls")]);
    assert!(matches!(d, Decision::Reclassify { by: "default", .. }));
}

// ---- config resolution ----

const CFG: &str = r#"
[providers.p]
kind = "openai"
base_url = "http://127.0.0.1:1"
rpm = 10
tpm = 100000
[models.a]
provider = "p"
input_per_mtok = "1"
output_per_mtok = "1"
[models.b]
provider = "p"
input_per_mtok = "1"
output_per_mtok = "1"
[categories.support]
route = { kind = "fallback", targets = ["a", "b"], max_wait_secs = 2 }
variant = { percent = 30, name = "pipe", route = { kind = "pipeline", stages = [
  { name = "one", target = "a" }, { name = "two", target = "b", prompt = "x {{stages.one}}" } ] } }
[categories.sales]
route = { kind = "consensus", targets = ["a", "b"], judge = "a" }
[classifier]
default_category = "support"
model = "a"
threshold = 0.7
rules = [ { category = "sales", keywords = ["Price"] }, { category = "support", regex = "(?i)^refund" } ]
"#;

#[test]
fn plans_resolve_from_config_with_a_stable_ab_split() {
    let cfg = Config::from_toml(CFG).unwrap();
    let mut variants = 0;
    for i in 0..1000 {
        let id = format!("job-{i}");
        let (plan, v) = Routes::build(&cfg)
            .unwrap()
            .plan_for("support", &id)
            .unwrap();
        assert_eq!(
            Routes::build(&cfg)
                .unwrap()
                .plan_for("support", &id)
                .unwrap()
                .1,
            v,
            "stable per job id"
        );
        match v.as_deref() {
            Some("pipe") => {
                variants += 1;
                assert_eq!(plan.kind(), "pipeline");
            }
            None => assert_eq!(plan.kind(), "fallback"),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        (250..350).contains(&variants),
        "{variants} of 1000 took the 30% variant"
    );
    let (plan, _) = Routes::build(&cfg).unwrap().plan_for("sales", "x").unwrap();
    assert!(matches!(
        plan,
        Plan::Consensus {
            min_agree: 2,
            judge: Some(_),
            ..
        }
    ));
    assert!(Routes::build(&cfg).unwrap().plan_for("nope", "x").is_none());
}

#[test]
fn rules_match_keywords_and_regexes_before_the_model() {
    let cfg = Config::from_toml(CFG).unwrap();
    assert_eq!(
        Routes::build(&cfg)
            .unwrap()
            .classify_by_rules("what's the price?")
            .unwrap()
            .0,
        "sales"
    );
    assert_eq!(
        Routes::build(&cfg)
            .unwrap()
            .classify_by_rules("Refund me")
            .unwrap()
            .0,
        "support"
    );
    assert!(Routes::build(&cfg)
        .unwrap()
        .classify_by_rules("hello")
        .is_none());
    assert!(matches!(
        Routes::build(&cfg).unwrap().classify_plan(),
        Some(Ok(Plan::Classify { .. }))
    ));
}

#[test]
fn bad_routes_are_named_in_config_errors() {
    for (bad, key) in [
        (
            CFG.replace(
                r#"targets = ["a", "b"], max"#,
                r#"targets = ["a", "zz"], max"#,
            ),
            "categories.support.route.targets[1]",
        ),
        (
            CFG.replace("x {{stages.one}}", "x {{stages.three}}"),
            "categories.support.variant.route.stages[1].prompt",
        ),
        (
            CFG.replace("percent = 30", "percent = 130"),
            "categories.support.variant.percent",
        ),
        (
            CFG.replace(r#"regex = "(?i)^refund""#, r#"regex = "(""#),
            "classifier.rules[1].regex",
        ),
        (
            CFG.replace(
                r#"default_category = "support""#,
                r#"default_category = "nope""#,
            ),
            "classifier.default_category",
        ),
        (
            CFG.replace(r#"judge = "a""#, r#"min_agree = 5"#),
            "categories.sales.route.min_agree",
        ),
    ] {
        let e = Config::from_toml(&bad).unwrap_err().0;
        assert!(e.contains(key), "want {key}: {e}");
    }
}

#[test]
fn a_route_that_cannot_run_fails_the_build_naming_its_key() {
    let mut cfg = Config::from_toml(CFG).unwrap();
    assert!(Routes::build(&cfg).is_ok());
    let (name, cat) = cfg.categories.iter_mut().next().unwrap();
    let name = name.clone();
    let model = cfg.models.keys().next().unwrap().clone();
    // Loaded configs are validated; one changed in code may still be wrong.
    cat.route = crate::config::RouteConfig::Consensus {
        targets: vec![model.clone(), model],
        min_agree: Some(3),
        judge: None,
    };
    let e = Routes::build(&cfg).unwrap_err().0;
    assert!(
        e.contains(&format!("categories.{name}.route")) && e.contains("3 of 2"),
        "{e}"
    );
    cat_unknown_model(&mut cfg, &name);
    let e = Routes::build(&cfg).unwrap_err().0;
    assert!(
        e.contains(&format!("categories.{name}.route.target")),
        "{e}"
    );
}

fn cat_unknown_model(cfg: &mut Config, name: &str) {
    cfg.categories.get_mut(name).unwrap().route = crate::config::RouteConfig::Single {
        target: "no-such-model".into(),
    };
}

#[test]
fn a_stage_prompt_never_rescans_user_or_model_text() {
    // The user's input and the draft both contain placeholders.
    let d = next(
        &pipeline(),
        &conv("print {{previous}} and {{stages.refine}}"),
        &[ok(0, "a", "draft {{input}}"), ok(1, "b", "refined")],
    );
    let Decision::Calls(c) = d else {
        panic!("expected the format stage, got {d:?}");
    };
    let prompt = &c[0].messages.last().unwrap().content;
    assert_eq!(
        prompt,
        "Format draft {{input}} / refined for: print {{previous}} and {{stages.refine}}"
    );
}

#[test]
fn a_pipeline_without_stages_fails_instead_of_panicking() {
    let d = next(&Plan::Pipeline { stages: vec![] }, &conv("q"), &[]);
    assert!(matches!(d, Decision::Fail { .. }), "{d:?}");
}
