//! `api_tokens`: bearer tokens for the HTTP endpoints, kept as SHA-256
//! hashes only. A token is `sy_` and 43 URL-safe base64 characters (32
//! bytes from the operating system's random source).

use anyhow::{Context, Result};
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Submit jobs and read one's own.
    Submit,
    /// Read jobs, results, costs, the dashboard and metrics.
    Read,
    /// Everything: read, submit, cancel, replay, resolve reviews, tokens.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "submit" => Some(Scope::Submit),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    /// Whether a token of this scope may use a route that needs `need`.
    pub fn allows(self, need: Scope) -> bool {
        self == Scope::Admin || self == need
    }
}

/// The stored form of a token: its SHA-256, hex.
pub fn hash(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// A new random token.
pub fn generate() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("the operating system's random source failed: {e}"))?;
    Ok(format!(
        "sy_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Create a token named `name` with `scope`; returns the token (shown
/// once: only its hash is stored).
pub async fn create(pool: &PgPool, name: &str, scope: Scope) -> Result<String> {
    let token = generate()?;
    sqlx::query("INSERT INTO api_tokens (name, scope, hash, prefix) VALUES ($1, $2, $3, $4)")
        .bind(name)
        .bind(scope.as_str())
        .bind(hash(&token))
        .bind(&token[..7])
        .execute(pool)
        .await
        .map_err(|e| match e.as_database_error().and_then(|d| d.code()) {
            Some(c) if c == "23505" => anyhow::anyhow!("a token named `{name}` exists already"),
            _ => anyhow::Error::new(e).context("creating the token"),
        })?;
    Ok(token)
}

/// A token as `switchyard token list` shows it (never the token).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TokenRow {
    pub name: String,
    pub scope: String,
    pub prefix: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

pub async fn list(pool: &PgPool) -> Result<Vec<TokenRow>> {
    Ok(sqlx::query_as(
        "SELECT name, scope, prefix, created_at::text AS created_at,
                last_used_at::text AS last_used_at, revoked_at::text AS revoked_at
         FROM api_tokens ORDER BY created_at",
    )
    .fetch_all(pool)
    .await?)
}

/// Revoke the token named `name`; false if there is none (or it was).
pub async fn revoke(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
    )
    .bind(name)
    .execute(pool)
    .await
    .context("revoking the token")?
    .rows_affected()
        > 0)
}

/// The name and scope of the live token whose hash is `hash`, if any.
pub async fn find(pool: &PgPool, hash: &str) -> Result<Option<(String, Scope)>> {
    let row: Option<(String, String)> = sqlx::query_as(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE hash = $1 AND revoked_at IS NULL RETURNING name, scope",
    )
    .bind(hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(n, s)| Scope::parse(&s).map(|s| (n, s))))
}

/// Record that token `token_name` submitted job `job_id` (first one wins).
pub async fn record_submission(pool: &PgPool, job_id: &str, token_name: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO api_submissions (job_id, token_name) VALUES ($1, $2)
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job_id)
    .bind(token_name)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether job `job_id` was submitted over HTTP (by any token).
pub async fn was_submitted(pool: &PgPool, job_id: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_submissions WHERE job_id = $1)")
            .bind(job_id)
            .fetch_one(pool)
            .await?,
    )
}

/// Whether token `token_name` submitted job `job_id`.
pub async fn submitted_by(pool: &PgPool, job_id: &str, token_name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM api_submissions WHERE job_id = $1 AND token_name = $2)",
    )
    .bind(job_id)
    .bind(token_name)
    .fetch_one(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_only_their_hash_is_kept() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("sy_") && a.len() == 46, "{a}");
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
        assert!(Scope::Admin.allows(Scope::Read) && Scope::Admin.allows(Scope::Submit));
        assert!(Scope::Read.allows(Scope::Read) && !Scope::Read.allows(Scope::Submit));
        assert!(!Scope::Submit.allows(Scope::Read) && !Scope::Read.allows(Scope::Admin));
    }
}
