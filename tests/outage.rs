//! Outages of the real services: Postgres stops mid-run and comes back; the
//! worker takes no new work meanwhile, holds what it has, and resumes by
//! itself. Nothing is lost and nothing is doubled: every answer the provider
//! gave has exactly one `calls` row and every job one result.
//!
//! The tests run their own PostgreSQL instance (initdb as the `postgres`
//! user) and their own NATS server, on free ports, so they can stop and
//! start them freely.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, TestEnv};
use switchyard::sim::SimProfile;
use switchyard::worker::{self, WorkerOptions};

/// A private PostgreSQL cluster, stopped and removed on drop.
struct PrivatePg {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

fn pg_bin() -> Option<PathBuf> {
    let root = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    let mut versions: Vec<PathBuf> = root.filter_map(|e| Some(e.ok()?.path())).collect();
    versions.sort();
    versions
        .pop()
        .map(|v| v.join("bin"))
        .filter(|b| b.join("initdb").exists())
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let exe = bin.join(tool);
    // initdb refuses to run as root.
    if unsafe_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PrivatePg {
    fn start() -> Self {
        let bin = pg_bin().expect("PostgreSQL server binaries in /usr/lib/postgresql");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("sy_pg_{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if unsafe_is_root() {
            assert!(Command::new("chown")
                .args(["postgres:postgres", dir.to_str().unwrap()])
                .status()
                .unwrap()
                .success());
        }
        let out = as_postgres(&bin, "initdb")
            .args([
                "-D",
                dir.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self { dir, port, bin };
        pg.ctl_start();
        pg
    }

    fn ctl_start(&self) {
        let opts = format!(
            "-p {} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        let log = self.dir.join("log");
        let out = as_postgres(&self.bin, "pg_ctl")
            .args([
                "-D",
                self.dir.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctl_stop(&self) {
        let out = as_postgres(&self.bin, "pg_ctl")
            .args([
                "-D",
                self.dir.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .args(["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_mid_run_loses_and_doubles_nothing() {
    if !have("the PostgreSQL server (initdb, pg_ctl)", pg_bin().is_some()) {
        return;
    }
    let pg = tokio::task::spawn_blocking(PrivatePg::start).await.unwrap();
    let env = TestEnv::new(SimProfile {
        latency_ms: 30,
        ..Default::default()
    })
    .await;
    let pool = switchyard::store::connect_and_migrate(&pg.url("switchyard"), 8)
        .await
        .unwrap();
    let cfg = Arc::new(env.config_with(&common::SINGLE_ROUTES));
    let w = worker::start(cfg, pool.clone(), env.bus.clone(), WorkerOptions::default())
        .await
        .unwrap();
    let n = 300;
    let js = common::jobs("pgdown", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    let p = pool.clone();
    wait_until(Duration::from_secs(60), "the first results", || {
        let p = p.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM results")
                .fetch_one(&p)
                .await
                .unwrap_or(0)
                >= 40
        }
    })
    .await;
    // Postgres goes away for 12 s: longer than a message's deliveries would
    // last if each failed commit gave it back (max_deliver 9, 1 s apart).
    let pg = tokio::task::spawn_blocking(move || {
        pg.ctl_stop();
        pg
    })
    .await
    .unwrap();
    let stopped_at = env.sim.now_ms();
    tokio::time::sleep(Duration::from_secs(12)).await;
    // Calls already under way finish; then no new work is taken.
    let late = env
        .sim
        .ledger()
        .iter()
        .filter(|e| e.at_ms >= stopped_at + 2_000)
        .count();
    assert_eq!(late, 0, "new calls started 2-12 s into the outage");
    let pg = tokio::task::spawn_blocking(move || {
        pg.ctl_start();
        pg
    })
    .await
    .unwrap();
    assert!(
        switchyard::enqueue::wait_finished(&pool, &ids, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "every job finished after Postgres came back"
    );
    assert!(w.shutdown().await, "the worker drained");
    let count = |sql: &'static str| {
        let p = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&p)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("SELECT count(*) FROM results").await, n as i64);
    assert_eq!(
        count("SELECT count(*) FROM jobs WHERE status = 'succeeded'").await,
        n as i64
    );
    // Every answer the provider gave is one `ok` row, no more, no less.
    let answered = env.sim.ledger().iter().filter(|e| e.status == 200).count() as i64;
    assert_eq!(
        count("SELECT count(*) FROM calls WHERE outcome = 'ok'").await,
        answered
    );
    assert_eq!(
        count("SELECT count(*) FROM (SELECT 1 FROM calls WHERE outcome = 'ok' GROUP BY job_id, step HAVING count(*) > 1) d").await,
        0
    );
    pool.close().await;
    drop(pg);
    env.cleanup().await;
}

/// The nats-server binary: on PATH, else where Debian's package puts it.
fn nats_server() -> Option<&'static str> {
    ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .find(|exe| Command::new(exe).arg("--version").output().is_ok())
}

/// These tests need the servers' binaries, not only running services (a
/// machine whose services run in Docker may lack them). Without them the
/// test says so and passes, except under CI, where it fails.
fn have(what: &str, found: bool) -> bool {
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} is not installed; CI needs it for the outage tests"
        );
        eprintln!("SKIPPED: {what} is not installed (install it to run this outage test)");
    }
    found
}

/// A private NATS server with JetStream; killed on drop.
struct PrivateNats {
    dir: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("sy_nats_{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut me = Self {
            dir,
            port,
            child: None,
        };
        me.run();
        me
    }

    fn run(&mut self) {
        let child = Command::new(nats_server().expect("nats-server"))
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server");
        self.child = Some(child);
        // Wait until it accepts connections.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no goodbye to the clients.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_run_loses_and_doubles_nothing() {
    if !have("nats-server", nats_server().is_some()) {
        return;
    }
    let mut nats = PrivateNats::start();
    let env = TestEnv::new(SimProfile {
        latency_ms: 30,
        ..Default::default()
    })
    .await;
    let bus = switchyard::bus::Bus::connect(&nats.url(), &env.name)
        .await
        .unwrap();
    // A short ack wait, so messages whose acks were lost come back soon.
    let mut overrides = common::SINGLE_ROUTES.to_vec();
    overrides.push(("SWITCHYARD_NATS__ACK_WAIT_SECS", "5"));
    let cfg = Arc::new(env.config_with(&overrides));
    bus.ensure_streams(&cfg).await.unwrap();
    let w = worker::start(cfg, env.pool.clone(), bus.clone(), WorkerOptions::default())
        .await
        .unwrap();
    let n = 300;
    let js = common::jobs("natsdown", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&bus, &js, None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), "the first results", || async {
        env.count("SELECT count(*) FROM results").await >= 40
    })
    .await;
    // NATS dies (SIGKILL) and comes back 3 s later with its store.
    nats.kill();
    // A producer gets a clear error instead of losing the job.
    let late = common::jobs("natsdown-late", 1);
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        switchyard::enqueue::publish_jobs(&bus, &late, None),
    )
    .await
    .expect("publishing gives up in time")
    .expect_err("publishing with NATS down must fail");
    assert!(format!("{err:#}").contains("same id is safe"), "{err:#}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nats = tokio::task::spawn_blocking(move || {
        nats.run();
        nats
    })
    .await
    .unwrap();
    // The producer does what the error says: publishes the job again.
    switchyard::enqueue::publish_jobs(&bus, &late, None)
        .await
        .unwrap();
    let mut all = ids.clone();
    all.push(late[0].id.clone());
    assert!(
        switchyard::enqueue::wait_finished(&env.pool, &all, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "every job finished after NATS came back"
    );
    assert!(w.shutdown().await, "the worker drained");
    assert_eq!(
        env.count("SELECT count(*) FROM results").await,
        n as i64 + 1
    );
    let answered = env.sim.ledger().iter().filter(|e| e.status == 200).count() as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE outcome = 'ok'")
            .await,
        answered,
        "every answer recorded once"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM (SELECT 1 FROM calls WHERE outcome = 'ok' GROUP BY job_id, step HAVING count(*) > 1) d").await,
        0
    );
    drop(nats);
    env.cleanup().await;
}
