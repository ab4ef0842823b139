//! One call: its answer is the job's, its failure the job's.

use super::{Decision, Message, StepCall, StepOutcome, StepRecord, Target};

pub(super) fn next(target: &Target, conv: &[Message], rec: Option<&StepRecord>) -> Decision {
    match rec {
        None => Decision::Calls(vec![StepCall {
            step: 0,
            target: target.clone(),
            messages: conv.to_vec(),
        }]),
        Some(r) if r.outcome == StepOutcome::Ok => Decision::Complete {
            output: r.output.clone().unwrap_or_default(),
            model: r.model.clone(),
            step: r.step,
        },
        Some(r) => Decision::Fail {
            error: r.reason.clone().unwrap_or_else(|| "call failed".into()),
        },
    }
}
