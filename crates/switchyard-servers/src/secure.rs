//! Servers that demand TLS or credentials, for the security tests: a test
//! certificate authority made with the `openssl` command (a CA, a server
//! certificate for `127.0.0.1` and `localhost`, a client certificate, and a
//! second CA that signed nothing), a nats-server run from a configuration
//! file, and TLS for a [`PrivatePg`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{free_port, nats_server_bin, wait_listening, PrivatePg};

/// Whether the `openssl` command is installed.
pub fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Test certificates (EC P-256, valid two days) in a fresh temporary
/// directory, removed on drop.
pub struct TestPki {
    tmp: tempfile::TempDir,
}

impl TestPki {
    pub fn generate() -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("switchyard_pki_")
            .tempdir()
            .context("creating a temporary directory")?;
        let dir = tmp.path();
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=switchyard test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            )?;
        }
        for (name, usage, san) in [
            (
                "server",
                "serverAuth",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
            ),
            ("client", "clientAuth", ""),
        ] {
            std::fs::write(
                dir.join(format!("{name}.ext")),
                format!(
                    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n{san}"
                ),
            )?;
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN=switchyard test {name}"),
                ],
            )?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-sha256",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            )?;
        }
        Ok(Self { tmp })
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }
    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }
    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.dir().join("other-ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir().join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir().join("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir().join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir().join("client.key")
    }
}

/// A nats-server with JetStream run from a configuration file whose
/// `listen` and `jetstream` lines are written here and the rest (`tls {}`,
/// `authorization {}`, `accounts {}`, …) given by the test; killed on drop.
pub struct ConfiguredNats {
    tmp: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl ConfiguredNats {
    pub fn start(extra_conf: &str) -> Result<Self> {
        let exe = nats_server_bin()
            .context("nats-server is not installed (Debian: apt install nats-server)")?;
        let port = free_port()?;
        let tmp = tempfile::Builder::new()
            .prefix("switchyard_nats_conf_")
            .tempdir()
            .context("creating a temporary directory")?;
        let store = tmp.path().join("store");
        let conf = tmp.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{extra_conf}\n",
                store.display().to_string()
            ),
        )?;
        // A bad configuration makes the server exit at once: say why.
        let check = Command::new(&exe).arg("-t").arg("-c").arg(&conf).output();
        if let Ok(out) = check {
            if !out.status.success() {
                bail!(
                    "nats-server rejects the test configuration: {}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let log = std::fs::File::create(tmp.path().join("log"))?;
        let child = Command::new(&exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        let me = Self {
            tmp,
            port,
            child: Some(child),
        };
        if let Err(e) = wait_listening(port, "nats-server", Duration::from_secs(10)) {
            bail!("{e}; its log:\n{}", me.log());
        }
        Ok(me)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `<scheme>://127.0.0.1:<port>`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("log")).unwrap_or_default()
    }
}

impl Drop for ConfiguredNats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl PrivatePg {
    /// Turn TLS on with `cert` and `key` (copied into the cluster, owned by
    /// its user) and replace `pg_hba.conf` with `hba`, then restart.
    pub fn enable_tls(&self, cert: &Path, key: &Path, hba: &str) -> Result<()> {
        let crt = self.dir.join("server.crt");
        let k = self.dir.join("server.key");
        std::fs::copy(cert, &crt).context("copying the server certificate")?;
        std::fs::copy(key, &k).context("copying the server key")?;
        std::fs::write(self.dir.join("pg_hba.conf"), hba)?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("postgresql.conf"))?;
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\npassword_encryption = 'scram-sha-256'\n",
        )?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))?;
        }
        if crate::is_root() {
            for f in [&crt, &k, &self.dir.join("pg_hba.conf")] {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(f)
                    .status()?
                    .success();
                if !ok {
                    bail!("could not hand {} to the postgres user", f.display());
                }
            }
        }
        self.ctl_stop()?;
        self.ctl_start()
    }

    /// This server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}
