//! The store itself: index, blobs, layers, locking, removal and garbage collection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::reference::{is_hex64, parse_normalized};
use crate::{ImageError, unpack};

const INDEX_FILE: &str = "index.json";
const INDEX_VERSION: u32 = 1;

/// An image as the agent sees it: what to stack and how to run it.
#[derive(Clone, Debug)]
pub struct Image {
    /// `sha256:<config digest hex>`, the same id Docker and containerd report.
    pub id: String,
    /// Normalized names (`docker.io/library/busybox:latest`).
    pub names: Vec<String>,
    /// `repository@sha256:<manifest digest>`, one per repository the image was obtained as.
    pub repo_digests: Vec<String>,
    /// Unpacked layer directories, lowest (base) layer first. Overlayfs wants the opposite
    /// order in `lowerdir=`, so reverse when mounting.
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
    /// Bytes on disk of the image's unpacked layers.
    pub size: u64,
}

/// The parts of the OCI image config the runtime needs to build a container's process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub stop_signal: Option<String>,
    /// `80/tcp`, `53/udp`, sorted.
    pub exposed_ports: Vec<String>,
}

impl ImageConfig {
    pub(crate) fn from_json(bytes: &[u8], what: &str) -> Result<(Self, Vec<String>), ImageError> {
        let config: RawImageConfig =
            serde_json::from_slice(bytes).map_err(|e| ImageError::json(what, e))?;
        let c = config.config.unwrap_or_default();
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let mut exposed_ports: Vec<String> =
            c.exposed_ports.unwrap_or_default().into_keys().collect();
        exposed_ports.sort();
        Ok((
            ImageConfig {
                entrypoint: c.entrypoint.unwrap_or_default(),
                cmd: c.cmd.unwrap_or_default(),
                env: c.env.unwrap_or_default(),
                working_dir: non_empty(c.working_dir),
                user: non_empty(c.user),
                stop_signal: non_empty(c.stop_signal),
                exposed_ports,
            },
            config.rootfs.diff_ids,
        ))
    }
}

/// The image config, read leniently: Docker writes `null` for empty lists and maps, and
/// fields the runtime does not need must not make an image unusable.
#[derive(Deserialize)]
struct RawImageConfig {
    #[serde(default)]
    config: Option<RawContainerConfig>,
    rootfs: RawRootFs,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stop_signal: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct RawRootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The persistent index: the only thing that makes an image visible.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Index {
    version: u32,
    images: BTreeMap<String, ImageRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    id: String,
    names: Vec<String>,
    repo_digests: Vec<String>,
    manifest_digest: String,
    layers: Vec<LayerRecord>,
    config: ImageConfig,
    /// Unix milliseconds; import time until the image is first used.
    last_used: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LayerRecord {
    diff_id: String,
    /// The (possibly compressed) blob the layer came from.
    blob: String,
    /// Unpacked bytes.
    size: u64,
}

/// An image whose blobs are all in `blobs/`, waiting for its layers to be unpacked and its
/// record to be written.
#[derive(Debug)]
pub(crate) struct PendingImage {
    pub names: Vec<String>,
    pub repo_digests: Vec<String>,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Layer blob digests, base first.
    pub layer_blobs: Vec<String>,
}

/// A local content-addressed image store. Cheap to clone; clones share the lock.
#[derive(Clone, Debug)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    lock_file: File,
    mutex: Mutex<()>,
    /// Last-use times recorded since the last index write (id → unix ms). Kept in memory so
    /// that marking an image used on every container start costs no disk write; folded into
    /// the index on the next mutation.
    used: Mutex<HashMap<String, u64>>,
}

/// Holds the in-process mutex and the `flock`; both released on drop.
pub(crate) struct WriteGuard<'a> {
    _mutex: MutexGuard<'a, ()>,
    file: &'a File,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if is_hex64(hex) => Ok(hex),
        _ => Err(ImageError::InvalidDigest(digest.to_string())),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`, and throws away whatever a crashed
    /// import left in `tmp/`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore, ImageError> {
        let root = root.into();
        for dir in ["blobs/sha256", "layers", "tmp"] {
            let d = root.join(dir);
            fs::create_dir_all(&d).at(&d)?;
        }
        let lock_path = root.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .at(&lock_path)?;
        let store = ImageStore {
            inner: Arc::new(Inner {
                root,
                lock_file,
                mutex: Mutex::new(()),
                used: Mutex::new(HashMap::new()),
            }),
        };
        {
            let _guard = store.lock()?;
            let tmp = store.tmp_dir();
            for entry in fs::read_dir(&tmp).at(&tmp)?.flatten() {
                let p = entry.path();
                let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                if let Err(e) = result {
                    tracing::warn!(path = %p.display(), error = %e, "cannot clean image store staging area");
                }
            }
            // Read now so a corrupt index fails the agent at startup, not at first pod.
            store.read_index()?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.inner.root.join("tmp")
    }

    fn index_path(&self) -> PathBuf {
        self.inner.root.join(INDEX_FILE)
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .inner
            .root
            .join("blobs/sha256")
            .join(digest_hex(digest)?))
    }

    fn layer_path(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.inner.root.join("layers").join(digest_hex(diff_id)?))
    }

    pub(crate) fn lock(&self) -> Result<WriteGuard<'_>, ImageError> {
        let guard = self.inner.mutex.lock();
        self.inner
            .lock_file
            .lock()
            .at(self.inner.root.join("lock"))?;
        Ok(WriteGuard {
            _mutex: guard,
            file: &self.inner.lock_file,
        })
    }

    pub(crate) fn read_index(&self) -> Result<Index, ImageError> {
        let path = self.index_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Index::default()),
            Err(e) => return Err(ImageError::io(path, e)),
        };
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::CorruptIndex {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if index.version != INDEX_VERSION {
            return Err(ImageError::CorruptIndex {
                path,
                reason: format!("unsupported index version {}", index.version),
            });
        }
        Ok(index)
    }

    /// Replaces `index.json` atomically, folding in pending last-use times.
    fn write_index(&self, _guard: &WriteGuard<'_>, index: &mut Index) -> Result<(), ImageError> {
        index.version = INDEX_VERSION;
        {
            let mut used = self.inner.used.lock();
            for (id, t) in used.drain() {
                if let Some(rec) = index.images.get_mut(&id) {
                    rec.last_used = rec.last_used.max(t);
                }
            }
        }
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| ImageError::json("index", e))?;
        let tmp = self.tmp_dir();
        let mut f = tempfile::NamedTempFile::new_in(&tmp).at(&tmp)?;
        f.write_all(&bytes).at(f.path())?;
        f.as_file().sync_all().at(f.path())?;
        let path = self.index_path();
        f.persist(&path)
            .map_err(|e| ImageError::io(&path, e.error))?;
        fsync_dir(&self.inner.root)
    }

    /// Streams `reader` into `blobs/` under its sha256, checking it against `expected` when
    /// given. Returns the digest. The blob only appears under its name once complete and
    /// durable.
    pub(crate) fn ingest_blob(
        &self,
        _guard: &WriteGuard<'_>,
        reader: &mut dyn Read,
        expected: Option<&str>,
        what: &str,
    ) -> Result<(String, u64), ImageError> {
        if let Some(e) = expected {
            digest_hex(e)?;
        }
        let tmp = self.tmp_dir();
        let mut f = tempfile::NamedTempFile::new_in(&tmp).at(&tmp)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ImageError::io(what, e));
                }
            };
            hasher.update(&buf[..n]);
            f.write_all(&buf[..n]).at(f.path())?;
            size += n as u64;
        }
        let digest = format!("sha256:{:x}", hasher.finalize());
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: expected.to_string(),
                actual: digest,
            });
        }
        let dest = self.blob_path(&digest)?;
        if dest.exists() {
            return Ok((digest, size));
        }
        f.as_file().sync_all().at(f.path())?;
        f.persist(&dest)
            .map_err(|e| ImageError::io(&dest, e.error))?;
        if let Some(parent) = dest.parent() {
            fsync_dir(parent)?;
        }
        Ok((digest, size))
    }

    pub(crate) fn read_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        let len = fs::metadata(&path).at(&path)?.len();
        if len > limit {
            return Err(ImageError::io(
                &path,
                io::Error::other(format!(
                    "blob of {len} bytes exceeds the {limit} byte limit"
                )),
            ));
        }
        fs::read(&path).at(&path)
    }

    /// Unpacks layers, then makes all `pending` images visible in one index write. Layer
    /// directories appear before the index names them, so a crash leaves only orphans.
    pub(crate) fn commit(
        &self,
        guard: &WriteGuard<'_>,
        pending: Vec<PendingImage>,
    ) -> Result<Vec<Image>, ImageError> {
        let mut index = self.read_index()?;
        let mut ids = Vec::new();
        let now = now_ms();
        for p in pending {
            let config_bytes = self.read_blob(&p.config_digest, 64 << 20)?;
            let (config, diff_ids) = ImageConfig::from_json(
                &config_bytes,
                &format!("image config {}", p.config_digest),
            )?;
            if diff_ids.len() != p.layer_blobs.len() {
                return Err(ImageError::BadLayer {
                    layer: p.config_digest.clone(),
                    reason: format!(
                        "manifest has {} layers but config lists {} diff ids",
                        p.layer_blobs.len(),
                        diff_ids.len()
                    ),
                });
            }
            let mut layers = Vec::with_capacity(diff_ids.len());
            for (blob, diff_id) in p.layer_blobs.iter().zip(&diff_ids) {
                let size = self.ensure_layer(guard, &index, blob, diff_id)?;
                layers.push(LayerRecord {
                    diff_id: diff_id.clone(),
                    blob: blob.clone(),
                    size,
                });
            }
            // A name points at one image: moving it leaves the old image unnamed (like Docker's
            // `<none>`), still usable by running containers until garbage-collected.
            for rec in index.images.values_mut() {
                rec.names.retain(|n| !p.names.contains(n));
            }
            let id = p.config_digest.clone();
            let rec = index
                .images
                .entry(id.clone())
                .or_insert_with(|| ImageRecord {
                    id: id.clone(),
                    names: Vec::new(),
                    repo_digests: Vec::new(),
                    manifest_digest: p.manifest_digest.clone(),
                    layers: Vec::new(),
                    config: config.clone(),
                    last_used: now,
                });
            rec.manifest_digest = p.manifest_digest;
            rec.layers = layers;
            rec.config = config;
            for n in p.names {
                if !rec.names.contains(&n) {
                    rec.names.push(n);
                }
            }
            for d in p.repo_digests {
                if !rec.repo_digests.contains(&d) {
                    rec.repo_digests.push(d);
                }
            }
            rec.names.sort();
            rec.repo_digests.sort();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        self.write_index(guard, &mut index)?;
        ids.iter()
            .filter_map(|id| index.images.get(id))
            .map(|rec| self.to_image(rec))
            .collect()
    }

    /// Makes sure `layers/<diff id>` exists, unpacking `blob` if needed. Returns its size.
    fn ensure_layer(
        &self,
        _guard: &WriteGuard<'_>,
        index: &Index,
        blob: &str,
        diff_id: &str,
    ) -> Result<u64, ImageError> {
        let dest = self.layer_path(diff_id)?;
        if dest.is_dir() {
            let known = index
                .images
                .values()
                .flat_map(|r| &r.layers)
                .find(|l| l.diff_id == diff_id)
                .map(|l| l.size);
            return Ok(known.unwrap_or_else(|| unpack::dir_size(&dest)));
        }
        let blob_path = self.blob_path(blob)?;
        let tmp = self.tmp_dir();
        let staging = tempfile::Builder::new()
            .prefix("layer-")
            .tempdir_in(&tmp)
            .at(&tmp)?;
        // A tar without a `./` entry must still give a root that non-root users can traverse.
        fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755)).at(staging.path())?;
        let unpacked = unpack::unpack_layer(&blob_path, staging.path(), blob)?;
        if unpacked.diff_id != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("diff id of layer blob {blob}"),
                expected: diff_id.to_string(),
                actual: unpacked.diff_id,
            });
        }
        // One syncfs makes the whole tree durable before it becomes reachable by name.
        let dir = File::open(staging.path()).at(staging.path())?;
        nix::unistd::syncfs(&dir).map_err(|e| ImageError::io(staging.path(), e.into()))?;
        let staged = staging.keep();
        fs::rename(&staged, &dest).at(&dest)?;
        if let Some(parent) = dest.parent() {
            fsync_dir(parent)?;
        }
        Ok(unpacked.size)
    }

    /// Deletes blobs and layers that no image references: what is left by failed or crashed
    /// imports, and by removals.
    pub(crate) fn sweep(&self, _guard: &WriteGuard<'_>) -> Result<(), ImageError> {
        let index = self.read_index()?;
        let mut blobs = HashSet::new();
        let mut layers = HashSet::new();
        for rec in index.images.values() {
            blobs.insert(rec.id.trim_start_matches("sha256:").to_string());
            blobs.insert(
                rec.manifest_digest
                    .trim_start_matches("sha256:")
                    .to_string(),
            );
            for l in &rec.layers {
                blobs.insert(l.blob.trim_start_matches("sha256:").to_string());
                layers.insert(l.diff_id.trim_start_matches("sha256:").to_string());
            }
        }
        for (dir, keep, is_dir) in [("blobs/sha256", &blobs, false), ("layers", &layers, true)] {
            let d = self.inner.root.join(dir);
            for e in fs::read_dir(&d).at(&d)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let p = e.path();
                let r = if is_dir {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                match r {
                    Ok(()) => {
                        tracing::debug!(path = %p.display(), "removed unreferenced image data")
                    }
                    Err(err) => {
                        tracing::warn!(path = %p.display(), error = %err, "cannot remove unreferenced image data")
                    }
                }
            }
        }
        Ok(())
    }

    fn to_image(&self, rec: &ImageRecord) -> Result<Image, ImageError> {
        // Layers are shared by diff id, so an image that carries the same diff twice (two
        // identical `COPY`s) would name one directory twice, which overlayfs refuses. Keeping
        // only the topmost occurrence is exact: everything the lower copy provides, the upper
        // copy provides again above it.
        let mut layers: Vec<&LayerRecord> = Vec::with_capacity(rec.layers.len());
        for (i, l) in rec.layers.iter().enumerate() {
            if !rec.layers[i + 1..]
                .iter()
                .any(|later| later.diff_id == l.diff_id)
            {
                layers.push(l);
            }
        }
        Ok(Image {
            id: rec.id.clone(),
            names: rec.names.clone(),
            repo_digests: rec.repo_digests.clone(),
            layers: layers
                .iter()
                .map(|l| self.layer_path(&l.diff_id))
                .collect::<Result<_, _>>()?,
            config: rec.config.clone(),
            size: layers.iter().map(|l| l.size).sum(),
        })
    }

    fn find<'a>(index: &'a Index, reference: &str) -> Result<Option<&'a ImageRecord>, ImageError> {
        if let Some(hex) = reference.strip_prefix("sha256:") {
            if !is_hex64(hex) {
                return Err(ImageError::InvalidDigest(reference.to_string()));
            }
            return Ok(index.images.get(reference));
        }
        if is_hex64(reference) {
            return Ok(index.images.get(&format!("sha256:{reference}")));
        }
        let r = parse_normalized(reference)?;
        if let Some(digest) = &r.digest {
            let want = format!("{}@{digest}", r.repository);
            return Ok(index
                .images
                .values()
                .find(|rec| rec.repo_digests.contains(&want)));
        }
        let name = r.to_string();
        Ok(index.images.values().find(|rec| rec.names.contains(&name)))
    }

    /// Looks an image up by name (normalized), by `sha256:<id>`, or by
    /// `name@sha256:<manifest digest>`.
    pub fn get(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        let index = self.read_index()?;
        Self::find(&index, reference)?
            .map(|rec| self.to_image(rec))
            .transpose()
    }

    /// All images, unnamed ones included, ordered by id.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let index = self.read_index()?;
        index
            .images
            .values()
            .map(|rec| self.to_image(rec))
            .collect()
    }

    /// Records that a container is being started from image `id` now; image garbage
    /// collection removes least recently used images first.
    pub fn mark_used(&self, id: &str) {
        let id = if id.starts_with("sha256:") {
            id.to_string()
        } else {
            format!("sha256:{id}")
        };
        self.inner.used.lock().insert(id, now_ms());
    }

    /// Removes a name, or a whole image when given an id or a digest reference. The image's
    /// blobs and layers go once no name references it, except those another image shares.
    /// Removing something that does not exist succeeds, as CRI's RemoveImage requires.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let guard = self.lock()?;
        let mut index = self.read_index()?;
        let Some(rec) = Self::find(&index, reference)?.cloned() else {
            return Ok(());
        };
        let by_name = !reference.starts_with("sha256:")
            && !is_hex64(reference)
            && parse_normalized(reference)?.digest.is_none();
        let remove_whole = if by_name {
            let name = parse_normalized(reference)?.to_string();
            let left = match index.images.get_mut(&rec.id) {
                Some(r) => {
                    r.names.retain(|n| *n != name);
                    // Repo digests of a repository no name refers to any more go with it.
                    let repos: HashSet<String> = r
                        .names
                        .iter()
                        .filter_map(|n| parse_normalized(n).ok().map(|p| p.repository))
                        .collect();
                    r.repo_digests.retain(|d| {
                        d.split_once('@')
                            .is_some_and(|(repo, _)| repos.contains(repo))
                    });
                    r.names.len()
                }
                None => 0,
            };
            left == 0
        } else {
            true
        };
        if remove_whole {
            index.images.remove(&rec.id);
        }
        self.write_index(&guard, &mut index)?;
        self.sweep(&guard)
    }

    /// Bytes used by blobs, unpacked layers and the index.
    pub fn disk_usage(&self) -> Result<u64, ImageError> {
        let root = &self.inner.root;
        let blobs_dir = root.join("blobs/sha256");
        let mut total = fs::metadata(self.index_path()).map_or(0, |m| m.len());
        for e in fs::read_dir(&blobs_dir).at(&blobs_dir)?.flatten() {
            total += e.metadata().map_or(0, |m| m.len());
        }
        total += unpack::dir_size(&root.join("layers"));
        Ok(total)
    }

    /// The kubelet's image garbage collection: when usage exceeds `high_bytes`, remove
    /// images not in `in_use` (ids), least recently used first, until usage is at most
    /// `low_bytes`. Returns the removed ids. Falling short is logged, not an error: the
    /// caller cannot free more either.
    pub fn garbage_collect(
        &self,
        in_use: &HashSet<String>,
        high_bytes: u64,
        low_bytes: u64,
    ) -> Result<Vec<String>, ImageError> {
        let guard = self.lock()?;
        let usage = self.disk_usage()?;
        if usage <= high_bytes {
            return Ok(Vec::new());
        }
        let to_free = usage.saturating_sub(low_bytes);
        let mut index = self.read_index()?;
        let used = self.inner.used.lock().clone();
        let last_used =
            |rec: &ImageRecord| used.get(&rec.id).copied().unwrap_or(0).max(rec.last_used);
        let in_use: HashSet<String> = in_use
            .iter()
            .map(|id| {
                if id.starts_with("sha256:") {
                    id.clone()
                } else {
                    format!("sha256:{id}")
                }
            })
            .collect();
        let mut candidates: Vec<(u64, String)> = index
            .images
            .values()
            .filter(|r| !in_use.contains(&r.id))
            .map(|r| (last_used(r), r.id.clone()))
            .collect();
        candidates.sort();
        let mut freed = 0u64;
        let mut removed = Vec::new();
        for (_, id) in candidates {
            if freed >= to_free {
                break;
            }
            let Some(rec) = index.images.remove(&id) else {
                continue;
            };
            freed += self.exclusive_bytes(&index, &rec);
            tracing::info!(image = %id, names = ?rec.names, "image garbage collection removes image");
            removed.push(id);
        }
        if freed < to_free {
            tracing::warn!(
                usage,
                to_free,
                freed,
                "image garbage collection could not free enough space"
            );
        }
        if !removed.is_empty() {
            self.write_index(&guard, &mut index)?;
            self.sweep(&guard)?;
        }
        Ok(removed)
    }

    /// Bytes that removing `rec` frees, given the images left in `index`.
    fn exclusive_bytes(&self, index: &Index, rec: &ImageRecord) -> u64 {
        let mut shared_layers = HashSet::new();
        let mut shared_blobs = HashSet::new();
        for other in index.images.values() {
            shared_blobs.insert(other.id.as_str());
            shared_blobs.insert(other.manifest_digest.as_str());
            for l in &other.layers {
                shared_layers.insert(l.diff_id.as_str());
                shared_blobs.insert(l.blob.as_str());
            }
        }
        let blob_len = |d: &str| {
            self.blob_path(d)
                .ok()
                .and_then(|p| fs::metadata(p).ok())
                .map_or(0, |m| m.len())
        };
        let mut total = 0;
        for l in &rec.layers {
            if !shared_layers.contains(l.diff_id.as_str()) {
                total += l.size;
            }
            if !shared_blobs.contains(l.blob.as_str()) {
                total += blob_len(&l.blob);
            }
        }
        for d in [&rec.id, &rec.manifest_digest] {
            if !shared_blobs.contains(d.as_str()) {
                total += blob_len(d);
            }
        }
        total
    }
}
