//! Operator and analyst commands: everything a person runs besides the
//! worker itself.
//!
//! - [`review`]: the human-review queue. `dlq`: dead letters (list, show, replay).
//! - [`feedback`]: ratings of results. `prune`: retention.
//! - [`report`] and `report_html`: spend, usage and savings.
//! - `dashboard`: `/metrics`, the live dashboard and `/api/stats`.
//! - [`batch`]: provider batches (list, show, cancel).

pub mod batch;
pub mod dashboard;
pub(crate) mod dlq;
pub mod feedback;
pub(crate) mod prune;
pub mod report;
pub(crate) mod report_html;
pub mod review;
