//! The provider's memory: one JSON file per object under the state directory, each
//! replaced atomically (write a temporary file, fsync, rename, fsync the directory), so a
//! crash leaves every object either as it was or as it became, never half-written.
//!
//! ```text
//! <state_dir>/networks/<name>.json
//! <state_dir>/ports/<name>.json
//! <state_dir>/public-ips/<name>.json
//! <state_dir>/servers/<name>.json     the record (written before the server is built)
//! <state_dir>/servers/<name>/         the server's files: kubeconfig, root, state, logs
//! ```

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{Flavor, Network, Port, PublicIp};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub network: Network,
    /// The packet mark and routing table of this network in the switch namespace: replies
    /// of its gateway are routed by it, so that networks with the same subnet never share
    /// a route.
    pub mark: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortRecord {
    pub port: Port,
    /// The server this port is the own NIC of (it lives and dies with that server).
    #[serde(default)]
    pub nic_of: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Recorded and being built; found in this phase by `open`, its creation was cut
    /// short.
    Building,
    /// Built: its kernel objects are kept (repaired by `open`), its agent restarted.
    Ready,
    /// Built as a spare of the warm pool: namespace, management link, cgroups and files,
    /// no NIC and no agent until it is claimed.
    Spare,
    /// Creation failed and was cleaned up; the next create of that name starts afresh.
    Failed(String),
}

/// The process running a server's agent. The pid alone could name another process after
/// the agent exited or the host rebooted; its start time (in clock ticks since boot, kept
/// across exec) and the boot's id cannot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProcess {
    pub pid: u32,
    pub start_time: u64,
    pub boot_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerRecord {
    pub name: String,
    pub tenant: String,
    pub flavor: Flavor,
    pub network: String,
    pub tags: BTreeMap<String, String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub phase: Phase,
    pub management_ip: Option<Ipv4Addr>,
    /// Its NIC's address.
    pub ip: Option<Ipv4Addr>,
    /// What the agent is started with again after a reboot. The kubeconfig is not here:
    /// it holds the node's private key and lives only in the server's 0600 file.
    pub node_name: String,
    pub agent_args: Vec<String>,
    pub agent: Option<AgentProcess>,
}

/// Everything the provider knows, as loaded from and mirrored to the files.
#[derive(Default)]
pub struct State {
    pub networks: BTreeMap<String, NetworkRecord>,
    pub ports: BTreeMap<String, PortRecord>,
    pub servers: BTreeMap<String, ServerRecord>,
    pub public_ips: BTreeMap<String, PublicIp>,
}

#[derive(Clone, Copy)]
pub enum Kind {
    Network,
    Port,
    Server,
    PublicIp,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Network => "networks",
            Kind::Port => "ports",
            Kind::Server => "servers",
            Kind::PublicIp => "public-ips",
        }
    }
}

/// The state directory.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A server's own directory.
    pub fn server_dir(&self, name: &str) -> PathBuf {
        self.root.join(Kind::Server.dir()).join(name)
    }

    fn file(&self, kind: Kind, name: &str) -> PathBuf {
        self.root.join(kind.dir()).join(format!("{name}.json"))
    }

    /// Creates the directories and reads every record. Leftover temporary files (a crash
    /// between write and rename) are removed; an unreadable record is an error rather than
    /// silently forgotten, since forgetting it would orphan its kernel objects.
    pub fn load(&self) -> Result<State> {
        let mut state = State::default();
        for kind in [Kind::Network, Kind::Port, Kind::Server, Kind::PublicIp] {
            let dir = self.root.join(kind.dir());
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let entry = entry?;
                let path = entry.path();
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if file_name.starts_with('.') && file_name.ends_with(".tmp") {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                let Some(name) = file_name.strip_suffix(".json") else {
                    continue;
                };
                let name = name.to_string();
                match kind {
                    Kind::Network => {
                        state.networks.insert(name, read(&path)?);
                    }
                    Kind::Port => {
                        state.ports.insert(name, read(&path)?);
                    }
                    Kind::Server => {
                        state.servers.insert(name, read(&path)?);
                    }
                    Kind::PublicIp => {
                        state.public_ips.insert(name, read(&path)?);
                    }
                }
            }
        }
        Ok(state)
    }

    pub async fn save<T: Serialize>(&self, kind: Kind, name: &str, value: &T) -> Result<()> {
        let path = self.file(kind, name);
        let bytes = serde_json::to_vec_pretty(value)?;
        blocking(move || write_atomic(&path, &bytes, 0o644)).await
    }

    pub async fn remove(&self, kind: Kind, name: &str) -> Result<()> {
        let path = self.file(kind, name);
        blocking(move || {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
                _ => {}
            }
            sync_dir(path.parent().unwrap_or(Path::new("/")))
        })
        .await
    }
}

fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Runs file-system work off the async workers (fsync can take a while).
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("file-system task panicked")?
}

/// Replaces `path` with `bytes`: a crash leaves the old or the new content. The file is
/// created with `mode` from the start (a kubeconfig is never readable by others, not even
/// for a moment).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Subnet;

    #[tokio::test]
    async fn records_survive_reload_and_temporaries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        store.load().unwrap();
        let record = NetworkRecord {
            network: Network {
                name: "n1".into(),
                tenant: "t".into(),
                subnet: Subnet::parse("10.0.0.0/24").unwrap(),
                gateway: "10.0.0.1".parse().unwrap(),
            },
            mark: 1000,
        };
        store.save(Kind::Network, "n1", &record).await.unwrap();
        fs::write(dir.path().join("networks/.n2.json.tmp"), b"{half").unwrap();
        let state = store.load().unwrap();
        assert_eq!(state.networks.len(), 1);
        assert_eq!(state.networks["n1"].network, record.network);
        assert_eq!(state.networks["n1"].mark, 1000);
        assert!(!dir.path().join("networks/.n2.json.tmp").exists());
        store.remove(Kind::Network, "n1").await.unwrap();
        store.remove(Kind::Network, "n1").await.unwrap();
        assert!(store.load().unwrap().networks.is_empty());
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        store.load().unwrap();
        fs::write(dir.path().join("ports/p.json"), b"{").unwrap();
        let err = store.load().err().unwrap();
        assert!(format!("{err:#}").contains("ports/p.json"), "{err:#}");
    }

    #[test]
    fn atomic_write_sets_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomic(&path, b"a", 0o600).unwrap();
        write_atomic(&path, b"b", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"b");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
