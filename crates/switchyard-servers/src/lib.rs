//! Private PostgreSQL and NATS servers on free loopback ports, for the chaos
//! bench and the outage tests: they can be stopped, killed and restarted
//! without touching the machine's own services. Each lives in a fresh
//! temporary directory (created with a random name and mode 0700, never a
//! fixed path another user could prepare) that is removed when it is dropped.
//!
//! [`secure`] adds what the security tests need: test certificates, a
//! nats-server run from a configuration file (TLS, users), TLS for a
//! [`PrivatePg`].
//!
//! `initdb` refuses to run as root, so as root the PostgreSQL tools run as
//! the `postgres` user (`runuser -u postgres --`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod secure;

/// A free TCP port on loopback (free when asked; the server binds it soon after).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_listening(port: u16, what: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The newest installed PostgreSQL server's `bin` directory (Debian layout),
/// or the directory of `initdb` on `PATH`.
pub fn pg_bin() -> Option<PathBuf> {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|root| {
            let mut versions: Vec<PathBuf> = root.filter_map(|e| Some(e.ok()?.path())).collect();
            versions.sort_by_key(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(0)
            });
            versions
                .pop()
                .map(|v| v.join("bin"))
                .filter(|b| b.join("initdb").exists())
        });
    debian.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        })
    })
}

/// The nats-server binary: on `PATH`, else where Debian's package puts it.
pub fn nats_server_bin() -> Option<&'static str> {
    ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .find(|exe| Command::new(exe).arg("--version").output().is_ok())
}

/// A private PostgreSQL cluster (trust auth, user `postgres`, fsync off),
/// stopped and removed on drop.
pub struct PrivatePg {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl PrivatePg {
    /// `initdb` a new cluster in a temporary directory and start it.
    pub fn start() -> Result<Self> {
        let bin = pg_bin().context(
            "the PostgreSQL server binaries (initdb, pg_ctl) are not installed \
             (Debian: apt install postgresql)",
        )?;
        let port = free_port()?;
        let tmp = tempfile::Builder::new()
            .prefix("switchyard_pg_")
            .tempdir()
            .context("creating a temporary directory")?;
        let dir = tmp.path().to_path_buf();
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .context("chown")?
                .success();
            if !ok {
                bail!("could not hand {} to the postgres user", dir.display());
            }
        }
        let pg = Self {
            _tmp: tmp,
            dir,
            port,
            bin,
        };
        let out = pg
            .tool("initdb")
            .arg("-D")
            .arg(&pg.dir)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        pg.ctl_start()?;
        Ok(pg)
    }

    fn tool(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// Start the server (again) and wait until it accepts connections.
    pub fn ctl_start(&self) -> Result<()> {
        // The socket lives in the cluster's own directory, not in /tmp.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &opts, "-w", "start"])
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stop the server the hard way (`-m immediate`: no checkpoint, clients
    /// cut off; the next start recovers from the WAL, like after a crash).
    pub fn ctl_stop(&self) -> Result<()> {
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .context("running pg_ctl stop")?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// A private nats-server with JetStream and its own store; killed on drop.
pub struct PrivateNats {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateNats {
    pub fn start() -> Result<Self> {
        let port = free_port()?;
        let tmp = tempfile::Builder::new()
            .prefix("switchyard_nats_")
            .tempdir()
            .context("creating a temporary directory")?;
        let mut me = Self {
            dir: tmp.path().join("store"),
            _tmp: tmp,
            port,
            child: None,
        };
        me.run()?;
        Ok(me)
    }

    /// Start the server (again, on the same store) and wait until it listens.
    pub fn run(&mut self) -> Result<()> {
        let exe = nats_server_bin()
            .context("nats-server is not installed (Debian: apt install nats-server)")?;
        let child = Command::new(exe)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        wait_listening(self.port, "nats-server", Duration::from_secs(10))
    }

    /// SIGKILL: no goodbye to the clients, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Tests that run their own PostgreSQL or nats-server need the servers'
/// binaries, not only running services (a machine whose services run in
/// Docker may lack them). Without them the test says so and passes, except
/// under CI, where it fails.
pub fn have(what: &str, found: bool) -> bool {
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} is not installed; CI needs it for this test"
        );
        eprintln!("SKIPPED: {what} is not installed (install it to run this test)");
    }
    found
}
