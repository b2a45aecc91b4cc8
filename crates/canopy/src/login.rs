//! `canopy login` and `canopy credential`: how a Keystone user gets to kubectl (seed §3).
//!
//! `canopy login` asks Keystone for a project-scoped token with the user's password (flags or
//! the OpenStack CLI's `OS_*` variables), makes sure the user has a namespace to work in, and
//! writes a kubeconfig context whose user runs `canopy credential`, kubectl's exec credential
//! plugin. The plugin hands kubectl the token and, once it nears expiry, asks Keystone for a
//! new one: with `OS_PASSWORD`, or by prompting when kubectl runs in a terminal.
//!
//! Between the two, the token (never the password) waits in a file only its owner can read,
//! under `$XDG_CACHE_HOME/canopy/tokens`, so that every kubectl command reuses one token and
//! the API servers validate it with Keystone once.

use std::{
    io::{BufRead, IsTerminal},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use canopy_apiserver::keystone::{self, DomainRef, IssuedToken, PasswordAuth, ProjectRef};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Who the user is in Keystone; the OpenStack CLI's flags and variables.
#[derive(clap::Args, Clone, Debug)]
pub struct KeystoneUser {
    /// Keystone identity endpoint, e.g. `http://keystone:5000/v3` (`/v3` is added to a URL
    /// without a version).
    #[arg(long, env = "OS_AUTH_URL")]
    pub os_auth_url: String,
    /// Keystone user name.
    #[arg(long, env = "OS_USERNAME")]
    pub os_username: String,
    /// Project (the tenant) to log in to, by name.
    #[arg(
        long,
        env = "OS_PROJECT_NAME",
        required_unless_present = "os_project_id"
    )]
    pub os_project_name: Option<String>,
    /// Project to log in to, by id (instead of its name).
    #[arg(long, env = "OS_PROJECT_ID", conflicts_with = "os_project_name")]
    pub os_project_id: Option<String>,
    /// The user's domain, by id (default: `default`).
    #[arg(
        long,
        env = "OS_USER_DOMAIN_ID",
        conflicts_with = "os_user_domain_name"
    )]
    pub os_user_domain_id: Option<String>,
    /// The user's domain, by name.
    #[arg(long, env = "OS_USER_DOMAIN_NAME")]
    pub os_user_domain_name: Option<String>,
    /// The project's domain, by id (default: the user's domain).
    #[arg(
        long,
        env = "OS_PROJECT_DOMAIN_ID",
        conflicts_with = "os_project_domain_name"
    )]
    pub os_project_domain_id: Option<String>,
    /// The project's domain, by name.
    #[arg(long, env = "OS_PROJECT_DOMAIN_NAME")]
    pub os_project_domain_name: Option<String>,
}

impl KeystoneUser {
    pub(crate) fn url(&self) -> String {
        let url = self.os_auth_url.trim_end_matches('/');
        let versioned = url.rsplit_once('/').is_some_and(|(_, last)| {
            last.strip_prefix('v')
                .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        });
        if versioned {
            url.to_string()
        } else {
            format!("{url}/v3")
        }
    }

    fn user_domain(&self) -> DomainRef {
        match (&self.os_user_domain_id, &self.os_user_domain_name) {
            (Some(id), _) => DomainRef::Id(id.clone()),
            (None, Some(name)) => DomainRef::Name(name.clone()),
            (None, None) => DomainRef::Id("default".into()),
        }
    }

    fn project(&self) -> ProjectRef {
        if let Some(id) = &self.os_project_id {
            return ProjectRef::Id(id.clone());
        }
        let domain = match (&self.os_project_domain_id, &self.os_project_domain_name) {
            (Some(id), _) => DomainRef::Id(id.clone()),
            (None, Some(name)) => DomainRef::Name(name.clone()),
            (None, None) => self.user_domain(),
        };
        ProjectRef::Name {
            name: self.os_project_name.clone().unwrap_or_default(),
            domain,
        }
    }

    pub(crate) fn auth(&self, password: String) -> PasswordAuth {
        PasswordAuth {
            username: self.os_username.clone(),
            password,
            user_domain: self.user_domain(),
            project: self.project(),
        }
    }

    /// The same identity as flags, for the kubeconfig's exec stanza (no password).
    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--os-auth-url".to_string(),
            self.url(),
            "--os-username".into(),
            self.os_username.clone(),
        ];
        let mut push = |flag: &str, value: &Option<String>| {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value.clone());
            }
        };
        push("--os-project-name", &self.os_project_name);
        push("--os-project-id", &self.os_project_id);
        push("--os-user-domain-id", &self.os_user_domain_id);
        push("--os-user-domain-name", &self.os_user_domain_name);
        push("--os-project-domain-id", &self.os_project_domain_id);
        push("--os-project-domain-name", &self.os_project_domain_name);
        args
    }

    /// A name for the token cache file: one token per endpoint, user and project.
    fn cache_file(&self) -> Result<PathBuf> {
        let identity = format!(
            "{}\n{}\n{:?}\n{:?}",
            self.url(),
            self.os_username,
            self.user_domain(),
            self.project()
        );
        let digest = Sha256::digest(identity.as_bytes());
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(cache_dir()?.join(format!("{name}.json")))
    }
}

fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => home()?.join(".cache"),
    };
    Ok(base.join("canopy/tokens"))
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("HOME is not set"))
}

/// A token saved for later kubectl commands.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CachedToken {
    token: String,
    expires_at: DateTime<Utc>,
}

/// A cached token is handed out only while it has this long left, so that a kubectl command
/// does not start with a token about to expire.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(60);

fn load_cached(path: &Path) -> Option<CachedToken> {
    let cached: CachedToken = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let margin = chrono::Duration::from_std(RENEW_BEFORE_EXPIRY).ok()?;
    (cached.expires_at - margin > Utc::now()).then_some(cached)
}

fn save_cached(path: &Path, issued: &IssuedToken) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let cached = CachedToken {
        token: issued.token.clone(),
        expires_at: issued.validation.expires_at,
    };
    canopy_apiserver::pki::write_private(path, &serde_json::to_vec(&cached)?)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("building an HTTP client")
}

/// Reads a password without echo from the terminal, with the prompt on the terminal too (the
/// credential plugin's stdout belongs to kubectl).
fn prompt_password(user: &KeystoneUser) -> Result<String> {
    let project = user
        .os_project_name
        .as_deref()
        .or(user.os_project_id.as_deref())
        .unwrap_or_default();
    rpassword::prompt_password(format!(
        "Keystone password for {} (project {project}): ",
        user.os_username
    ))
    .context("reading the password from the terminal")
}

/// Flags of `canopy login`.
#[derive(clap::Args)]
pub struct LoginArgs {
    #[command(flatten)]
    user: KeystoneUser,
    /// Canopy API server URL.
    #[arg(long, env = "CANOPY_SERVER", default_value = "https://127.0.0.1:6443")]
    server: String,
    /// Canopy's CA certificate (PEM), to trust the API server. Default: the CA of a local
    /// `canopy server`, ./canopy-data/pki/ca.crt.
    #[arg(long)]
    certificate_authority: Option<PathBuf>,
    /// Kubeconfig to write the context into (merged with what is there). Default: the first
    /// file of $KUBECONFIG, else ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Name of the context (and its cluster and user). Default: `<user>@<project>`.
    #[arg(long)]
    context: Option<String>,
    /// Namespace of the context; created, for your tenant, if it does not exist. Default: one
    /// of yours if you have any, else one named after the project.
    #[arg(long, short)]
    namespace: Option<String>,
    /// Read the password from the first line of standard input (else $OS_PASSWORD, else a
    /// prompt).
    #[arg(long)]
    password_stdin: bool,
    /// Put the token itself in the kubeconfig instead of the `canopy credential` plugin, for
    /// clients without exec plugins. The context stops working when the token expires.
    #[arg(long)]
    embed_token: bool,
}

/// `canopy login`.
pub async fn login(args: LoginArgs) -> Result<()> {
    let password = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else if let Some(password) = std::env::var_os("OS_PASSWORD") {
        password
            .into_string()
            .map_err(|_| anyhow!("OS_PASSWORD is not UTF-8"))?
    } else if std::io::stdin().is_terminal() {
        prompt_password(&args.user)?
    } else {
        bail!("no password: set OS_PASSWORD, pass --password-stdin, or run in a terminal");
    };
    let url = args.user.url();
    let issued = keystone::request_token(&http_client()?, &url, &args.user.auth(password)).await?;
    let v = &issued.validation;
    eprintln!(
        "Logged in to Keystone {url} as {} (project {}, roles {}); token valid until {}",
        v.user_name,
        v.project_name,
        v.roles.join(","),
        v.expires_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );

    let ca_path = match &args.certificate_authority {
        Some(path) => path.clone(),
        None => {
            let local = canopy_apiserver::pki::Pki::new(Path::new("./canopy-data")).ca_cert_path();
            if !local.exists() {
                bail!(
                    "--certificate-authority is needed: the CA certificate of the Canopy API server (a local `canopy server` writes it to <data-dir>/pki/ca.crt)"
                );
            }
            local
        }
    };
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading {}", ca_path.display()))?;
    let context = args
        .context
        .clone()
        .unwrap_or_else(|| format!("{}@{}", v.user_name, v.project_name));

    let client = token_client(&args.server, &ca_pem, &issued.token).await?;
    let namespace = choose_namespace(&client, args.namespace.as_deref(), &v.project_name).await?;

    let user_entry = if args.embed_token {
        json!({ "token": issued.token })
    } else {
        save_cached(&args.user.cache_file()?, &issued)?;
        let command = std::env::current_exe().context("locating the canopy binary")?;
        let mut exec_args = vec!["credential".to_string()];
        exec_args.extend(args.user.to_args());
        json!({ "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": command,
            "args": exec_args,
            "interactiveMode": "IfAvailable",
            "provideClusterInfo": false,
            "installHint": "canopy credential is part of the canopy binary; run `canopy login` again",
        }})
    };
    let path = match &args.kubeconfig {
        Some(path) => path.clone(),
        None => default_kubeconfig()?,
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    merge_kubeconfig(
        &path,
        &context,
        json!({ "server": args.server, "certificate-authority-data": b64 }),
        user_entry,
        &namespace,
    )?;
    eprintln!(
        "Wrote context {context:?} (namespace {namespace}) to {} and made it current",
        path.display()
    );
    Ok(())
}

fn default_kubeconfig() -> Result<PathBuf> {
    if let Some(paths) = std::env::var_os("KUBECONFIG")
        && let Some(first) = std::env::split_paths(&paths).find(|p| !p.as_os_str().is_empty())
    {
        return Ok(first);
    }
    Ok(home()?.join(".kube/config"))
}

/// A kube-rs client that presents the token, to check it and settle the namespace.
async fn token_client(server: &str, ca_pem: &str, token: &str) -> Result<kube::Client> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let doc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": b64}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    });
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&serde_json::to_string(&doc)?)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A DNS label from a project name: `Team A` → `team-a`.
fn namespace_for(project: &str) -> String {
    let mut name: String = project
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "tenant".into()
    } else {
        name
    }
}

/// The namespace of the context: the one asked for, created if missing; else one the user
/// already has (the project's, or `default` for administrators); else the project's, created.
async fn choose_namespace(
    client: &kube::Client,
    wanted: Option<&str>,
    project: &str,
) -> Result<String> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let derived = namespace_for(project);
    let name = match wanted {
        Some(name) => name.to_string(),
        None => {
            let visible: Vec<String> = api
                .list(&Default::default())
                .await
                .map_err(|e| server_error(e, "listing your namespaces"))?
                .items
                .into_iter()
                .filter_map(|ns| ns.metadata.name)
                .collect();
            let pick = [derived.as_str(), "default"]
                .into_iter()
                .find(|n| visible.iter().any(|v| v == n))
                .map(str::to_string)
                .or_else(|| visible.first().cloned());
            match pick {
                Some(name) => return Ok(name),
                None => derived,
            }
        }
    };
    match api.get_opt(&name).await {
        Ok(Some(_)) => return Ok(name),
        Ok(None) => {}
        Err(e) => return Err(server_error(e, &format!("reading namespace {name}"))),
    }
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match api.create(&Default::default(), &namespace).await {
        Ok(_) => {
            eprintln!("Created namespace {name}");
            Ok(name)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Err(anyhow!(
            "namespace {name} belongs to another tenant; choose another with --namespace"
        )),
        Err(e) => Err(server_error(e, &format!("creating namespace {name}"))),
    }
}

fn server_error(err: kube::Error, doing: &str) -> anyhow::Error {
    match err {
        kube::Error::Api(status) if status.code == 401 => anyhow!(
            "the Canopy API server does not accept this Keystone token (is it started with --keystone-url pointing at the same Keystone?)"
        ),
        kube::Error::Api(status) => anyhow!(
            "{doing}: the API server answered {}: {}",
            status.code,
            status.message
        ),
        other => anyhow!("{doing}: {other}"),
    }
}

/// Puts cluster, user and context `name` into the kubeconfig at `path` (replacing entries
/// of that name, keeping everything else) and makes the context current.
fn merge_kubeconfig(
    path: &Path,
    name: &str,
    cluster: Value,
    user: Value,
    namespace: &str,
) -> Result<()> {
    let mut doc: Value = match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not a kubeconfig", path.display()))?,
        Ok(_) => Value::Null,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !doc.is_object() {
        doc = json!({"apiVersion": "v1", "kind": "Config", "preferences": {}});
    }
    let upsert = |doc: &mut Value, list: &str, field: &str, body: Value| -> Result<()> {
        let object = doc
            .as_object_mut()
            .ok_or_else(|| anyhow!("not a kubeconfig"))?;
        let slot = object.entry(list).or_insert_with(|| json!([]));
        if !slot.is_array() {
            *slot = json!([]);
        }
        if let Value::Array(entries) = slot {
            entries.retain(|e| e.get("name").and_then(Value::as_str) != Some(name));
            entries.push(json!({ "name": name, field: body }));
        }
        Ok(())
    };
    upsert(&mut doc, "clusters", "cluster", cluster)?;
    upsert(&mut doc, "users", "user", user)?;
    upsert(
        &mut doc,
        "contexts",
        "context",
        json!({"cluster": name, "user": name, "namespace": namespace}),
    )?;
    doc["current-context"] = json!(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    canopy_apiserver::pki::write_private(path, serde_yaml::to_string(&doc)?.as_bytes())
}

/// Flags of `canopy credential`.
#[derive(clap::Args)]
pub struct CredentialArgs {
    #[command(flatten)]
    user: KeystoneUser,
}

/// `canopy credential`: kubectl's exec credential plugin. Prints an ExecCredential with a
/// Keystone token: the cached one while it has time left, else a new one.
pub async fn credential(args: CredentialArgs) -> Result<()> {
    // kubectl says which API version it speaks and whether the user is at a terminal.
    let info: Value = std::env::var("KUBERNETES_EXEC_INFO")
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    let api_version = info
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("client.authentication.k8s.io/v1")
        .to_string();
    let interactive = info
        .pointer("/spec/interactive")
        .and_then(Value::as_bool)
        .unwrap_or_else(|| std::io::stdin().is_terminal());

    let cache = args.user.cache_file()?;
    let (token, expires_at) = match load_cached(&cache) {
        Some(cached) => (cached.token, cached.expires_at),
        None => {
            let password = match std::env::var_os("OS_PASSWORD") {
                Some(p) => p
                    .into_string()
                    .map_err(|_| anyhow!("OS_PASSWORD is not UTF-8"))?,
                None if interactive => prompt_password(&args.user)?,
                None => bail!(
                    "the Keystone token of {} has expired: run `canopy login` again, or set OS_PASSWORD",
                    args.user.os_username
                ),
            };
            let issued = keystone::request_token(
                &http_client()?,
                &args.user.url(),
                &args.user.auth(password),
            )
            .await?;
            save_cached(&cache, &issued)?;
            (issued.token, issued.validation.expires_at)
        }
    };
    let credential = json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": {
            "token": token,
            "expirationTimestamp": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    });
    println!("{credential}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_from_project_names() {
        assert_eq!(namespace_for("tenant-a"), "tenant-a");
        assert_eq!(namespace_for("Team A_1"), "team-a-1");
        assert_eq!(namespace_for("--"), "tenant");
        assert_eq!(namespace_for(&"x".repeat(80)).len(), 63);
    }

    #[test]
    fn versionless_auth_urls_get_v3() {
        let user = |url: &str| KeystoneUser {
            os_auth_url: url.into(),
            os_username: "alice".into(),
            os_project_name: Some("p".into()),
            os_project_id: None,
            os_user_domain_id: None,
            os_user_domain_name: None,
            os_project_domain_id: None,
            os_project_domain_name: None,
        };
        assert_eq!(user("http://k:5000").url(), "http://k:5000/v3");
        assert_eq!(user("http://k:5000/").url(), "http://k:5000/v3");
        assert_eq!(user("http://k:5000/v3/").url(), "http://k:5000/v3");
        assert_eq!(user("http://k/identity/v3").url(), "http://k/identity/v3");
        assert_eq!(user("http://vhost:5000").url(), "http://vhost:5000/v3");
    }

    #[test]
    fn merging_keeps_other_entries_and_replaces_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kube/config");
        let other = json!({"apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "prod", "cluster": {"server": "https://prod"}}],
            "users": [{"name": "prod", "user": {"token": "x"}}],
            "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "prod"}}],
            "current-context": "prod", "preferences": {"colors": true}});
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_yaml::to_string(&other).unwrap()).unwrap();
        for token in ["one", "two"] {
            merge_kubeconfig(
                &path,
                "alice@a",
                json!({"server": "https://canopy"}),
                json!({"token": token}),
                "a",
            )
            .unwrap();
        }
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(doc["current-context"], "alice@a");
        assert_eq!(doc["preferences"]["colors"], true);
        assert_eq!(doc["clusters"].as_array().unwrap().len(), 2);
        assert_eq!(doc["users"][1]["user"]["token"], "two");
        assert_eq!(doc["contexts"][1]["context"]["namespace"], "a");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a kubeconfig with tokens is private");
    }
}
