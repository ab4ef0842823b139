//! Operator and analyst commands: everything a person runs besides the
//! worker itself.
//!
//! - [`review`]: the human-review queue. [`dlq`]: dead letters (list, show, replay).
//! - [`feedback`]: ratings of results. [`prune`]: retention.
//! - [`report`] and [`report_html`]: spend, usage and savings.
//! - [`dashboard`]: `/metrics`, the live dashboard and `/api/stats`.
//! - [`demo`]: the simulator, a worker and sample jobs in one command.

pub mod dashboard;
pub mod demo;
pub mod dlq;
pub mod feedback;
pub mod prune;
pub mod report;
pub mod report_html;
pub mod review;
