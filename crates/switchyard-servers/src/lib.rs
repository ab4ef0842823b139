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

/// `n` distinct free loopback ports (all held until every one is found, so
/// none is handed out twice).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
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

/// The nats-server binary: `NATS_SERVER_BIN` if set (how a test run picks
/// a server generation), else `nats-server` on `PATH`, else where Debian's
/// package puts it.
pub fn nats_server_bin() -> Option<PathBuf> {
    let chosen = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from);
    chosen
        .into_iter()
        .chain(["nats-server", "/usr/sbin/nats-server"].map(PathBuf::from))
        .find(|exe| Command::new(exe).arg("--version").output().is_ok())
}

/// The version a nats-server binary reports (`2.15.1`), if it runs.
pub fn nats_server_version(exe: &std::path::Path) -> Option<String> {
    let out = Command::new(exe).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .last()
        .map(|v| v.trim_start_matches('v').to_string())
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

/// How a [`PrivateNats`] runs: which binary, and (for a cluster node) its
/// name and routes. The default: the binary of [`nats_server_bin`], alone.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// The nats-server binary (default: [`nats_server_bin`]).
    pub exe: Option<PathBuf>,
    /// `--server_name` (a cluster needs one per node).
    pub server_name: Option<String>,
    /// Make the server a node of a cluster.
    pub cluster: Option<ClusterNode>,
    /// The client port (default: a free one).
    pub port: Option<u16>,
}

/// A node's place in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// `--cluster_name`, the same on every node.
    pub name: String,
    /// The port this node listens on for routes.
    pub port: u16,
    /// The other nodes' route ports.
    pub routes: Vec<u16>,
}

/// A private nats-server with JetStream and its own store; killed on drop.
pub struct PrivateNats {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    port: u16,
    opts: NatsOptions,
    child: Option<Child>,
}

impl PrivateNats {
    pub fn start() -> Result<Self> {
        Self::start_with(NatsOptions::default())
    }

    /// Start a server run as `opts` says.
    pub fn start_with(opts: NatsOptions) -> Result<Self> {
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let tmp = tempfile::Builder::new()
            .prefix("switchyard_nats_")
            .tempdir()
            .context("creating a temporary directory")?;
        let mut me = Self {
            dir: tmp.path().join("store"),
            _tmp: tmp,
            port,
            opts,
            child: None,
        };
        me.run()?;
        Ok(me)
    }

    /// Start the server (again, on the same store and ports) and wait until
    /// it listens.
    pub fn run(&mut self) -> Result<()> {
        let exe = match &self.opts.exe {
            Some(e) => e.clone(),
            None => nats_server_bin()
                .context("nats-server is not installed (Debian: apt install nats-server)")?,
        };
        let mut cmd = Command::new(&exe);
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&self.dir);
        if let Some(n) = &self.opts.server_name {
            cmd.args(["--server_name", n]);
        }
        if let Some(c) = &self.opts.cluster {
            let routes: Vec<String> = c
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args(["--cluster_name", &c.name])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", c.port)])
                .args(["--routes", &routes.join(",")]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._tmp.path().join("server.log"))
            .context("opening the nats-server log")?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        self.child = Some(child);
        wait_listening(self.port, "nats-server", Duration::from_secs(10))
    }

    /// SIGKILL: no goodbye to the clients or the other nodes, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `--server_name`, if it has one.
    pub fn server_name(&self) -> Option<&str> {
        self.opts.server_name.as_deref()
    }

    /// What the server wrote to stderr (its log), for a failed run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._tmp.path().join("server.log")).unwrap_or_default()
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

/// A JetStream cluster of private nats-servers on loopback (`n1`, `n2`,
/// ...), each with its own ports and store; killed on drop.
pub struct NatsCluster {
    pub nodes: Vec<PrivateNats>,
}

impl NatsCluster {
    /// Start `n` nodes of `exe` (default: [`nats_server_bin`]) routed to
    /// each other. They listen when this returns; JetStream needs a moment
    /// more to elect its meta leader (retry the first stream creation).
    pub fn start(n: usize, exe: Option<PathBuf>) -> Result<Self> {
        // Another process may take a port between its choice and the
        // node's bind: try again with fresh ones.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(n, exe.clone()) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    fn try_start(n: usize, exe: Option<PathBuf>) -> Result<Self> {
        // Every node's client and route ports at once, all distinct.
        let ports = free_ports(2 * n)?;
        let (client_ports, route_ports) = ports.split_at(n);
        let name = format!("sy_{}", client_ports[0]);
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let routes = route_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect();
            nodes.push(PrivateNats::start_with(NatsOptions {
                exe: exe.clone(),
                server_name: Some(format!("n{}", i + 1)),
                cluster: Some(ClusterNode {
                    name: name.clone(),
                    port: route_ports[i],
                    routes,
                }),
                port: Some(client_ports[i]),
            })?);
        }
        Ok(Self { nodes })
    }

    /// Every node's URL, node `first` first: a client given this prefers
    /// that node and falls back to the others.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|k| self.nodes[(first + k) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node named `name` (`n1`, ...).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.server_name() == Some(name))
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
