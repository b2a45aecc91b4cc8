//! A pod's volumes on the node: what the API says (ConfigMaps, Secrets, the downward API, a
//! node directory) turned into directories its containers bind-mount.
//!
//! ConfigMap, Secret, downward API and projected volumes are written as upstream's kubelet
//! writes them (its `AtomicWriter`): the files live in a timestamped directory, `..data`
//! points at it, and each top-level name is a link through `..data`. An update writes a new
//! directory and swaps the `..data` link with one rename, so a container never reads half of
//! an update. Secrets and anything that can hold one (projected, downward API) are on tmpfs:
//! they never touch the node's disk.
//!
//! The agent reads the referenced objects with its node identity, which the API server lets
//! read exactly the ConfigMaps and Secrets its pods reference (upstream's node authorizer),
//! and asks for projected service-account tokens bound to the pod, which the API server
//! issues to a node only for the pods bound to it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::{PermissionsExt, symlink},
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, HostPathVolumeSource, KeyToPath, Pod, Secret,
    ServiceAccount, Volume,
};
use kube::{Api, Client, api::PostParams};
use parking_lot::Mutex;

use crate::spec::{self, ConfigError, NodeAllocatable};

/// Upstream's default file mode of ConfigMap, Secret, downward API and projected volumes.
const DEFAULT_MODE: i32 = 0o644;
/// The link the AtomicWriter swaps.
const DATA_LINK: &str = "..data";
const DATA_LINK_TMP: &str = "..data_tmp";

/// The ConfigMaps and Secrets a pod references, read once per sync (`None` when missing),
/// and its service-account tokens by (audience, lifetime).
#[derive(Debug, Default)]
pub struct Sources {
    config_maps: HashMap<String, Option<ConfigMap>>,
    secrets: HashMap<String, Option<Secret>>,
    tokens: HashMap<(String, i64), String>,
}

/// Upstream's default lifetime of a projected token, and the kubelet's refresh rule: a token
/// is renewed once 80% of its lifetime has passed, or after 24 hours.
const DEFAULT_TOKEN_SECONDS: i64 = 3600;
const TOKEN_REFRESH_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Service-account tokens the agent holds for its pods (the kubelet's token manager), by
/// pod UID, audience and lifetime. A token is asked for once and renewed before it expires,
/// not on every sync.
#[derive(Default)]
pub struct Tokens {
    held: Mutex<HashMap<(String, String, i64), HeldToken>>,
}

struct HeldToken {
    token: String,
    fetched: Instant,
    lifetime: Duration,
}

impl HeldToken {
    fn fresh(&self) -> bool {
        let age = self.fetched.elapsed();
        age < self.lifetime.mul_f64(0.8) && age < TOKEN_REFRESH_AFTER
    }
}

impl Tokens {
    /// A token for the pod's service account, bound to the pod.
    async fn get(
        &self,
        client: &Client,
        pod: &Pod,
        audience: &str,
        seconds: i64,
    ) -> anyhow::Result<String> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let key = (uid.clone(), audience.to_string(), seconds);
        {
            let mut held = self.held.lock();
            held.retain(|_, t| t.fetched.elapsed() < t.lifetime);
            if let Some(token) = held.get(&key).filter(|t| t.fresh()) {
                return Ok(token.token.clone());
            }
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: if audience.is_empty() {
                    Vec::new()
                } else {
                    vec![audience.to_string()]
                },
                expiration_seconds: Some(seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name),
                    uid: Some(uid),
                }),
            },
            ..TokenRequest::default()
        };
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        let issued = accounts
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .map_err(|e| {
                anyhow::anyhow!("requesting a token for service account {namespace}/{account}: {e}")
            })?;
        let token = issued
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow::anyhow!("the API server returned no token"))?;
        self.held.lock().insert(
            key,
            HeldToken {
                token: token.clone(),
                fetched: Instant::now(),
                lifetime: Duration::from_secs(seconds.max(0) as u64),
            },
        );
        Ok(token)
    }

    /// Forgets the tokens of a pod that is gone.
    pub fn forget(&self, pod_uid: &str) {
        self.held.lock().retain(|(uid, _, _), _| uid != pod_uid);
    }
}

impl Sources {
    /// Reads every ConfigMap and Secret the pod's volumes and containers reference, and gets
    /// the service-account tokens its projected volumes ask for.
    pub async fn fetch(client: &Client, pod: &Pod, tokens: &Tokens) -> anyhow::Result<Sources> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let (config_map_names, secret_names) = references(pod);
        let mut sources = Sources::default();
        for (audience, seconds) in token_requests(pod) {
            let token = tokens.get(client, pod, &audience, seconds).await?;
            sources.tokens.insert((audience, seconds), token);
        }
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        for name in config_map_names {
            let found = config_maps
                .get_opt(&name)
                .await
                .map_err(|e| anyhow::anyhow!("reading ConfigMap {namespace}/{name}: {e}"))?;
            sources.config_maps.insert(name, found);
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        for name in secret_names {
            let found = secrets
                .get_opt(&name)
                .await
                .map_err(|e| anyhow::anyhow!("reading Secret {namespace}/{name}: {e}"))?;
            sources.secrets.insert(name, found);
        }
        Ok(sources)
    }

    /// Sources from objects at hand (tests).
    pub fn from_objects(config_maps: Vec<ConfigMap>, secrets: Vec<Secret>) -> Sources {
        let name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.clone().unwrap_or_default()
        };
        Sources {
            config_maps: config_maps
                .into_iter()
                .map(|c| (name(&c.metadata), Some(c)))
                .collect(),
            secrets: secrets
                .into_iter()
                .map(|s| (name(&s.metadata), Some(s)))
                .collect(),
            tokens: HashMap::new(),
        }
    }

    /// A ConfigMap's keys and values (`data` and `binaryData`); `None` when it is missing.
    pub fn config_map(&self, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let map = self.config_maps.get(name)?.as_ref()?;
        let mut out: BTreeMap<String, Vec<u8>> = map
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        for (k, v) in map.binary_data.iter().flatten() {
            out.insert(k.clone(), v.0.clone());
        }
        Some(out)
    }

    /// A Secret's keys and values; `None` when it is missing.
    pub fn secret(&self, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let secret = self.secrets.get(name)?.as_ref()?;
        Some(
            secret
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
        )
    }
}

/// The (audience, lifetime) of every service-account token the pod's projected volumes ask for.
fn token_requests(pod: &Pod) -> BTreeSet<(String, i64)> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .flat_map(|v| v.projected.iter().flat_map(|p| p.sources.iter().flatten()))
        .filter_map(|source| source.service_account_token.as_ref())
        .map(|t| {
            (
                t.audience.clone().unwrap_or_default(),
                t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
            )
        })
        .collect()
}

/// Names of the ConfigMaps and Secrets a pod references.
fn references(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut config_maps = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return (config_maps, secrets);
    };
    for volume in spec.volumes.iter().flatten() {
        if let Some(c) = &volume.config_map {
            config_maps.insert(c.name.clone());
        }
        if let Some(name) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(name);
        }
        for source in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
        {
            if let Some(c) = &source.config_map {
                config_maps.insert(c.name.clone());
            }
            if let Some(s) = &source.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    for container in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        for env in container.env.iter().flatten() {
            let from = env.value_from.as_ref();
            if let Some(r) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                config_maps.insert(r.name.clone());
            }
            if let Some(r) = from.and_then(|f| f.secret_key_ref.as_ref()) {
                secrets.insert(r.name.clone());
            }
        }
        for from in container.env_from.iter().flatten() {
            if let Some(r) = &from.config_map_ref {
                config_maps.insert(r.name.clone());
            }
            if let Some(r) = &from.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    (config_maps, secrets)
}

/// Whether the pod has volumes whose content follows API objects (and so must be refreshed
/// now and then, as upstream's kubelet does on its sync period).
pub fn has_live_content(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| {
            v.config_map.is_some()
                || v.secret.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some()
        })
}

/// Files of a volume: relative path → content and mode.
type Payload = BTreeMap<String, (Vec<u8>, u32)>;

/// Where the pod's volumes are on the node, by volume name, and whether they are read-only
/// to containers (upstream mounts API-backed volumes read-only).
#[derive(Debug, Default, Clone)]
pub struct Prepared {
    dirs: HashMap<String, (PathBuf, bool)>,
}

impl Prepared {
    /// The node path of a volume and whether it must be mounted read-only.
    pub fn get(&self, volume: &str) -> Option<&(PathBuf, bool)> {
        self.dirs.get(volume)
    }
}

/// What volume preparation needs of the node.
pub struct VolumeHost<'a> {
    /// The pod's volumes directory (`<pods_dir>/<uid>/volumes`).
    pub dir: PathBuf,
    pub host_ip: Option<&'a str>,
    pub node: &'a NodeAllocatable,
}

/// Sets up (or refreshes) every volume of the pod.
pub fn prepare(
    host: &VolumeHost<'_>,
    pod: &Pod,
    sources: &Sources,
) -> Result<Prepared, ConfigError> {
    let mut prepared = Prepared::default();
    let spec = pod.spec.as_ref();
    let fs_group = spec
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group);
    for volume in spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let (dir, read_only) = prepare_one(host, pod, volume, sources, fs_group.is_some())
            .map_err(|e| ConfigError(format!("volume {:?}: {}", volume.name, e.0)))?;
        // Upstream's volume ownership: the pod's volumes (not a node's hostPath) belong to
        // its fsGroup.
        if let Some(group) = fs_group
            && volume.host_path.is_none()
        {
            set_group_ownership(&dir, group, read_only)
                .map_err(|e| ConfigError(format!("volume {:?}: fsGroup: {e}", volume.name)))?;
        }
        prepared.dirs.insert(volume.name.clone(), (dir, read_only));
    }
    Ok(prepared)
}

/// Gives a volume's tree to `group` as upstream's `SetVolumeOwnership`: group `fsGroup`,
/// group-readable (and writable unless read-only), directories setgid so that new files
/// stay in the group. Links (the `..data` indirection) are left alone.
fn set_group_ownership(dir: &Path, group: i64, read_only: bool) -> std::io::Result<()> {
    let gid = u32::try_from(group)
        .map_err(|_| std::io::Error::other(format!("fsGroup {group} is not a valid group id")))?;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&path, None, Some(gid))?;
        let mode = meta.permissions().mode() & 0o7777;
        let group_bits = if read_only { 0o040 } else { 0o060 };
        let wanted = if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
            mode | group_bits | 0o010 | 0o2000
        } else {
            mode | group_bits
        };
        if wanted != mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted))?;
        }
    }
    Ok(())
}

fn plugin_dir(host: &VolumeHost<'_>, plugin: &str, volume: &str) -> PathBuf {
    host.dir
        .join(format!("kubernetes.io~{plugin}"))
        .join(volume)
}

fn prepare_one(
    host: &VolumeHost<'_>,
    pod: &Pod,
    volume: &Volume,
    sources: &Sources,
    group_readable: bool,
) -> Result<(PathBuf, bool), ConfigError> {
    if let Some(empty) = &volume.empty_dir {
        let dir = plugin_dir(host, "empty-dir", &volume.name);
        prepare_empty_dir(&dir, empty.medium.as_deref(), empty.size_limit.as_ref())?;
        return Ok((dir, false));
    }
    if let Some(host_path) = &volume.host_path {
        return Ok((prepare_host_path(host_path)?, false));
    }
    let (plugin, on_tmpfs, payload) = if let Some(source) = &volume.config_map {
        let payload = match sources.config_map(&source.name) {
            Some(data) => key_files(
                &data,
                source.items.as_deref(),
                source.default_mode.unwrap_or(DEFAULT_MODE),
                "ConfigMap",
                &source.name,
                source.optional == Some(true),
            )?,
            None if source.optional == Some(true) => Payload::new(),
            None => return Err(not_found("configmap", &source.name)),
        };
        ("configmap", false, payload)
    } else if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        let payload = match sources.secret(&name) {
            Some(data) => key_files(
                &data,
                source.items.as_deref(),
                source.default_mode.unwrap_or(DEFAULT_MODE),
                "Secret",
                &name,
                source.optional == Some(true),
            )?,
            None if source.optional == Some(true) => Payload::new(),
            None => return Err(not_found("secret", &name)),
        };
        ("secret", true, payload)
    } else if let Some(source) = &volume.downward_api {
        let mode = source.default_mode.unwrap_or(DEFAULT_MODE);
        let mut payload = Payload::new();
        downward_files(host, pod, source.items.iter().flatten(), mode, &mut payload)?;
        ("downward-api", true, payload)
    } else if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
        let mut payload = Payload::new();
        for source in projected.sources.iter().flatten() {
            if let Some(c) = &source.config_map {
                let optional = c.optional == Some(true);
                match sources.config_map(&c.name) {
                    Some(data) => payload.extend(key_files(
                        &data,
                        c.items.as_deref(),
                        mode,
                        "ConfigMap",
                        &c.name,
                        optional,
                    )?),
                    None if optional => {}
                    None => return Err(not_found("configmap", &c.name)),
                }
            } else if let Some(s) = &source.secret {
                let optional = s.optional == Some(true);
                match sources.secret(&s.name) {
                    Some(data) => payload.extend(key_files(
                        &data,
                        s.items.as_deref(),
                        mode,
                        "Secret",
                        &s.name,
                        optional,
                    )?),
                    None if optional => {}
                    None => return Err(not_found("secret", &s.name)),
                }
            } else if let Some(d) = &source.downward_api {
                downward_files(host, pod, d.items.iter().flatten(), mode, &mut payload)?;
            } else if let Some(t) = &source.service_account_token {
                let key = (
                    t.audience.clone().unwrap_or_default(),
                    t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
                );
                let token = sources.tokens.get(&key).ok_or_else(|| {
                    ConfigError("no service-account token was issued for this pod".into())
                })?;
                check_path(&t.path)?;
                payload.insert(t.path.clone(), (token.clone().into_bytes(), mode as u32));
            } else {
                return Err(ConfigError(
                    "projected sources other than configMap, secret, downwardAPI and serviceAccountToken (cluster trust bundles, pod certificates) are not supported by this agent".into(),
                ));
            }
        }
        ("projected", true, payload)
    } else {
        return Err(ConfigError(
            "only emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes are supported by this agent".into(),
        ));
    };
    let mut payload = payload;
    if group_readable {
        // The fsGroup reads what the pod's volumes hold (upstream's read-only mask 0440).
        for (_, mode) in payload.values_mut() {
            *mode |= 0o040;
        }
    }
    let dir = plugin_dir(host, plugin, &volume.name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ConfigError(format!("creating {}: {e}", dir.display())))?;
    if on_tmpfs {
        mount_tmpfs(&dir, "mode=0755")?;
    }
    write_atomically(&dir, &payload)
        .map_err(|e| ConfigError(format!("writing {}: {e}", dir.display())))?;
    Ok((dir, true))
}

fn not_found(kind: &str, name: &str) -> ConfigError {
    ConfigError(format!("{kind} {name:?} not found"))
}

/// The files of a ConfigMap or Secret: every key, or the listed items at their paths.
fn key_files(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
    kind: &str,
    name: &str,
    optional: bool,
) -> Result<Payload, ConfigError> {
    let mut payload = Payload::new();
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let Some(value) = data.get(&item.key) else {
                    if optional {
                        continue;
                    }
                    return Err(ConfigError(format!(
                        "configured to use key {:?} of {kind} {name:?}, which it does not have",
                        item.key
                    )));
                };
                check_path(&item.path)?;
                payload.insert(
                    item.path.clone(),
                    (value.clone(), mode_bits(item.mode.unwrap_or(default_mode))?),
                );
            }
        }
        _ => {
            for (key, value) in data {
                check_path(key)?;
                payload.insert(key.clone(), (value.clone(), mode_bits(default_mode)?));
            }
        }
    }
    Ok(payload)
}

fn downward_files<'a>(
    host: &VolumeHost<'_>,
    pod: &Pod,
    items: impl Iterator<Item = &'a DownwardAPIVolumeFile>,
    default_mode: i32,
    payload: &mut Payload,
) -> Result<(), ConfigError> {
    for item in items {
        check_path(&item.path)?;
        let value = if let Some(field) = &item.field_ref {
            spec::field_value_in_volume(pod, &field.field_path, host.host_ip)?
        } else if let Some(resource) = &item.resource_field_ref {
            let container_name = resource.container_name.as_deref().unwrap_or_default();
            let container = pod
                .spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
                .find(|c: &&Container| c.name == container_name)
                .ok_or_else(|| {
                    ConfigError(format!(
                        "resourceFieldRef of {:?} names no container of the pod ({container_name:?})",
                        item.path
                    ))
                })?;
            spec::resource_value(
                container,
                &resource.resource,
                resource.divisor.as_ref().map(|d| d.0.as_str()),
                host.node,
            )?
        } else {
            return Err(ConfigError(format!(
                "downward API file {:?} has neither fieldRef nor resourceFieldRef",
                item.path
            )));
        };
        payload.insert(
            item.path.clone(),
            (
                value.into_bytes(),
                mode_bits(item.mode.unwrap_or(default_mode))?,
            ),
        );
    }
    Ok(())
}

fn mode_bits(mode: i32) -> Result<u32, ConfigError> {
    if !(0..=0o777).contains(&mode) {
        return Err(ConfigError(format!(
            "file mode {mode} is outside 0 to 0777 (511)"
        )));
    }
    Ok(mode as u32)
}

/// Upstream's rule for item paths: relative, no `..` element, not starting with `..` (the
/// writer's own names).
fn check_path(path: &str) -> Result<(), ConfigError> {
    let bad = path.is_empty()
        || path.starts_with("..")
        || Path::new(path)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)));
    if bad {
        return Err(ConfigError(format!(
            "invalid file path {path:?}: it must be relative, without '..' and not start with '..'"
        )));
    }
    Ok(())
}

/// Writes the payload into `dir` the way upstream's AtomicWriter does; nothing is written
/// when the content is unchanged.
fn write_atomically(dir: &Path, payload: &Payload) -> std::io::Result<()> {
    let data_link = dir.join(DATA_LINK);
    if let Ok(current) = std::fs::read_link(&data_link)
        && same_content(&dir.join(&current), payload)
    {
        return Ok(());
    }
    let stamp = format!(
        "..{}.{}",
        chrono::Utc::now().format("%Y_%m_%d_%H_%M_%S%.9f"),
        std::process::id()
    );
    let new_dir = dir.join(&stamp);
    std::fs::create_dir(&new_dir)?;
    std::fs::set_permissions(&new_dir, std::fs::Permissions::from_mode(0o755))?;
    for (path, (content, mode)) in payload {
        let file = new_dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
    }
    let tmp = dir.join(DATA_LINK_TMP);
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, &data_link)?;
    let tops: BTreeSet<String> = payload
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_string))
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("{DATA_LINK}/{top}"), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            if name != DATA_LINK && name != stamp {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        } else if !tops.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn same_content(dir: &Path, payload: &Payload) -> bool {
    fn count_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => count_files(&e.path()),
                        _ => 1,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    payload.iter().all(|(path, (content, mode))| {
        let file = dir.join(path);
        std::fs::symlink_metadata(&file)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o777 == *mode)
            && std::fs::read(&file).is_ok_and(|c| &c == content)
    }) && count_files(dir) == payload.len()
}

fn mount_tmpfs(dir: &Path, options: &str) -> Result<(), ConfigError> {
    // Checked on the mount itself: after a reboot the directory is on disk, the tmpfs gone.
    let on_tmpfs = nix::sys::statfs::statfs(dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if on_tmpfs {
        return Ok(());
    }
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(|e| ConfigError(format!("mounting a tmpfs on {}: {e}", dir.display())))
}

fn prepare_empty_dir(
    dir: &Path,
    medium: Option<&str>,
    size_limit: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
) -> Result<(), ConfigError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ConfigError(format!("creating emptyDir {}: {e}", dir.display())))?;
    // World-writable as upstream's emptyDir, so that non-root containers can use it.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
    if medium == Some("Memory") {
        let size = size_limit
            .and_then(|q| canopy_api::quantity::Quantity::parse(&q.0).ok())
            .map(|q| format!(",size={}", q.value()))
            .unwrap_or_default();
        mount_tmpfs(dir, &format!("mode=1777{size}"))?;
    }
    Ok(())
}

/// A node path, checked against (or created for) the volume's type, as upstream.
fn prepare_host_path(source: &HostPathVolumeSource) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let path = PathBuf::from(&source.path);
    if !path.is_absolute() {
        return Err(ConfigError(format!(
            "hostPath {:?} must be an absolute path",
            source.path
        )));
    }
    let kind = source.type_.as_deref().unwrap_or("");
    let meta = std::fs::metadata(&path);
    let wrong = |what: &str| {
        Err(ConfigError(format!(
            "hostPath type check failed: {} is not a {what}",
            source.path
        )))
    };
    match kind {
        "" => {}
        "DirectoryOrCreate" => match &meta {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return wrong("directory"),
            Err(_) => {
                std::fs::create_dir_all(&path)
                    .map_err(|e| ConfigError(format!("creating {}: {e}", path.display())))?;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
            }
        },
        "FileOrCreate" => match &meta {
            Ok(m) if m.is_file() => {}
            Ok(_) => return wrong("file"),
            Err(_) => {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| ConfigError(format!("creating {}: {e}", path.display())))?;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
            }
        },
        "Directory" => {
            if !meta.as_ref().is_ok_and(|m| m.is_dir()) {
                return wrong("directory");
            }
        }
        "File" => {
            if !meta.as_ref().is_ok_and(|m| m.is_file()) {
                return wrong("file");
            }
        }
        "Socket" => {
            if !meta.as_ref().is_ok_and(|m| m.file_type().is_socket()) {
                return wrong("socket");
            }
        }
        "CharDevice" => {
            if !meta.as_ref().is_ok_and(|m| m.file_type().is_char_device()) {
                return wrong("character device");
            }
        }
        "BlockDevice" => {
            if !meta.as_ref().is_ok_and(|m| m.file_type().is_block_device()) {
                return wrong("block device");
            }
        }
        other => {
            return Err(ConfigError(format!("unknown hostPath type {other:?}")));
        }
    }
    Ok(path)
}

/// Unmounts the tmpfs volumes of a pod before its directory is removed.
pub fn unmount_all(pod_dir: &Path) {
    let Ok(plugins) = std::fs::read_dir(pod_dir.join("volumes")) else {
        return;
    };
    for plugin in plugins.flatten() {
        for volume in std::fs::read_dir(plugin.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = nix::mount::umount2(&volume.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn read(dir: &Path, path: &str) -> String {
        std::fs::read_to_string(dir.join(path)).unwrap()
    }

    #[test]
    fn references_cover_volumes_env_and_projections() {
        let p = pod(json!({"metadata": {"name": "p"}, "spec": {
            "volumes": [
                {"name": "a", "configMap": {"name": "cm-vol"}},
                {"name": "b", "secret": {"secretName": "s-vol"}},
                {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "s-proj"}}]}}
            ],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s-init"}}]}],
            "containers": [{"name": "c", "env": [
                {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}}
            ], "envFrom": [{"configMapRef": {"name": "cm-from"}}]}]
        }}));
        let (cms, secrets) = references(&p);
        assert_eq!(
            cms.into_iter().collect::<Vec<_>>(),
            ["cm-env", "cm-from", "cm-proj", "cm-vol"]
        );
        assert_eq!(
            secrets.into_iter().collect::<Vec<_>>(),
            ["s-env", "s-init", "s-proj", "s-vol"]
        );
    }

    #[test]
    fn atomic_writer_swaps_whole_updates_and_drops_removed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut payload = Payload::new();
        payload.insert("a".into(), (b"1".to_vec(), 0o644));
        payload.insert("sub/b".into(), (b"2".to_vec(), 0o400));
        write_atomically(dir.path(), &payload).unwrap();
        assert_eq!(read(dir.path(), "a"), "1");
        assert_eq!(read(dir.path(), "sub/b"), "2");
        let first = std::fs::read_link(dir.path().join(DATA_LINK)).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("a")).unwrap(),
            PathBuf::from("..data/a")
        );
        let mode = std::fs::metadata(dir.path().join("sub/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);

        // Unchanged content: nothing is rewritten.
        write_atomically(dir.path(), &payload).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join(DATA_LINK)).unwrap(),
            first
        );

        payload.remove("sub/b");
        payload.insert("a".into(), (b"updated".to_vec(), 0o644));
        write_atomically(dir.path(), &payload).unwrap();
        assert_eq!(read(dir.path(), "a"), "updated");
        assert!(std::fs::symlink_metadata(dir.path().join("sub")).is_err());
        assert!(!dir.path().join(&first).exists(), "the old data is removed");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".."))
            .collect();
        assert_eq!(names.len(), 2, "one data directory and its link: {names:?}");
    }

    #[test]
    fn item_paths_cannot_escape() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "..data", ""] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "a/b.txt", "dir/..hidden-not-first"] {
            assert!(check_path(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn key_files_follow_items_and_optional() {
        let data: BTreeMap<String, Vec<u8>> = [
            ("k1".to_string(), b"v1".to_vec()),
            ("k2".to_string(), b"v2".to_vec()),
        ]
        .into();
        let all = key_files(&data, None, 0o600, "ConfigMap", "c", false).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["k1"], (b"v1".to_vec(), 0o600));
        let items = vec![KeyToPath {
            key: "k2".into(),
            path: "conf/two".into(),
            mode: Some(0o400),
        }];
        let some = key_files(&data, Some(&items), 0o644, "ConfigMap", "c", false).unwrap();
        assert_eq!(some.keys().collect::<Vec<_>>(), ["conf/two"]);
        assert_eq!(some["conf/two"].1, 0o400);
        let missing = vec![KeyToPath {
            key: "nope".into(),
            path: "x".into(),
            mode: None,
        }];
        assert!(key_files(&data, Some(&missing), 0o644, "ConfigMap", "c", false).is_err());
        assert!(
            key_files(&data, Some(&missing), 0o644, "ConfigMap", "c", true)
                .unwrap()
                .is_empty()
        );
        assert!(key_files(&data, None, 0o1777, "ConfigMap", "c", false).is_err());
    }

    #[test]
    fn downward_volume_formats_maps_like_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeAllocatable {
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
        };
        let host = VolumeHost {
            dir: dir.path().to_path_buf(),
            host_ip: Some("10.0.0.1"),
            node: &node,
        };
        let p = pod(json!({"metadata": {"name": "p", "namespace": "ns",
            "labels": {"b": "2", "a": "one \"quoted\""}},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi"}}}]}}));
        let items: Vec<DownwardAPIVolumeFile> = serde_json::from_value(json!([
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
            {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}}
        ]))
        .unwrap();
        let mut payload = Payload::new();
        downward_files(&host, &p, items.iter(), 0o644, &mut payload).unwrap();
        assert_eq!(payload["labels"].0, b"a=\"one \\\"quoted\\\"\"\nb=\"2\"");
        assert_eq!(payload["name"].0, b"p");
        assert_eq!(payload["mem"].0, b"64");
    }

    #[test]
    fn host_path_types_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let source = |path: &Path, kind: &str| HostPathVolumeSource {
            path: path.to_string_lossy().into_owned(),
            type_: Some(kind.to_string()),
        };
        let new_dir = dir.path().join("made");
        prepare_host_path(&source(&new_dir, "DirectoryOrCreate")).unwrap();
        assert!(new_dir.is_dir());
        let new_file = dir.path().join("file");
        prepare_host_path(&source(&new_file, "FileOrCreate")).unwrap();
        assert!(new_file.is_file());
        assert!(prepare_host_path(&source(&new_file, "Directory")).is_err());
        assert!(prepare_host_path(&source(&new_dir, "File")).is_err());
        assert!(prepare_host_path(&source(&new_dir, "Socket")).is_err());
        assert!(prepare_host_path(&source(&dir.path().join("absent"), "Directory")).is_err());
        assert!(prepare_host_path(&source(Path::new("relative"), "")).is_err());
    }
}
