//! The runtime path of a job: the dispatcher takes it off the jobs stream,
//! lanes make its provider calls, and the worker wires them together.
//!
//! - `dispatcher`: the jobs-stream consumer's step (validate, store, route, first calls).
//! - [`lane`]: the calls-stream consumer's step for one provider.
//! - `flow`: a routing decision turned into rows and messages (pure).
//! - [`worker`]: starts the writer, the dispatcher and the lanes; the pull loops; drain.
//! - `poison`: messages that reached `max_deliver` become dead letters.
//! - [`settle`]: the one commit path (hold the message while the database is away).

pub mod batch;
pub(crate) mod dispatcher;
pub(crate) mod flow;
pub mod lane;
pub(crate) mod poison;
pub mod pull;
pub mod settle;
pub mod worker;
