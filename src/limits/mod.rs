//! Everything that holds work back: provider rate limits (per lane and
//! fleet-wide) and category spend budgets.
//!
//! Every rate limit here uses the one token bucket, [`crate::bucket`] (a
//! leaf, so the simulator shares it without importing the limits).
//!
//! - [`lane`]: one lane's limiter: own caps, pause, backpressure, then the fleet.
//! - [`fleet`]: the limits every process of a provider shares (NATS KV document).
//! - [`budget`]: daily/monthly USD caps per category.

pub mod budget;
pub mod fleet;
pub mod lane;
