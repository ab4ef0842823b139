//! Completion webhooks: when a job ends, Switchyard POSTs
//! `{job_id, category, status, cost_usd, output, output_json}` to its
//! callback URL, signed with HMAC-SHA256.
//!
//! This module is pure (the allowlist, the signature, the backoff, the
//! payload); [`deliver`] is the background task that sends and records the
//! attempts (`store::webhooks`, table `webhook_deliveries`).
//!
//! The signature header is `Switchyard-Signature: t=<unix seconds>,v1=<hex>`
//! where `<hex>` is HMAC-SHA256 under `webhooks.secret` of `<t>.<body>`
//! (the exact bytes of the request body). docs/api.md shows a receiver's
//! check in five lines of Python.

pub mod deliver;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The request header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Switchyard-Signature";
/// The request header naming the delivery series (the same on every retry
/// of one delivery): receivers may de-duplicate on it.
pub const DELIVERY_HEADER: &str = "Switchyard-Delivery";

/// What a receiver gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    pub job_id: String,
    pub category: String,
    /// `succeeded`, `failed`, `dead`, `cancelled` or `expired`.
    pub status: String,
    /// What the job's calls cost, as `GET /v1/jobs/{id}` reports it: a
    /// decimal string, never a float.
    pub cost_usd: Decimal,
    pub output: Option<String>,
    pub output_json: Option<serde_json::Value>,
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(k.map(|b| b ^ 0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(k.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of [`SIGNATURE_HEADER`] for `body` sent at `t` (Unix seconds).
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    format!("t={t},v1={}", hex(&hmac_sha256(secret, &signed)))
}

/// Whether `header` signs `body` under `secret` (what a receiver checks;
/// the tests check deliveries with it).
pub fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let field = |name: &str| {
        header
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
    };
    let (Some(t), Some(v1)) = (field("t"), field("v1")) else {
        return false;
    };
    let Ok(t) = t.parse::<i64>() else {
        return false;
    };
    let want = signature(secret, t, body);
    // Constant time over the hex digits.
    let got = format!("t={t},v1={v1}");
    want.len() == got.len()
        && want
            .bytes()
            .zip(got.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// One `webhooks.allow_hosts` entry: a host, or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// Lower case; an IPv6 address in brackets.
    pub host: String,
    /// `None`: only the URL scheme's default port (80 for http, 443 for https).
    pub port: Option<u16>,
}

/// Read an allowlist entry: `hooks.example.com`, `127.0.0.1:8080`,
/// `[::1]:9000`. No scheme, path, user or wildcard.
pub fn parse_allowed(entry: &str) -> Result<AllowedHost, String> {
    let bad = || {
        format!(
            "`{entry}` is not a host or host:port (such as hooks.example.com or 127.0.0.1:8080)"
        )
    };
    if entry.is_empty() || entry.contains(['/', '@', '?', '#', '*']) || entry.contains("://") {
        return Err(bad());
    }
    let u = url::Url::parse(&format!("http://{entry}/")).map_err(|_| bad())?;
    let host = u.host_str().ok_or_else(bad)?.to_string();
    // `Url::port` hides a port equal to http's default: read it from the text.
    let port = match entry.rsplit_once(':') {
        Some((_, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| bad())?)
        }
        _ => None,
    };
    Ok(AllowedHost { host, port })
}

/// Why `url` may not be called back, if it may not: it must be an http(s)
/// URL without credentials whose host (and port) is on `allow_hosts`. An
/// entry without a port allows the host on the scheme's default port only;
/// `host:port` allows that port (on http and https). Hosts compare
/// exactly (case-insensitive): no wildcards, no subdomains, no resolving.
pub fn check_url(url: &str, allow_hosts: &[String]) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("`{url}` must be an http:// or https:// URL"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("a callback URL may not carry a user or password".into());
    }
    let host = u.host_str().unwrap_or_default();
    let port = u.port_or_known_default().unwrap_or(0);
    let allowed = allow_hosts
        .iter()
        .filter_map(|e| parse_allowed(e).ok())
        .any(|a| {
            a.host == host
                && match a.port {
                    Some(p) => p == port,
                    None => u.port().is_none(),
                }
        });
    if allowed {
        return Ok(());
    }
    let shown = match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    if allow_hosts.is_empty() {
        Err(format!(
            "host `{shown}` is not allowed: webhooks.allow_hosts is empty (no callbacks)"
        ))
    } else {
        Err(format!("host `{shown}` is not on webhooks.allow_hosts"))
    }
}

/// The wait before attempt `attempt + 1` after attempt `attempt` (from 1)
/// failed: `base` doubled per attempt, capped at `max`, in milliseconds.
pub fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64) -> u64 {
    let factor = 1u64 << attempt.saturating_sub(1).min(32);
    base_ms.saturating_mul(factor).min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_signature_verifies_only_with_its_secret_and_body() {
        let body = br#"{"job_id":"j1"}"#;
        let h = signature(b"s3cret", 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="), "{h}");
        assert!(verify(b"s3cret", &h, body));
        assert!(!verify(b"other", &h, body));
        assert!(!verify(b"s3cret", &h, br#"{"job_id":"j2"}"#));
        assert!(!verify(
            b"s3cret",
            &h.replace("1700000000", "1700000001"),
            body
        ));
        assert!(!verify(b"s3cret", "v1=00", body));
    }

    #[test]
    fn only_listed_hosts_and_ports_are_called_back() {
        let allow: Vec<String> = ["hooks.example.com", "127.0.0.1:8080", "[::1]:9000"]
            .map(String::from)
            .to_vec();
        for ok in [
            "https://hooks.example.com/done",
            "http://HOOKS.example.com/x?y=1",
            "https://hooks.example.com:443/",
            "http://127.0.0.1:8080/hook",
            "https://127.0.0.1:8080/hook",
            "http://[::1]:9000/",
        ] {
            assert_eq!(check_url(ok, &allow), Ok(()), "{ok}");
        }
        for (bad, why) in [
            (
                "https://hooks.example.com:8443/",
                "`hooks.example.com:8443` is not on",
            ),
            ("http://127.0.0.1/hook", "`127.0.0.1` is not on"),
            ("http://127.0.0.1:8081/hook", "not on"),
            ("https://evil.hooks.example.com/", "not on"),
            ("http://169.254.169.254/latest", "not on"),
            ("ftp://hooks.example.com/", "http:// or https://"),
            ("hooks.example.com/done", "not a URL"),
            ("https://u:p@hooks.example.com/", "user or password"),
        ] {
            let e = check_url(bad, &allow).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(check_url("https://hooks.example.com/", &[])
            .unwrap_err()
            .contains("allow_hosts is empty"));
    }

    #[test]
    fn allowlist_entries_are_hosts_or_host_ports() {
        assert_eq!(
            parse_allowed("Hooks.Example.com"),
            Ok(AllowedHost {
                host: "hooks.example.com".into(),
                port: None
            })
        );
        assert_eq!(parse_allowed("127.0.0.1:80").unwrap().port, Some(80));
        assert_eq!(parse_allowed("[::1]").unwrap().port, None);
        for bad in [
            "",
            "https://x.com",
            "x.com/path",
            "*.x.com",
            "u@x.com",
            "x.com:99999",
        ] {
            assert!(parse_allowed(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(
            (1..=6)
                .map(|a| backoff_ms(a, 1000, 10_000))
                .collect::<Vec<_>>(),
            [1000, 2000, 4000, 8000, 10_000, 10_000]
        );
        assert_eq!(backoff_ms(200, 1000, 60_000), 60_000);
    }

    #[test]
    fn cost_travels_as_a_decimal_string() {
        let p = Payload {
            job_id: "j".into(),
            category: "support".into(),
            status: "succeeded".into(),
            cost_usd: "0.000123".parse().unwrap(),
            output: Some("hi".into()),
            output_json: None,
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["cost_usd"], "0.000123");
    }
}
