//! Switchyard: a durable, multi-model LLM job system.
//!
//! Jobs arrive on NATS JetStream (`<prefix>.jobs.<category>`); the dispatcher
//! validates and stores them and routes each to a provider lane
//! (`<prefix>.calls.<provider>`); a lane waits for its rate limits, calls the
//! provider, and hands the cost record and result to a batched Postgres
//! writer; messages are acked only after the commit.
//!
//! # Layout
//! Leaves (import nothing of the runtime): [`ids`], `clock`, `template`, [`bucket`],
//! [`pricing`], [`tasks`]; [`config`] (TOML, env overrides, validation;
//! errors name the key) and [`envelope`] (job envelope v1, pure) sit just
//! above them.
//! - [`route`]: the routing state machine (pure), one file per pattern, and
//!   [`route::Routes`], the config's routes built once at start-up.
//! - [`pipeline`]: the runtime path: dispatcher, lanes, the one settle path,
//!   the worker's wiring and shutdown.
//! - [`limits`]: rate limits per lane and fleet-wide, category budgets.
//! - [`providers`]: one adapter per wire format behind a closed enum.
//! - [`store`]: everything Postgres: migrations, the batched writer,
//!   statuses, typed errors, queries.
//! - [`bus`]: NATS names, streams, consumers, message shapes.
//! - [`ops`]: operator and analyst commands (review, dead letters, report,
//!   feedback, retention, dashboard).
//! - [`webhooks`]: completion webhooks: the allowlist, the signature and
//!   the backoff (pure), and the deliverer task beside the pipeline.
//! - [`sim`]: the provider simulator; [`enqueue`]: publishing jobs;
//!   [`demo`]; [`cli`]: the commands of the `switchyard` binary.
//!
//! The measuring harness is a separate binary, `switchyard-bench`
//! (`crates/switchyard-bench`). See ARCHITECTURE.md for the invariants.

pub mod api;
pub mod bucket;
pub mod bus;
pub mod cli;
pub mod client;
pub(crate) mod clock;
pub mod config;
pub mod demo;
pub mod enqueue;
pub mod envelope;
pub mod ids;
pub mod limits;
pub mod memory;
pub(crate) mod metrics;
pub mod ops;
pub mod pipeline;
pub mod pricing;
pub mod providers;
pub mod route;
pub mod secrets;
pub mod sim;
pub mod store;
pub mod structured;
pub mod tasks;
pub(crate) mod template;
pub mod webhooks;

/// Install a stderr logger honouring `RUST_LOG` (default `info`, quieter for dependencies).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,async_nats=warn,hyper=warn,reqwest=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
