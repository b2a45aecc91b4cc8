//! Keystone tokens (seed §3): a user's token is validated with Keystone once, and the result
//! is cached in the store, keyed by the token's SHA-256 (never the token), so that every
//! apiserver replica shares it. Each replica keeps a local copy of those entries current
//! through a watch, so a cached token costs a hash and a map lookup.
//!
//! An entry is used until the token expires or `cache_ttl` has passed since Keystone last
//! confirmed it, which bounds how long a revocation can go unnoticed. When Keystone is down,
//! cached tokens keep working within those bounds and unknown tokens fail closed.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use canopy_api::tenant::MEMBER_GROUP_PREFIX;
use canopy_store::{EventKind, Outcome, Store};
use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::auth::{MASTERS, User};

/// Where cached validations live in the store.
pub const TOKEN_PREFIX: &str = "/registry/canopy.io/keystonetokens/";

/// How long an unknown or rejected token is not asked about again.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// The service account Canopy validates tokens as.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceCredentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Project name.
    pub project: String,
    /// Domain of the user and the project.
    #[serde(default = "default_domain")]
    pub domain: String,
}

fn default_domain() -> String {
    "default".into()
}

impl std::fmt::Debug for ServiceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCredentials")
            .field("username", &self.username)
            .field("project", &self.project)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ServiceCredentials {
    /// Reads credentials from a file (JSON or YAML: username, password, project, domain),
    /// else from `CANOPY_KEYSTONE_USERNAME`, `_PASSWORD`, `_PROJECT` and `_DOMAIN`.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            return serde_yaml::from_str(&text)
                .with_context(|| format!("parsing Keystone credentials in {}", path.display()));
        }
        let var = |name: &str| std::env::var(format!("CANOPY_KEYSTONE_{name}")).ok();
        match (var("USERNAME"), var("PASSWORD"), var("PROJECT")) {
            (Some(username), Some(password), Some(project)) => Ok(Self {
                username,
                password,
                project,
                domain: var("DOMAIN").unwrap_or_else(default_domain),
            }),
            _ => bail!(
                "Keystone needs service credentials: --keystone-credentials-file, or CANOPY_KEYSTONE_USERNAME, CANOPY_KEYSTONE_PASSWORD and CANOPY_KEYSTONE_PROJECT"
            ),
        }
    }
}

impl ServiceCredentials {
    /// The password authentication these credentials make.
    pub fn auth(&self) -> PasswordAuth {
        PasswordAuth {
            username: self.username.clone(),
            password: self.password.clone(),
            user_domain: DomainRef::Id(self.domain.clone()),
            project: ProjectRef::Name {
                name: self.project.clone(),
                domain: DomainRef::Id(self.domain.clone()),
            },
        }
    }
}

/// A Keystone domain, by id or by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainRef {
    /// Domain id, e.g. `default`.
    Id(String),
    /// Domain name, e.g. `Default`.
    Name(String),
}

impl DomainRef {
    fn to_json(&self) -> Value {
        match self {
            DomainRef::Id(id) => json!({ "id": id }),
            DomainRef::Name(name) => json!({ "name": name }),
        }
    }
}

/// The project a token is scoped to: by id, or by name within a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectRef {
    /// Project id.
    Id(String),
    /// Project name and its domain.
    Name {
        /// Project name.
        name: String,
        /// Its domain.
        domain: DomainRef,
    },
}

/// A user's password, for a project-scoped token (the OpenStack CLI's `password` auth).
#[derive(Clone)]
pub struct PasswordAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// The user's domain.
    pub user_domain: DomainRef,
    /// The project to scope the token to.
    pub project: ProjectRef,
}

impl std::fmt::Debug for PasswordAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordAuth")
            .field("username", &self.username)
            .field("user_domain", &self.user_domain)
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

/// A token Keystone issued, with what it says about it.
pub struct IssuedToken {
    /// The token (secret).
    pub token: String,
    /// User, project, roles and expiry.
    pub validation: Validation,
}

/// Asks Keystone (`POST /v3/auth/tokens`) for a project-scoped token.
pub async fn request_token(
    http: &reqwest::Client,
    url: &str,
    auth: &PasswordAuth,
) -> Result<IssuedToken> {
    let scope = match &auth.project {
        ProjectRef::Id(id) => json!({ "id": id }),
        ProjectRef::Name { name, domain } => json!({ "name": name, "domain": domain.to_json() }),
    };
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": auth.username,
            "domain": auth.user_domain.to_json(),
            "password": auth.password,
        }}},
        "scope": {"project": scope}
    }});
    let url = format!("{}/auth/tokens", url.trim_end_matches('/'));
    let response = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach Keystone at {url}"))?;
    let status = response.status();
    if status.as_u16() == 401 || status.as_u16() == 404 {
        bail!(
            "Keystone refused the credentials of user {:?} (HTTP {status}): wrong user name, password, domain or project, or no role on the project",
            auth.username
        );
    }
    if !status.is_success() {
        bail!("Keystone answered HTTP {status} to a token request");
    }
    let token = response
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow!("Keystone sent no X-Subject-Token"))?
        .to_string();
    let body: Value = response.json().await.context("Keystone's token")?;
    Ok(IssuedToken {
        token,
        validation: Validation::from_token(&body, Utc::now())?,
    })
}

/// How Canopy uses Keystone.
#[derive(Clone, Debug)]
pub struct KeystoneConfig {
    /// The identity v3 endpoint, e.g. `http://127.0.0.1:5000/v3`.
    pub url: String,
    /// Canopy's own account.
    pub credentials: ServiceCredentials,
    /// Longest time a validation is trusted without asking Keystone again.
    pub cache_ttl: Duration,
    /// Users with role `admin` on this project are cluster admins.
    pub admin_project: String,
}

/// What Keystone said about a token; stored as JSON under the token's digest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Validation {
    /// User name.
    pub user_name: String,
    /// User id.
    pub user_id: String,
    /// Project id (the tenant), for project-scoped tokens.
    #[serde(default)]
    pub project_id: String,
    /// Project name.
    #[serde(default)]
    pub project_name: String,
    /// Role names on the project.
    #[serde(default)]
    pub roles: Vec<String>,
    /// When the token expires.
    pub expires_at: DateTime<Utc>,
    /// When Keystone last confirmed it.
    pub validated_at: DateTime<Utc>,
}

impl Validation {
    fn from_token(body: &Value, now: DateTime<Utc>) -> Result<Validation> {
        let token = body
            .get("token")
            .ok_or_else(|| anyhow!("no token in answer"))?;
        let text = |p: &str| {
            token
                .pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let expires_at = DateTime::parse_from_rfc3339(&text("/expires_at"))
            .context("expires_at")?
            .with_timezone(&Utc);
        Ok(Validation {
            user_name: text("/user/name"),
            user_id: text("/user/id"),
            project_id: text("/project/id"),
            project_name: text("/project/name"),
            roles: token
                .get("roles")
                .and_then(Value::as_array)
                .map(|roles| {
                    roles
                        .iter()
                        .filter_map(|r| r.get("name").and_then(Value::as_str))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            expires_at,
            validated_at: now,
        })
    }

    /// Whether the entry may still be used.
    pub fn usable(&self, now: DateTime<Utc>, ttl: Duration) -> bool {
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        now < self.expires_at && now < self.validated_at + ttl
    }

    /// The user this token authenticates: admins by the admin role on the admin project,
    /// tenant members by the member role on their project.
    pub fn user(&self, admin_project: &str) -> User {
        let has = |role: &str| self.roles.iter().any(|r| r == role);
        let mut groups = Vec::new();
        if has("admin") && self.project_name == admin_project {
            groups.push(MASTERS.to_string());
        } else if has("member") && !self.project_id.is_empty() {
            groups.push(format!("{MEMBER_GROUP_PREFIX}{}", self.project_id));
        }
        groups.push("system:authenticated".into());
        User {
            name: self.user_name.clone(),
            groups,
        }
    }
}

/// The store key of a token's cache entry.
pub fn cache_key(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut key = String::with_capacity(TOKEN_PREFIX.len() + 64);
    key.push_str(TOKEN_PREFIX);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(key, "{b:02x}");
    }
    key
}

struct Entry {
    validation: Validation,
    user: User,
    revision: i64,
}

/// Counters for operators and benchmarks, shared with the server's metrics.
#[derive(Clone, Default)]
pub struct KeystoneStats {
    /// Token validations asked of Keystone.
    pub validations: Counter,
    /// Service token requests.
    pub logins: Counter,
    /// Tokens answered from the cache.
    pub hits: Counter,
    /// Tokens the cache could not answer.
    pub misses: Counter,
    /// Latency of validations.
    pub validate_seconds: Option<Histogram>,
}

impl KeystoneStats {
    /// Counters registered in the server's metrics.
    pub fn registered(metrics: &crate::metrics::Metrics) -> Self {
        use crate::metrics::{CacheStatusLabels, KeystoneLabels};
        let op = |o: &str| KeystoneLabels {
            operation: o.into(),
        };
        let status = |s: &str| CacheStatusLabels { status: s.into() };
        // Owned children: a family's read guard held while creating the next label set
        // would deadlock on the family's write lock.
        Self {
            validations: metrics
                .keystone_requests
                .get_or_create_owned(&op("validate")),
            logins: metrics.keystone_requests.get_or_create_owned(&op("login")),
            hits: metrics.token_cache.get_or_create_owned(&status("hit")),
            misses: metrics.token_cache.get_or_create_owned(&status("miss")),
            validate_seconds: Some(
                metrics
                    .keystone_duration
                    .get_or_create_owned(&op("validate")),
            ),
        }
    }
}

/// The Keystone token authenticator.
pub struct Keystone {
    config: KeystoneConfig,
    http: reqwest::Client,
    store: Arc<dyn Store>,
    entries: RwLock<HashMap<String, Entry>>,
    negative: parking_lot::Mutex<HashMap<String, Instant>>,
    service_token: tokio::sync::Mutex<Option<(String, DateTime<Utc>)>>,
    inflight: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    known_tenants: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Counters.
    pub stats: KeystoneStats,
}

/// Removes a token's validation gate when its validation ends, even if the request that ran
/// it is cancelled.
struct Leave<'a> {
    inflight: &'a parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: &'a str,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.inflight.lock().remove(self.key);
    }
}

enum Checked {
    Valid(Validation),
    Invalid,
}

impl Keystone {
    /// An authenticator; [`Keystone::run`] keeps its cache in step with the store.
    pub fn new(
        config: KeystoneConfig,
        store: Arc<dyn Store>,
        stats: KeystoneStats,
    ) -> Result<Arc<Keystone>> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .context("building the Keystone HTTP client")?;
        Ok(Arc::new(Keystone {
            config,
            http,
            store,
            entries: RwLock::new(HashMap::new()),
            negative: Default::default(),
            service_token: Default::default(),
            inflight: Default::default(),
            known_tenants: Default::default(),
            stats,
        }))
    }

    /// The user of a cached, still usable token (the fast path).
    pub fn cached(&self, key: &str) -> Option<User> {
        let entries = self.entries.read();
        let entry = entries.get(key)?;
        entry
            .validation
            .usable(Utc::now(), self.config.cache_ttl)
            .then(|| entry.user.clone())
    }

    /// Authenticates a token: the cache, else Keystone. `None`: not a valid token.
    pub async fn authenticate(&self, token: &str) -> Option<User> {
        let key = cache_key(token);
        if let Some(user) = self.cached(&key) {
            self.stats.hits.inc();
            return Some(user);
        }
        if self.recently_refused(&key) {
            return None;
        }
        self.stats.misses.inc();
        // One validation per token at a time: concurrent requests with the same new token
        // wait for the first one's answer.
        // The gate is dropped from the map only once the answer is in the cache (or the
        // negative cache), so a request arriving in between finds one or the other.
        let gate = self.inflight.lock().entry(key.clone()).or_default().clone();
        let _turn = gate.lock().await;
        let _leave = Leave {
            inflight: &self.inflight,
            key: &key,
        };
        if let Some(user) = self.cached(&key) {
            self.stats.hits.inc();
            return Some(user);
        }
        if self.recently_refused(&key) {
            return None;
        }
        let result = self.validate(token).await;
        match result {
            Ok(Checked::Valid(validation)) => {
                let user = validation.user(&self.config.admin_project);
                self.remember(&key, validation.clone(), user.clone()).await;
                if user
                    .groups
                    .iter()
                    .any(|g| g.starts_with(MEMBER_GROUP_PREFIX))
                {
                    self.ensure_tenant(&validation).await;
                }
                Some(user)
            }
            Ok(Checked::Invalid) => {
                self.forget(&key).await;
                let mut negative = self.negative.lock();
                if negative.len() > 100_000 {
                    negative.retain(|_, t| t.elapsed() < NEGATIVE_TTL);
                }
                negative.insert(key.clone(), Instant::now());
                None
            }
            Err(err) => {
                // Fail closed; the token stays out of the log.
                tracing::warn!(error = %format!("{err:#}"), "Keystone is unavailable: refusing a token it has not validated");
                None
            }
        }
    }

    fn recently_refused(&self, key: &str) -> bool {
        self.negative
            .lock()
            .get(key)
            .is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
    }

    async fn login(&self) -> Result<(String, DateTime<Utc>)> {
        self.stats.logins.inc();
        let issued = request_token(
            &self.http,
            &self.config.url,
            &self.config.credentials.auth(),
        )
        .await
        .context("asking Keystone for Canopy's service token")?;
        Ok((issued.token, issued.validation.expires_at))
    }

    async fn service_token(&self, renew: bool) -> Result<String> {
        let mut current = self.service_token.lock().await;
        let fresh = current
            .as_ref()
            .is_some_and(|(_, exp)| *exp - chrono::Duration::minutes(5) > Utc::now());
        if renew || !fresh {
            *current = Some(self.login().await?);
        }
        Ok(current.as_ref().map(|(t, _)| t.clone()).unwrap_or_default())
    }

    async fn validate(&self, token: &str) -> Result<Checked> {
        for attempt in 0..2 {
            let service = self.service_token(attempt > 0).await?;
            self.stats.validations.inc();
            let started = Instant::now();
            let response = self
                .http
                .get(format!("{}/auth/tokens", self.config.url))
                .header("X-Auth-Token", &service)
                .header("X-Subject-Token", token)
                .send()
                .await
                .context("validating a token with Keystone");
            if let Some(histogram) = &self.stats.validate_seconds {
                histogram.observe(started.elapsed().as_secs_f64());
            }
            let response = response?;
            match response.status().as_u16() {
                200 => {
                    let body: Value = response.json().await.context("Keystone's answer")?;
                    return Ok(Checked::Valid(Validation::from_token(&body, Utc::now())?));
                }
                404 => return Ok(Checked::Invalid),
                // Our own token expired or was revoked: log in again, once.
                401 if attempt == 0 => continue,
                code => bail!("Keystone answered HTTP {code} to a validation"),
            }
        }
        bail!("Keystone keeps refusing Canopy's service token")
    }

    async fn remember(&self, key: &str, validation: Validation, user: User) {
        let bytes = Bytes::from(serde_json::to_vec(&validation).unwrap_or_default());
        let revision = match self.write(key, bytes).await {
            Ok(rev) => rev,
            Err(err) => {
                tracing::warn!(error = %err, "could not share a token validation through the store");
                0
            }
        };
        let mut entries = self.entries.write();
        let replace = entries.get(key).is_none_or(|e| e.revision <= revision);
        if replace {
            entries.insert(
                key.to_string(),
                Entry {
                    validation,
                    user,
                    revision,
                },
            );
        }
    }

    async fn write(&self, key: &str, bytes: Bytes) -> canopy_store::Result<i64> {
        for _ in 0..5 {
            match self.store.create(key, bytes.clone()).await? {
                Outcome::Committed(kv) => return Ok(kv.mod_revision),
                Outcome::Conflict(Some(current)) => {
                    match self
                        .store
                        .update(key, bytes.clone(), current.mod_revision)
                        .await?
                    {
                        Outcome::Committed(kv) => return Ok(kv.mod_revision),
                        Outcome::Conflict(_) => continue,
                    }
                }
                Outcome::Conflict(None) => continue,
            }
        }
        Err(canopy_store::Error::Unavailable(
            "too many concurrent writes of one token".into(),
        ))
    }

    async fn forget(&self, key: &str) {
        let existed = self.entries.write().remove(key).is_some();
        if existed && let Err(err) = self.store.delete(key, None).await {
            tracing::warn!(error = %err, "could not drop a token validation from the store");
        }
    }

    /// A tenant's first member to log in creates its Tenant (a Keystone project is a tenant).
    async fn ensure_tenant(&self, validation: &Validation) {
        let tenant = &validation.project_id;
        if self.known_tenants.lock().contains(tenant) {
            return;
        }
        let Some(def) = canopy_api::registry::BUILTIN
            .iter()
            .find(|d| d.group == "canopy.io" && d.plural == "tenants")
        else {
            return;
        };
        let mut obj = json!({
            "apiVersion": "canopy.io/v1",
            "kind": "Tenant",
            "metadata": {
                "name": tenant,
                "uid": uuid::Uuid::new_v4().to_string(),
                "creationTimestamp": canopy_api::meta::now_rfc3339(),
                "generation": 1,
            },
            "spec": {
                "projectId": tenant,
                "displayName": validation.project_name,
            },
        });
        canopy_api::kinds::prepare_create(def, &mut obj);
        canopy_api::kinds::apply_defaults(def, &mut obj);
        let key = def.key("", tenant);
        let bytes = Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
        match self.store.create(&key, bytes).await {
            Ok(Outcome::Committed(_)) => {
                tracing::info!(%tenant, project = %validation.project_name, "created the Tenant of a Keystone project");
                self.known_tenants.lock().insert(tenant.clone());
            }
            Ok(Outcome::Conflict(_)) => {
                self.known_tenants.lock().insert(tenant.clone());
            }
            Err(err) => tracing::warn!(%tenant, error = %err, "could not create a Tenant"),
        }
    }

    fn apply(&self, key: &str, value: Option<&[u8]>, revision: i64) {
        let mut entries = self.entries.write();
        match value.and_then(|v| serde_json::from_slice::<Validation>(v).ok()) {
            Some(validation) => {
                if entries.get(key).is_some_and(|e| e.revision > revision) {
                    return;
                }
                let user = validation.user(&self.config.admin_project);
                entries.insert(
                    key.to_string(),
                    Entry {
                        validation,
                        user,
                        revision,
                    },
                );
            }
            None => {
                if entries.get(key).is_some_and(|e| e.revision <= revision) {
                    entries.remove(key);
                }
            }
        }
    }

    /// Keeps the local cache in step with the store (list, then watch; again after
    /// compaction or a lost watch) and drops expired entries from the store, until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let janitor = {
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = tick.tick() => this.drop_expired().await,
                        _ = shutdown.cancelled() => return,
                    }
                }
            })
        };
        loop {
            tokio::select! {
                result = self.sync() => {
                    if let Err(err) = result {
                        tracing::warn!(error = %err, "token cache watch ended; listing again");
                    }
                }
                _ = shutdown.cancelled() => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        janitor.abort();
    }

    async fn sync(&self) -> canopy_store::Result<()> {
        let listed = self
            .store
            .range(canopy_store::RangeRequest {
                prefix: TOKEN_PREFIX.into(),
                ..Default::default()
            })
            .await?;
        {
            let mut fresh = HashMap::new();
            for kv in &listed.kvs {
                if let Ok(validation) = serde_json::from_slice::<Validation>(&kv.value) {
                    let user = validation.user(&self.config.admin_project);
                    fresh.insert(
                        kv.key.clone(),
                        Entry {
                            validation,
                            user,
                            revision: kv.mod_revision,
                        },
                    );
                }
            }
            let mut entries = self.entries.write();
            // Entries written here after the list keep their newer revision.
            for (key, entry) in entries.drain() {
                if entry.revision > listed.revision {
                    fresh.insert(key, entry);
                }
            }
            *entries = fresh;
        }
        let mut watch = self.store.watch(TOKEN_PREFIX, listed.revision + 1).await?;
        loop {
            let Some(response) = watch.next().await else {
                return Ok(());
            };
            for event in response?.events {
                let value = (event.kind == EventKind::Put).then_some(&event.kv.value[..]);
                self.apply(&event.kv.key, value, event.kv.mod_revision);
            }
        }
    }

    async fn drop_expired(&self) {
        let now = Utc::now();
        let expired: Vec<(String, i64)> = self
            .entries
            .read()
            .iter()
            .filter(|(_, e)| !e.validation.usable(now, self.config.cache_ttl))
            .map(|(k, e)| (k.clone(), e.revision))
            .collect();
        for (key, revision) in expired {
            // Compare-and-delete: another replica may just have renewed it.
            if revision > 0 {
                let _ = self.store.delete(&key, Some(revision)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validation(roles: &[&str], project: &str) -> Validation {
        Validation {
            user_name: "alice".into(),
            user_id: "u1".into(),
            project_id: "p1".into(),
            project_name: project.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            expires_at: Utc::now() + chrono::Duration::hours(1),
            validated_at: Utc::now(),
        }
    }

    #[test]
    fn roles_map_to_groups() {
        assert!(validation(&["admin"], "admin").user("admin").is_admin());
        assert!(!validation(&["admin"], "other").user("admin").is_admin());
        assert_eq!(
            validation(&["member", "reader"], "tenant-a")
                .user("admin")
                .groups,
            ["canopy:tenant:p1", "system:authenticated"]
        );
        assert_eq!(
            validation(&["reader"], "tenant-a").user("admin").groups,
            ["system:authenticated"]
        );
    }

    #[test]
    fn usable_until_expiry_or_ttl() {
        let v = validation(&["member"], "t");
        let now = Utc::now();
        assert!(v.usable(now, Duration::from_secs(300)));
        assert!(!v.usable(
            now + chrono::Duration::seconds(301),
            Duration::from_secs(300)
        ));
        assert!(!v.usable(
            now + chrono::Duration::hours(2),
            Duration::from_secs(86_400)
        ));
    }

    #[test]
    fn keys_hold_a_digest_not_the_token() {
        let key = cache_key("gAAAAABsecret");
        assert!(key.starts_with(TOKEN_PREFIX));
        assert!(!key.contains("secret"));
        assert_eq!(key.len(), TOKEN_PREFIX.len() + 64);
    }
}
