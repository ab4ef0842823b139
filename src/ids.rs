//! Identifiers (leaf: imports nothing of the crate): job ids and the tag
//! that names one attempt of one step of a job on the wire.

/// A random job id: 20 hex characters.
pub fn new_job_id() -> String {
    format!("{:016x}{:04x}", fastrand::u64(..), fastrand::u16(..))
}

/// The header that carries `providers::CallRequest::tag`.
pub const CALL_TAG_HEADER: &str = "x-switchyard-call";

/// The tag of one attempt of a job's step, as sent in [`CALL_TAG_HEADER`]:
/// `job#step#attempt`, with bytes a header cannot carry (and `%`)
/// percent-encoded (job ids may hold any printable Unicode).
pub fn call_tag(job_id: &str, step: i32, attempt: i32) -> String {
    let mut t = String::with_capacity(job_id.len() + 8);
    for b in job_id.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' {
            t.push(b as char);
        } else {
            t.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{t}#{step}#{attempt}")
}

/// The inverse of [`call_tag`]'s encoding: `job#step#attempt` as sent,
/// with the job id decoded. `None` if it is not a tag.
pub fn parse_call_tag(tag: &str) -> Option<(String, i32, i32)> {
    let mut parts = tag.rsplitn(3, '#');
    let attempt = parts.next()?.parse().ok()?;
    let step = parts.next()?.parse().ok()?;
    let enc = parts.next()?.as_bytes();
    let mut out = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        if enc[i] == b'%' {
            let hex = std::str::from_utf8(enc.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(enc[i]);
            i += 1;
        }
    }
    Some((String::from_utf8(out).ok()?, step, attempt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_tags_survive_any_job_id() {
        for id in ["job-1", "a#b#c", "100%", "naïve Ünïcödé ✓", "sp ace\"q"] {
            let t = call_tag(id, 3, 12);
            assert!(t.bytes().all(|b| (0x21..0x7f).contains(&b)), "{t}");
            assert_eq!(parse_call_tag(&t), Some((id.to_string(), 3, 12)));
        }
        assert_eq!(parse_call_tag("nope"), None);
        assert_eq!(parse_call_tag("x#1#y"), None);
    }
}
