//! The measuring harness of Switchyard, apart from the shipped binary.
//!
//! - [`throughput`]: end-to-end jobs per second against the raw JetStream
//!   ceiling measured in the same run (`switchyard-bench`).
//! - [`limits`]: worker processes sharing one rate-limited provider
//!   (`switchyard-bench limits`).
//! - [`chaos`]: workers killed, NATS and PostgreSQL restarted under load, then
//!   the provider's ledger reconciled with `calls` (`switchyard-bench chaos`).
//! - [`cluster`]: workers on a three-node NATS cluster (R3 streams and
//!   KV) while the jobs stream's leader is killed, reconciled like chaos
//!   (`switchyard-bench cluster`).
//! - [`batch`]: jobs through the providers' batch APIs, reconciled, with the
//!   saving and the worker's peak memory (`switchyard-bench batch`).
//! - [`latency`]: the latency Switchyard adds at a steady offered load
//!   (`switchyard-bench latency`).
//! - [`soak`]: the million-job night through worker processes and the
//!   simulator (`switchyard-bench soak`), and one worker's memory with
//!   1,000 calls in flight (`switchyard-bench rss`).
//!
//! Each mode starts its own simulator and publishes on a subject prefix of
//! its own, so it never touches jobs it did not publish.

pub mod batch;
pub mod cache;
pub mod chaos;
pub mod cluster;
pub mod ingest;
pub mod latency;
pub mod limits;
pub mod soak;
pub mod throughput;

use std::path::PathBuf;

/// The `switchyard` binary whose `worker` subcommand the multi-process modes
/// start: `BENCH_SWITCHYARD_BIN` if set, else the one built beside this program
/// (for a test binary in `target/<profile>/deps/`, the one a level up).
pub fn switchyard_exe() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("BENCH_SWITCHYARD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().unwrap_or(std::path::Path::new("."));
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let candidate = dir.join("switchyard");
    if candidate.is_file() {
        return Ok(candidate);
    }
    anyhow::bail!(
        "cannot find the switchyard binary beside {}: build it (cargo build --release) or set BENCH_SWITCHYARD_BIN",
        me.display()
    )
}
