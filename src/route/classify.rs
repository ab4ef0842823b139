//! The classifier model of an `auto` job: its answer moves the job to a
//! category (or, below the threshold or unreadable, to the default one).

use super::{
    extract_json, input_text, Decision, Message, Role, StepCall, StepOutcome, StepRecord, Target,
    CLASSIFY_STEP,
};

pub(super) fn next(
    classifier: &Target,
    categories: &[String],
    threshold: f64,
    default_category: &str,
    conv: &[Message],
    rec: Option<&StepRecord>,
) -> Decision {
    match rec {
        None => Decision::Calls(vec![StepCall {
            step: CLASSIFY_STEP,
            target: classifier.clone(),
            messages: vec![Message {
                role: Role::User,
                content: classifier_prompt(categories, &input_text(conv)),
                parts: Vec::new(),
            }],
        }]),
        Some(r) => {
            let parsed = (r.outcome == StepOutcome::Ok)
                .then(|| parse_classifier_answer(r.output.as_deref().unwrap_or(""), categories))
                .flatten();
            match parsed {
                Some((category, confidence)) if confidence >= threshold => Decision::Reclassify {
                    category,
                    confidence,
                    by: "model",
                },
                Some((_, confidence)) => Decision::Reclassify {
                    category: default_category.to_string(),
                    confidence,
                    by: "default",
                },
                None => Decision::Reclassify {
                    category: default_category.to_string(),
                    confidence: 0.0,
                    by: "default",
                },
            }
        }
    }
}

/// The classifier's prompt.
pub fn classifier_prompt(categories: &[String], input: &str) -> String {
    format!(
        "Classify the request into exactly one of these categories: {}.\n\
         Reply only with JSON: {{\"category\": \"<one of the categories>\", \"confidence\": <0.0-1.0>}}.\n\n\
         Request:\n{input}",
        categories.join(", ")
    )
}

/// Read the classifier's `{"category", "confidence"}`; anything else is
/// low confidence (None).
pub fn parse_classifier_answer(text: &str, categories: &[String]) -> Option<(String, f64)> {
    let v = extract_json(text)?;
    let cat = v.get("category")?.as_str()?.trim().to_string();
    let conf = v.get("confidence")?.as_f64()?;
    (categories.contains(&cat) && (0.0..=1.0).contains(&conf)).then_some((cat, conf))
}
