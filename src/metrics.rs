//! Prometheus metrics of this process: counters, gauges and histograms kept
//! in one registry and rendered in the text exposition format on the
//! worker's `/metrics` (see `ops::dashboard`). Recording is a short
//! mutex-guarded map update that allocates only for a new series; nothing
//! here does I/O.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

/// Every metric: name, type, help.
const METRICS: &[(&str, &str, &str)] = &[
    (
        "switchyard_jobs_received_total",
        "counter",
        "Valid jobs the dispatcher stored and routed, by category.",
    ),
    (
        "switchyard_direct_calls_total",
        "counter",
        "Jobs whose first call the dispatcher handed to a free lane of its own process instead of the calls stream, by provider.",
    ),
    (
        "switchyard_jobs_finished_total",
        "counter",
        "Jobs that ended, by category and status (succeeded, failed, needs_review, dead).",
    ),
    (
        "switchyard_calls_total",
        "counter",
        "Provider calls, by provider, model and outcome (ok, retryable_error, terminal_error).",
    ),
    (
        "switchyard_rate_limited_total",
        "counter",
        "Provider calls answered 429 (rate limited), by provider and model.",
    ),
    (
        "switchyard_tokens_total",
        "counter",
        "Tokens of answered calls, by provider, model and direction (input, output).",
    ),
    (
        "switchyard_cost_usd_total",
        "counter",
        "USD of provider calls, by provider and model.",
    ),
    (
        "switchyard_call_latency_seconds",
        "histogram",
        "Provider call latency, by provider and model.",
    ),
    (
        "switchyard_limiter_wait_seconds",
        "histogram",
        "Time a call waited for its rate limits (claim to admission), by provider.",
    ),
    (
        "switchyard_queue_depth",
        "gauge",
        "Messages waiting or in flight: jobs per category, calls per provider lane.",
    ),
    (
        "switchyard_database_up",
        "gauge",
        "1 while Postgres answers this process, else 0.",
    ),
    (
        "switchyard_webhook_deliveries_total",
        "counter",
        "Completion webhook attempts, by outcome (ok, failed, refused).",
    ),
    (
        "switchyard_job_rollups_lag_seconds",
        "gauge",
        "How far behind now the job rollups end (five to six minutes when the roller keeps up; reports read the rest raw).",
    ),
    (
        "switchyard_call_rollups_lag_seconds",
        "gauge",
        "How far behind now the call rollups end (30 to 35 s when the roller keeps up; readers read the rest raw).",
    ),
    (
        "switchyard_job_rollups_dirty_hours",
        "gauge",
        "Rolled hours changed since, read raw until the roller re-rolls them.",
    ),
    (
        "switchyard_limits_unavailable",
        "gauge",
        "1 while a fleet provider's shared limits document cannot be read or written (its calls wait), by provider.",
    ),
];

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

type Labels = Vec<(&'static str, String)>;

#[derive(Default, Clone)]
struct Hist {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Series keyed by name and labels, found without allocating (a hash of
/// the borrowed name and labels, then an equality check); a series' owned
/// labels are made only the first time it is recorded.
struct Series<T> {
    by_hash: HashMap<u64, Vec<(Key, T)>>,
}

/// A series' name and labels.
type Key = (&'static str, Labels);

impl<T> Default for Series<T> {
    fn default() -> Self {
        Self {
            by_hash: HashMap::new(),
        }
    }
}

fn key_hash(name: &str, l: &[(&'static str, &str)]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    static STATE: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut h = STATE.get_or_init(Default::default).build_hasher();
    name.hash(&mut h);
    for (k, v) in l {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

/// Whether a stored series' key is `name` with labels `l` (same order).
fn is_key((n, ls): &Key, name: &str, l: &[(&'static str, &str)]) -> bool {
    *n == name
        && ls.len() == l.len()
        && ls
            .iter()
            .zip(l)
            .all(|((k, v), (k2, v2))| k == k2 && v == v2)
}

impl<T: Default> Series<T> {
    fn entry(&mut self, name: &'static str, l: &[(&'static str, &str)]) -> &mut T {
        let bucket = self.by_hash.entry(key_hash(name, l)).or_default();
        let i = match bucket.iter().position(|(key, _)| is_key(key, name, l)) {
            Some(i) => i,
            None => {
                bucket.push(((name, labels(l)), T::default()));
                bucket.len() - 1
            }
        };
        &mut bucket[i].1
    }

    #[cfg(test)]
    fn get(&self, name: &'static str, l: &[(&'static str, &str)]) -> Option<&T> {
        self.by_hash
            .get(&key_hash(name, l))?
            .iter()
            .find_map(|(key, t)| is_key(key, name, l).then_some(t))
    }

    /// The series of `name`, in label order.
    fn of(&self, name: &str) -> Vec<(&Labels, &T)> {
        let mut v: Vec<(&Labels, &T)> = self
            .by_hash
            .values()
            .flatten()
            .filter(|((n, _), _)| *n == name)
            .map(|((_, l), t)| (l, t))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

#[derive(Default)]
struct Inner {
    values: Series<f64>,
    hists: Series<Hist>,
}

/// The process's metrics.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

/// The registry of this process.
pub fn global() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn series(name: &str, l: &Labels, extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", parts.join(","))
    }
}

impl Registry {
    /// Add `v` to a counter.
    pub fn inc(&self, name: &'static str, l: &[(&'static str, &str)], v: f64) {
        if let Ok(mut i) = self.inner.lock() {
            *i.values.entry(name, l) += v;
        }
    }

    /// Set a gauge.
    pub fn set(&self, name: &'static str, l: &[(&'static str, &str)], v: f64) {
        if let Ok(mut i) = self.inner.lock() {
            *i.values.entry(name, l) = v;
        }
    }

    /// Record one observation (seconds) in a histogram.
    pub fn observe(&self, name: &'static str, l: &[(&'static str, &str)], secs: f64) {
        if let Ok(mut i) = self.inner.lock() {
            let h = i.hists.entry(name, l);
            for (b, c) in BUCKETS.iter().zip(h.counts.iter_mut()) {
                if secs <= *b {
                    *c += 1;
                }
            }
            h.sum += secs;
            h.count += 1;
        }
    }

    /// A counter's or gauge's current value (0 if never set).
    #[cfg(test)]
    pub fn value(&self, name: &'static str, l: &[(&'static str, &str)]) -> f64 {
        self.inner
            .lock()
            .ok()
            .and_then(|i| i.values.get(name, l).copied())
            .unwrap_or(0.0)
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let Ok(i) = self.inner.lock() else {
            return String::new();
        };
        let mut out = String::new();
        for (name, kind, help) in METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if *kind == "histogram" {
                for (l, h) in i.hists.of(name) {
                    let n = name;
                    for (b, c) in BUCKETS.iter().zip(h.counts.iter()) {
                        let le = b.to_string();
                        let _ = writeln!(
                            out,
                            "{} {c}",
                            series(&format!("{n}_bucket"), l, Some(("le", &le)))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{} {}",
                        series(&format!("{n}_bucket"), l, Some(("le", "+Inf"))),
                        h.count
                    );
                    let _ = writeln!(out, "{} {}", series(&format!("{n}_sum"), l, None), h.sum);
                    let _ = writeln!(
                        out,
                        "{} {}",
                        series(&format!("{n}_count"), l, None),
                        h.count
                    );
                }
            } else {
                for (l, v) in i.values.of(name) {
                    let _ = writeln!(out, "{} {v}", series(name, l, None));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let r = Registry::default();
        r.inc(
            "switchyard_calls_total",
            &[("provider", "openai"), ("model", "m\"x"), ("outcome", "ok")],
            1.0,
        );
        r.inc(
            "switchyard_calls_total",
            &[("provider", "openai"), ("model", "m\"x"), ("outcome", "ok")],
            2.0,
        );
        r.set("switchyard_database_up", &[], 1.0);
        r.observe(
            "switchyard_call_latency_seconds",
            &[("provider", "openai")],
            0.3,
        );
        r.observe(
            "switchyard_call_latency_seconds",
            &[("provider", "openai")],
            7.0,
        );
        let t = r.render();
        assert!(
            t.contains(
                "switchyard_calls_total{provider=\"openai\",model=\"m\\\"x\",outcome=\"ok\"} 3\n"
            ),
            "{t}"
        );
        assert!(t.contains("switchyard_database_up 1\n"));
        assert!(t.contains(
            "switchyard_call_latency_seconds_bucket{provider=\"openai\",le=\"0.25\"} 0\n"
        ));
        assert!(t.contains(
            "switchyard_call_latency_seconds_bucket{provider=\"openai\",le=\"0.5\"} 1\n"
        ));
        assert!(
            t.contains("switchyard_call_latency_seconds_bucket{provider=\"openai\",le=\"10\"} 2\n")
        );
        assert!(t.contains(
            "switchyard_call_latency_seconds_bucket{provider=\"openai\",le=\"+Inf\"} 2\n"
        ));
        assert!(t.contains("switchyard_call_latency_seconds_sum{provider=\"openai\"} 7.3\n"));
        assert!(t.contains("# TYPE switchyard_call_latency_seconds histogram\n"));
        assert_eq!(r.value("switchyard_database_up", &[]), 1.0);
    }
}
