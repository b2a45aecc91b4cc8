//! Pulling images from a registry with `oci-client`.
//!
//! Everything is downloaded into a staging directory under `tmp/` without holding the store
//! lock (pulls are slow, imports and removals must not wait on the network); the lock is taken
//! only to move verified blobs in, unpack and write the index, on a blocking thread.

use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::archive::{
    MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, ManifestOrIndex,
    select_platform,
};
use crate::reference::parse_normalized;
use crate::store::{PendingImage, digest_hex};
use crate::{Image, ImageConfig, ImageError, ImageStore};

/// Credentials for a registry. Bearer-token registries (Docker Hub, GHCR, …) are handled by the
/// client's token exchange starting from either of these.
#[derive(Clone, Default)]
pub enum RegistryAuth {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryAuth::Anonymous => f.write_str("Anonymous"),
            RegistryAuth::Basic { username, .. } => write!(f, "Basic({username}, ****)"),
        }
    }
}

impl RegistryAuth {
    fn to_client(&self) -> oci_client::secrets::RegistryAuth {
        match self {
            RegistryAuth::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
            RegistryAuth::Basic { username, password } => {
                oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
            }
        }
    }
}

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Registries (`host` or `host:port`, as in the image name) spoken to over plain HTTP.
    /// Loopback registries (`localhost`, `127.0.0.0/8`, `[::1]`) always are, as Docker and
    /// containerd treat them as insecure by default.
    pub insecure_registries: Vec<String>,
}

impl PullOptions {
    fn is_insecure(&self, registry: &str) -> bool {
        if self.insecure_registries.iter().any(|r| r == registry) {
            return true;
        }
        let host = if let Some(rest) = registry.strip_prefix('[') {
            rest.split_once(']').map_or(rest, |(h, _)| h)
        } else {
            registry.split(':').next().unwrap_or(registry)
        };
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

const ACCEPTED: &[&str] = &[
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
];

fn registry_error(reference: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Registry {
        reference: reference.to_string(),
        message: e.to_string(),
    }
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl ImageStore {
    /// Pulls `reference` with default options (HTTPS except for loopback registries).
    pub async fn pull(&self, reference: &str, auth: &RegistryAuth) -> Result<Image, ImageError> {
        self.pull_with(reference, auth, &PullOptions::default())
            .await
    }

    /// Pulls `reference` (resolving a multi-arch index to linux/<host arch>), verifying every
    /// digest, and records it under its normalized name and repo digest.
    pub async fn pull_with(
        &self,
        reference: &str,
        auth: &RegistryAuth,
        options: &PullOptions,
    ) -> Result<Image, ImageError> {
        // The registry client's TLS takes the process's default crypto provider; Canopy
        // builds rustls with ring only, so install it unless the process already has one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let parsed = parse_normalized(reference)?;
        let normalized = parsed.to_string();
        let oref: oci_client::Reference = normalized
            .parse()
            .map_err(|e| registry_error(&normalized, e))?;
        let mut insecure = options.insecure_registries.clone();
        if options.is_insecure(parsed.domain()) {
            insecure.push(parsed.domain().to_string());
        }
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            ..Default::default()
        });
        let auth = auth.to_client();

        let (bytes, _) = client
            .pull_manifest_raw(&oref, &auth, ACCEPTED)
            .await
            .map_err(|e| registry_error(&normalized, e))?;
        let top_digest = sha256_of(&bytes);
        if let Some(want) = &parsed.digest
            && *want != top_digest
        {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {normalized}"),
                expected: want.clone(),
                actual: top_digest,
            });
        }
        let mut manifest_bytes = bytes.to_vec();
        let mut manifest_digest = top_digest.clone();
        let mut manifest: ManifestOrIndex = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| ImageError::json(format!("manifest of {normalized}"), e))?;
        if manifest.is_index() {
            let manifests = manifest.manifests.take().unwrap_or_default();
            let chosen = select_platform(&manifests, &top_digest)?.digest.clone();
            digest_hex(&chosen)?;
            let by_digest = oref.clone_with_digest(chosen.clone());
            let (bytes, _) = client
                .pull_manifest_raw(&by_digest, &auth, ACCEPTED)
                .await
                .map_err(|e| registry_error(&normalized, e))?;
            let actual = sha256_of(&bytes);
            if actual != chosen {
                return Err(ImageError::DigestMismatch {
                    what: format!("platform manifest of {normalized}"),
                    expected: chosen,
                    actual,
                });
            }
            manifest_bytes = bytes.to_vec();
            manifest_digest = actual;
            manifest = serde_json::from_slice(&manifest_bytes)
                .map_err(|e| ImageError::json(format!("manifest {manifest_digest}"), e))?;
            if manifest.is_index() {
                return Err(ImageError::UnsupportedMediaType(format!(
                    "nested image index {manifest_digest}"
                )));
            }
        }
        let config_desc = manifest.config.clone().ok_or_else(|| {
            registry_error(
                &normalized,
                format!("manifest {manifest_digest} has no config"),
            )
        })?;
        digest_hex(&config_desc.digest)?;
        let layers = manifest.layers.clone().unwrap_or_default();

        let tmp = self.tmp_dir();
        let staging = tempfile::Builder::new()
            .prefix("pull-")
            .tempdir_in(&tmp)
            .map_err(|e| ImageError::io(&tmp, e))?;

        let mut config_bytes = Vec::new();
        client
            .pull_blob(&oref, config_desc.digest.as_str(), &mut config_bytes)
            .await
            .map_err(|e| registry_error(&normalized, e))?;
        let actual = sha256_of(&config_bytes);
        if actual != config_desc.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("config of {normalized}"),
                expected: config_desc.digest,
                actual,
            });
        }
        let (_, diff_ids) = ImageConfig::from_json(&config_bytes, &format!("config {actual}"))?;

        let mut staged_files: Vec<(PathBuf, String)> = vec![
            (
                write_staged(staging.path(), "manifest", &manifest_bytes).await?,
                manifest_digest.clone(),
            ),
            (
                write_staged(staging.path(), "config", &config_bytes).await?,
                config_desc.digest.clone(),
            ),
        ];
        for (i, layer) in layers.iter().enumerate() {
            digest_hex(&layer.digest)?;
            // Layers already unpacked (shared with another image) are not fetched again.
            let have_layer = diff_ids
                .get(i)
                .and_then(|d| digest_hex(d).ok())
                .is_some_and(|hex| self.root().join("layers").join(hex).is_dir());
            if have_layer || self.blob_path(&layer.digest)?.exists() {
                continue;
            }
            let path = staging.path().join(format!("layer-{i}"));
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| ImageError::io(&path, e))?;
            client
                .pull_blob(&oref, layer.digest.as_str(), &mut file)
                .await
                .map_err(|e| registry_error(&normalized, e))?;
            file.flush().await.map_err(|e| ImageError::io(&path, e))?;
            staged_files.push((path, layer.digest.clone()));
        }

        let pending = PendingImage {
            names: if parsed.tag.is_some() && parsed.digest.is_none() {
                vec![normalized.clone()]
            } else {
                Vec::new()
            },
            repo_digests: vec![format!("{}@{}", parsed.repository, top_digest)],
            manifest_digest,
            config_digest: config_desc.digest.clone(),
            layer_blobs: layers.into_iter().map(|l| l.digest).collect(),
        };
        let store = self.clone();
        let images = tokio::task::spawn_blocking(move || {
            let guard = store.lock()?;
            let result = (|| {
                for (path, digest) in &staged_files {
                    let mut f = std::fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
                    store.ingest_blob(
                        &guard,
                        &mut f,
                        Some(digest),
                        &format!("pulled blob {digest}"),
                    )?;
                }
                store.commit(&guard, vec![pending])
            })();
            let swept = store.sweep(&guard);
            drop(staging);
            let images = result?;
            swept?;
            Ok::<_, ImageError>(images)
        })
        .await
        .map_err(|e| registry_error(&normalized, format!("commit task failed: {e}")))??;
        images
            .into_iter()
            .next()
            .ok_or_else(|| registry_error(&normalized, "pulled image vanished"))
    }
}

async fn write_staged(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, ImageError> {
    let path = dir.join(name);
    tokio::fs::write(&path, bytes)
        .await
        .map_err(|e| ImageError::io(&path, e))?;
    Ok(path)
}
