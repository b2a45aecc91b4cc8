//! Layer unpacking into overlayfs lower directories.
//!
//! Layers come from archives and registries we do not trust, so the unpacker never lets an
//! entry land outside the layer directory: `..` components are refused, absolute paths are
//! taken relative to the layer root, and parent directories are walked with `lstat` so that a
//! symlink planted by an earlier entry is never followed (an entry whose parent is a symlink
//! is refused). Files are created with `O_EXCL`, which does not follow symlinks either.
//!
//! OCI whiteouts are converted to overlayfs' native form while unpacking: `.wh.<name>` becomes
//! a 0:0 character device `<name>`, and `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on
//! its directory.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, lutimes, makedev, mknod};
use nix::sys::time::TimeVal;
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::ImageError;
use crate::error::IoContext;

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// What unpacking a layer produced.
#[derive(Debug)]
pub(crate) struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar stream: the layer's diff id.
    pub diff_id: String,
    /// Bytes of regular file content written (hard links counted once).
    pub size: u64,
}

/// Compression of a layer blob, decided by its magic bytes (media types lie, and the legacy
/// `docker save` format has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn detect_compression(path: &Path) -> Result<Compression, ImageError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).at(path)?;
    let mut n = 0;
    while n < magic.len() {
        match f.read(&mut magic[n..]).at(path)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

/// Counts and hashes what the tar reader consumes, so the diff id is computed in the same pass.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the layer blob at `blob` into `dest` (an existing, empty directory).
/// `layer` names the layer in errors.
pub(crate) fn unpack_layer(blob: &Path, dest: &Path, layer: &str) -> Result<Unpacked, ImageError> {
    let compression = detect_compression(blob)?;
    let file = BufReader::new(File::open(blob).at(blob)?);
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file).at(blob)?),
    };
    let mut reader = HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
    };
    let size = {
        let mut archive = tar::Archive::new(&mut reader);
        let mut u = Unpacker {
            root: dest,
            layer,
            size: 0,
            dir_times: Vec::new(),
        };
        u.run(&mut archive)?;
        u.size
    };
    // The diff id covers the whole uncompressed stream, including the end-of-archive padding
    // the tar reader stops before.
    io::copy(&mut reader, &mut io::sink()).map_err(|e| bad(layer, format!("reading: {e}")))?;
    let diff_id = format!("sha256:{:x}", reader.hasher.finalize());
    Ok(Unpacked { diff_id, size })
}

/// Where a link entry points; a link without a target is a broken layer.
fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    layer: &str,
    kind: &str,
    raw_path: &Path,
) -> Result<PathBuf, ImageError> {
    entry
        .link_name()
        .map_err(|e| bad(layer, format!("link name: {e}")))?
        .map(|target| target.into_owned())
        .ok_or_else(|| {
            bad(
                layer,
                format!("{kind} {} without target", raw_path.display()),
            )
        })
}

fn bad(layer: &str, reason: impl Into<String>) -> ImageError {
    ImageError::BadLayer {
        layer: layer.to_string(),
        reason: reason.into(),
    }
}

fn unsafe_layer(layer: &str, reason: impl Into<String>) -> ImageError {
    ImageError::UnsafeLayer {
        layer: layer.to_string(),
        reason: reason.into(),
    }
}

/// Makes a tar path relative to the layer root. `None` is the root itself.
fn clean_path(layer: &str, p: &Path) -> Result<Option<PathBuf>, ImageError> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(unsafe_layer(
                    layer,
                    format!("entry {} contains '..'", p.display()),
                ));
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

struct Unpacker<'a> {
    root: &'a Path,
    layer: &'a str,
    size: u64,
    dir_times: Vec<(PathBuf, u64)>,
}

impl Unpacker<'_> {
    fn run<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), ImageError> {
        let layer = self.layer;
        let entries = archive
            .entries()
            .map_err(|e| bad(layer, format!("not a tar stream: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(layer, format!("reading entry: {e}")))?;
            self.entry(&mut entry)?;
        }
        // Directory mtimes last: creating children bumps them.
        for (path, mtime) in self.dir_times.iter().rev() {
            set_mtime(path, *mtime);
        }
        Ok(())
    }

    /// Walks `rel`'s parents below the root with `lstat`, creating missing directories and
    /// refusing anything that is not a real directory: that is what keeps a symlink planted by
    /// an earlier entry from redirecting a later one.
    fn ensure_dir(&self, rel: &Path, create: bool) -> Result<PathBuf, ImageError> {
        let mut cur = self.root.to_path_buf();
        for c in rel.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(unsafe_layer(
                        self.layer,
                        format!(
                            "{} is not a directory (a symlink?) but has entries below it",
                            rel_display(self.root, &cur)
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&cur).at(&cur)?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).at(&cur)?;
                }
                Err(e) => return Err(ImageError::io(&cur, e)),
            }
        }
        Ok(cur)
    }

    /// Resolves `rel` to a full path whose parents all exist as real directories.
    fn prepare(&self, rel: &Path) -> Result<PathBuf, ImageError> {
        let parent = self.ensure_dir(rel.parent().unwrap_or(Path::new("")), true)?;
        let name = rel
            .file_name()
            .ok_or_else(|| unsafe_layer(self.layer, format!("bad entry {}", rel.display())))?;
        Ok(parent.join(name))
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let layer = self.layer;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw_path = entry
            .path()
            .map_err(|e| bad(layer, format!("entry path: {e}")))?
            .into_owned();
        let Some(rel) = clean_path(layer, &raw_path)? else {
            // The layer root itself: only its metadata matters.
            if kind == EntryType::Directory {
                self.apply_metadata(entry, self.root.to_path_buf(), true)?;
            }
            return Ok(());
        };
        let name = rel
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();

        if name == WHITEOUT_OPAQUE {
            let dir = self.ensure_dir(rel.parent().unwrap_or(Path::new("")), true)?;
            xattr::set(&dir, OPAQUE_XATTR, b"y").map_err(|e| {
                ImageError::io(&dir, io::Error::other(format!("{OPAQUE_XATTR}: {e}")))
            })?;
            return Ok(());
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            // aufs bookkeeping (.wh..wh.plnk etc.): meaningless to overlayfs.
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(unsafe_layer(
                    layer,
                    format!("bad whiteout {}", raw_path.display()),
                ));
            }
            let target = self.prepare(&rel.with_file_name(hidden))?;
            clear(&target, false)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
                .map_err(|e| ImageError::io(&target, io::Error::from(e)))?;
            return Ok(());
        }

        let path = self.prepare(&rel)?;
        match kind {
            EntryType::Directory => {
                clear(&path, true)?;
                if fs::symlink_metadata(&path).is_err() {
                    fs::create_dir(&path).at(&path)?;
                }
                self.apply_metadata(entry, path, true)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                clear(&path, false)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .at(&path)?;
                let n = io::copy(entry, &mut f)
                    .map_err(|e| bad(layer, format!("{}: {e}", raw_path.display())))?;
                self.size += n;
                drop(f);
                self.apply_metadata(entry, path, false)?;
            }
            EntryType::Symlink => {
                let target = link_target(entry, layer, "symlink", &raw_path)?;
                clear(&path, false)?;
                // The target is stored verbatim: it is only ever resolved inside the container's
                // root, never by us.
                std::os::unix::fs::symlink(&target, &path).at(&path)?;
                self.apply_metadata(entry, path, false)?;
            }
            EntryType::Link => {
                let target = link_target(entry, layer, "hard link", &raw_path)?;
                let Some(target_rel) = clean_path(layer, &target)? else {
                    return Err(unsafe_layer(
                        layer,
                        format!("hard link {} to the root", raw_path.display()),
                    ));
                };
                let target_parent =
                    self.ensure_dir(target_rel.parent().unwrap_or(Path::new("")), false)?;
                let source = target_parent.join(target_rel.file_name().unwrap_or_default());
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.file_type().is_dir() => {
                        return Err(unsafe_layer(
                            layer,
                            format!("hard link {} to a directory", raw_path.display()),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(bad(
                            layer,
                            format!(
                                "hard link {} to missing {}: {e}",
                                raw_path.display(),
                                target.display()
                            ),
                        ));
                    }
                }
                if source == path {
                    return Ok(());
                }
                clear(&path, false)?;
                // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                fs::hard_link(&source, &path).at(&path)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                clear(&path, false)?;
                let header = entry.header();
                let mode = Mode::from_bits_truncate(header.mode().unwrap_or(0o600) & 0o7777);
                let result = if kind == EntryType::Fifo {
                    nix::unistd::mkfifo(&path, mode)
                } else {
                    let major = header.device_major().ok().flatten().unwrap_or(0);
                    let minor = header.device_minor().ok().flatten().unwrap_or(0);
                    let sflag = if kind == EntryType::Char {
                        SFlag::S_IFCHR
                    } else {
                        SFlag::S_IFBLK
                    };
                    mknod(&path, sflag, mode, makedev(major.into(), minor.into()))
                };
                match result {
                    Ok(()) => self.apply_metadata(entry, path, false)?,
                    Err(e) => {
                        // Unprivileged (e.g. in a user namespace): device nodes in images are
                        // decoration, the runtime populates /dev itself.
                        tracing::warn!(layer, entry = %raw_path.display(), error = %e, "skipping device node");
                    }
                }
            }
            other => {
                tracing::debug!(layer, entry = %raw_path.display(), kind = ?other, "skipping unsupported tar entry");
            }
        }
        Ok(())
    }

    fn apply_metadata<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: PathBuf,
        is_dir: bool,
    ) -> Result<(), ImageError> {
        let header = entry.header();
        let is_symlink = header.entry_type() == EntryType::Symlink;
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let mode = header.mode().unwrap_or(if is_dir { 0o755 } else { 0o644 });
        let mtime = header.mtime().unwrap_or(0);
        let (uid, gid) = (
            u32::try_from(uid).unwrap_or(0),
            u32::try_from(gid).unwrap_or(0),
        );
        if let Err(e) = std::os::unix::fs::lchown(&path, Some(uid), Some(gid)) {
            if e.raw_os_error() == Some(nix::libc::EPERM)
                || e.raw_os_error() == Some(nix::libc::EINVAL)
            {
                tracing::debug!(path = %path.display(), error = %e, "cannot chown layer entry");
            } else {
                return Err(ImageError::io(&path, e));
            }
        }
        if !is_symlink {
            // After chown: chown clears set-id bits.
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777)).at(&path)?;
        }
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX)
                    && let Err(e) = xattr::set(&path, name, ext.value_bytes())
                {
                    tracing::debug!(path = %path.display(), xattr = name, error = %e, "cannot set xattr");
                }
            }
        }
        if is_dir {
            self.dir_times.push((path, mtime));
        } else {
            set_mtime(&path, mtime);
        }
        Ok(())
    }
}

fn set_mtime(path: &Path, mtime: u64) {
    let t = TimeVal::new(i64::try_from(mtime).unwrap_or(0), 0);
    if let Err(e) = lutimes(path, &t, &t) {
        tracing::debug!(path = %path.display(), error = %e, "cannot set mtime");
    }
}

/// Removes whatever is at `path` (without following symlinks) so a later tar entry replaces an
/// earlier one, as tar does; an existing directory is kept when the new entry is a directory.
fn clear(path: &Path, new_is_dir: bool) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => {
            if !new_is_dir {
                fs::remove_dir_all(path).at(path)?;
            }
        }
        Ok(_) => fs::remove_file(path).at(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ImageError::io(path, e)),
    }
    Ok(())
}

fn rel_display(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Bytes of regular-file content under `dir`, hard links counted once. Symlinks are not
/// followed.
pub(crate) fn dir_size(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.file_type().is_dir() {
                stack.push(e.path());
            } else if m.file_type().is_file() && (m.nlink() <= 1 || seen.insert((m.dev(), m.ino())))
            {
                total += m.len();
            }
        }
    }
    total
}
