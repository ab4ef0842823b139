//! How every process reaches NATS: the server URLs (several, separated by
//! commas, are fallbacks), TLS (`tls://` URLs, a custom CA, a client
//! certificate) and one way to authenticate: user and password (in the URL
//! as users write it, `nats://user:pass@host:4222`, or `NATS_USER` /
//! `NATS_PASSWORD`), a token (`nats://TOKEN@host`, `NATS_TOKEN`), an NKey
//! seed (`NATS_NKEY_SEED`) or a JWT credentials file (`NATS_CREDS_FILE`).
//! Secret variables may instead name a file (`<NAME>_FILE`).
//!
//! async-nats reads no credentials from the URL itself (it would connect
//! without them and the server would answer "authorization violation"), so
//! they are taken out here and handed to it as options; what it is given,
//! and every URL this module prints, carries none.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{NatsConfig, SecretString};
use crate::secrets::{redact_url, var_or_file};

/// How the client proves who it is; at most one way per connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: SecretString,
    },
    Token(SecretString),
    /// An NKey user seed (`SU…`): the client signs the server's nonce.
    NkeySeed(SecretString),
    /// A `.creds` file: the user JWT and its NKey seed.
    CredsFile(PathBuf),
}

impl NatsAuth {
    fn kind(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::UserPassword { .. } => "user and password",
            NatsAuth::Token(_) => "token",
            NatsAuth::NkeySeed(_) => "NKey seed",
            NatsAuth::CredsFile(_) => "credentials file",
        }
    }
}

/// TLS and credentials for NATS, from config and environment (see
/// [`NatsSecurity::load`]). Its `Debug` shows no secret.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatsSecurity {
    /// PEM CA file trusted instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// TLS even for `nats://` URLs.
    pub tls_required: bool,
    pub auth: NatsAuth,
    /// Where `auth` came from, for error messages (`NATS_TOKEN`, …).
    auth_source: &'static str,
}

/// One path setting: the environment variable wins over the config key.
fn path_setting(
    var: &'static str,
    key: &'static str,
    configured: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<PathBuf>> {
    let (path, from) = match env(var).filter(|v| !v.is_empty()) {
        Some(v) => (PathBuf::from(v), var),
        None => match configured {
            Some(p) => (p.to_path_buf(), key),
            None => return Ok(None),
        },
    };
    // Fail at start naming the setting, not at the first TLS handshake.
    std::fs::File::open(&path)
        .with_context(|| format!("{from}: cannot read {}", path.display()))?;
    Ok(Some(path))
}

impl NatsSecurity {
    /// Settings from `cfg` (`nats.tls_ca_file`, `nats.tls_cert_file`,
    /// `nats.tls_key_file`, `nats.tls_required`, `nats.creds_file`) and the
    /// environment, which wins: `NATS_CA_FILE`, `NATS_CERT_FILE`,
    /// `NATS_KEY_FILE`, `NATS_CREDS_FILE`, and the secrets `NATS_USER` +
    /// `NATS_PASSWORD`, `NATS_TOKEN`, `NATS_NKEY_SEED` (each also as
    /// `<NAME>_FILE`). Two ways to authenticate at once is an error.
    pub fn load(cfg: &NatsConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let ca_file = path_setting(
            "NATS_CA_FILE",
            "nats.tls_ca_file",
            cfg.tls_ca_file.as_deref(),
            env,
        )?;
        let cert = path_setting(
            "NATS_CERT_FILE",
            "nats.tls_cert_file",
            cfg.tls_cert_file.as_deref(),
            env,
        )?;
        let key = path_setting(
            "NATS_KEY_FILE",
            "nats.tls_key_file",
            cfg.tls_key_file.as_deref(),
            env,
        )?;
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => bail!(
                "a NATS client certificate needs its key (NATS_KEY_FILE or nats.tls_key_file)"
            ),
            (None, Some(_)) => bail!(
                "a NATS client key needs its certificate (NATS_CERT_FILE or nats.tls_cert_file)"
            ),
        };

        let mut found: Vec<(NatsAuth, &'static str)> = Vec::new();
        let user = var_or_file("NATS_USER", env)?;
        let password = var_or_file("NATS_PASSWORD", env)?;
        match (user, password) {
            (Some(user), Some(pw)) => found.push((
                NatsAuth::UserPassword {
                    user,
                    password: SecretString::new(pw),
                },
                "NATS_USER/NATS_PASSWORD",
            )),
            (None, None) => {}
            (Some(_), None) => bail!("NATS_USER is set but NATS_PASSWORD is not"),
            (None, Some(_)) => bail!("NATS_PASSWORD is set but NATS_USER is not"),
        }
        if let Some(t) = var_or_file("NATS_TOKEN", env)? {
            found.push((NatsAuth::Token(SecretString::new(t)), "NATS_TOKEN"));
        }
        if let Some(seed) = var_or_file("NATS_NKEY_SEED", env)? {
            found.push((
                NatsAuth::NkeySeed(SecretString::new(seed.trim())),
                "NATS_NKEY_SEED",
            ));
        }
        if let Some(creds) = path_setting(
            "NATS_CREDS_FILE",
            "nats.creds_file",
            cfg.creds_file.as_deref(),
            env,
        )? {
            found.push((NatsAuth::CredsFile(creds), "NATS_CREDS_FILE"));
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|(_, s)| *s).collect();
            bail!(
                "more than one NATS credential is set ({}); set one",
                names.join(", ")
            );
        }
        let (auth, auth_source) = found.pop().unwrap_or((NatsAuth::None, ""));
        Ok(Self {
            ca_file,
            client_cert,
            tls_required: cfg.tls_required,
            auth,
            auth_source,
        })
    }

    /// [`NatsSecurity::load`] from the process environment.
    pub fn from_process_env(cfg: &NatsConfig) -> Result<Self> {
        Self::load(cfg, &crate::secrets::process_env)
    }

    /// These settings authenticating with `auth` (tests, embedding).
    pub fn with_auth(mut self, auth: NatsAuth) -> Self {
        self.auth = auth;
        self.auth_source = "the caller";
        self
    }

    /// These settings trusting the CA in `path` (PEM).
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// These settings presenting a client certificate.
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }
}

/// Server URLs as async-nats takes them, and the credentials their user
/// info carried.
#[derive(Debug, PartialEq)]
pub struct ServerList {
    /// Each URL without user info.
    pub servers: Vec<String>,
    /// From `user:pass@` (user and password) or `token@` (token).
    pub auth: NatsAuth,
}

/// Split `urls` at commas, take the credentials out of their user info
/// (percent-decoded), and check that URLs carrying credentials agree.
pub fn parse_servers(urls: &str) -> Result<ServerList> {
    let mut servers = Vec::new();
    let mut auth = NatsAuth::None;
    for raw in urls.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let with_scheme = if raw.contains("://") {
            raw.to_string()
        } else {
            format!("nats://{raw}")
        };
        let mut u = url::Url::parse(&with_scheme)
            .map_err(|e| anyhow::anyhow!("invalid NATS URL {}: {e}", redact_url(raw)))?;
        if !matches!(u.scheme(), "nats" | "tls" | "ws" | "wss") {
            bail!(
                "invalid NATS URL {}: the scheme must be nats, tls, ws or wss",
                redact_url(raw)
            );
        }
        if u.username().is_empty() && u.password().is_none() {
            servers.push(raw.to_string());
            continue;
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = decode(u.username());
        let this = match u.password() {
            Some(p) => NatsAuth::UserPassword {
                user,
                password: SecretString::new(decode(p)),
            },
            None => NatsAuth::Token(SecretString::new(user)),
        };
        if auth != NatsAuth::None && auth != this {
            bail!("the NATS URLs carry different credentials; one connection uses one");
        }
        auth = this;
        let _ = u.set_username("");
        let _ = u.set_password(None);
        servers.push(u.into());
    }
    if servers.is_empty() {
        bail!("no NATS server URL given");
    }
    Ok(ServerList { servers, auth })
}

/// Connect to the first answering server of `urls` with `sec`.
pub async fn connect(urls: &str, sec: &NatsSecurity) -> Result<async_nats::Client> {
    // async-nats builds its rustls config on the process-wide provider.
    crate::providers::http::install_tls_provider();
    let shown = redact_url(urls);
    let list = parse_servers(urls)?;
    let (auth, source) = match (&list.auth, &sec.auth) {
        (NatsAuth::None, a) => (a.clone(), sec.auth_source),
        (a, NatsAuth::None) => (a.clone(), "the URL"),
        (a, b) => bail!(
            "NATS credentials are given twice: a {} in the URL and a {} in {}; give one",
            a.kind(),
            b.kind(),
            sec.auth_source
        ),
    };
    // Several URLs are the nodes of a cluster: the first is tried first and
    // the others are fallbacks in the order given (async-nats would shuffle
    // them), so workers listing the nodes in different orders spread over
    // the cluster; the client also learns the other nodes from the server.
    let mut opts = async_nats::ConnectOptions::new()
        .name("switchyard")
        .connection_timeout(Duration::from_secs(5))
        .retain_servers_order();
    if sec.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &sec.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &sec.client_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    opts = match auth {
        NatsAuth::None => opts,
        NatsAuth::UserPassword { user, password } => {
            opts.user_and_password(user, password.expose().to_string())
        }
        NatsAuth::Token(t) => opts.token(t.expose().to_string()),
        NatsAuth::NkeySeed(seed) => {
            // Check the seed here: async-nats would only say "authentication".
            nkeys::KeyPair::from_seed(seed.expose())
                .map_err(|_| anyhow::anyhow!("the NKey seed from {source} is not a valid seed"))?;
            opts.nkey(seed.expose().to_string())
        }
        NatsAuth::CredsFile(path) => opts
            .credentials_file(&path)
            .await
            .with_context(|| format!("reading the NATS credentials file {}", path.display()))?,
    };
    opts.connect(list.servers).await.map_err(|e| {
        let text = e.to_string();
        let hint = if text.contains("certificate") || text.contains("UnknownIssuer") {
            " (is the server's CA given in NATS_CA_FILE or nats.tls_ca_file?)"
        } else if text.contains("authorization") {
            " (check the NATS credentials)"
        } else {
            ""
        };
        anyhow::anyhow!("connecting to NATS at {shown}: {text}{hint}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)], cfg: &NatsConfig) -> Result<NatsSecurity> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NatsSecurity::load(cfg, &|k| map.get(k).cloned())
    }

    #[test]
    fn credentials_in_the_url_are_taken_out_and_decoded() {
        let l = parse_servers("nats://alice:p%40ss@n1:4222, nats://n2:4222,n3").unwrap();
        assert_eq!(l.servers, ["nats://n1:4222", "nats://n2:4222", "n3"]);
        assert_eq!(
            l.auth,
            NatsAuth::UserPassword {
                user: "alice".into(),
                password: SecretString::new("p@ss")
            }
        );
        let l = parse_servers("tls://s3cr3t@n1:4222").unwrap();
        assert_eq!(l.servers, ["tls://n1:4222"]);
        assert_eq!(l.auth, NatsAuth::Token(SecretString::new("s3cr3t")));
        let l = parse_servers("nats://127.0.0.1:4222").unwrap();
        assert_eq!(l.auth, NatsAuth::None);

        let e = parse_servers("nats://a:1@n1,nats://b:2@n2").unwrap_err();
        assert!(!format!("{e:#}").contains(":1@"), "{e:#}");
        let e = parse_servers("http://u:pw@n1").unwrap_err().to_string();
        assert!(e.contains("scheme") && !e.contains("pw"), "{e}");
        assert!(parse_servers(" , ").is_err());
    }

    #[test]
    fn environment_settings_and_their_conflicts() {
        let dir = std::env::temp_dir().join(format!("sy-natssec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = |n: &str| {
            let p = dir.join(n);
            std::fs::write(&p, format!("{n}-content\n")).unwrap();
            p.display().to_string()
        };
        let (ca, cert, key, pw) = (f("ca"), f("cert"), f("key"), f("pw"));
        let cfg = NatsConfig::default();

        let s = load(&[], &cfg).unwrap();
        assert_eq!(s.auth, NatsAuth::None);
        assert!(s.ca_file.is_none() && s.client_cert.is_none());

        let s = load(
            &[
                ("NATS_CA_FILE", &ca),
                ("NATS_CERT_FILE", &cert),
                ("NATS_KEY_FILE", &key),
                ("NATS_USER", "bob"),
                ("NATS_PASSWORD_FILE", &pw),
            ],
            &cfg,
        )
        .unwrap();
        assert_eq!(s.ca_file.as_deref(), Some(Path::new(&ca)));
        assert!(s.client_cert.is_some());
        assert_eq!(
            s.auth,
            NatsAuth::UserPassword {
                user: "bob".into(),
                password: SecretString::new("pw-content")
            }
        );
        assert!(!format!("{s:?}").contains("pw-content"));

        // The config key, and the variable winning over it.
        let mut with_key = NatsConfig {
            tls_ca_file: Some(PathBuf::from(&cert)),
            ..NatsConfig::default()
        };
        assert_eq!(
            load(&[], &with_key).unwrap().ca_file.as_deref(),
            Some(Path::new(&cert))
        );
        assert_eq!(
            load(&[("NATS_CA_FILE", &ca)], &with_key)
                .unwrap()
                .ca_file
                .as_deref(),
            Some(Path::new(&ca))
        );
        with_key.tls_ca_file = Some(dir.join("missing"));
        let e = load(&[], &with_key).unwrap_err().to_string();
        assert!(e.contains("nats.tls_ca_file"), "{e}");

        let e = load(&[("NATS_TOKEN", "t"), ("NATS_NKEY_SEED", "s")], &cfg).unwrap_err();
        assert!(e.to_string().contains("NATS_TOKEN, NATS_NKEY_SEED"), "{e}");
        assert!(load(&[("NATS_USER", "bob")], &cfg).is_err());
        assert!(load(&[("NATS_CERT_FILE", &cert)], &cfg).is_err());
        let s = load(&[("NATS_CREDS_FILE", &key)], &cfg).unwrap();
        assert_eq!(s.auth, NatsAuth::CredsFile(PathBuf::from(&key)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn credentials_in_both_url_and_environment_are_refused_before_connecting() {
        let sec = NatsSecurity::default().with_auth(NatsAuth::Token(SecretString::new("t")));
        let e = connect("nats://u:hunter2@127.0.0.1:1", &sec)
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("twice") && !e.contains("hunter2"), "{e}");
    }

    #[tokio::test]
    async fn a_bad_seed_or_creds_file_is_named() {
        let sec = NatsSecurity::default().with_auth(NatsAuth::NkeySeed(SecretString::new("SUnot")));
        let e = format!(
            "{:#}",
            connect("nats://127.0.0.1:1", &sec).await.unwrap_err()
        );
        assert!(e.contains("NKey seed") && !e.contains("SUnot"), "{e}");

        let dir = std::env::temp_dir().join(format!("sy-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.creds");
        std::fs::write(&path, "not a creds file").unwrap();
        let sec = NatsSecurity::default().with_auth(NatsAuth::CredsFile(path.clone()));
        let e = format!(
            "{:#}",
            connect("nats://127.0.0.1:1", &sec).await.unwrap_err()
        );
        assert!(e.contains("credentials file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
