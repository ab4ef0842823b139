//! Parsing of retry and rate-limit headers. Pure; nonsense values are
//! treated as absent, never as errors.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use super::{Budget, RateInfo};

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
    let mut info = RateInfo::default();
    for what in ["requests", "tokens"] {
        // Some gateways send limit 0 / -1 with no meaning; a remaining count
        // is only trusted when a positive limit accompanies it.
        let Some(limit) = num(&format!("x-ratelimit-limit-{what}")).filter(|l| *l > 0) else {
            continue;
        };
        if let Some(remaining) = num(&format!("x-ratelimit-remaining-{what}")) {
            info.budgets.push(Budget {
                name: what_name(what),
                limit: Some(limit),
                remaining,
                reset: header(h, &format!("x-ratelimit-reset-{what}")).and_then(parse_go_duration),
            });
        }
    }
    info
}

/// Anthropic's `anthropic-ratelimit-<budget>-{limit,remaining,reset}` headers,
/// resets as RFC 3339 timestamps (turned into waits from `now`).
pub fn anthropic_rate_info(h: &HeaderMap, now: SystemTime) -> RateInfo {
    let num = |name: &str| header(h, name).and_then(|v| v.parse::<u64>().ok());
    let mut info = RateInfo::default();
    for what in ["requests", "tokens", "input-tokens", "output-tokens"] {
        let Some(limit) = num(&format!("anthropic-ratelimit-{what}-limit")).filter(|l| *l > 0)
        else {
            continue;
        };
        if let Some(remaining) = num(&format!("anthropic-ratelimit-{what}-remaining")) {
            let reset = header(h, &format!("anthropic-ratelimit-{what}-reset"))
                .and_then(parse_rfc3339)
                .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
                .filter(|d| *d <= MAX_HEADER_WAIT);
            info.budgets.push(Budget {
                name: what_name(what),
                limit: Some(limit),
                remaining,
                reset,
            });
        }
    }
    info
}

fn what_name(what: &str) -> &'static str {
    match what {
        "requests" => "requests",
        "tokens" => "tokens",
        "input-tokens" => "input_tokens",
        _ => "output_tokens",
    }
}

/// An RFC 3339 UTC timestamp such as `2025-08-21T12:40:59Z` (fractions and
/// numeric offsets accepted).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, hh, mm, ss) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        let f = &frac[..digits];
        if f.is_empty() {
            return None;
        }
        let padded = format!("{:0<9}", &f[..f.len().min(9)]);
        nanos = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
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
        assert_eq!(r.budget("requests").unwrap().remaining, 0);
        assert_eq!(r.exhausted_for(), Some(Duration::from_secs(1)));
        // Azure-style nonsense is ignored.
        let h = hm(&[
            ("x-ratelimit-limit-requests", "-1"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "0"),
        ]);
        assert_eq!(openai_rate_info(&h).exhausted_for(), None);
    }

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("2025-08-21T12:40:59Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_755_780_059
        );
        let f = parse_rfc3339("2025-08-21T12:40:59.250Z").unwrap();
        assert_eq!(f.duration_since(t).unwrap(), Duration::from_millis(250));
        let o = parse_rfc3339("2025-08-21T14:40:59+02:00").unwrap();
        assert_eq!(o, t);
        assert_eq!(
            parse_rfc3339("2000-01-01T00:00:00Z")
                .unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            946_684_800
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        for t in [
            t,
            parse_rfc3339("2024-02-29T23:59:59Z").unwrap(),
            SystemTime::UNIX_EPOCH,
        ] {
            assert_eq!(parse_rfc3339(&crate::clock::fmt_rfc3339(t)), Some(t));
        }
        assert_eq!(crate::clock::fmt_rfc3339(t), "2025-08-21T12:40:59Z");
        assert_eq!(parse_rfc3339("2025-13-21T12:40:59Z"), None);
        assert_eq!(parse_rfc3339("2025-08-21T12:40:59"), None);
    }

    #[test]
    fn anthropic_rate_headers() {
        let now = parse_rfc3339("2025-08-21T12:40:00Z").unwrap();
        let h = hm(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:01Z"),
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-08-21T12:40:30Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "7000"),
            ("anthropic-ratelimit-output-tokens-reset", "not a date"),
        ]);
        let r = anthropic_rate_info(&h, now);
        assert_eq!(r.budgets.len(), 3);
        assert_eq!(r.exhausted_for(), Some(Duration::from_secs(30)));
        assert_eq!(r.budget("output_tokens").unwrap().reset, None);
    }
}
