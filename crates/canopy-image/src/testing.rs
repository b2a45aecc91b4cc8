//! Fixtures for Canopy's own tests: real, runnable OCI archives built from the host's static
//! busybox, plus builders for hand-made (including deliberately malicious) layers and archives.
//! Deterministic: the same inputs always give the same image id.
//!
//! Not for production use; it is public so that the agent's and runtime's tests can share it.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::archive::{MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, host_arch};
use crate::{ImageConfig, ImageError, normalize};

/// Where Debian's `busybox-static` installs the binary.
const BUSYBOX_CANDIDATES: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];
const FIXED_MTIME: u64 = 1_700_000_000;
/// The PATH busybox images conventionally carry.
pub const DEFAULT_PATH_ENV: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";

/// One entry of a hand-made layer tar.
#[derive(Clone, Debug)]
pub enum TestEntry {
    Dir(String, u32),
    File(String, Vec<u8>, u32),
    Symlink(String, String),
    HardLink(String, String),
    /// A regular file whose name is written verbatim into the tar header, bypassing the tar
    /// crate's own checks: how a malicious archive carries `../x` or `/x`.
    RawFile(String, Vec<u8>),
}

/// Compression of the layer blobs an archive builder writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

fn fixture_err(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::io(what, std::io::Error::other(e.to_string()))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(FIXED_MTIME);
    h.set_size(size);
    h
}

/// Builds an uncompressed layer tar from `entries`, in order.
pub fn layer_tar(entries: &[TestEntry]) -> Result<Vec<u8>, ImageError> {
    let mut b = tar::Builder::new(Vec::new());
    let err = |e: std::io::Error| fixture_err("layer tar", e);
    for e in entries {
        match e {
            TestEntry::Dir(path, mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, path, std::io::empty()).map_err(err)?;
            }
            TestEntry::File(path, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice()).map_err(err)?;
            }
            TestEntry::Symlink(path, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target).map_err(err)?;
            }
            TestEntry::HardLink(path, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, path, target).map_err(err)?;
            }
            TestEntry::RawFile(path, data) => {
                let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
                let name = &mut h.as_old_mut().name;
                let bytes = path.as_bytes();
                if bytes.len() > name.len() {
                    return Err(fixture_err("layer tar", "raw path too long"));
                }
                name.fill(0);
                name[..bytes.len()].copy_from_slice(bytes);
                h.set_cksum();
                b.append(&h, data.as_slice()).map_err(err)?;
            }
        }
    }
    b.into_inner().map_err(err)
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn compress(tar: &[u8], c: LayerCompression) -> Result<(Vec<u8>, &'static str), ImageError> {
    Ok(match c {
        LayerCompression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        LayerCompression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(tar).map_err(|e| fixture_err("gzip", e))?;
            (
                enc.finish().map_err(|e| fixture_err("gzip", e))?,
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        LayerCompression::Zstd => (
            zstd::encode_all(tar, 3).map_err(|e| fixture_err("zstd", e))?,
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    })
}

/// The image config JSON for `layers` (uncompressed tars) and `config`.
pub fn config_json(layers: &[Vec<u8>], config: &ImageConfig) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    let mut c = serde_json::Map::new();
    let list = |v: &[String]| serde_json::Value::from(v.to_vec());
    if !config.entrypoint.is_empty() {
        c.insert("Entrypoint".into(), list(&config.entrypoint));
    }
    if !config.cmd.is_empty() {
        c.insert("Cmd".into(), list(&config.cmd));
    }
    if !config.env.is_empty() {
        c.insert("Env".into(), list(&config.env));
    }
    if let Some(w) = &config.working_dir {
        c.insert("WorkingDir".into(), w.clone().into());
    }
    if let Some(u) = &config.user {
        c.insert("User".into(), u.clone().into());
    }
    if let Some(s) = &config.stop_signal {
        c.insert("StopSignal".into(), s.clone().into());
    }
    if !config.exposed_ports.is_empty() {
        let ports: serde_json::Map<String, serde_json::Value> = config
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), serde_json::json!({})))
            .collect();
        c.insert("ExposedPorts".into(), ports.into());
    }
    let v = serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

fn append_file(b: &mut tar::Builder<fs::File>, path: &str, data: &[u8]) -> Result<(), ImageError> {
    let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
    b.append_data(&mut h, path, data)
        .map_err(|e| fixture_err("archive", e))
}

/// Writes an OCI image-layout tar at `dest` with one image made of `layers` (uncompressed
/// tars, base first), named `name` (normalized, in both the OCI `ref.name` and containerd's
/// name annotation) if given.
pub fn oci_archive(
    dest: &Path,
    name: Option<&str>,
    layers: &[Vec<u8>],
    compression: LayerCompression,
    config: &ImageConfig,
) -> Result<(), ImageError> {
    let config_bytes = config_json(layers, config);
    let mut blobs: Vec<Vec<u8>> = vec![config_bytes.clone()];
    let mut layer_descs = Vec::new();
    for l in layers {
        let (blob, media_type) = compress(l, compression)?;
        layer_descs.push(serde_json::json!({
            "mediaType": media_type, "digest": sha256_digest(&blob), "size": blob.len()
        }));
        blobs.push(blob);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": sha256_digest(&config_bytes), "size": config_bytes.len()},
        "layers": layer_descs,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| fixture_err("manifest", e))?;
    let mut desc = serde_json::json!({
        "mediaType": MEDIA_OCI_MANIFEST,
        "digest": sha256_digest(&manifest_bytes),
        "size": manifest_bytes.len(),
        "platform": {"architecture": host_arch(), "os": "linux"},
    });
    if let Some(name) = name {
        let n = normalize(name)?;
        desc["annotations"] = serde_json::json!({
            "org.opencontainers.image.ref.name": n,
            "io.containerd.image.name": n,
        });
    }
    blobs.push(manifest_bytes);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [desc],
    });
    let file = fs::File::create(dest).map_err(|e| ImageError::io(dest, e))?;
    let mut b = tar::Builder::new(file);
    append_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    append_file(
        &mut b,
        "index.json",
        &serde_json::to_vec(&index).map_err(|e| fixture_err("index", e))?,
    )?;
    for blob in &blobs {
        let d = sha256_digest(blob);
        append_file(&mut b, &format!("blobs/sha256/{}", &d[7..]), blob)?;
    }
    b.into_inner()
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::io(dest, e))
}

/// Writes a legacy `docker save` tar: `manifest.json`, `<config hex>.json`, and
/// `<n>/layer.tar` per layer (uncompressed, as Docker writes them).
pub fn docker_save_archive(
    dest: &Path,
    repo_tags: &[&str],
    layers: &[Vec<u8>],
    config: &ImageConfig,
) -> Result<(), ImageError> {
    let config_bytes = config_json(layers, config);
    let config_name = format!("{}.json", &sha256_digest(&config_bytes)[7..]);
    let layer_names: Vec<String> = (0..layers.len())
        .map(|i| format!("layer{i}/layer.tar"))
        .collect();
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": layer_names,
    }]);
    let file = fs::File::create(dest).map_err(|e| ImageError::io(dest, e))?;
    let mut b = tar::Builder::new(file);
    append_file(&mut b, &config_name, &config_bytes)?;
    for (name, layer) in layer_names.iter().zip(layers) {
        append_file(&mut b, name, layer)?;
    }
    append_file(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).map_err(|e| fixture_err("manifest", e))?,
    )?;
    b.into_inner()
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::io(dest, e))
}

/// The busybox root filesystem as layer entries: `/bin/busybox`, a symlink for every applet
/// (`busybox --list-full`), `/etc/passwd` and `/etc/group` with root and nobody (65534),
/// `/tmp` (1777) and empty `/proc`, `/sys`, `/dev`.
pub fn busybox_entries() -> Result<Vec<TestEntry>, ImageError> {
    let bin = BUSYBOX_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| fixture_err("busybox", "no /bin/busybox: install busybox-static"))?;
    let binary = fs::read(bin).map_err(|e| ImageError::io(bin, e))?;
    let out = Command::new(bin)
        .arg("--list-full")
        .output()
        .map_err(|e| ImageError::io(bin, e))?;
    if !out.status.success() {
        return Err(fixture_err(
            "busybox --list-full",
            format!("{}", out.status),
        ));
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != "bin/busybox" && !l.contains(".."))
        .collect();
    applets.sort();
    applets.dedup();

    let mut entries = vec![];
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "var", "home",
    ] {
        entries.push(TestEntry::Dir(d.into(), 0o755));
    }
    entries.push(TestEntry::Dir("root".into(), 0o700));
    entries.push(TestEntry::Dir("tmp".into(), 0o1777));
    entries.push(TestEntry::File("bin/busybox".into(), binary, 0o755));
    for a in applets {
        entries.push(TestEntry::Symlink(a, "/bin/busybox".into()));
    }
    entries.push(TestEntry::File(
        "etc/passwd".into(),
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .to_vec(),
        0o644,
    ));
    entries.push(TestEntry::File(
        "etc/group".into(),
        b"root:x:0:\nnobody:x:65534:\n".to_vec(),
        0o644,
    ));
    Ok(entries)
}

/// The config of the busybox fixture image.
pub fn busybox_config() -> ImageConfig {
    ImageConfig {
        cmd: vec!["sh".into()],
        env: vec![DEFAULT_PATH_ENV.into()],
        ..ImageConfig::default()
    }
}

/// Writes a runnable busybox OCI image-layout tar (one gzip layer, `Cmd ["sh"]`) named `name`.
pub fn busybox_oci_archive(dest: &Path, name: &str) -> Result<(), ImageError> {
    let layer = layer_tar(&busybox_entries()?)?;
    oci_archive(
        dest,
        Some(name),
        &[layer],
        LayerCompression::Gzip,
        &busybox_config(),
    )
}
