//! Parsing of retry and rate-limit headers. Pure; nonsense values are
//! treated as absent, never as errors.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use super::RateInfo;

/// Longest wait we accept from a provider header; beyond it the value is
/// treated as nonsense (a daily quota is handled by failing, not sleeping).
pub const MAX_HEADER_WAIT: Duration = Duration::from_secs(3600);

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// `retry-after-ms` (milliseconds), else `retry-after` as seconds or an HTTP date.
pub fn retry_after(h: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header(h, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 && ms <= MAX_HEADER_WAIT.as_millis() as f64 {
            return Some(Duration::from_micros((ms * 1000.0) as u64));
        }
    }
    let v = header(h, "retry-after")?;
    parse_retry_after(v, now)
}

/// A `retry-after` value: delta-seconds (fractions tolerated) or an HTTP date.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 && secs <= MAX_HEADER_WAIT.as_secs_f64() {
            return Some(Duration::from_secs_f64(secs));
        }
        return None;
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let d = at.duration_since(now).unwrap_or(Duration::ZERO);
    (d <= MAX_HEADER_WAIT).then_some(d)
}

/// A Go duration such as `12ms`, `1s`, `6m0s`, `1h2m3.5s`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += n * unit;
    }
    (total.is_finite() && total <= MAX_HEADER_WAIT.as_secs_f64())
        .then(|| Duration::from_secs_f64(total))
}

/// OpenAI's `x-ratelimit-*` headers. Negative or unparsable values are absent.
pub fn openai_rate_info(h: &HeaderMap) -> RateInfo {
    let num = |name: &str| header(h, name).and_then(|v| v.parse::<u64>().ok());
    let dur = |name: &str| header(h, name).and_then(parse_go_duration);
    // Some gateways send limit 0 / -1 with no meaning; a remaining count is only
    // trusted when a positive limit accompanies it.
    let limit_ok = |name: &str| num(name).is_some_and(|l| l > 0);
    RateInfo {
        remaining_requests: limit_ok("x-ratelimit-limit-requests")
            .then(|| num("x-ratelimit-remaining-requests"))
            .flatten(),
        remaining_tokens: limit_ok("x-ratelimit-limit-tokens")
            .then(|| num("x-ratelimit-remaining-tokens"))
            .flatten(),
        reset_requests: dur("x-ratelimit-reset-requests"),
        reset_tokens: dur("x-ratelimit-reset-tokens"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse_go_duration("0h1m2.5s"),
            Some(Duration::from_millis(62_500))
        );
        // Beyond an hour is treated as nonsense.
        assert_eq!(parse_go_duration("1h2m3s"), None);
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("-1"), None);
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&hm(&[("retry-after", "2")]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&hm(&[("retry-after-ms", "250"), ("retry-after", "9")]), now),
            Some(Duration::from_millis(250))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(&hm(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_after(&hm(&[("retry-after", "-1")]), now), None);
        assert_eq!(retry_after(&hm(&[("retry-after", "tomorrow")]), now), None);
        assert_eq!(retry_after(&hm(&[("retry-after", "99999999")]), now), None);
        assert_eq!(retry_after(&hm(&[("retry-after-ms", "NaN")]), now), None);
        assert_eq!(retry_after(&hm(&[]), now), None);
    }

    #[test]
    fn openai_rate_headers() {
        let h = hm(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "500"),
            ("x-ratelimit-reset-tokens", "30s"),
        ]);
        let r = openai_rate_info(&h);
        assert_eq!(r.remaining_requests, Some(0));
        assert_eq!(r.exhausted_for(), Some(Duration::from_secs(1)));
        // Azure-style nonsense is ignored.
        let h = hm(&[
            ("x-ratelimit-limit-requests", "-1"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "0"),
        ]);
        assert_eq!(openai_rate_info(&h).exhausted_for(), None);
    }
}
