//! Parallel consensus: every voter answers the same input at once; the
//! largest group of equal (normalised) answers wins if it is big enough,
//! else a judge picks, else a person reviews.

use super::{
    extract_json, input_text, with_user, Decision, Message, StepCall, StepOutcome, StepRecord,
    Target,
};

pub(super) fn next<'a>(
    voters: &[Target],
    min_agree: usize,
    judge: Option<&Target>,
    conv: &[Message],
    rec: &impl Fn(i32) -> Option<&'a StepRecord>,
) -> Decision {
    {
        let n = voters.len() as i32;
        if (0..n).all(|i| rec(i).is_none()) {
            return Decision::Calls(
                voters
                    .iter()
                    .enumerate()
                    .map(|(i, t)| StepCall {
                        step: i as i32,
                        target: t.clone(),
                        messages: conv.to_vec(),
                    })
                    .collect(),
            );
        }
        if (0..n).any(|i| rec(i).is_none()) {
            return Decision::Wait;
        }
        // Group the answers of voters that answered.
        let answered: Vec<&StepRecord> = (0..n)
            .filter_map(rec)
            .filter(|r| r.outcome == StepOutcome::Ok)
            .collect();
        let mut groups: Vec<(String, Vec<&StepRecord>)> = Vec::new();
        for r in &answered {
            let key = normalise(r.output.as_deref().unwrap_or(""));
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push(r),
                None => groups.push((key, vec![r])),
            }
        }
        groups.sort_by(|a, b| {
            b.1.len()
                .cmp(&a.1.len())
                .then(a.1[0].step.cmp(&b.1[0].step))
        });
        if let Some((_, g)) = groups.first() {
            if g.len() >= min_agree {
                return Decision::Complete {
                    output: g[0].output.clone().unwrap_or_default(),
                    model: g[0].model.clone(),
                    step: g[0].step,
                };
            }
        }
        let Some(judge) = judge else {
            return Decision::Review {
                reason: format!(
                "no consensus: {} of {} voters answered, largest agreement {} (need {min_agree})",
                answered.len(),
                n,
                groups.first().map_or(0, |g| g.1.len())
            ),
            };
        };
        if answered.is_empty() {
            return Decision::Review {
                reason: "no consensus: every voter failed".into(),
            };
        }
        match rec(n) {
            None => {
                let input = input_text(conv);
                let list: Vec<(usize, &str)> = answered
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (i + 1, r.output.as_deref().unwrap_or("")))
                    .collect();
                Decision::Calls(vec![StepCall {
                    step: n,
                    target: judge.clone(),
                    messages: with_user(conv, judge_prompt(&input, &list), true),
                }])
            }
            Some(j) => {
                let pick = (j.outcome == StepOutcome::Ok)
                    .then(|| j.output.as_deref().and_then(extract_json))
                    .flatten()
                    .and_then(|v| v.get("answer").and_then(|a| a.as_u64()))
                    .and_then(|k| answered.get((k as usize).checked_sub(1)?));
                match pick {
                    Some(r) => Decision::Complete {
                        output: r.output.clone().unwrap_or_default(),
                        model: r.model.clone(),
                        step: r.step,
                    },
                    None => Decision::Review {
                        reason: "no consensus and the judge gave no usable verdict".into(),
                    },
                }
            }
        }
    }
}

/// Normalise an answer for voting: lower case, words only, single spaces.
pub fn normalise(answer: &str) -> String {
    answer
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn judge_prompt(input: &str, answers: &[(usize, &str)]) -> String {
    let mut p = format!(
        "Several assistants answered the request below. Decide which answer is correct and best.\n\
         Reply only with JSON: {{\"answer\": <number of the best answer>, \"confidence\": <0.0-1.0>}}.\n\n\
         Request:\n{input}\n\nAnswers:\n"
    );
    for (n, a) in answers {
        p.push_str(&format!("{n}. {a}\n"));
    }
    p
}
