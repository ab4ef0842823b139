//! Bearer tokens on the HTTP endpoints, walked from the route table itself
//! (so a new route cannot skip authentication): no token → 401, a token of
//! the wrong scope → 403, a revoked token → 401, the right scope → 200; the
//! open routes show no figures; bad tokens from one address are rate
//! limited without ever blocking a valid one; tokens never reach the logs
//! or the database in clear.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::TestEnv;
use switchyard::api::auth::Scope;
use switchyard::ops::dashboard::ROUTES;

/// `switchyard token create`: the token alone on the last line.
fn create_token(env: &TestEnv, name: &str, scope: &str) -> String {
    let out = common::switchyard(&env.child_env())
        .args(["token", "create", "--name", name, "--scope", scope])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let token = text.lines().last().unwrap().trim().to_string();
    assert!(token.starts_with("sy_") && !token.contains(' '), "{text}");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_token_of_its_scope() {
    let env = TestEnv::new(Default::default()).await;
    let read = create_token(&env, "grafana", "read");
    let admin = create_token(&env, "ops", "admin");
    let submit = create_token(&env, "backend", "submit");
    let revoked = create_token(&env, "old", "read");

    let port = switchyard_servers::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("{}-serve.log", env.name));
    let _serve = common::Worker(
        common::switchyard(&env.child_env())
            .args(["serve", "--listen", &listen])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    switchyard::providers::http::install_tls_provider();
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    common::wait_until(Duration::from_secs(20), "the endpoint is up", || async {
        http.get(format!("{base}/healthz")).send().await.is_ok()
    })
    .await;
    let revoke = common::switchyard(&env.child_env())
        .args(["token", "revoke", "old"])
        .output()
        .unwrap();
    assert!(revoke.status.success());

    // Each route is tried from its own loopback address (127.0.1.N), so
    // the bad-token limiter of one does not answer for the next.
    let client_from = |n: u8| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 1, n]))
            .build()
            .unwrap()
    };
    let send = |http: &reqwest::Client, method: &str, path: &str, token: Option<&str>| {
        let url = format!("{base}{}", path.replace("{id}", "no-such-job"));
        let mut r = if method == "POST" {
            http.post(url)
                .header("content-type", "application/json")
                .body("{}")
        } else {
            http.get(url)
        };
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap() }
    };
    let call = |method: &str, path: &str, token: Option<&str>| send(&http, method, path, token);
    let guarded: Vec<_> = ROUTES.iter().filter(|r| r.scope.is_some()).collect();
    assert!(guarded.len() >= 5, "the table lists the guarded routes");
    for (i, spec) in guarded.into_iter().enumerate() {
        let (m, p) = (spec.method, spec.path);
        let from = client_from(u8::try_from(i + 1).unwrap());
        let call = |method: &str, path: &str, token: Option<&str>| send(&from, method, path, token);
        let none = call(m, p, None).await;
        assert_eq!(none.status(), 401, "{m} {p} without a token");
        assert_eq!(none.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            call(m, p, Some("sy_not-a-token")).await.status(),
            401,
            "{m} {p}"
        );
        assert_eq!(
            call(m, p, Some(&revoked)).await.status(),
            401,
            "{m} {p} revoked"
        );
        let (right, wrong) = match spec.scope {
            // An `own` route lets a submit token in, for its own jobs only.
            Some(Scope::Read) if spec.own => (&submit, &submit),
            Some(Scope::Read) => (&read, &submit),
            Some(Scope::Submit) => (&submit, &read),
            _ => (&admin, &read),
        };
        if !spec.own {
            assert_eq!(
                call(m, p, Some(wrong)).await.status(),
                403,
                "{m} {p} wrong scope"
            );
        }
        for t in [right, &admin] {
            let s = call(m, p, Some(t)).await.status();
            assert!(s != 401 && s != 403 && !s.is_server_error(), "{m} {p}: {s}");
        }
    }
    // The OpenAPI document describes every route of the table, and each
    // operation it describes is served.
    let doc: serde_json::Value = call("GET", "/openapi.json", Some(&read))
        .await
        .json()
        .await
        .unwrap();
    let mut described = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            described += 1;
            let spec = ROUTES
                .iter()
                .find(|r| r.path == path && r.method.eq_ignore_ascii_case(method))
                .unwrap_or_else(|| panic!("{method} {path} is described but not in the table"));
            assert_eq!(op["summary"], spec.summary);
            if let Some(scope) = spec.scope {
                assert_eq!(op["x-switchyard-scope"], scope.as_str(), "{method} {path}");
            }
            let r = call(&method.to_uppercase(), path, Some(&admin)).await;
            let status = r.status();
            let body = r.text().await.unwrap();
            assert!(
                status != 405 && !(status == 404 && body.is_empty()),
                "{method} {path} is not served: {status}"
            );
        }
    }
    assert_eq!(described, ROUTES.len(), "every route is described");

    // The open routes reveal nothing.
    let health = call("GET", "/healthz", None).await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
    let page = call("GET", "/", None).await.text().await.unwrap();
    assert!(page.contains("Sign in with an API token"));
    assert!(
        page.contains("<b id=\"jobs-today\">–</b>"),
        "no figure in the page"
    );

    // Bad tokens from one address: after a burst, 429; a valid token still passes.
    let mut limited = false;
    for _ in 0..40 {
        if call("GET", "/metrics", Some("sy_guess")).await.status() == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "bad attempts are rate limited");
    assert_eq!(call("GET", "/metrics", Some(&read)).await.status(), 200);

    // Tokens are stored hashed and never logged.
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT hash, prefix FROM api_tokens ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 4);
    for t in [&read, &admin, &submit, &revoked] {
        assert!(stored.iter().all(|(h, p)| h != t && p != t && p.len() == 7));
        assert!(stored
            .iter()
            .any(|(h, _)| *h == switchyard::store::tokens::hash(t)));
    }
    let list = common::switchyard(&env.child_env())
        .args(["token", "list", "--json"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.contains("grafana") && list.contains("\"revoked_at\""));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("request refused"),
        "refusals are logged: {logged}"
    );
    for t in [&read, &admin, &submit, &revoked] {
        assert!(!list.contains(t.as_str()) && !logged.contains(t.as_str()));
    }
    assert!(!logged.contains("sy_guess"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_refuse_bad_input() {
    let env = TestEnv::new(Default::default()).await;
    let bad = common::switchyard(&env.child_env())
        .args(["token", "create", "--name", "x", "--scope", "root"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("submit, read or admin"));
    create_token(&env, "x", "read");
    let again = common::switchyard(&env.child_env())
        .args(["token", "create", "--name", "x", "--scope", "read"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    let none = common::switchyard(&env.child_env())
        .args(["token", "revoke", "nobody"])
        .output()
        .unwrap();
    assert!(!none.status.success());
    env.cleanup().await;
}
