//! Keystone login against a real Keystone (Debian's python3-keystone under uwsgi, started
//! from a template that `scripts/keystone.sh prepare` builds once): tokens authenticate,
//! validations are cached in the store and shared by replicas, Keystone outages and
//! revocations behave as documented.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use canopy::procs::{Etcd, ServerProcess};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Keystone of its own for one test.
struct Keystone {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
    ids: Value,
    token_lifetime: Option<u64>,
}

impl Keystone {
    fn start() -> Keystone {
        Keystone::start_with(None)
    }

    /// A Keystone whose tokens last `token_lifetime` seconds (default an hour).
    fn start_with(token_lifetime: Option<u64>) -> Keystone {
        let template = std::env::var_os("CANOPY_TEST_KEYSTONE_TEMPLATE")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/keystone-template"));
        let script = workspace().join("scripts/keystone.sh");
        if !template.join("ids.json").exists() {
            let out = Command::new(&script)
                .arg("prepare")
                .arg(&template)
                .output()
                .expect("running scripts/keystone.sh");
            assert!(
                out.status.success(),
                "preparing Keystone failed (is it installed? .ci/run runs `scripts/keystone.sh install`): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("keystone");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&state)
            .status()
            .unwrap();
        assert!(copied.success());
        let ids: Value =
            serde_json::from_str(&std::fs::read_to_string(state.join("ids.json")).unwrap())
                .unwrap();
        let port = canopy::procs::free_port().expect("a free port");
        let mut keystone = Keystone {
            child: None,
            url: format!("http://127.0.0.1:{port}/v3"),
            dir,
            ids,
            token_lifetime,
        };
        keystone.spawn(port);
        keystone
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("keystone")
    }

    fn spawn(&mut self, port: u16) {
        let mut command = Command::new(workspace().join("scripts/keystone.sh"));
        if let Some(seconds) = self.token_lifetime {
            command.env("KEYSTONE_TOKEN_EXPIRATION", seconds.to_string());
        }
        let child = command
            .arg("start")
            .arg(self.state())
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting Keystone");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let up = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &self.url])
                .output()
                .map(|o| o.stdout == b"200")
                .unwrap_or(false);
            if up {
                return;
            }
            assert!(Instant::now() < deadline, "Keystone did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Token validations Keystone has answered (from its request log).
    fn validations(&self) -> usize {
        std::fs::read_to_string(self.state().join("log/uwsgi.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("GET /v3/auth/tokens"))
            .count()
    }

    fn tenant(&self, i: usize) -> &Value {
        &self.ids["tenants"][i]
    }

    /// A project-scoped token for a user.
    async fn token(&self, user: &str, password: &str, project: &str) -> String {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}}
        }});
        let response = reqwest::Client::new()
            .post(format!("{}/auth/tokens", self.url))
            .json(&body)
            .send()
            .await
            .expect("asking Keystone for a token");
        assert_eq!(response.status().as_u16(), 201, "Keystone token for {user}");
        response.headers()["x-subject-token"]
            .to_str()
            .unwrap()
            .to_string()
    }

    async fn member_token(&self, i: usize) -> String {
        let t = self.tenant(i);
        self.token(
            t["user"].as_str().unwrap(),
            t["password"].as_str().unwrap(),
            t["project"].as_str().unwrap(),
        )
        .await
    }

    /// Revokes a token (as its own user).
    async fn revoke(&self, token: &str) {
        let response = reqwest::Client::new()
            .delete(format!("{}/auth/tokens", self.url))
            .header("X-Auth-Token", token)
            .header("X-Subject-Token", token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 204);
    }

    fn credentials_file(&self) -> PathBuf {
        let path = self.dir.path().join("canopy-keystone.yaml");
        let s = &self.ids["service"];
        std::fs::write(
            &path,
            serde_json::to_string(&json!({
                "username": s["user"], "password": s["password"], "project": s["project"]
            }))
            .unwrap(),
        )
        .unwrap();
        path
    }
}

impl Drop for Keystone {
    fn drop(&mut self) {
        self.stop();
    }
}

fn server(dir: &Path, store: &str, keystone: &Keystone, ttl: &str) -> ServerProcess {
    let credentials = keystone.credentials_file();
    let extra = [
        "--keystone-url",
        &keystone.url,
        "--keystone-credentials-file",
        credentials.to_str().unwrap(),
        "--keystone-cache-ttl",
        ttl,
    ];
    ServerProcess::start(&common::canopy_exe(), dir, store, &extra).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        panic!("starting canopy server: {e:#}\n{log}")
    })
}

async fn token_client(server: &ServerProcess, token: &str) -> kube::Client {
    common::token_client(&server.kubeconfig, token).await
}

/// The status of listing namespaces with a token.
async fn list_status(server: &ServerProcess, token: &str) -> u16 {
    let client = token_client(server, token).await;
    match Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await
    {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keystone_tokens_are_validated_once_and_shared_by_replicas() {
    let mut keystone = Keystone::start();
    let etcd = Etcd::start().expect("etcd");
    let store = format!("etcd={}", etcd.url);
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = server(dirs.0.path(), &store, &keystone, "5m");
    let two = server(dirs.1.path(), &store, &keystone, "5m");

    // Alice logs in and works in her tenant; kubectl with the token works too.
    let alice = keystone.member_token(0).await;
    let project = keystone.tenant(0)["project_id"]
        .as_str()
        .unwrap()
        .to_string();
    let client = token_client(&one, &alice).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "alice-ns"}})).unwrap();
    let created = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(
        created.metadata.labels.unwrap()["canopy.io/tenant"],
        project,
        "the namespace belongs to alice's Keystone project"
    );
    let ca = dirs.0.path().join("pki/ca.crt");
    let out = Command::new(common::kubectl_bin())
        .args(["--server", &one.url, "--token", &alice])
        .arg(format!("--certificate-authority={}", ca.display()))
        .args(["get", "namespaces", "-o", "name"])
        .env("KUBECONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/alice-ns"
    );
    // Her Tenant exists, named after her project, and she can read it.
    let tenants: Api<canopy_api::tenant::Tenant> = Api::all(client.clone());
    let tenant = tenants.get(&project).await.unwrap();
    assert_eq!(tenant.spec.display_name.as_deref(), Some("tenant-a"));

    // Cached: many more requests, on both replicas, cost no more validations.
    let validations = keystone.validations();
    assert!(validations >= 1);
    for _ in 0..20 {
        assert_eq!(list_status(&one, &alice).await, 200);
    }
    assert_eq!(list_status(&two, &alice).await, 200);
    assert_eq!(
        keystone.validations(),
        validations,
        "cached tokens are not validated again, by either replica"
    );
    // The cache holds a digest, never the token.
    let out = Command::new("etcdctl")
        .args([
            "--endpoints",
            &etcd.url,
            "get",
            "--prefix",
            "/registry/canopy.io/keystonetokens/",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    let stored = String::from_utf8_lossy(&out.stdout);
    assert!(stored.contains("\"userName\":\"alice\""), "{stored}");
    assert!(!stored.contains(&alice));

    // An unknown token and a non-token are refused.
    assert_eq!(list_status(&one, "not-a-token").await, 401);

    // Keystone down: the cached token still works, a token never validated does not.
    let bob = keystone.member_token(1).await;
    keystone.stop();
    assert_eq!(list_status(&two, &alice).await, 200);
    assert_eq!(list_status(&one, &bob).await, 401);
    let log = std::fs::read_to_string(dirs.0.path().join("server.log")).unwrap();
    assert!(log.contains("Keystone is unavailable"));
    assert!(
        !log.contains(&bob) && !log.contains(&alice),
        "tokens must never be logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_tokens_stop_working_within_the_cache_ttl() {
    let keystone = Keystone::start();
    let dir = tempfile::tempdir().unwrap();
    let one = server(dir.path(), "embedded", &keystone, "2s");
    let alice = keystone.member_token(0).await;
    assert_eq!(list_status(&one, &alice).await, 200);
    keystone.revoke(&alice).await;
    // Still cached right after the revocation; refused once the TTL has passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(list_status(&one, &alice).await, 401);
    // An admin of the admin project is a cluster admin.
    let admin = &keystone.ids["admin"];
    let token = keystone
        .token(
            admin["user"].as_str().unwrap(),
            admin["password"].as_str().unwrap(),
            admin["project"].as_str().unwrap(),
        )
        .await;
    let client = token_client(&one, &token).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    nodes.list(&ListParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_tokens_are_refused_even_within_the_cache_ttl() {
    let keystone = Keystone::start_with(Some(5));
    let dir = tempfile::tempdir().unwrap();
    let one = server(dir.path(), "embedded", &keystone, "5m");
    let alice = keystone.member_token(0).await;
    assert_eq!(list_status(&one, &alice).await, 200);
    let validations = keystone.validations();
    assert_eq!(list_status(&one, &alice).await, 200);
    assert_eq!(keystone.validations(), validations, "cached until expiry");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(list_status(&one, &alice).await, 401);
    // A new token works again.
    let fresh = keystone.member_token(0).await;
    assert_eq!(list_status(&one, &fresh).await, 200);
}

/// Runs `canopy` with a clean environment: HOME and the token cache in `home`.
fn canopy_cli(home: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = Command::new(common::canopy_exe());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", home)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

/// Runs kubectl as a user whose HOME is `home` (so ~/.kube/config and the token cache).
fn user_kubectl(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(common::kubectl_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", home)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn canopy_login_writes_a_kubeconfig_that_kubectl_and_kube_rs_use() {
    let keystone = Keystone::start();
    let dir = tempfile::tempdir().unwrap();
    let one = server(dir.path(), "embedded", &keystone, "5m");
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let ca = dir.path().join("pki/ca.crt");
    let (alice, bob) = (keystone.tenant(0).clone(), keystone.tenant(1).clone());
    let versionless = keystone.url.trim_end_matches("/v3").to_string();
    let login_env = |t: &Value| {
        vec![
            ("OS_AUTH_URL", versionless.clone()),
            ("OS_USERNAME", t["user"].as_str().unwrap().to_string()),
            (
                "OS_PROJECT_NAME",
                t["project"].as_str().unwrap().to_string(),
            ),
            ("OS_USER_DOMAIN_NAME", "Default".to_string()),
            ("OS_PROJECT_DOMAIN_NAME", "Default".to_string()),
        ]
    };
    let login_args = [
        "login",
        "--server",
        &one.url,
        "--certificate-authority",
        ca.to_str().unwrap(),
    ];

    // A wrong password is refused with a clear message, and nothing is written.
    let mut env = login_env(&alice);
    env.push(("OS_PASSWORD", "wrong".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = canopy_cli(home, &login_args, &env_refs, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Keystone refused the credentials"), "{err}");
    assert!(!home.join(".kube/config").exists());

    // Alice logs in with OS_PASSWORD (like the OpenStack CLI) into ~/.kube/config.
    let mut env = login_env(&alice);
    env.push(("OS_PASSWORD", alice["password"].as_str().unwrap().into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = canopy_cli(home, &login_args, &env_refs, None);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Created namespace tenant-a"), "{err}");
    assert!(!err.contains(alice["password"].as_str().unwrap()));
    let validations = keystone.validations();

    // kubectl works in her namespace with no password at hand: the plugin's saved token.
    ok(&user_kubectl(
        home,
        &["create", "configmap", "demo", "--from-literal=a=b"],
        &[],
    ));
    assert_eq!(
        ok(&user_kubectl(
            home,
            &[
                "get",
                "configmap",
                "demo",
                "-o",
                "jsonpath={.metadata.namespace}"
            ],
            &[]
        )),
        "tenant-a"
    );
    assert_eq!(
        ok(&user_kubectl(
            home,
            &["get", "namespaces", "-o", "name"],
            &[]
        )),
        "namespace/tenant-a"
    );
    assert_eq!(
        keystone.validations(),
        validations,
        "every kubectl command reuses the token the server validated at login"
    );
    let cache_dir = home.join(".cache/canopy/tokens");
    let cached: Vec<_> = std::fs::read_dir(&cache_dir).unwrap().collect();
    assert_eq!(cached.len(), 1);
    let cached = cached[0].as_ref().unwrap().path();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cached).unwrap().permissions().mode() & 0o077,
        0
    );
    let config = std::fs::read_to_string(home.join(".kube/config")).unwrap();
    assert!(!config.contains(alice["password"].as_str().unwrap()));
    assert!(config.contains("credential"), "{config}");

    // kube-rs reads the same kubeconfig and runs the same plugin.
    let kubeconfig = kube::config::Kubeconfig::read_from(home.join(".kube/config")).unwrap();
    let config = {
        // The plugin must find the token cache under the test's HOME.
        let mut kubeconfig = kubeconfig.clone();
        for user in &mut kubeconfig.auth_infos {
            if let Some(exec) = user.auth_info.as_mut().and_then(|a| a.exec.as_mut()) {
                let mut env = std::collections::HashMap::new();
                env.insert("name".to_string(), "HOME".to_string());
                env.insert("value".to_string(), home.display().to_string());
                exec.env = Some(vec![env]);
            }
        }
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap()
    };
    let client = kube::Client::try_from(config).unwrap();
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::default_namespaced(client);
    assert!(maps.get("demo").await.is_ok());

    // The saved token gone and no password: a clear error, not a hang.
    std::fs::remove_file(&cached).unwrap();
    let out = user_kubectl(home, &["get", "configmaps"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run `canopy login` again"), "{err}");
    // With OS_PASSWORD the plugin gets a new token itself.
    let password = alice["password"].as_str().unwrap();
    ok(&user_kubectl(
        home,
        &["get", "configmap", "demo"],
        &[("OS_PASSWORD", password)],
    ));
    assert!(cached.exists());

    // Bob logs in too (password on stdin); both contexts live in one kubeconfig.
    let env = login_env(&bob);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut args = login_args.to_vec();
    args.push("--password-stdin");
    let stdin = format!("{}\n", bob["password"].as_str().unwrap());
    ok(&canopy_cli(home, &args, &env_refs, Some(&stdin)));
    assert_eq!(
        ok(&user_kubectl(home, &["config", "current-context"], &[])),
        "bob@tenant-b"
    );
    assert_eq!(
        ok(&user_kubectl(
            home,
            &["get", "namespaces", "-o", "name"],
            &[]
        )),
        "namespace/tenant-b"
    );
    let out = user_kubectl(home, &["get", "configmap", "demo", "-n", "tenant-a"], &[]);
    assert!(!out.status.success(), "bob must not read alice's configmap");
    assert!(
        ok(&user_kubectl(
            home,
            &[
                "--context",
                "alice@tenant-a",
                "get",
                "configmap",
                "demo",
                "-o",
                "name"
            ],
            &[]
        ))
        .contains("demo")
    );

    // The plugin speaks the version kubectl asks for.
    let env = login_env(&bob);
    let mut env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let info = r#"{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","spec":{"interactive":false}}"#;
    env_refs.push(("KUBERNETES_EXEC_INFO", info));
    let out = canopy_cli(home, &["credential"], &env_refs, None);
    let credential: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(
        credential["apiVersion"],
        "client.authentication.k8s.io/v1beta1"
    );
    assert_eq!(credential["kind"], "ExecCredential");
    assert!(!credential["status"]["token"].as_str().unwrap().is_empty());
    let expires: DateTime<Utc> = credential["status"]["expirationTimestamp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(expires > Utc::now() + chrono::Duration::minutes(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_uses_of_a_token_ask_keystone_once() {
    let keystone = Keystone::start();
    let dir = tempfile::tempdir().unwrap();
    let one = server(dir.path(), "embedded", &keystone, "5m");
    let alice = keystone.member_token(0).await;
    let before = keystone.validations();
    let requests: Vec<_> = (0..24)
        .map(|_| {
            let kubeconfig = one.kubeconfig.clone();
            let alice = alice.clone();
            tokio::spawn(async move {
                let client = common::token_client(&kubeconfig, &alice).await;
                Api::<Namespace>::all(client)
                    .list(&ListParams::default())
                    .await
                    .is_ok()
            })
        })
        .collect();
    for request in requests {
        assert!(request.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(keystone.validations() - before, 1);
    // The server counts it too.
    let admin = common::client_for(&one.kubeconfig).await;
    let (_, _, body) = common::raw(&admin, "GET", "/metrics", None, Vec::new()).await;
    let metrics = body.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("canopy_keystone_requests_total{operation=\"validate\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apiserver_authentication_token_cache_request_total{status=\"miss\"}"),
        "{metrics}"
    );
}
