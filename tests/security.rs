//! TLS and credentials against servers that demand them, on loopback: a
//! nats-server with TLS (and one that verifies clients), nats-servers with
//! users, tokens, NKeys and an operator (JWT credentials files), and a
//! private PostgreSQL with `ssl = on` that accepts only TLS connections.
//! Certificates are made by the test with the `openssl` command. Each
//! server refuses a client that offers no TLS or no credentials, so each
//! test fails without the feature it covers; and no secret appears in an
//! error or a log line.

mod common;

use std::time::Duration;

use switchyard::bus::connect::{NatsAuth, NatsSecurity};
use switchyard::bus::Bus;
use switchyard::config::{NatsConfig, SecretString};
use switchyard::enqueue::{publish_jobs, wait_finished};
use switchyard::sim::{SimProfile, SimServer};
use switchyard_servers::secure::{have_openssl, ConfiguredNats, TestPki};
use switchyard_servers::{have, nats_server_bin, pg_bin, PrivatePg};

fn nats_ready() -> bool {
    have("openssl", have_openssl()) && have("nats-server", nats_server_bin().is_some())
}

fn tls_block(pki: &TestPki, verify: bool) -> String {
    format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify}\n  timeout: 5\n}}\n",
        pki.server_cert().display().to_string(),
        pki.server_key().display().to_string(),
        pki.ca().display().to_string(),
    )
}

fn prefix() -> String {
    format!("sy_sec_{}", &switchyard::ids::new_job_id()[..10])
}

/// The whole error chain, as a user sees it.
fn text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

/// Streams made, one message published and read back through JetStream.
async fn round_trip(bus: &Bus) {
    let cfg = switchyard::config::Config::from_toml_with_env(
        common::SHIPPED_CONFIG,
        &[(
            "SWITCHYARD_NATS__PREFIX".to_string(),
            bus.names.prefix.clone(),
        )],
    )
    .unwrap();
    bus.ensure_streams(&cfg).await.expect("streams");
    let subject = bus.names.job_subject("support");
    bus.js
        .publish(subject, "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let info = bus
        .js
        .get_stream(bus.names.jobs_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 1);
    bus.delete_streams().await;
}

/// A TLS-only nats-server: the client needs the test CA; with it a job
/// runs end to end through a worker (streams, consumers, publish, ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_the_test_ca_runs_a_job_end_to_end() {
    if !nats_ready() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let nats = ConfiguredNats::start(&tls_block(&pki, false)).unwrap();
    let name = prefix();

    // No CA: the system roots do not know the test CA, over tls:// and over
    // nats:// (the server's INFO requires TLS, so the client upgrades).
    for url in [nats.url("tls"), nats.url("nats")] {
        let e = text(
            Bus::connect_with(&url, &name, &NatsSecurity::default())
                .await
                .err()
                .expect("refused without the CA"),
        );
        assert!(e.contains("NATS_CA_FILE"), "{e}");
    }
    // The wrong CA.
    let wrong = NatsSecurity::default().with_ca_file(pki.other_ca());
    assert!(Bus::connect_with(&nats.url("tls"), &name, &wrong)
        .await
        .is_err());

    // The right CA, from the config key (as a deployment writes it).
    let cfg = NatsConfig {
        prefix: name.clone(),
        tls_ca_file: Some(pki.ca()),
        ..NatsConfig::default()
    };
    let sec = NatsSecurity::load(&cfg, &|_| None).unwrap();
    let bus = Bus::connect_with(&nats.url("tls"), &name, &sec)
        .await
        .expect("TLS with the test CA");

    let db_url = common::database_url_for(&name);
    let pool = switchyard::store::connect_and_migrate(&db_url, 8)
        .await
        .expect("test database");
    let sim = SimServer::start("127.0.0.1:0", SimProfile::default())
        .await
        .unwrap();
    let env = common::TestEnv {
        name,
        db_url,
        pool,
        bus,
        sim,
    };
    let worker = env
        .start_worker(env.config_with(&common::SINGLE_ROUTES))
        .await;
    let jobs = common::jobs("tls", 6);
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    publish_jobs(&env.bus, &jobs, None).await.unwrap();
    let done = wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
        .await
        .unwrap();
    assert!(done, "jobs finished over TLS");
    assert_eq!(
        env.count("SELECT count(*) FROM results").await,
        6,
        "one result per job"
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// A server that verifies clients (`verify: true`) refuses a client without
/// a certificate and takes one with the test client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mutual_tls_needs_the_client_certificate() {
    if !nats_ready() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let nats = ConfiguredNats::start(&tls_block(&pki, true)).unwrap();
    let name = prefix();
    let ca_only = NatsSecurity::default().with_ca_file(pki.ca());
    assert!(
        Bus::connect_with(&nats.url("tls"), &name, &ca_only)
            .await
            .is_err(),
        "a client without a certificate is refused"
    );
    // From the environment, as the binary reads it.
    let vars = [
        ("NATS_CA_FILE", pki.ca()),
        ("NATS_CERT_FILE", pki.client_cert()),
        ("NATS_KEY_FILE", pki.client_key()),
    ];
    let env = |k: &str| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, p)| p.display().to_string())
    };
    let sec = NatsSecurity::load(&NatsConfig::default(), &env).unwrap();
    let bus = Bus::connect_with(&nats.url("tls"), &name, &sec)
        .await
        .expect("mutual TLS");
    round_trip(&bus).await;
}

const ALICE_PW: &str = "pw-alice-Zq81x";
/// Characters a URL must percent-encode.
const BOB_PW: &str = "p@ss/w:rd%";

/// Users with passwords and an NKey user in the default account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_users_passwords_and_nkeys() {
    if !nats_ready() {
        return;
    }
    let nkey_user = nkeys::KeyPair::new_user();
    let nats = ConfiguredNats::start(&format!(
        "authorization {{\n  users = [\n    {{ user: alice, password: {ALICE_PW:?} }}\n    {{ user: bob, password: {BOB_PW:?} }}\n    {{ nkey: {} }}\n  ]\n}}\n",
        nkey_user.public_key()
    ))
    .unwrap();
    let name = prefix();
    let none = NatsSecurity::default();

    // No credentials: refused.
    let e = text(
        Bus::connect_with(&nats.url("nats"), &name, &none)
            .await
            .err()
            .expect("refused without credentials"),
    );
    assert!(e.contains("authorization"), "{e}");

    // In the URL, as users write it (percent-encoded where needed).
    let url = format!("nats://alice:{ALICE_PW}@127.0.0.1:{}", nats.port());
    let bus = Bus::connect_with(&url, &name, &none)
        .await
        .expect("user and password in the URL");
    round_trip(&bus).await;
    let url = format!(
        "nats://bob:{}@127.0.0.1:{}",
        "p%40ss%2Fw%3Ard%25",
        nats.port()
    );
    Bus::connect_with(&url, &name, &none)
        .await
        .expect("a percent-encoded password");

    // Several URLs: a dead one first, then the server (fallback).
    let dead = switchyard_servers::free_port().unwrap();
    let url = format!(
        "nats://alice:{ALICE_PW}@127.0.0.1:{dead},nats://127.0.0.1:{}",
        nats.port()
    );
    Bus::connect_with(&url, &name, &none)
        .await
        .expect("fallback URL with the first URL's credentials");

    // A wrong password: refused, and neither password is printed.
    let url = format!("nats://alice:wrong-Pw-123@127.0.0.1:{}", nats.port());
    let e = text(
        Bus::connect_with(&url, &name, &none)
            .await
            .err()
            .expect("wrong password refused"),
    );
    assert!(e.contains("authorization violation"), "{e}");
    assert!(!e.contains("wrong-Pw-123") && !e.contains(ALICE_PW), "{e}");
    assert!(e.contains("alice:***@127.0.0.1"), "{e}");

    // From the environment: NATS_USER and NATS_PASSWORD_FILE.
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, format!("{ALICE_PW}\n")).unwrap();
    let pw_path = pw_file.display().to_string();
    let env = |k: &str| match k {
        "NATS_USER" => Some("alice".to_string()),
        "NATS_PASSWORD_FILE" => Some(pw_path.clone()),
        _ => None,
    };
    let sec = NatsSecurity::load(&NatsConfig::default(), &env).unwrap();
    Bus::connect_with(&nats.url("nats"), &name, &sec)
        .await
        .expect("NATS_USER / NATS_PASSWORD_FILE");

    // An NKey seed.
    let seed = nkey_user.seed().unwrap();
    let sec = none
        .clone()
        .with_auth(NatsAuth::NkeySeed(SecretString::new(seed.clone())));
    let bus = Bus::connect_with(&nats.url("nats"), &name, &sec)
        .await
        .expect("NKey seed");
    round_trip(&bus).await;
    // Another user's seed is refused, and not printed.
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let sec = none
        .clone()
        .with_auth(NatsAuth::NkeySeed(SecretString::new(stranger.clone())));
    let e = text(
        Bus::connect_with(&nats.url("nats"), &name, &sec)
            .await
            .err()
            .expect("unknown NKey refused"),
    );
    assert!(!e.contains(&stranger), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tokens_in_the_url_and_the_environment() {
    if !nats_ready() {
        return;
    }
    let token = "tok-9fQ2mLx7";
    let nats = ConfiguredNats::start(&format!("authorization {{ token: {token:?} }}\n")).unwrap();
    let name = prefix();
    assert!(
        Bus::connect_with(&nats.url("nats"), &name, &NatsSecurity::default())
            .await
            .is_err(),
        "refused without the token"
    );
    let bus = Bus::connect_with(
        &format!("nats://{token}@127.0.0.1:{}", nats.port()),
        &name,
        &NatsSecurity::default(),
    )
    .await
    .expect("token in the URL");
    round_trip(&bus).await;
    let env = |k: &str| (k == "NATS_TOKEN").then(|| token.to_string());
    let sec = NatsSecurity::load(&NatsConfig::default(), &env).unwrap();
    Bus::connect_with(&nats.url("nats"), &name, &sec)
        .await
        .expect("NATS_TOKEN");
    let e = text(
        Bus::connect_with(
            &format!("nats://not-the-token@127.0.0.1:{}", nats.port()),
            &name,
            &NatsSecurity::default(),
        )
        .await
        .err()
        .expect("a wrong token is refused"),
    );
    assert!(!e.contains("not-the-token"), "{e}");
}

/// A signed JWT (NATS' `ed25519-nkey` algorithm) with `claims`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let header = B64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": switchyard::ids::new_job_id().to_uppercase(),
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = B64.encode(serde_json::to_vec(&claims).unwrap());
    let signed = format!("{header}.{claims}");
    let sig = B64.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{sig}")
}

/// Operator mode (an operator, an account with JetStream, a user; a memory
/// resolver): the user's `.creds` file from `NATS_CREDS_FILE` connects and
/// uses JetStream; without it, or with an unknown user's, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jwt_credentials_file() {
    if !nats_ready() {
        return;
    }
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let acct_jwt = jwt(
        &operator,
        &account.public_key(),
        "test-account",
        serde_json::json!({
            "type": "account", "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            }
        }),
    );
    let creds_for = |user: &nkeys::KeyPair, signer: &nkeys::KeyPair| {
        let user_jwt = jwt(
            signer,
            &user.public_key(),
            "test-user",
            serde_json::json!({
                "type": "user", "version": 2,
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1
            }),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    };
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let sys_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let nats = ConfiguredNats::start(&format!(
        "operator: {op_jwt:?}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {acct}: {acct_jwt:?}\n  {sys}: {sys_jwt:?}\n}}\n",
        acct = account.public_key(),
        sys = system.public_key(),
    ))
    .unwrap();
    let name = prefix();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("user.creds");
    std::fs::write(&good, creds_for(&nkeys::KeyPair::new_user(), &account)).unwrap();
    // Signed by an account the server does not know.
    let bad = dir.path().join("stranger.creds");
    let stranger_account = nkeys::KeyPair::new_account();
    std::fs::write(
        &bad,
        creds_for(&nkeys::KeyPair::new_user(), &stranger_account),
    )
    .unwrap();

    assert!(
        Bus::connect_with(&nats.url("nats"), &name, &NatsSecurity::default())
            .await
            .is_err(),
        "refused without credentials"
    );
    let good_path = good.display().to_string();
    let sec = NatsSecurity::load(&NatsConfig::default(), &|k| {
        (k == "NATS_CREDS_FILE").then(|| good_path.clone())
    })
    .unwrap();
    let bus = Bus::connect_with(&nats.url("nats"), &name, &sec)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nserver log:\n{}", nats.log()));
    round_trip(&bus).await;
    let sec = NatsSecurity::default().with_auth(NatsAuth::CredsFile(bad));
    assert!(
        Bus::connect_with(&nats.url("nats"), &name, &sec)
            .await
            .is_err(),
        "an unknown account's user is refused"
    );
}

const APP_PW: &str = "pg-App-s3cret-77";

/// A private PostgreSQL with TLS on that takes TCP connections over TLS
/// only (`hostssl`), `postgres` by trust and `app` by SCRAM password.
async fn tls_postgres(pki: &TestPki) -> PrivatePg {
    let pg = PrivatePg::start().unwrap();
    let admin = sqlx::PgPool::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE app LOGIN CREATEDB PASSWORD '{APP_PW}'"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    pg.enable_tls(
        &pki.server_cert(),
        &pki.server_key(),
        "local all all trust\n\
         hostssl all postgres 127.0.0.1/32 trust\n\
         hostssl all app 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    pg
}

/// `sslmode=disable` is refused; `require`, `verify-ca` and `verify-full`
/// (with `sslrootcert`) connect; the wrong CA fails verification; a
/// password user's password appears in no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_only() {
    if !have("openssl", have_openssl()) || !have("PostgreSQL server", pg_bin().is_some()) {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let pg = tls_postgres(&pki).await;
    let ca = pki.ca().display().to_string();
    let other = pki.other_ca().display().to_string();
    let db = |q: &str| format!("{}?{q}", pg.url("sy_tls"));

    let e = text(
        switchyard::store::connect_and_migrate(&db("sslmode=disable"), 2)
            .await
            .expect_err("no TLS refused"),
    );
    assert!(e.contains("no encryption") || e.contains("pg_hba"), "{e}");

    for q in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let pool = switchyard::store::connect_and_migrate(&db(&q), 2)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e:#}"));
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(ssl, "{q}: the connection is encrypted");
        pool.close().await;
    }
    let e = text(
        switchyard::store::connect_and_migrate(
            &db(&format!("sslmode=verify-full&sslrootcert={other}")),
            2,
        )
        .await
        .expect_err("the wrong CA fails verification"),
    );
    assert!(
        e.to_lowercase().contains("certificate")
            || e.contains("UnknownIssuer")
            || e.contains("tls"),
        "{e}"
    );

    // A password user, over TLS.
    let app = |pw: &str| {
        format!(
            "postgres://app:{pw}@127.0.0.1:{}/sy_app?sslmode=verify-full&sslrootcert={ca}",
            pg.port()
        )
    };
    let pool = switchyard::store::connect_and_migrate(&app(APP_PW), 2)
        .await
        .unwrap_or_else(|e| panic!("{:#}", e));
    pool.close().await;
    let e = text(
        switchyard::store::connect_and_migrate(&app("wrong-Pg-pw-55"), 2)
            .await
            .expect_err("a wrong password is refused"),
    );
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong-Pg-pw-55") && !e.contains(APP_PW), "{e}");
    assert!(e.contains("app:***@127.0.0.1"), "{e}");
}

/// The binary reads `DATABASE_URL_FILE` (the password only in the file)
/// and NATS credentials from the environment, and prints no password even
/// at trace level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_secret_files_and_prints_no_password() {
    if !nats_ready() || !have("PostgreSQL server", pg_bin().is_some()) {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let pg = tls_postgres(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let url_file = write(
        "database_url",
        &format!(
            "postgres://app:{APP_PW}@127.0.0.1:{}/sy_bin?sslmode=verify-full&sslrootcert={}\n",
            pg.port(),
            pki.ca().display()
        ),
    );
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env("RUST_LOG", "trace")
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&["migrate"], &[("DATABASE_URL_FILE", &url_file)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains(APP_PW), "the password is in the logs");
    // It migrated the database of the file's URL, on the private server.
    let check =
        switchyard::store::connect_and_migrate(&format!("{}?sslmode=require", pg.url("sy_bin")), 2)
            .await
            .unwrap();
    let owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'sy_bin'",
    )
    .fetch_one(&check)
    .await
    .unwrap();
    assert_eq!(owner, "app", "created by the file's user");
    check.close().await;

    // The wrong password from the file: refused, the URL shown redacted.
    let bad_file = write(
        "bad_url",
        &format!(
            "postgres://app:wrong-Pg-pw-55@127.0.0.1:{}/sy_bin?sslmode=require",
            pg.port()
        ),
    );
    let out = run(&["migrate"], &[("DATABASE_URL_FILE", &bad_file)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("app:***@"), "{err}");
    assert!(!err.contains("wrong-Pg-pw-55"), "{err}");
    // Both the variable and its file: an error naming both.
    let out = run(
        &["migrate"],
        &[
            ("DATABASE_URL_FILE", &url_file),
            ("DATABASE_URL", "postgres://x@y/z"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("DATABASE_URL_FILE"),
        "{err}"
    );

    // NATS: enqueue to a TLS server with user and password, from the
    // environment; `--help` shows no environment values.
    let nats_pw = "nats-Bin-pw-31";
    let nats = ConfiguredNats::start(&format!(
        "{}authorization {{ users = [ {{ user: svc, password: {nats_pw:?} }} ] }}\n",
        tls_block(&pki, false)
    ))
    .unwrap();
    let pw_file = write("nats_pw", nats_pw);
    let jobs = write(
        "jobs.jsonl",
        "{\"id\":\"bin-1\",\"category\":\"support\",\"prompt\":\"hi\"}\n",
    );
    let name = prefix();
    let nats_url = nats.url("tls");
    let ca = pki.ca().display().to_string();
    let base: Vec<(&str, &str)> = vec![
        ("NATS_URL", &nats_url),
        ("NATS_CA_FILE", &ca),
        ("SWITCHYARD_NATS__PREFIX", &name),
    ];
    let out = run(&["enqueue", &jobs], &base);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no credentials: refused\n{err}");
    let mut with_creds = base.clone();
    with_creds.extend([("NATS_USER", "svc"), ("NATS_PASSWORD_FILE", &pw_file)]);
    let out = run(&["enqueue", &jobs], &with_creds);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains(nats_pw), "the NATS password is in the logs");
    let url_with_pw = format!("tls://svc:{nats_pw}@127.0.0.1:{}", nats.port());
    let out = run(&["--help"], &[("NATS_URL", &url_with_pw)]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && help.contains("NATS_URL"), "{help}");
    assert!(!help.contains(nats_pw), "{help}");

    let sec = NatsSecurity::default()
        .with_ca_file(pki.ca())
        .with_auth(NatsAuth::UserPassword {
            user: "svc".into(),
            password: SecretString::new(nats_pw),
        });
    let bus = Bus::connect_with(&nats_url, &name, &sec).await.unwrap();
    let stored = bus
        .js
        .get_stream(bus.names.jobs_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(stored, 1, "the binary's job is in the stream");
}
