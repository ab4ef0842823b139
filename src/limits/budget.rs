//! Category budgets: daily and monthly USD caps (`categories.<c>.budget`).
//! The spend is what `calls` holds for the category since the start of the
//! UTC day or month, so it survives restarts and is the same for every
//! worker process; each process reads it at most every [`REFRESH`]. When a
//! cap is reached, new jobs of the category are served by a cheaper model
//! (`downgrade`) or parked in Postgres until the next period (`pause`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::config::{BudgetAction, BudgetConfig, Config};
use crate::store::{self, spend::Spend};

/// How stale a process's view of the spend may be (a cap can be overshot by
/// the calls started within this time).
pub const REFRESH: Duration = Duration::from_secs(2);

/// A cap that is reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Exceeded {
    /// `daily` or `monthly`.
    pub period: &'static str,
    pub cap_usd: Decimal,
    pub spent_usd: Decimal,
}

/// Which cap, if any, the spend of this day and month reaches (pure). A new
/// UTC day or month starts from zero: the spend passed in is the period's.
pub fn check(
    b: &BudgetConfig,
    spent_today: Decimal,
    spent_this_month: Decimal,
) -> Option<Exceeded> {
    if let Some(cap) = b.monthly_usd.filter(|c| spent_this_month >= *c) {
        return Some(Exceeded {
            period: "monthly",
            cap_usd: cap,
            spent_usd: spent_this_month,
        });
    }
    b.daily_usd
        .filter(|c| spent_today >= *c)
        .map(|cap| Exceeded {
            period: "daily",
            cap_usd: cap,
            spent_usd: spent_today,
        })
}

/// What a category's budget does to a job now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Within budget (a paused category: clear a job's parking).
    Within { pausable: bool },
    /// Serve the job with this model alone.
    Downgrade { model: String, exceeded: Exceeded },
    /// Park the job until the budget allows.
    Pause { exceeded: Exceeded },
}

impl Verdict {
    /// For `switchyard_budget_state`: 0 within, 1 downgraded, 2 paused.
    pub fn state(&self) -> f64 {
        match self {
            Verdict::Within { .. } => 0.0,
            Verdict::Downgrade { .. } => 1.0,
            Verdict::Pause { .. } => 2.0,
        }
    }

    /// Apply to a job about to start with `plan` and decision log `log`
    /// (pure): a downgrade replaces the plan and records why; a pause records
    /// why. Returns whether the job is to be parked.
    pub fn apply(
        &self,
        routes: &crate::route::Routes,
        plan: &mut crate::route::Plan,
        log: &mut serde_json::Value,
    ) -> bool {
        use serde_json::json;
        match self {
            Verdict::Within { .. } => false,
            Verdict::Downgrade { model, exceeded: x } => {
                if let Some(p) = routes.single_plan(model) {
                    log["budget"] = json!({"action": "downgrade", "period": x.period,
                        "cap_usd": x.cap_usd, "spent_usd": x.spent_usd,
                        "route": log.get("kind").cloned(), "model": model});
                    log["kind"] = json!("single");
                    log["model"] = json!(model);
                    *plan = p;
                }
                false
            }
            Verdict::Pause { exceeded: x } => {
                log["budget"] = json!({"action": "pause", "period": x.period,
                    "cap_usd": x.cap_usd, "spent_usd": x.spent_usd});
                true
            }
        }
    }
}

/// Spend per category, and when it was read.
type Snapshot = (Instant, HashMap<String, Spend>);

/// This process's view of the budgeted categories' spend.
pub struct Book {
    pool: PgPool,
    categories: Vec<String>,
    cache: tokio::sync::Mutex<Option<Snapshot>>,
    /// The last state logged per category (`None`: within budget).
    logged: std::sync::Mutex<HashMap<String, Option<&'static str>>>,
}

impl Book {
    pub fn new(cfg: &Config, pool: PgPool) -> Self {
        Self {
            pool,
            categories: cfg
                .categories
                .iter()
                .filter(|(_, c)| c.budget.is_some())
                .map(|(n, _)| n.clone())
                .collect(),
            cache: Default::default(),
            logged: Default::default(),
        }
    }

    /// The category's (today, this month) spend, at most [`REFRESH`] old.
    pub async fn spent(&self, category: &str) -> Result<(Decimal, Decimal)> {
        let mut cache = self.cache.lock().await;
        let fresh = cache.as_ref().is_some_and(|(at, _)| at.elapsed() < REFRESH);
        if !fresh {
            let spend = store::spend::by_category(&self.pool, &self.categories).await?;
            *cache = Some((Instant::now(), spend));
        }
        let spend = cache
            .as_ref()
            .and_then(|(_, m)| m.get(category).copied())
            .unwrap_or_default();
        Ok((spend.today_usd, spend.this_month_usd))
    }

    /// What `category`'s budget (None: it has none) does to a job now.
    pub async fn verdict(&self, cfg: &Config, category: &str) -> Result<Option<Verdict>> {
        let Some(b) = cfg.categories.get(category).and_then(|c| c.budget.as_ref()) else {
            return Ok(None);
        };
        let v = match (self.exceeded(cfg, category).await?, b.on_exceed) {
            (None, a) => Verdict::Within {
                pausable: a == BudgetAction::Pause,
            },
            (Some(exceeded), BudgetAction::Downgrade) => Verdict::Downgrade {
                model: b.downgrade_to.clone().unwrap_or_default(),
                exceeded,
            },
            (Some(exceeded), BudgetAction::Pause) => Verdict::Pause { exceeded },
        };
        crate::metrics::global().set(
            "switchyard_budget_state",
            &[("category", category)],
            v.state(),
        );
        Ok(Some(v))
    }

    /// Whether `category`'s budget (if it has one) is reached.
    pub async fn exceeded(&self, cfg: &Config, category: &str) -> Result<Option<Exceeded>> {
        let Some(b) = cfg.categories.get(category).and_then(|c| c.budget.as_ref()) else {
            return Ok(None);
        };
        let (day, month) = self.spent(category).await?;
        let x = check(b, day, month);
        // Log when the state changes (as this process sees it).
        let now = x.as_ref().map(|x| x.period);
        if let Ok(mut logged) = self.logged.lock() {
            let before = logged.insert(category.to_string(), now).flatten();
            if before != now {
                match &x {
                    Some(x) => tracing::warn!(
                        category,
                        period = x.period,
                        cap_usd = %x.cap_usd,
                        spent_usd = %x.spent_usd,
                        action = ?b.on_exceed,
                        "budget reached"
                    ),
                    None if before.is_some() => {
                        tracing::info!(category, "budget allows again")
                    }
                    None => {}
                }
            }
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn caps_are_reached_at_their_amount_and_reset_with_the_period() {
        let b = BudgetConfig {
            daily_usd: Some(d("5")),
            monthly_usd: Some(d("100")),
            on_exceed: BudgetAction::Pause,
            downgrade_to: None,
        };
        assert_eq!(check(&b, d("4.99"), d("50")), None);
        assert_eq!(check(&b, d("5"), d("50")).unwrap().period, "daily");
        // A new day: today's spend starts again from zero.
        assert_eq!(check(&b, d("0"), d("55")), None);
        let m = check(&b, d("1"), d("100.5")).unwrap();
        assert_eq!(
            (m.period, m.cap_usd, m.spent_usd),
            ("monthly", d("100"), d("100.5"))
        );
        // A new month: both start from zero.
        assert_eq!(check(&b, d("0"), d("0")), None);
        let only_daily = BudgetConfig {
            monthly_usd: None,
            ..b
        };
        assert_eq!(check(&only_daily, d("1"), d("1000")), None);
    }
}
