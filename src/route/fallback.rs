//! A fallback chain: targets in order until one's answer passes the
//! route's check; after the last, a person reviews the job.

use super::{
    extract_json, Check, Decision, Message, Plan, StepCall, StepOutcome, StepRecord, Target,
    Verdict,
};

pub(super) fn next<'a>(
    plan: &Plan,
    targets: &[Target],
    conv: &[Message],
    rec: &impl Fn(i32) -> Option<&'a StepRecord>,
) -> Decision {
    {
        for (i, t) in targets.iter().enumerate() {
            match rec(i as i32) {
                None => {
                    return Decision::Calls(vec![StepCall {
                        step: i as i32,
                        target: t.clone(),
                        messages: conv.to_vec(),
                    }])
                }
                Some(r) => {
                    if verdict(plan, r) == Verdict::Accepted {
                        return Decision::Complete {
                            output: r.output.clone().unwrap_or_default(),
                            model: r.model.clone(),
                            step: r.step,
                        };
                    }
                }
            }
        }
        Decision::Review {
            reason: format!(
                "all {} fallback targets failed or were rejected",
                targets.len()
            ),
        }
    }
}

/// The verdict on a finished step under a plan.
pub fn verdict(plan: &Plan, rec: &StepRecord) -> Verdict {
    match rec.outcome {
        StepOutcome::Failed => {
            Verdict::Rejected(rec.reason.clone().unwrap_or_else(|| "call failed".into()))
        }
        StepOutcome::TooSlow => Verdict::Rejected(
            rec.reason
                .clone()
                .unwrap_or_else(|| "limiter wait too long".into()),
        ),
        StepOutcome::Ok => match (plan, &rec.output) {
            (Plan::Fallback { check: Some(c), .. }, Some(out)) => check_answer(c, out),
            _ => Verdict::Accepted,
        },
    }
}

/// Does a fallback answer pass the route's check?
pub fn check_answer(check: &Check, output: &str) -> Verdict {
    match check {
        Check::JsonSchema { schema } => match crate::structured::parse_answer(output) {
            None => Verdict::Rejected("answer is not JSON".into()),
            Some(v) => match crate::structured::validate(schema, &v) {
                Ok(()) => Verdict::Accepted,
                Err(e) => Verdict::Rejected(format!("answer fails the schema: {e}")),
            },
        },
        Check::Confidence { min } => match self_reported_confidence(output) {
            Some(c) if c >= *min => Verdict::Accepted,
            Some(c) => Verdict::Rejected(format!("self-reported confidence {c} is below {min}")),
            None => Verdict::Rejected("answer reports no confidence".into()),
        },
    }
}

/// `"confidence": X` in a JSON answer, or a `confidence: X` line.
pub fn self_reported_confidence(output: &str) -> Option<f64> {
    if let Some(c) = extract_json(output).and_then(|v| v.get("confidence").and_then(|c| c.as_f64()))
    {
        return Some(c);
    }
    output.lines().rev().find_map(|l| {
        let l = l.trim().to_lowercase();
        let rest = l
            .strip_prefix("confidence")?
            .trim_start_matches([':', '=', ' ']);
        rest.trim_end_matches('%')
            .parse::<f64>()
            .ok()
            .map(|c| if c > 1.0 { c / 100.0 } else { c })
    })
}
