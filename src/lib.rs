//! Switchyard: a durable, multi-model LLM job system.
//!
//! Jobs arrive on NATS JetStream (`<prefix>.jobs.<category>`); the dispatcher
//! validates and stores them and routes each to a provider lane
//! (`<prefix>.calls.<provider>`); a lane waits for its rate limits, calls the
//! provider, and hands the cost record and result to a batched Postgres
//! writer; messages are acked only after the commit.
//!
//! # Layout
//! - [`config`]: the TOML config, env overrides, validation (errors name the key).
//! - [`envelope`]: job envelope v1 and its validation (pure).
//! - [`route`]: the routing state machine (pure).
//! - [`pricing`]: tokens × prices → USD in `Decimal` (pure).
//! - [`bus`]: everything NATS: names, streams, consumers, message shapes.
//! - [`store`]: everything Postgres: database creation, migrations, the batched writer.
//! - [`dispatcher`], [`lane`], [`worker`]: the consumers and their wiring.
//! - [`limit`]: per-lane RPM/TPM/concurrency limits and provider-imposed pauses.
//! - [`providers`]: one adapter per wire format behind a closed enum.
//! - [`sim`]: the provider simulator; [`enqueue`], [`report`], [`demo`], [`bench`], [`cli`]: commands.

pub mod bus;
pub mod cli;
pub mod clock;
pub mod config;
pub mod enqueue;
pub mod envelope;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod pricing;
pub mod providers;
pub mod route;
pub mod sim;
pub mod store;
pub mod tasks;
pub mod template;

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
