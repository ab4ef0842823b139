//! Everything that holds work back: provider rate limits (per lane and
//! fleet-wide) and category spend budgets.
//!
//! - [`bucket`]: the token bucket every rate limit here (and the simulator's) uses.
//! - [`lane`]: one lane's limiter: own caps, pause, backpressure, then the fleet.
//! - [`fleet`]: the limits every process of a provider shares (NATS KV document).
//! - [`budget`]: daily/monthly USD caps per category.

pub mod bucket;
pub mod budget;
pub mod fleet;
pub mod lane;
