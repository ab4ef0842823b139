//! Pure money arithmetic: token usage × unit prices → USD, in `Decimal`.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Unit prices in USD per 1M tokens, as charged for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    pub input_per_mtok: Decimal,
    pub output_per_mtok: Decimal,
    pub cached_input_per_mtok: Decimal,
    pub cache_write_per_mtok: Decimal,
}

/// Token usage of one call, with the contract's meaning: `input_tokens`
/// counts all input, including cached reads (`cached_input_tokens`) and cache
/// writes (`cache_write_input_tokens`); `output_tokens` counts all output,
/// including reasoning/thinking tokens (`reasoning_tokens`, informational).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub cache_write_input_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
}

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// What the providers' batch APIs charge: half of every real-time price.
pub const BATCH_DISCOUNT: Decimal = Decimal::from_parts(5, 0, 0, false, 1);

impl Prices {
    /// The prices of the same model through its provider's batch API.
    pub fn batch(&self) -> Prices {
        Prices {
            input_per_mtok: self.input_per_mtok * BATCH_DISCOUNT,
            output_per_mtok: self.output_per_mtok * BATCH_DISCOUNT,
            cached_input_per_mtok: self.cached_input_per_mtok * BATCH_DISCOUNT,
            cache_write_per_mtok: self.cache_write_per_mtok * BATCH_DISCOUNT,
        }
    }

    /// `((input − cached − cache_write) × input + cached × cached_input +
    /// cache_write × cache_write_price + output × output) / 1e6`.
    ///
    /// Cached and cache-write counts above the input count (a provider bug)
    /// are clamped, so a cost is never negative.
    pub fn cost(&self, u: &Usage) -> Decimal {
        let cached = u.cached_input_tokens.min(u.input_tokens);
        let written = u.cache_write_input_tokens.min(u.input_tokens - cached);
        let uncached = u.input_tokens - cached - written;
        (Decimal::from(uncached) * self.input_per_mtok
            + Decimal::from(cached) * self.cached_input_per_mtok
            + Decimal::from(written) * self.cache_write_per_mtok
            + Decimal::from(u.output_tokens) * self.output_per_mtok)
            / MILLION
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn prices(i: &str, o: &str, c: &str, w: &str) -> Prices {
        Prices {
            input_per_mtok: d(i),
            output_per_mtok: d(o),
            cached_input_per_mtok: d(c),
            cache_write_per_mtok: d(w),
        }
    }

    #[test]
    fn cost_is_exact() {
        let p = prices("0.15", "0.60", "0.075", "0.15");
        let u = Usage {
            input_tokens: 1_000,
            output_tokens: 500,
            cached_input_tokens: 200,
            ..Default::default()
        };
        // 800*0.15 + 200*0.075 + 500*0.60 = 120 + 15 + 300 = 435 -> /1e6
        assert_eq!(p.cost(&u), d("0.000435"));
    }

    #[test]
    fn cache_writes_are_priced_separately() {
        // claude-sonnet-4-5: 3.00 in, 15.00 out, 0.30 cached, 3.75 cache write.
        let p = prices("3.00", "15.00", "0.30", "3.75");
        let u = Usage {
            input_tokens: 10_000, // 2,000 plain + 5,000 read + 3,000 written
            output_tokens: 1_000,
            cached_input_tokens: 5_000,
            cache_write_input_tokens: 3_000,
            reasoning_tokens: 400,
        };
        // 2000*3 + 5000*0.30 + 3000*3.75 + 1000*15 = 6000 + 1500 + 11250 + 15000 = 33750
        assert_eq!(p.cost(&u), d("0.03375"));
    }

    #[test]
    fn counts_are_clamped_to_input() {
        let p = prices("1", "1", "0.1", "2");
        let u = Usage {
            input_tokens: 10,
            cached_input_tokens: 50,
            cache_write_input_tokens: 50,
            ..Default::default()
        };
        assert_eq!(p.cost(&u), d("0.000001"));
    }
}
