//! Pure money arithmetic: token usage × unit prices → USD, in `Decimal`.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Unit prices in USD per 1M tokens, as charged for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    pub input_per_mtok: Decimal,
    pub output_per_mtok: Decimal,
    pub cached_input_per_mtok: Decimal,
}

/// Token usage of one call, with the contract's meaning: `input_tokens`
/// counts all input including `cached_input_tokens`; `output_tokens` counts
/// all output including reasoning tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
}

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

impl Prices {
    /// `((input − cached) × input + cached × cached_input + output × output) / 1e6`.
    /// Cached tokens above the input count (a provider bug) are clamped.
    pub fn cost(&self, u: &Usage) -> Decimal {
        let cached = u.cached_input_tokens.min(u.input_tokens);
        let uncached = u.input_tokens - cached;
        (Decimal::from(uncached) * self.input_per_mtok
            + Decimal::from(cached) * self.cached_input_per_mtok
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

    #[test]
    fn cost_is_exact() {
        let p = Prices {
            input_per_mtok: d("0.15"),
            output_per_mtok: d("0.60"),
            cached_input_per_mtok: d("0.075"),
        };
        let u = Usage {
            input_tokens: 1_000,
            output_tokens: 500,
            cached_input_tokens: 200,
        };
        // 800*0.15 + 200*0.075 + 500*0.60 = 120 + 15 + 300 = 435 -> /1e6
        assert_eq!(p.cost(&u), d("0.000435"));
    }

    #[test]
    fn cached_is_clamped_to_input() {
        let p = Prices {
            input_per_mtok: d("1"),
            output_per_mtok: d("1"),
            cached_input_per_mtok: d("0.1"),
        };
        let u = Usage {
            input_tokens: 10,
            output_tokens: 0,
            cached_input_tokens: 50,
        };
        assert_eq!(p.cost(&u), d("0.000001"));
    }
}
