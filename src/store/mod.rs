//! Postgres, and the only code of the crate that holds SQL: database
//! creation, migrations, and the batched writer that commits many
//! messages' rows per transaction and only then lets their NATS messages be
//! acked (here); one module per family of tables for everything else, each
//! a set of typed functions whose input goes in bound parameters only.
//!
//! - `writer` ([`Writer`]) and `rows`: the batched writer and the rows it
//!   takes.
//! - [`jobs`]: one job's status, steps and recorded attempts; parked jobs.
//! - [`review`]: the human review queue and its resolve transaction.
//! - [`dlq`]: dead letters and the replay claim.
//! - [`report`]: the report's reads for a time window, category or prefix.
//! - [`stats`]: the dashboard's figures.
//! - [`prices`]: the configured models' prices, for the savings views.
//! - [`batches`]: provider batches, their leases and items.
//! - [`client_batches`]: the OpenAI Batch-compatible front door's files,
//!   batches and lines (not provider batches).
//! - [`spend`]: category spend for budgets.
//! - [`feedback`]: ratings of results.
//! - [`retention`]: what `prune` counts and deletes.
//! - [`webhooks`]: completion webhooks' attempts (`webhook_deliveries`):
//!   claim, record, list, replay.
//!
//! Job statuses are [`JobStatus`]; SQL receives them as bound parameters.

/// The SQL condition for the `calls` rows of the job whose id is `$1`:
/// its id, and one of the two partition keys its calls can carry (its
/// creation time, or 1970-01-01 for a call written while its job row was
/// missing; migration 0030). Naming them lets Postgres skip the other
/// months' partitions while it runs the query (after 0033 `job_costs` does
/// the same for its per-job lookups).
macro_rules! calls_of_job_1 {
    () => {
        "job_id = $1 AND job_created_at IN ((SELECT j.created_at FROM jobs j WHERE j.id = $1), \
         TIMESTAMPTZ '1970-01-01 00:00:00+00')"
    };
}

pub mod batches;
pub mod cache;
pub mod client_batches;
pub mod dlq;
mod error;
pub mod feedback;
pub mod job_rollups;
pub mod jobs;
pub mod prices;
pub mod report;
pub mod retention;
pub mod review;
pub mod rollups;
mod rows;
pub mod spend;
pub mod stats;
mod status;
pub mod tokens;
pub mod webhooks;
mod writer;
pub use error::StoreError;
pub use jobs::{count_finished, count_finished_prefix, job_status, load_steps, take_parked};
pub use rows::*;
pub use status::JobStatus;
pub use writer::Writer;

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};

/// The migrations. A database migrated by a newer build (migrations this
/// build does not have) is accepted: they are additive, so an old worker
/// keeps running beside new ones during a rolling upgrade.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("./migrations")
};

/// Connect to `url`, creating the database when it is missing, and apply the
/// migrations (idempotent; an advisory lock makes concurrent starts safe).
/// `url` naming database `db` instead (same server, user and options).
pub fn with_database(url: &str, db: &str) -> Result<String> {
    let mut u = url::Url::parse(url).context("invalid DATABASE_URL")?;
    u.set_path(&format!("/{db}"));
    Ok(u.into())
}

/// TLS follows the URL's `sslmode` (`disable`, `prefer` — the default —,
/// `require`, `verify-ca`, `verify-full`) and `sslrootcert` (the CA file),
/// as with libpq. Errors show the URL without its password.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> Result<PgPool> {
    // sqlx brings its own ring provider; this keeps every TLS client of the
    // process on the same one.
    crate::providers::http::install_tls_provider();
    let shown = crate::secrets::redact_url(url);
    let mut opts = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("invalid DATABASE_URL {shown}: {e}"))?
        .log_statements(tracing::log::LevelFilter::Trace)
        // Every query here walks indexes and rollups. Postgres's JIT
        // (`jit_above_cost`) triggers on cost estimates inflated by empty
        // or unanalyzed tables (job_rollup_dirty) and spends 100-200 ms
        // compiling what then runs in a few: off for this pool.
        .options([("jit", "off")]);
    if plain_on_loopback(url, std::env::var_os("PGSSLMODE").is_some()) {
        opts = opts.ssl_mode(sqlx::postgres::PgSslMode::Disable);
    }
    create_database_if_missing(&opts, &shown).await?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts.clone())
        .await
        .with_context(|| format!("connecting to Postgres at {shown}"))?;
    MIGRATOR
        .run(&pool)
        .await
        .context("applying database migrations")?;
    // The monthly `calls` partitions ahead (migration 0030); a call for a
    // month without one lands in the default partition, so a start does not
    // fail for want of them (the call roller tries again hourly).
    match retention::ensure_call_partitions(&pool).await {
        Ok(Some(_)) => {}
        Ok(None) => tracing::warn!("calls is busy: its partitions ahead are left to the roller"),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "creating calls partitions failed"),
    }
    Ok(pool)
}

/// Whether to talk to Postgres without TLS although the URL does not say
/// so: no `sslmode` in the URL (nor `PGSSLMODE`) and the server on this
/// machine (a loopback address, `localhost` or a socket). sqlx's default,
/// `prefer`, would negotiate TLS with a local server that has `ssl = on`
/// (Debian's default) and cost a quarter of the pipeline's throughput for
/// traffic that never leaves the machine (docs/benchmarks.md). A remote
/// server keeps `prefer`; say `sslmode=require` (or `verify-full`) to insist.
fn plain_on_loopback(url: &str, env_says: bool) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    if env_says
        || u.query_pairs()
            .any(|(k, _)| k == "sslmode" || k == "ssl-mode")
    {
        return false;
    }
    let socket = u
        .query_pairs()
        .any(|(k, v)| k == "host" && v.starts_with('/'));
    socket
        || match u.host() {
            None => true,
            // A `postgres:` URL's host is opaque to the url crate: an
            // address arrives as a name.
            Some(url::Host::Domain(d)) => {
                d == "localhost"
                    || d.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|a| a.is_loopback())
            }
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
        }
}

async fn create_database_if_missing(opts: &PgConnectOptions, shown: &str) -> Result<()> {
    let Some(db) = opts.get_database().map(str::to_string) else {
        return Ok(());
    };
    match opts.connect().await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(());
        }
        Err(e) if db_code(&e).as_deref() == Some("3D000") => {}
        Err(e) => return Err(e).with_context(|| format!("connecting to Postgres at {shown}")),
    }
    let mut admin = opts
        .clone()
        .database("postgres")
        .connect()
        .await
        .context("connecting to the `postgres` database to create ours")?;
    let quoted = format!("\"{}\"", db.replace('"', "\"\""));
    match admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .await
    {
        Ok(_) => tracing::info!(database = %db, "created database"),
        // Another process created it first.
        Err(e) if matches!(db_code(&e).as_deref(), Some("42P04") | Some("23505")) => {}
        Err(e) => return Err(e).with_context(|| format!("creating database {db}")),
    }
    let _ = admin.close().await;
    Ok(())
}

/// Where a `LIKE` pattern lets other text stand around the literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Like {
    /// The value starts with the text.
    Prefix,
    /// The value contains the text.
    Contains,
}

/// `text` as a `LIKE` / `ILIKE` pattern that matches it literally: its
/// `\`, `%` and `_` escaped (Postgres' default escape character), then the
/// wildcards `how` asks for. Bound as a parameter, never spliced into SQL.
fn like_pattern(text: &str, how: Like) -> String {
    let literal = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    match how {
        Like::Prefix => format!("{literal}%"),
        Like::Contains => format!("%{literal}%"),
    }
}

fn db_code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_an_unspecified_sslmode_to_this_machine_goes_without_tls() {
        use super::plain_on_loopback as plain;
        assert!(plain("postgres://u@127.0.0.1:5432/db", false));
        assert!(plain("postgres://u@localhost/db", false));
        assert!(plain("postgres://u@[::1]/db", false));
        assert!(plain("postgres:///db?host=/var/run/postgresql", false));
        assert!(!plain("postgres://u@127.0.0.1/db?sslmode=require", false));
        assert!(
            !plain("postgres://u@127.0.0.1/db", true),
            "PGSSLMODE decides"
        );
        assert!(!plain("postgres://u@db.example.com/db", false));
        assert!(!plain("postgres://u@10.0.0.5/db", false));
    }

    use super::*;

    #[test]
    fn like_patterns_match_their_text_literally() {
        assert_eq!(like_pattern("", Like::Prefix), "%");
        assert_eq!(like_pattern("run-1_", Like::Prefix), "run-1\\_%");
        assert_eq!(
            like_pattern("50% off\\now", Like::Contains),
            "%50\\% off\\\\now%"
        );
    }
}
