//! Job envelope v1: the JSON document producers publish on
//! `<prefix>.jobs.<category>`, and its validation. Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The only envelope version this build understands.
pub const ENVELOPE_VERSION: u32 = 1;
/// Longest accepted job id, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// A job as published by a producer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobEnvelope {
    /// Envelope version; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Client-chosen idempotency key; also the `Nats-Msg-Id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Task category; absent means the subject's last token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Chat messages (role/content). Exactly one of `messages` and `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    /// A single user prompt. Exactly one of `messages` and `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Extra system prompt, appended to the category's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Generation parameters.
    #[serde(default, skip_serializing_if = "Params::is_empty")]
    pub params: Params,
    /// Free-form string metadata, stored with the job.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// When the result is needed, an RFC 3339 time (`2026-11-30T06:00:00Z`).
    /// A job whose deadline has passed when it arrives is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// The answer must be JSON: `{"type": "json_object"}` or `{"type":
    /// "json_schema", "name", "schema", "strict"}` (replaces the category's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<crate::structured::ResponseFormat>,
    /// Not before this RFC 3339 time: the job waits in Postgres (holding no
    /// NATS delivery) until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// A job not started by this RFC 3339 time ends `expired`, with no
    /// provider call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Where to POST the signed result when the job ends (an http(s) URL
    /// whose host is on `webhooks.allow_hosts`); replaces the category's
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// `high`, `normal` (absent) or `low`: the order in which a provider
    /// lane serves waiting calls.
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
}

/// A job's priority: within a provider lane, waiting `high` calls are
/// served first, then `normal`, then `low` (which keeps a configured share,
/// `priority.low_share`, so it never starves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Every priority, the most urgent first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// One chat turn. `content` is a string, or a list of parts (text and
/// images) on the wire; here `content` is always the text (the text parts
/// joined by newlines) and `parts` holds the list when one was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireMessage", into = "WireMessage")]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The parts, in order, when the content was given as a list.
    pub parts: Vec<Part>,
}

/// A part of a message's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    Text {
        text: String,
    },
    /// An image by `url` (https), or inline as base64 `data` with its
    /// `media_type` (`image/jpeg`, `image/png`, `image/gif`, `image/webp`).
    Image {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media_type: Option<String>,
    },
}

impl Message {
    /// A plain text turn.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            parts: Vec::new(),
        }
    }

    /// The images among the parts.
    pub fn images(&self) -> impl Iterator<Item = &Part> {
        self.parts
            .iter()
            .filter(|p| matches!(p, Part::Image { .. }))
    }
}

/// A message as it travels: `content` a string or a list of parts.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMessage {
    role: Role,
    content: WireContent,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WireContent {
    Text(String),
    Parts(Vec<serde_json::Value>),
}

impl TryFrom<WireMessage> for Message {
    type Error = String;

    fn try_from(w: WireMessage) -> Result<Self, String> {
        match w.content {
            WireContent::Text(content) => Ok(Message::text(w.role, content)),
            WireContent::Parts(raw) => {
                let mut parts = Vec::with_capacity(raw.len());
                for (i, v) in raw.into_iter().enumerate() {
                    let p: Part =
                        serde_json::from_value(v).map_err(|e| format!("content[{i}]: {e}"))?;
                    parts.push(p);
                }
                let content = parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::Text { text } => Some(text.as_str()),
                        Part::Image { .. } => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                Ok(Message {
                    role: w.role,
                    content,
                    parts,
                })
            }
        }
    }
}

impl From<Message> for WireMessage {
    fn from(m: Message) -> Self {
        let content = if m.parts.is_empty() {
            WireContent::Text(m.content)
        } else {
            WireContent::Parts(
                m.parts
                    .into_iter()
                    .filter_map(|p| serde_json::to_value(p).ok())
                    .collect(),
            )
        };
        WireMessage {
            role: m.role,
            content,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

impl Params {
    fn is_empty(&self) -> bool {
        self.max_tokens.is_none() && self.temperature.is_none()
    }
}

/// Why a job message was rejected; the text lands in `dead_letters.reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    Oversize { size: usize, limit: usize },
    #[error("not a valid job envelope: {0}")]
    Malformed(String),
    #[error("unsupported envelope version {0} (this worker understands version 1)")]
    UnknownVersion(u32),
    #[error("empty input: give a non-empty `prompt` or `messages` with content")]
    EmptyInput,
    #[error("give either `prompt` or `messages`, not both")]
    BothInputs,
    #[error("invalid job id: {0}")]
    BadId(String),
    #[error("unknown category `{0}`")]
    UnknownCategory(String),
    #[error("body category `{body}` contradicts subject category `{subject}`")]
    CategoryMismatch { body: String, subject: String },
    #[error("invalid params: {0}")]
    BadParams(String),
    #[error("{count} messages exceed the limit of {limit} per job")]
    TooManyMessages { count: usize, limit: usize },
    #[error("invalid deadline `{0}`: expected an RFC 3339 time such as 2026-11-30T06:00:00Z")]
    BadDeadline(String),
    #[error("deadline {0} had already passed when the job arrived")]
    DeadlinePassed(String),
    #[error("invalid response_format: {0}")]
    BadResponseFormat(String),
    #[error("invalid image: {0}")]
    BadImage(String),
    #[error("invalid {field} `{value}`: expected an RFC 3339 time such as 2026-11-30T06:00:00Z")]
    BadTime { field: &'static str, value: String },
    #[error("invalid callback_url: {0}")]
    BadCallback(String),
}

/// Image media types every provider takes.
pub const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Why the job's images cannot be sent, if they cannot: each one a `url`
/// (http or https) or base64 `data` of a known `media_type` within
/// `max_image_bytes`, at most `max_images_per_job`, none in a system turn.
pub fn check_images(
    messages: &[Message],
    limits: &crate::config::LimitsConfig,
) -> Result<(), String> {
    use base64::Engine as _;
    let mut count = 0;
    for (i, m) in messages.iter().enumerate() {
        for p in m.images() {
            let Part::Image {
                url,
                data,
                media_type,
            } = p
            else {
                continue;
            };
            count += 1;
            let at = format!("messages[{i}]");
            if m.role == Role::System {
                return Err(format!("{at}: a system turn cannot carry images"));
            }
            match (url, data) {
                (Some(u), None) => {
                    let lower = u.to_ascii_lowercase();
                    if !(lower.starts_with("https://") || lower.starts_with("http://")) {
                        return Err(format!(
                            "{at}: image url must be http(s), not `{}`",
                            u.chars().take(40).collect::<String>()
                        ));
                    }
                }
                (None, Some(d)) => {
                    let mt = media_type.as_deref().unwrap_or("");
                    if !IMAGE_TYPES.contains(&mt) {
                        return Err(format!(
                            "{at}: media_type `{mt}` is not one of {}",
                            IMAGE_TYPES.join(", ")
                        ));
                    }
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(d.trim())
                        .map_err(|e| format!("{at}: image data is not base64: {e}"))?;
                    if bytes.len() > limits.max_image_bytes {
                        return Err(format!(
                            "{at}: image of {} bytes exceeds limits.max_image_bytes ({})",
                            bytes.len(),
                            limits.max_image_bytes
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "{at}: an image needs exactly one of `url` and `data`"
                    ))
                }
            }
        }
    }
    if count > limits.max_images_per_job {
        return Err(format!(
            "{count} images exceed limits.max_images_per_job ({})",
            limits.max_images_per_job
        ));
    }
    Ok(())
}

/// A validated job, ready to route.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidJob {
    pub id: String,
    pub category: String,
    pub envelope: JobEnvelope,
    /// The envelope's `deadline`, in milliseconds since the Unix epoch.
    pub deadline_ms: Option<i64>,
    /// `not_before` and `expires_at`, in milliseconds since the Unix epoch.
    pub not_before_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
}

/// An RFC 3339 time (`2026-11-30T06:00:00Z`, `2026-11-30T07:00:00+01:00`)
/// in milliseconds since the Unix epoch.
pub fn parse_deadline(text: &str) -> Option<i64> {
    let t = text.trim();
    // humantime reads UTC (`Z`) only: move an offset into the time first.
    let (base, offset_secs) = match t.len().checked_sub(6).map(|i| (i, &t[i..])) {
        Some((i, o))
            if (o.starts_with('+') || o.starts_with('-'))
                && o.as_bytes().get(3) == Some(&b':')
                && t[..i].contains('T') =>
        {
            let h: i64 = o[1..3].parse().ok()?;
            let m: i64 = o[4..6].parse().ok()?;
            let sign = if o.starts_with('-') { -1 } else { 1 };
            (format!("{}Z", &t[..i]), sign * (h * 3600 + m * 60))
        }
        _ => (t.to_string(), 0),
    };
    let at = humantime::parse_rfc3339(&base).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64;
    Some(ms - offset_secs * 1000)
}

/// What the dispatcher learned from a message, good or bad.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Valid(Box<ValidJob>),
    /// Rejected; `id`/`category` are what could be read, for the `jobs` row.
    Rejected {
        id: Option<String>,
        category: Option<String>,
        reason: Rejection,
    },
}

/// Parse and validate one job message.
///
/// * `subject_category`: the subject's last token.
/// * `fallback_id`: the id used when the envelope has none (derived from the
///   stream sequence, so a redelivery keeps it).
/// * `known_category`: whether a category exists in config.
/// * `now_ms`: the time of arrival (a passed deadline is rejected).
/// * `allow_hosts`: `webhooks.allow_hosts`, the only hosts a `callback_url`
///   may name.
pub fn parse_job(
    payload: &[u8],
    subject_category: &str,
    fallback_id: &str,
    limits: &crate::config::LimitsConfig,
    known_category: impl Fn(&str) -> bool,
    now_ms: i64,
    allow_hosts: &[String],
) -> Parsed {
    let max_payload_bytes = limits.max_payload_bytes;
    if payload.len() > max_payload_bytes {
        return Parsed::Rejected {
            id: None,
            category: Some(subject_category.to_string()),
            reason: Rejection::Oversize {
                size: payload.len(),
                limit: max_payload_bytes,
            },
        };
    }
    let env: JobEnvelope = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => {
            // Salvage the id for the jobs row when the JSON is an object with a string id.
            let id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
                .filter(|id| check_id(id).is_ok());
            return Parsed::Rejected {
                id,
                category: Some(subject_category.to_string()),
                reason: Rejection::Malformed(e.to_string()),
            };
        }
    };
    let id = env.id.clone().unwrap_or_else(|| fallback_id.to_string());
    let reject = |reason: Rejection| Parsed::Rejected {
        id: check_id(&id).ok().map(|_| id.clone()),
        category: Some(
            env.category
                .clone()
                .unwrap_or_else(|| subject_category.to_string()),
        ),
        reason,
    };
    if let Err(e) = check_id(&id) {
        return reject(e);
    }
    if let Some(v) = env.version {
        if v != ENVELOPE_VERSION {
            return reject(Rejection::UnknownVersion(v));
        }
    }
    let category = match &env.category {
        Some(c) if c != subject_category => {
            return reject(Rejection::CategoryMismatch {
                body: c.clone(),
                subject: subject_category.to_string(),
            })
        }
        Some(c) => c.clone(),
        None => subject_category.to_string(),
    };
    if !known_category(&category) {
        return reject(Rejection::UnknownCategory(category));
    }
    match (&env.prompt, &env.messages) {
        (Some(_), Some(_)) => return reject(Rejection::BothInputs),
        (Some(p), None) if p.trim().is_empty() => return reject(Rejection::EmptyInput),
        (None, Some(m))
            if m.iter()
                .all(|m| m.content.trim().is_empty() && m.images().next().is_none()) =>
        {
            return reject(Rejection::EmptyInput)
        }
        (None, None) => return reject(Rejection::EmptyInput),
        _ => {}
    }
    if let Some(m) = &env.messages {
        if m.len() > limits.max_messages {
            return reject(Rejection::TooManyMessages {
                count: m.len(),
                limit: limits.max_messages,
            });
        }
    }
    if env.params.max_tokens == Some(0) {
        return reject(Rejection::BadParams("max_tokens must be at least 1".into()));
    }
    if let Some(t) = env.params.temperature {
        if !(0.0..=2.0).contains(&t) {
            return reject(Rejection::BadParams(format!(
                "temperature {t} is outside 0..=2"
            )));
        }
    }
    if let Some(m) = &env.messages {
        if let Err(e) = check_images(m, limits) {
            return reject(Rejection::BadImage(e));
        }
    }
    if let Some(rf) = &env.response_format {
        if let Err(e) = rf.validate() {
            return reject(Rejection::BadResponseFormat(e));
        }
    }
    let deadline_ms = match &env.deadline {
        None => None,
        Some(d) => match parse_deadline(d) {
            None => return reject(Rejection::BadDeadline(d.clone())),
            Some(ms) if ms <= now_ms => return reject(Rejection::DeadlinePassed(d.clone())),
            Some(ms) => Some(ms),
        },
    };
    let time = |field: &'static str, v: &Option<String>| match v {
        None => Ok(None),
        Some(t) => parse_deadline(t).map(Some).ok_or(Rejection::BadTime {
            field,
            value: t.clone(),
        }),
    };
    let not_before_ms = match time("not_before", &env.not_before) {
        Ok(t) => t,
        Err(r) => return reject(r),
    };
    let expires_at_ms = match time("expires_at", &env.expires_at) {
        Ok(t) => t,
        Err(r) => return reject(r),
    };
    if let Some(u) = &env.callback_url {
        if let Err(e) = crate::webhooks::check_url(u, allow_hosts) {
            return reject(Rejection::BadCallback(e));
        }
    }
    Parsed::Valid(Box::new(ValidJob {
        id,
        category,
        envelope: env,
        deadline_ms,
        not_before_ms,
        expires_at_ms,
    }))
}

fn check_id(id: &str) -> Result<(), Rejection> {
    if id.is_empty() {
        return Err(Rejection::BadId("empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Rejection::BadId(format!(
            "{} bytes, the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if id.chars().any(|c| c.is_control()) {
        return Err(Rejection::BadId("contains control characters".into()));
    }
    Ok(())
}

impl JobEnvelope {
    /// A minimal envelope with a prompt.
    pub fn prompt(
        id: impl Into<String>,
        category: impl Into<String>,
        prompt: impl Into<String>,
    ) -> Self {
        Self {
            version: Some(ENVELOPE_VERSION),
            id: Some(id.into()),
            category: Some(category.into()),
            messages: None,
            prompt: Some(prompt.into()),
            system: None,
            params: Params::default(),
            metadata: BTreeMap::new(),
            deadline: None,
            response_format: None,
            not_before: None,
            expires_at: None,
            priority: Priority::Normal,
            callback_url: None,
        }
    }

    /// The conversation to send: the system prompt (category's, then the job's)
    /// first, then the messages or the prompt as one user message.
    pub fn conversation(&self, category_system: Option<&str>) -> Vec<Message> {
        let mut out = Vec::new();
        let system = match (category_system, self.system.as_deref()) {
            (Some(a), Some(b)) => Some(format!("{a}\n\n{b}")),
            (Some(a), None) => Some(a.to_string()),
            (None, Some(b)) => Some(b.to_string()),
            (None, None) => None,
        };
        if let Some(s) = system {
            out.push(Message {
                role: Role::System,
                content: s,
                parts: Vec::new(),
            });
        }
        if let Some(p) = &self.prompt {
            out.push(Message {
                role: Role::User,
                content: p.clone(),
                parts: Vec::new(),
            });
        }
        if let Some(m) = &self.messages {
            out.extend(m.iter().cloned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_a_string_or_a_list_of_parts_and_travels_as_given() {
        let text: Message = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
        assert_eq!(text, Message::text(Role::User, "hi"));
        assert_eq!(
            serde_json::to_string(&text).unwrap(),
            r#"{"role":"user","content":"hi"}"#
        );
        let raw = r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image","url":"https://x/1.png"},{"type":"text","text":"b"}]}"#;
        let m: Message = serde_json::from_str(raw).unwrap();
        assert_eq!(m.content, "a\nb");
        assert_eq!(m.images().count(), 1);
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::from_str::<serde_json::Value>(raw).unwrap()
        );
        for (bad, want) in [
            (
                r#"{"role":"user","content":[{"type":"video"}]}"#,
                "content[0]",
            ),
            (
                r#"{"role":"user","content":[{"type":"image","href":"x"}]}"#,
                "content[0]",
            ),
            (
                r#"{"role":"user","content":"x","extra":1}"#,
                "unknown field",
            ),
        ] {
            let e = serde_json::from_str::<Message>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    fn parse(payload: &str, subject_cat: &str) -> Parsed {
        let limits = crate::config::LimitsConfig {
            max_payload_bytes: 1024,
            max_messages: 4,
            ..Default::default()
        };
        parse_job(
            payload.as_bytes(),
            subject_cat,
            "JOBS-7",
            &limits,
            |c| matches!(c, "support" | "sales"),
            NOW_MS,
            &["hooks.example.com".to_string()],
        )
    }

    /// 2026-11-29T12:00:00Z.
    const NOW_MS: i64 = 1_795_953_600_000;

    #[test]
    fn deadlines_are_rfc3339_times_and_must_lie_ahead() {
        assert_eq!(parse_deadline("2026-11-29T12:00:00Z"), Some(NOW_MS));
        assert_eq!(
            parse_deadline("2026-11-29T13:30:00+01:00"),
            Some(NOW_MS + 1_800_000)
        );
        assert_eq!(
            parse_deadline("2026-11-29T11:00:00.250-01:00"),
            Some(NOW_MS + 250)
        );
        for bad in ["tomorrow", "2026-11-29", "2026-13-01T00:00:00Z", ""] {
            assert_eq!(parse_deadline(bad), None, "{bad}");
        }
        let Parsed::Valid(v) = parse(
            r#"{"id":"d1","prompt":"hi","deadline":"2026-11-30T06:00:00Z"}"#,
            "support",
        ) else {
            panic!()
        };
        assert_eq!(v.deadline_ms, Some(NOW_MS + 18 * 3_600_000));
        let r = reason(parse(
            r#"{"id":"d2","prompt":"hi","deadline":"2026-11-29T11:59:59Z"}"#,
            "support",
        ));
        assert_eq!(
            r.to_string(),
            "deadline 2026-11-29T11:59:59Z had already passed when the job arrived"
        );
        let r = reason(parse(
            r#"{"id":"d3","prompt":"hi","deadline":"soon"}"#,
            "support",
        ));
        assert_eq!(r, Rejection::BadDeadline("soon".into()));
        let Parsed::Valid(v) = parse(r#"{"id":"d4","prompt":"hi"}"#, "support") else {
            panic!()
        };
        assert_eq!(v.deadline_ms, None);
    }

    fn reason(p: Parsed) -> Rejection {
        match p {
            Parsed::Rejected { reason, .. } => reason,
            Parsed::Valid(v) => panic!("expected rejection, got {v:?}"),
        }
    }

    #[test]
    fn too_many_messages_are_rejected_with_the_count_and_the_limit() {
        let m = r#"{"role":"user","content":"hi"}"#;
        let four = format!(r#"{{"id":"m4","messages":[{m},{m},{m},{m}]}}"#);
        assert!(matches!(parse(&four, "support"), Parsed::Valid(_)));
        let five = format!(r#"{{"id":"m5","messages":[{m},{m},{m},{m},{m}]}}"#);
        let r = reason(parse(&five, "support"));
        assert_eq!(r, Rejection::TooManyMessages { count: 5, limit: 4 });
        assert_eq!(r.to_string(), "5 messages exceed the limit of 4 per job");
    }

    #[test]
    fn minimal_prompt_job_is_valid_and_takes_subject_category() {
        let Parsed::Valid(v) = parse(r#"{"id":"a1","prompt":"hi"}"#, "support") else {
            panic!()
        };
        assert_eq!(v.id, "a1");
        assert_eq!(v.category, "support");
    }

    #[test]
    fn missing_id_uses_the_fallback() {
        let Parsed::Valid(v) = parse(r#"{"prompt":"hi"}"#, "sales") else {
            panic!()
        };
        assert_eq!(v.id, "JOBS-7");
    }

    #[test]
    fn full_envelope_round_trips() {
        let text = r#"{"version":1,"id":"x","category":"sales","messages":[{"role":"user","content":"hello"}],
            "system":"be brief","params":{"max_tokens":10,"temperature":0.5},"metadata":{"k":"v"}}"#;
        let Parsed::Valid(v) = parse(text, "sales") else {
            panic!()
        };
        let again = serde_json::to_string(&v.envelope).unwrap();
        let Parsed::Valid(w) = parse(&again, "sales") else {
            panic!()
        };
        assert_eq!(v, w);
    }

    #[test]
    fn rejections_have_reasons() {
        assert!(matches!(
            reason(parse("not json", "support")),
            Rejection::Malformed(_)
        ));
        assert!(matches!(
            reason(parse(r#"{"id":1,"prompt":"x"}"#, "support")),
            Rejection::Malformed(_)
        ));
        assert!(matches!(
            reason(parse(r#"{"id":"a","promt":"x"}"#, "support")),
            Rejection::Malformed(_)
        ));
        assert_eq!(
            reason(parse(r#"{"version":2,"id":"a","prompt":"x"}"#, "support")),
            Rejection::UnknownVersion(2)
        );
        assert_eq!(
            reason(parse(r#"{"id":"a","prompt":"  "}"#, "support")),
            Rejection::EmptyInput
        );
        assert_eq!(
            reason(parse(r#"{"id":"a"}"#, "support")),
            Rejection::EmptyInput
        );
        assert_eq!(
            reason(parse(r#"{"id":"a","prompt":"x","messages":[]}"#, "support")),
            Rejection::BothInputs
        );
        assert_eq!(
            reason(parse(r#"{"id":"a","prompt":"x"}"#, "billing")),
            Rejection::UnknownCategory("billing".into())
        );
        assert_eq!(
            reason(parse(
                r#"{"id":"a","category":"sales","prompt":"x"}"#,
                "support"
            )),
            Rejection::CategoryMismatch {
                body: "sales".into(),
                subject: "support".into()
            }
        );
        assert!(matches!(
            reason(parse(
                r#"{"id":"a","prompt":"x","params":{"temperature":9}}"#,
                "support"
            )),
            Rejection::BadParams(_)
        ));
        let big = format!(r#"{{"id":"a","prompt":"{}"}}"#, "x".repeat(2000));
        assert!(matches!(
            reason(parse(&big, "support")),
            Rejection::Oversize { limit: 1024, .. }
        ));
    }

    #[test]
    fn a_callback_url_must_be_on_the_allowlist() {
        let Parsed::Valid(v) = parse(
            r#"{"id":"c1","prompt":"hi","callback_url":"https://hooks.example.com/done"}"#,
            "support",
        ) else {
            panic!()
        };
        assert_eq!(
            v.envelope.callback_url.as_deref(),
            Some("https://hooks.example.com/done")
        );
        let r = reason(parse(
            r#"{"id":"c2","prompt":"hi","callback_url":"http://169.254.169.254/latest"}"#,
            "support",
        ));
        assert_eq!(
            r.to_string(),
            "invalid callback_url: host `169.254.169.254` is not on webhooks.allow_hosts"
        );
        assert!(matches!(
            reason(parse(
                r#"{"id":"c3","prompt":"hi","callback_url":"file:///etc/passwd"}"#,
                "support"
            )),
            Rejection::BadCallback(_)
        ));
    }

    #[test]
    fn rejected_messages_keep_a_salvageable_id() {
        let Parsed::Rejected { id, .. } = parse(r#"{"id":"keep-me","prompt":5}"#, "support") else {
            panic!()
        };
        assert_eq!(id.as_deref(), Some("keep-me"));
    }

    #[test]
    fn conversation_puts_system_first() {
        let mut e = JobEnvelope::prompt("a", "support", "question");
        e.system = Some("job system".into());
        let conv = e.conversation(Some("category system"));
        assert_eq!(conv[0].role, Role::System);
        assert_eq!(conv[0].content, "category system\n\njob system");
        assert_eq!(conv[1].content, "question");
    }
}
