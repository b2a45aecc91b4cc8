//! Importing image archives: OCI image layouts (`oci-layout`, `index.json`, `blobs/`) and the
//! legacy `docker save` format (`manifest.json` with `Config`, `RepoTags`, `Layers`).
//!
//! The archive is streamed once: every file except the small top-level metadata goes straight
//! into `blobs/` under its computed digest (and a file stored as `blobs/sha256/<hex>` must hash
//! to `<hex>`). Nothing becomes visible until every image of the archive has been verified and
//! unpacked; blobs written by a failed import are swept.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path};

use serde::Deserialize;

use crate::reference::parse_normalized;
use crate::store::{PendingImage, WriteGuard, digest_hex};
use crate::unpack::{Compression, detect_compression};
use crate::{Image, ImageError, ImageStore};

pub(crate) const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const MEDIA_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const MEDIA_DOCKER_MANIFEST: &str =
    "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
const METADATA_LIMIT: u64 = 16 << 20;
const MANIFEST_LIMIT: u64 = 8 << 20;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

/// An index or a manifest: told apart by media type, or by shape when that is absent.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ManifestOrIndex {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

impl ManifestOrIndex {
    pub(crate) fn is_index(&self) -> bool {
        match self.media_type.as_deref() {
            Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST) => true,
            Some(MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST) => false,
            _ => self.manifests.is_some() && self.config.is_none(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// The `GOARCH` name of the host, which is what image platforms use.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Picks the manifest for linux/<host arch> from an index; attestation manifests
/// (`unknown/unknown`) never match.
pub(crate) fn select_platform<'a>(
    manifests: &'a [Descriptor],
    index_digest: &str,
) -> Result<&'a Descriptor, ImageError> {
    let arch = host_arch();
    if let Some(d) = manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    }) {
        return Ok(d);
    }
    // A single-entry index without platform information (as some tools write) is unambiguous.
    if let [only] = manifests
        && only.platform.is_none()
    {
        return Ok(only);
    }
    Err(ImageError::NoMatchingPlatform {
        digest: index_digest.to_string(),
        platform: format!("linux/{arch}"),
    })
}

/// Where each archive path ended up.
#[derive(Default)]
struct Staged {
    /// Small top-level metadata files, kept in memory.
    metadata: HashMap<String, Vec<u8>>,
    /// Archive path → blob digest.
    files: HashMap<String, String>,
    /// Archive path → archive path it links to (symlinks and hard links).
    links: HashMap<String, String>,
}

impl Staged {
    fn resolve(&self, path: &str) -> Option<&String> {
        let mut p = normalize_archive_path(path)?;
        for _ in 0..16 {
            if let Some(d) = self.files.get(&p) {
                return Some(d);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }
}

/// Archive paths relative to the archive root, `..` resolved lexically; `None` if it escapes.
fn normalize_archive_path(p: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    Some(parts.join("/"))
}

fn bad(archive: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::BadArchive {
        archive: archive.to_path_buf(),
        reason: reason.into(),
    }
}

impl ImageStore {
    /// Imports every image in an OCI image-layout tar or a `docker save` tar (optionally
    /// gzip- or zstd-compressed). All images of the archive become visible together, or none.
    pub fn import_archive(&self, archive: &Path) -> Result<Vec<Image>, ImageError> {
        let guard = self.lock()?;
        let result = self.import_locked(&guard, archive);
        // Blobs of a failed import, and archive files no image uses, are not kept.
        let swept = self.sweep(&guard);
        let images = result?;
        swept?;
        Ok(images)
    }

    fn import_locked(
        &self,
        guard: &WriteGuard<'_>,
        archive: &Path,
    ) -> Result<Vec<Image>, ImageError> {
        let staged = self.stage_archive(guard, archive)?;
        let pending = if staged.metadata.contains_key("index.json") {
            self.oci_layout_images(archive, &staged)?
        } else if let Some(manifest) = staged.metadata.get("manifest.json") {
            self.docker_save_images(guard, archive, &staged, manifest)?
        } else {
            return Err(bad(
                archive,
                "neither index.json (OCI layout) nor manifest.json (docker save) found",
            ));
        };
        if pending.is_empty() {
            return Err(bad(archive, "archive contains no image"));
        }
        self.commit(guard, pending)
    }

    fn stage_archive(&self, guard: &WriteGuard<'_>, archive: &Path) -> Result<Staged, ImageError> {
        let compression = detect_compression(archive)?;
        let file = BufReader::new(File::open(archive).map_err(|e| ImageError::io(archive, e))?);
        let reader: Box<dyn Read> = match compression {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(file).map_err(|e| ImageError::io(archive, e))?,
            ),
        };
        let mut tar = tar::Archive::new(reader);
        let mut staged = Staged::default();
        let entries = tar
            .entries()
            .map_err(|e| bad(archive, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(archive, format!("reading: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| bad(archive, format!("entry path: {e}")))?
                .to_string_lossy()
                .into_owned();
            let Some(path) = normalize_archive_path(&raw) else {
                return Err(bad(archive, format!("entry {raw:?} escapes the archive")));
            };
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let Some(target) = entry
                    .link_name()
                    .map_err(|e| bad(archive, format!("link {raw}: {e}")))?
                else {
                    continue;
                };
                let target = target.to_string_lossy().into_owned();
                let joined = if kind.is_symlink() {
                    let dir = Path::new(&path).parent().unwrap_or(Path::new(""));
                    dir.join(&target).to_string_lossy().into_owned()
                } else {
                    target
                };
                if let Some(t) = normalize_archive_path(&joined) {
                    staged.links.insert(path, t);
                }
                continue;
            }
            if !kind.is_file() && kind != tar::EntryType::Continuous {
                continue;
            }
            if matches!(
                path.as_str(),
                "index.json" | "manifest.json" | "oci-layout" | "repositories"
            ) {
                if entry.size() > METADATA_LIMIT {
                    return Err(bad(archive, format!("{path} is {} bytes", entry.size())));
                }
                let mut buf = Vec::new();
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| bad(archive, format!("reading {path}: {e}")))?;
                staged.metadata.insert(path, buf);
                continue;
            }
            // `blobs/sha256/<hex>` is a claim about the content: check it.
            let expected = path
                .strip_prefix("blobs/")
                .and_then(|rest| rest.split_once('/'))
                .map(|(algo, hex)| format!("{algo}:{hex}"));
            if let Some(e) = &expected
                && digest_hex(e).is_err()
            {
                return Err(bad(
                    archive,
                    format!("unsupported blob {path} (only sha256 blobs are supported)"),
                ));
            }
            let what = format!("{} in {}", path, archive.display());
            let (digest, _) = self.ingest_blob(guard, &mut entry, expected.as_deref(), &what)?;
            staged.files.insert(path, digest);
        }
        Ok(staged)
    }

    fn oci_layout_images(
        &self,
        archive: &Path,
        staged: &Staged,
    ) -> Result<Vec<PendingImage>, ImageError> {
        let index_bytes = staged
            .metadata
            .get("index.json")
            .ok_or_else(|| bad(archive, "index.json missing"))?;
        let index: ManifestOrIndex = serde_json::from_slice(index_bytes)
            .map_err(|e| ImageError::json(format!("index.json in {}", archive.display()), e))?;
        let mut pending = Vec::new();
        for top in index.manifests.unwrap_or_default() {
            let annotations = top.annotations.clone().unwrap_or_default();
            let name = match annotations.get(ANNOTATION_CONTAINERD_NAME) {
                Some(n) => Some(n),
                // A bare tag (`latest`, as docker writes next to the containerd annotation)
                // names no repository, so without a full name the image stays unnamed.
                None => match annotations.get(ANNOTATION_REF_NAME) {
                    Some(n) if n.contains(['/', ':']) => Some(n),
                    Some(n) => {
                        tracing::warn!(archive = %archive.display(), ref_name = %n, "image is named only by a tag; importing it unnamed");
                        None
                    }
                    None => None,
                },
            };
            let names = name
                .map(|n| parse_normalized(n))
                .transpose()?
                .into_iter()
                .collect::<Vec<_>>();
            let repo_digests = names
                .iter()
                .map(|n| format!("{}@{}", n.repository, top.digest))
                .collect();
            let (manifest_digest, manifest) = self.resolve_manifest(&top, 0)?;
            let config = manifest
                .config
                .ok_or_else(|| bad(archive, format!("manifest {manifest_digest} has no config")))?;
            digest_hex(&config.digest)?;
            let layer_blobs = manifest
                .layers
                .unwrap_or_default()
                .into_iter()
                .map(|l| {
                    digest_hex(&l.digest)?;
                    if !self.blob_path(&l.digest)?.exists() {
                        return Err(bad(archive, format!("layer blob {} missing", l.digest)));
                    }
                    Ok(l.digest)
                })
                .collect::<Result<_, ImageError>>()?;
            if !self.blob_path(&config.digest)?.exists() {
                return Err(bad(
                    archive,
                    format!("config blob {} missing", config.digest),
                ));
            }
            pending.push(PendingImage {
                names: names.iter().map(ToString::to_string).collect(),
                repo_digests,
                manifest_digest,
                config_digest: config.digest,
                layer_blobs,
            });
        }
        Ok(pending)
    }

    /// Follows index → manifest (choosing our platform) down to an image manifest.
    fn resolve_manifest(
        &self,
        desc: &Descriptor,
        depth: u32,
    ) -> Result<(String, ManifestOrIndex), ImageError> {
        if depth > 4 {
            return Err(ImageError::UnsupportedMediaType(format!(
                "image index nested too deeply at {}",
                desc.digest
            )));
        }
        let bytes = self.read_blob(&desc.digest, MANIFEST_LIMIT)?;
        if desc.size > 0 && usize::try_from(desc.size).ok() != Some(bytes.len()) {
            return Err(ImageError::DigestMismatch {
                what: format!("size of {}", desc.digest),
                expected: desc.size.to_string(),
                actual: bytes.len().to_string(),
            });
        }
        let m: ManifestOrIndex = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::json(format!("manifest {}", desc.digest), e))?;
        if m.is_index() {
            let manifests = m.manifests.unwrap_or_default();
            let chosen = select_platform(&manifests, &desc.digest)?.clone();
            return self.resolve_manifest(&chosen, depth + 1);
        }
        Ok((desc.digest.clone(), m))
    }

    fn docker_save_images(
        &self,
        guard: &WriteGuard<'_>,
        archive: &Path,
        staged: &Staged,
        manifest: &[u8],
    ) -> Result<Vec<PendingImage>, ImageError> {
        let entries: Vec<DockerSaveEntry> = serde_json::from_slice(manifest)
            .map_err(|e| ImageError::json(format!("manifest.json in {}", archive.display()), e))?;
        let mut pending = Vec::new();
        for e in entries {
            let config_digest = staged
                .resolve(&e.config)
                .ok_or_else(|| bad(archive, format!("config {} missing", e.config)))?
                .clone();
            let mut layer_blobs = Vec::new();
            let mut layer_descs = Vec::new();
            for l in &e.layers {
                let digest = staged
                    .resolve(l)
                    .ok_or_else(|| bad(archive, format!("layer {l} missing")))?
                    .clone();
                let path = self.blob_path(&digest)?;
                let media_type = match detect_compression(&path)? {
                    Compression::None => "application/vnd.oci.image.layer.v1.tar",
                    Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                    Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
                };
                let size = std::fs::metadata(&path)
                    .map_err(|e| ImageError::io(&path, e))?
                    .len();
                layer_descs.push(
                    serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}),
                );
                layer_blobs.push(digest);
            }
            // docker save carries no manifest; synthesize the OCI one so every image in the
            // store has the same shape (and could be pushed as is).
            let config_path = self.blob_path(&config_digest)?;
            let config_size = std::fs::metadata(&config_path)
                .map_err(|e| ImageError::io(&config_path, e))?
                .len();
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_MANIFEST,
                "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": layer_descs,
            });
            let bytes = serde_json::to_vec(&manifest)
                .map_err(|e| ImageError::json("synthesized manifest", e))?;
            let (manifest_digest, _) =
                self.ingest_blob(guard, &mut bytes.as_slice(), None, "synthesized manifest")?;
            let names = e
                .repo_tags
                .unwrap_or_default()
                .iter()
                .map(|t| parse_normalized(t).map(|r| r.to_string()))
                .collect::<Result<_, _>>()?;
            pending.push(PendingImage {
                names,
                // `docker load` records no repo digest either: the manifest is ours, no
                // registry has ever served it.
                repo_digests: Vec::new(),
                manifest_digest,
                config_digest,
                layer_blobs,
            });
        }
        Ok(pending)
    }
}
