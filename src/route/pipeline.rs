//! A sequential pipeline: each stage's prompt is its template filled with
//! the job's input, the previous stage's output and earlier stages'
//! outputs; the last stage's answer is the result; a failed stage goes to
//! a person.

use std::collections::BTreeMap;

use super::{input_text, with_user, Decision, Message, Stage, StepCall, StepOutcome, StepRecord};

pub(super) fn next<'a>(
    stages: &[Stage],
    conv: &[Message],
    rec: &impl Fn(i32) -> Option<&'a StepRecord>,
) -> Decision {
    {
        let input = input_text(conv);
        let mut outputs: BTreeMap<&str, &str> = BTreeMap::new();
        let mut previous = input.clone();
        for (i, s) in stages.iter().enumerate() {
            match rec(i as i32) {
                Some(r) if r.outcome == StepOutcome::Ok => {
                    let out = r.output.as_deref().unwrap_or("");
                    outputs.insert(s.name.as_str(), out);
                    previous = out.to_string();
                }
                Some(r) => {
                    return Decision::Review {
                        reason: format!(
                            "stage `{}` failed: {}",
                            s.name,
                            r.reason.clone().unwrap_or_default()
                        ),
                    }
                }
                None => {
                    let prompt = crate::template::render(&s.template, &input, &previous, &outputs);
                    return Decision::Calls(vec![StepCall {
                        step: i as i32,
                        target: s.target.clone(),
                        // The job's images go to the stages that read its input.
                        messages: with_user(conv, prompt, s.template.contains("{{input}}")),
                    }]);
                }
            }
        }
        // Every stage answered: the last one's answer is the result.
        match stages.len().checked_sub(1).and_then(|l| rec(l as i32)) {
            Some(r) => Decision::Complete {
                output: r.output.clone().unwrap_or_default(),
                model: r.model.clone(),
                step: r.step,
            },
            None => Decision::Fail {
                error: "a pipeline plan with no stages".into(),
            },
        }
    }
}
