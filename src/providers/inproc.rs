//! A provider that answers in-process with no I/O: the simulator's
//! deterministic text and token counts, with zero latency. Used by
//! `switchyard-bench` to measure Switchyard's own overhead.

use super::{CallError, CallRequest, CallResponse, RateInfo};
use crate::pricing::Usage;
use crate::sim::synthesize;

#[derive(Debug, Clone, Copy)]
pub struct InprocAdapter;

impl InprocAdapter {
    pub fn call(&self, req: &CallRequest) -> Result<CallResponse, CallError> {
        let s = synthesize(&req.model, &req.messages, req.max_tokens);
        Ok(CallResponse {
            text: s.text,
            finish_reason: Some(s.finish_reason.to_string()),
            usage: Usage {
                input_tokens: s.prompt_tokens,
                output_tokens: s.completion_tokens,
                ..Default::default()
            },
            http_status: 200,
            rate: RateInfo::default(),
        })
    }
}
