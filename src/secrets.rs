//! Secrets from the environment and keeping them out of text: a variable
//! `NAME` may instead be given as a file named by `NAME_FILE` (Docker and
//! Kubernetes secrets), and every URL that reaches a log line, an error or
//! `--help` goes through [`redact_url`] first. A leaf: imports nothing of
//! the crate.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// What replaces a secret in text.
pub const REDACTED: &str = "***";

/// The value of variable `name`, or the contents of the file named by
/// `<name>_FILE` (one trailing newline dropped, as `echo` and editors leave
/// it). Both set is an error, so a stale variable never silently wins; an
/// empty value counts as unset. `env` looks a variable up (the process
/// environment in production, a map in tests).
pub fn var_or_file(name: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>> {
    let direct = env(name).filter(|v| !v.is_empty());
    let file_var = format!("{name}_FILE");
    let file = env(&file_var).filter(|v| !v.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => bail!("both {name} and {file_var} are set; set one of them"),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret_file(Path::new(&path))
            .with_context(|| format!("{file_var}: cannot read {path}"))
            .map(Some),
        (None, None) => Ok(None),
    }
}

/// A secret file's contents without its trailing line break.
pub fn read_secret_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if text.is_empty() {
        bail!("the file is empty");
    }
    Ok(text.to_string())
}

/// The process environment, for [`var_or_file`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Query parameters whose values are secrets (libpq's `password` and
/// `sslpassword`, and the usual names elsewhere).
const SECRET_PARAMS: &[&str] = &["password", "sslpassword", "pass", "token", "auth_token"];

/// `urls` (one URL, or several separated by commas as NATS takes them) fit
/// to print: passwords, and query parameters such as `password=`, become
/// `***`. A user name stays for `postgres://` URLs, where it is a name; in a
/// NATS URL a user with no password is a token (`nats://TOKEN@host`) and is
/// replaced too. Text that does not parse as a URL loses everything between
/// `://` and its last `@`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(raw: &str) -> String {
    let trimmed = raw.trim();
    let Ok(mut u) = url::Url::parse(trimmed) else {
        return redact_unparsed(raw);
    };
    if u.cannot_be_a_base() {
        // `host:port` without a scheme parses as scheme `host`.
        return redact_unparsed(raw);
    }
    let keeps_user = matches!(u.scheme(), "postgres" | "postgresql");
    if u.password().is_some() {
        let _ = u.set_password(Some(REDACTED));
    } else if !u.username().is_empty() && !keeps_user {
        let _ = u.set_username(REDACTED);
    }
    if u.query_pairs()
        .any(|(k, _)| SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()))
    {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) {
                    REDACTED.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    let mut out = String::from(u);
    // `Url` writes `***` percent-encoded in the user info; show it plainly.
    out = out.replace("%2A%2A%2A", REDACTED);
    // Keep the leading space of `a, b` lists as written.
    let lead = &raw[..raw.len() - raw.trim_start().len()];
    format!("{lead}{out}")
}

fn redact_unparsed(raw: &str) -> String {
    let (scheme, rest) = match raw.find("://") {
        Some(i) => (&raw[..i + 3], &raw[i + 3..]),
        None => ("", raw),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}{REDACTED}{}", &rest[at..]),
        None => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn passwords_tokens_and_password_parameters_are_redacted() {
        assert_eq!(
            redact_url("nats://alice:s3cret@nats1:4222"),
            "nats://alice:***@nats1:4222"
        );
        assert_eq!(
            redact_url("nats://t0ken@nats1:4222"),
            "nats://***@nats1:4222"
        );
        assert_eq!(
            redact_url("nats://a:pw1@n1:4222, tls://n2:4222,n3:4222"),
            "nats://a:***@n1:4222, tls://n2:4222,n3:4222"
        );
        assert_eq!(
            redact_url("postgres://app:p%40ss@db:5432/sy?sslmode=require"),
            "postgres://app:***@db:5432/sy?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/switchyard"),
            "postgres://postgres@127.0.0.1:5432/switchyard"
        );
        let r = redact_url("postgres://app@db/sy?password=hunter2&sslmode=verify-full");
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("sslmode=verify-full"), "{r}");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        // Not a URL: whatever precedes the last `@` goes.
        assert_eq!(redact_url("u:p@ss@host:4222"), "***@host:4222");
        assert_eq!(redact_url("nats://u:[pw@host"), "nats://u:***@host");
        // An invalid port: not a URL.
        assert_eq!(
            redact_url("nats://u:pw@host:99999"),
            "nats://***@host:99999"
        );
    }

    #[test]
    fn a_variable_or_its_file_but_not_both() {
        let dir = std::env::temp_dir().join(format!("sy-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let vars: HashMap<&str, String> = HashMap::from([
            ("A", "direct".to_string()),
            ("B_FILE", file.display().to_string()),
            ("C", "x".to_string()),
            ("C_FILE", file.display().to_string()),
            ("D_FILE", dir.join("missing").display().to_string()),
            ("E", String::new()),
        ]);
        let env = |k: &str| vars.get(k).cloned();
        assert_eq!(var_or_file("A", &env).unwrap().as_deref(), Some("direct"));
        assert_eq!(
            var_or_file("B", &env).unwrap().as_deref(),
            Some("from-file")
        );
        let both = var_or_file("C", &env).unwrap_err().to_string();
        assert!(both.contains("C_FILE"), "{both}");
        let missing = format!("{:#}", var_or_file("D", &env).unwrap_err());
        assert!(missing.contains("D_FILE"), "{missing}");
        assert_eq!(var_or_file("E", &env).unwrap(), None);
        assert_eq!(var_or_file("Z", &env).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
