//! What went wrong with the database, told apart by SQLSTATE: the database
//! is unavailable (hold the message and wait), a conflict that a retry
//! clears, or the statement was rejected (retrying the same rows will not
//! help).

/// A failed read or write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down (connection
    /// errors, SQLSTATE classes 08, 53, 57P, 58): wait for it.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A serialization failure, deadlock or lock timeout (40001, 40P01,
    /// 55P03): the same statement may succeed at once.
    #[error("database conflict ({code}): {message}")]
    Conflict { code: String, message: String },
    /// The database answered and refused the statement (a constraint, a
    /// type, a bug): the same rows will be refused again.
    #[error("statement rejected ({code}): {message}")]
    Rejected { code: String, message: String },
    /// The writer task has stopped (the process is shutting down).
    #[error("the database writer has stopped")]
    Stopped,
}

impl StoreError {
    /// Classify `e`, looking through `anyhow` context for the sqlx error.
    pub fn from_anyhow(e: &anyhow::Error) -> Self {
        match e.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()) {
            Some(s) => Self::from_sqlx(s, &format!("{e:#}")),
            None => Self::Unavailable(format!("{e:#}")),
        }
    }

    /// Classify a sqlx error (`text` is what to report).
    pub fn from_sqlx(e: &sqlx::Error, text: &str) -> Self {
        let Some(db) = e.as_database_error() else {
            // I/O, TLS, protocol, pool timeouts: the connection, not the rows.
            return Self::Unavailable(text.to_string());
        };
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        Self::from_code(&code, text)
    }

    /// Classify by SQLSTATE (pure).
    pub fn from_code(code: &str, text: &str) -> Self {
        let (code, message) = (code.to_string(), text.to_string());
        match code.as_str() {
            c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
                Self::Unavailable(message)
            }
            "57P01" | "57P02" | "57P03" | "57P04" => Self::Unavailable(message),
            "40001" | "40P01" | "55P03" => Self::Conflict { code, message },
            _ => Self::Rejected { code, message },
        }
    }

    /// Whether the database itself is away (as opposed to these rows).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_tell_an_outage_from_a_refusal() {
        for code in ["08006", "08001", "57P01", "57P03", "53300", "58030"] {
            assert!(StoreError::from_code(code, "x").is_unavailable(), "{code}");
        }
        for code in ["40001", "40P01"] {
            assert!(
                matches!(
                    StoreError::from_code(code, "x"),
                    StoreError::Conflict { .. }
                ),
                "{code}"
            );
        }
        for code in ["23505", "23514", "22P02", "42P01", "42703"] {
            assert!(
                matches!(
                    StoreError::from_code(code, "x"),
                    StoreError::Rejected { .. }
                ),
                "{code}"
            );
        }
        let io = sqlx::Error::Io(std::io::Error::other("connection reset"));
        assert!(StoreError::from_sqlx(&io, "reset").is_unavailable());
        assert!(
            StoreError::from_anyhow(&anyhow::Error::new(sqlx::Error::PoolTimedOut))
                .is_unavailable()
        );
    }
}
