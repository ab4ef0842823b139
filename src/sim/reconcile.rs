//! The simulator's ledger against the `calls` rows (pure): every request
//! the simulator answered must have its row, and every `ok` row an answer.

use std::collections::{HashMap, HashSet};

use super::LedgerEntry;

/// The ledger against the `calls` rows `(job, step, attempt, outcome)`.
#[derive(Debug, Default, PartialEq)]
pub struct Reconciled {
    pub answered: usize,
    pub untagged: usize,
    pub unrecorded: usize,
    pub phantom: usize,
    pub duplicate_answers: usize,
}

/// Compare what the simulator answered with what `calls` holds (pure).
pub fn reconcile(ledger: &[LedgerEntry], rows: &[(String, i32, i32, String)]) -> Reconciled {
    let recorded: HashSet<(&str, i32, i32)> = rows
        .iter()
        .map(|(j, s, a, _)| (j.as_str(), *s, *a))
        .collect();
    let mut r = Reconciled {
        answered: ledger.len(),
        ..Default::default()
    };
    let mut seen: HashSet<(&str, i32, i32)> = HashSet::new();
    let mut answered_ok: HashSet<(&str, i32, i32)> = HashSet::new();
    for e in ledger {
        let Some(t) = &e.call else {
            r.untagged += 1;
            continue;
        };
        let key = (t.job_id.as_str(), t.step, t.attempt);
        // One row accounts for one request: a second request with the same
        // tag is unrecorded.
        if !seen.insert(key) || !recorded.contains(&key) {
            r.unrecorded += 1;
        }
        if e.status == 200 {
            answered_ok.insert(key);
        }
    }
    r.unrecorded += r.untagged;
    let mut ok_per_step: HashMap<(&str, i32), usize> = HashMap::new();
    for (j, s, a, outcome) in rows {
        if outcome == "ok" {
            if !answered_ok.contains(&(j.as_str(), *s, *a)) {
                r.phantom += 1;
            }
            *ok_per_step.entry((j.as_str(), *s)).or_default() += 1;
        }
    }
    r.duplicate_answers = ok_per_step.values().filter(|n| **n > 1).count();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{CallTag, Format};

    fn entry(tag: Option<(&str, i32, i32)>, status: u16) -> LedgerEntry {
        LedgerEntry {
            seq: 0,
            format: Format::Openai,
            model: "m".into(),
            status,
            prompt_tokens: 1,
            completion_tokens: 1,
            max_tokens: 1,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            at_ms: 0,
            has_auth: false,
            retry_after_ms: None,
            in_flight: 1,
            call: tag.map(|(j, s, a)| CallTag {
                job_id: j.into(),
                step: s,
                attempt: a,
            }),
            batch: None,
            images: 0,
        }
    }

    fn row(j: &str, s: i32, a: i32, o: &str) -> (String, i32, i32, String) {
        (j.into(), s, a, o.into())
    }

    #[test]
    fn reconcile_finds_unrecorded_phantom_and_twice_answered_calls() {
        let ledger = vec![
            entry(Some(("a", 0, 1)), 500),
            entry(Some(("a", 0, 2)), 200),
            entry(Some(("b", 0, 1)), 200), // worker died: recorded as unknown
            entry(Some(("c", 0, 1)), 200), // no row at all
            entry(Some(("d", 0, 1)), 200),
            entry(Some(("d", 0, 1)), 200), // the same attempt twice
            entry(Some(("e", 1, 1)), 200),
            entry(Some(("e", 1, 2)), 200),
            entry(None, 200),
        ];
        let rows = vec![
            row("a", 0, 1, "retryable_error"),
            row("a", 0, 2, "ok"),
            row("b", 0, 1, "unknown"),
            row("d", 0, 1, "ok"),
            row("e", 1, 1, "ok"),
            row("e", 1, 2, "ok"),
            row("f", 0, 1, "ok"),      // never answered
            row("a", 0, 3, "unknown"), // intent, the call never left
        ];
        let r = reconcile(&ledger, &rows);
        assert_eq!(
            r,
            Reconciled {
                answered: 9,
                untagged: 1,
                unrecorded: 3, // c, d's second request, the untagged one
                phantom: 1,
                duplicate_answers: 1,
            }
        );
    }
}
