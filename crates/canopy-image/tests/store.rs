//! Store behaviour against real archives built by `canopy_image::testing`.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use canopy_image::testing::{
    self, LayerCompression, TestEntry, busybox_config, busybox_oci_archive, docker_save_archive,
    layer_tar, oci_archive,
};
use canopy_image::{ImageConfig, ImageError, ImageStore};

struct Fixture {
    dir: tempfile::TempDir,
    store: ImageStore,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("store")).unwrap();
        Fixture { dir, store }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn count(&self, sub: &str) -> usize {
        fs::read_dir(self.dir.path().join("store").join(sub))
            .unwrap()
            .count()
    }
}

fn file(path: &str, data: &[u8]) -> TestEntry {
    TestEntry::File(path.into(), data.to_vec(), 0o644)
}

fn dir(path: &str) -> TestEntry {
    TestEntry::Dir(path.into(), 0o755)
}

fn small_image(f: &Fixture, archive: &str, name: &str, layers: &[Vec<u8>]) -> canopy_image::Image {
    let p = f.path(archive);
    oci_archive(
        &p,
        Some(name),
        layers,
        LayerCompression::Gzip,
        &ImageConfig::default(),
    )
    .unwrap();
    let mut images = f.store.import_archive(&p).unwrap();
    assert_eq!(images.len(), 1);
    images.remove(0)
}

#[test]
fn imports_busybox_archive() {
    let f = Fixture::new();
    let archive = f.path("busybox.tar");
    busybox_oci_archive(&archive, "busybox").unwrap();
    let images = f.store.import_archive(&archive).unwrap();
    assert_eq!(images.len(), 1);
    let img = &images[0];
    assert!(
        img.id.starts_with("sha256:") && img.id.len() == 71,
        "{}",
        img.id
    );
    assert_eq!(img.names, vec!["docker.io/library/busybox:latest"]);
    assert_eq!(img.repo_digests.len(), 1);
    assert!(img.repo_digests[0].starts_with("docker.io/library/busybox@sha256:"));
    assert_eq!(img.config, busybox_config());
    assert_eq!(img.config.cmd, vec!["sh"]);
    assert_eq!(img.config.env, vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
    assert_eq!(img.layers.len(), 1);
    let root = &img.layers[0];
    let busybox = fs::symlink_metadata(root.join("bin/busybox")).unwrap();
    assert!(busybox.is_file());
    assert_eq!(busybox.mode() & 0o7777, 0o755);
    assert_eq!(busybox.uid(), 0);
    assert_eq!(
        img.size,
        busybox.len()
            + fs::metadata(root.join("etc/passwd")).unwrap().len()
            + fs::metadata(root.join("etc/group")).unwrap().len()
    );
    for applet in ["bin/sh", "bin/ls", "bin/sleep", "bin/cat"] {
        assert_eq!(
            fs::read_link(root.join(applet)).unwrap(),
            Path::new("/bin/busybox"),
            "{applet}"
        );
    }
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert!(
        fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .contains("nobody:x:65534:65534")
    );
    for d in ["proc", "sys", "dev"] {
        assert!(root.join(d).is_dir());
    }

    // Every way of naming it finds it.
    let by_digest = img.repo_digests[0].clone();
    let short_digest = by_digest.replace("docker.io/library/", "");
    for r in [
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox:latest",
        &img.id,
        &img.id[7..],
        &by_digest,
        &short_digest,
    ] {
        assert_eq!(
            f.store.get(r).unwrap().map(|i| i.id),
            Some(img.id.clone()),
            "{r}"
        );
    }
    assert!(f.store.get("busybox:other").unwrap().is_none());
    let wrong = format!("busybox@sha256:{}", "0".repeat(64));
    assert!(f.store.get(&wrong).unwrap().is_none());
    assert!(matches!(
        f.store.get("Bad Name"),
        Err(ImageError::InvalidReference { .. })
    ));
    assert_eq!(f.store.list().unwrap().len(), 1);

    // The index survives reopening.
    let reopened = ImageStore::open(f.dir.path().join("store")).unwrap();
    assert_eq!(reopened.get("busybox").unwrap().unwrap().layers, img.layers);
}

#[test]
fn import_is_idempotent() {
    let f = Fixture::new();
    let archive = f.path("busybox.tar");
    busybox_oci_archive(&archive, "docker.io/library/busybox:1.36").unwrap();
    let first = f.store.import_archive(&archive).unwrap();
    let blobs = f.count("blobs/sha256");
    let second = f.store.import_archive(&archive).unwrap();
    assert_eq!(first[0].id, second[0].id);
    assert_eq!(second[0].names, vec!["docker.io/library/busybox:1.36"]);
    assert_eq!(f.store.list().unwrap().len(), 1);
    assert_eq!(f.count("blobs/sha256"), blobs);
    assert_eq!(blobs, 3, "manifest, config and one layer");
    assert_eq!(f.count("layers"), 1);
    assert_eq!(f.count("tmp"), 0);
}

/// Rewrites `archive`, passing every regular file's content through `edit(path, data)`.
fn rewrite_archive(archive: &Path, out: &Path, edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) {
    let mut input = tar::Archive::new(fs::File::open(archive).unwrap());
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    for e in input.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let data = edit(&path, data);
        let mut h = e.header().clone();
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &path, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn tampered_blob_is_rejected_and_leaves_nothing() {
    let f = Fixture::new();
    let good = f.path("good.tar");
    busybox_oci_archive(&good, "busybox").unwrap();
    let bad = f.path("bad.tar");
    // Flip one byte near the end of the (largest) layer blob.
    rewrite_archive(&good, &bad, |path, mut data| {
        if path.starts_with("blobs/") && data.len() > 100_000 {
            let i = data.len() - 20;
            data[i] ^= 0xff;
        }
        data
    });
    let err = f.store.import_archive(&bad).unwrap_err();
    match &err {
        ImageError::DigestMismatch {
            what,
            expected,
            actual,
        } => {
            assert!(what.contains("blobs/sha256/"), "{err}");
            assert_ne!(expected, actual);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(f.store.list().unwrap().is_empty());
    assert!(f.store.get("busybox").unwrap().is_none());
    assert_eq!(f.count("blobs/sha256"), 0);
    assert_eq!(f.count("layers"), 0);
    assert_eq!(f.count("tmp"), 0);
}

#[test]
fn layer_not_matching_its_diff_id_is_rejected() {
    // docker save names layers by path, so only the config's diff ids vouch for them.
    let f = Fixture::new();
    let real = layer_tar(&[file("a", b"real")]).unwrap();
    let fake = layer_tar(&[file("a", b"fake")]).unwrap();
    let config = testing::config_json(&[real], &ImageConfig::default());
    let config_name = format!("{}.json", "c".repeat(64));
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}]);
    let archive = f.path("save.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    for (name, data) in [
        (config_name.as_str(), config),
        ("l/layer.tar", fake),
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let err = f.store.import_archive(&archive).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("diff id"), "{err}");
    assert!(f.store.list().unwrap().is_empty());
    assert_eq!(f.count("layers"), 0);
    assert_eq!(f.count("blobs/sha256"), 0);
}

fn import_layer(f: &Fixture, entries: &[TestEntry]) -> Result<canopy_image::Image, ImageError> {
    let archive = f.path("evil.tar");
    let layer = layer_tar(entries).unwrap();
    oci_archive(
        &archive,
        Some("evil"),
        &[layer],
        LayerCompression::None,
        &ImageConfig::default(),
    )
    .unwrap();
    f.store.import_archive(&archive).map(|mut v| v.remove(0))
}

#[test]
fn dot_dot_entries_are_refused() {
    let f = Fixture::new();
    let err = import_layer(
        &f,
        &[
            file("ok", b"1"),
            TestEntry::RawFile("../../../../evil-dotdot".into(), b"x".to_vec()),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
    assert!(!f.dir.path().join("evil-dotdot").exists());
    assert!(!f.dir.path().join("store/evil-dotdot").exists());
    assert!(f.store.list().unwrap().is_empty());
    assert_eq!(f.count("layers"), 0);
    let err = import_layer(
        &f,
        &[
            file("a", b"1"),
            TestEntry::HardLink("h".into(), "../../../../etc/passwd".into()),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
}

#[test]
fn absolute_paths_stay_inside_the_layer() {
    let f = Fixture::new();
    let outside = f.path("abs-target");
    let img = import_layer(
        &f,
        &[TestEntry::RawFile(
            format!("{}", outside.display()),
            b"inside".to_vec(),
        )],
    )
    .unwrap();
    assert!(
        !outside.exists(),
        "absolute entry escaped to {}",
        outside.display()
    );
    let rel = outside.strip_prefix("/").unwrap();
    assert_eq!(fs::read(img.layers[0].join(rel)).unwrap(), b"inside");
}

#[test]
fn writes_through_symlinks_are_refused() {
    let f = Fixture::new();
    let outside = f.path("outside");
    fs::create_dir(&outside).unwrap();
    let err = import_layer(
        &f,
        &[
            TestEntry::Symlink("esc".into(), outside.display().to_string()),
            file("esc/pwned", b"x"),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
    assert!(!outside.join("pwned").exists());
    // Relative symlink pointing up and out.
    let err = import_layer(
        &f,
        &[
            TestEntry::Symlink("up".into(), "../../../../../..".into()),
            file(&format!("up{}/pwned2", outside.display()), b"x"),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
    assert!(!outside.join("pwned2").exists());
    assert!(f.store.list().unwrap().is_empty());
}

#[test]
fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
    let f = Fixture::new();
    let victim = f.path("victim");
    fs::write(&victim, b"original").unwrap();
    let img = import_layer(
        &f,
        &[
            TestEntry::Symlink("f".into(), victim.display().to_string()),
            file("f", b"replaced"),
            TestEntry::HardLink("g".into(), "f".into()),
        ],
    )
    .unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"original");
    let layer = &img.layers[0];
    assert!(fs::symlink_metadata(layer.join("f")).unwrap().is_file());
    assert_eq!(fs::read(layer.join("f")).unwrap(), b"replaced");
    assert_eq!(
        fs::metadata(layer.join("g")).unwrap().ino(),
        fs::metadata(layer.join("f")).unwrap().ino()
    );
}

#[test]
fn whiteouts_become_overlayfs_whiteouts() {
    let f = Fixture::new();
    let base = layer_tar(&[
        dir("a"),
        file("a/x", b"x"),
        file("a/y", b"y"),
        dir("d"),
        file("d/z", b"z"),
    ])
    .unwrap();
    let top = layer_tar(&[
        dir("a"),
        file("a/.wh.x", b""),
        dir("d"),
        file("d/.wh..wh..opq", b""),
        file("d/new", b"new"),
        file("e/.wh.gone", b""),
    ])
    .unwrap();
    let img = small_image(&f, "wh.tar", "wh:1", &[base, top]);
    assert_eq!(img.layers.len(), 2);
    let (lower, upper) = (&img.layers[0], &img.layers[1]);
    assert_eq!(fs::read(lower.join("a/x")).unwrap(), b"x");
    let wh = fs::symlink_metadata(upper.join("a/x")).unwrap();
    assert!(wh.file_type().is_char_device(), "a/x should be a whiteout");
    assert_eq!(wh.rdev(), 0);
    assert!(
        fs::symlink_metadata(upper.join("e/gone"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(
        xattr::get(upper.join("d"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        xattr::get(lower.join("d"), "trusted.overlay.opaque").unwrap(),
        None
    );
    assert_eq!(fs::read(upper.join("d/new")).unwrap(), b"new");
    for entry in walk(upper) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(".wh."),
            "OCI whiteout file left: {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn imports_docker_save_format() {
    let f = Fixture::new();
    let base = layer_tar(&testing::busybox_entries().unwrap()).unwrap();
    let extra = layer_tar(&[
        dir("app"),
        TestEntry::File("app/run".into(), b"#!/bin/sh\necho hi\n".to_vec(), 0o755),
    ])
    .unwrap();
    let config = ImageConfig {
        entrypoint: vec!["/app/run".into()],
        cmd: vec!["x".into()],
        env: vec!["A=B".into()],
        working_dir: Some("/app".into()),
        user: Some("65534".into()),
        stop_signal: Some("SIGINT".into()),
        exposed_ports: vec!["53/udp".into(), "80/tcp".into()],
    };
    let save = f.path("save.tar");
    docker_save_archive(
        &save,
        &["foo/bar:1", "localhost:5000/app"],
        &[base.clone(), extra.clone()],
        &config,
    )
    .unwrap();
    let images = f.store.import_archive(&save).unwrap();
    assert_eq!(images.len(), 1);
    let img = &images[0];
    assert_eq!(
        img.names,
        vec!["docker.io/foo/bar:1", "localhost:5000/app:latest"]
    );
    assert!(img.repo_digests.is_empty());
    assert_eq!(img.config, config);
    assert_eq!(img.layers.len(), 2);
    assert_eq!(
        fs::metadata(img.layers[1].join("app/run")).unwrap().mode() & 0o777,
        0o755
    );

    // The same image as an OCI archive (zstd layers) is the same image id: names merge.
    let oci = f.path("oci.tar");
    oci_archive(
        &oci,
        Some("quay.io/x/y:2"),
        &[base, extra],
        LayerCompression::Zstd,
        &config,
    )
    .unwrap();
    let again = f.store.import_archive(&oci).unwrap();
    assert_eq!(again[0].id, img.id);
    assert_eq!(
        again[0].names,
        vec![
            "docker.io/foo/bar:1",
            "localhost:5000/app:latest",
            "quay.io/x/y:2"
        ]
    );
    assert_eq!(f.store.list().unwrap().len(), 1);
    assert_eq!(f.count("layers"), 2);
}

#[test]
fn compressed_archives_and_name_moves() {
    let f = Fixture::new();
    let one = small_image(
        &f,
        "one.tar",
        "app:v",
        &[layer_tar(&[file("v", b"1")]).unwrap()],
    );
    // Gzip the whole archive, as people do with `docker save | gzip`.
    let plain = f.path("two.tar");
    oci_archive(
        &plain,
        Some("app:v"),
        &[layer_tar(&[file("v", b"2")]).unwrap()],
        LayerCompression::None,
        &ImageConfig::default(),
    )
    .unwrap();
    let gz = f.path("two.tar.gz");
    let mut enc =
        flate2::write::GzEncoder::new(fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    std::io::copy(&mut fs::File::open(&plain).unwrap(), &mut enc).unwrap();
    enc.finish().unwrap();
    let two = f.store.import_archive(&gz).unwrap().remove(0);
    assert_ne!(one.id, two.id);
    // The name moved; the old image stays, unnamed, until removed or collected.
    assert_eq!(f.store.get("app:v").unwrap().unwrap().id, two.id);
    let old = f.store.get(&one.id).unwrap().unwrap();
    assert!(old.names.is_empty());
    assert_eq!(f.store.list().unwrap().len(), 2);
}

#[test]
fn tag_only_ref_name_imports_unnamed() {
    let f = Fixture::new();
    let good = f.path("good.tar");
    busybox_oci_archive(&good, "busybox").unwrap();
    let tagged = f.path("tagged.tar");
    rewrite_archive(&good, &tagged, |path, data| {
        if path == "index.json" {
            let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
            v["manifests"][0]["annotations"] =
                serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
            serde_json::to_vec(&v).unwrap()
        } else {
            data
        }
    });
    let img = f.store.import_archive(&tagged).unwrap().remove(0);
    assert!(img.names.is_empty());
    assert!(f.store.get(&img.id).unwrap().is_some());
}

#[test]
fn remove_keeps_shared_layers() {
    let f = Fixture::new();
    let base = layer_tar(&[dir("base"), file("base/f", &[7u8; 4096])]).unwrap();
    let a = small_image(
        &f,
        "a.tar",
        "a",
        &[base.clone(), layer_tar(&[file("a", b"a")]).unwrap()],
    );
    let b = small_image(
        &f,
        "b.tar",
        "b",
        &[base, layer_tar(&[file("b", b"b")]).unwrap()],
    );
    assert_eq!(a.layers[0], b.layers[0]);
    assert_eq!(f.count("layers"), 3);

    // Removing one name of two keeps the image.
    let c = f.path("a2.tar");
    oci_archive(
        &c,
        Some("a:two"),
        &[
            layer_tar(&[dir("base"), file("base/f", &[7u8; 4096])]).unwrap(),
            layer_tar(&[file("a", b"a")]).unwrap(),
        ],
        LayerCompression::Gzip,
        &ImageConfig::default(),
    )
    .unwrap();
    f.store.import_archive(&c).unwrap();
    f.store.remove("a").unwrap();
    assert_eq!(f.store.get("a:two").unwrap().unwrap().id, a.id);
    assert!(a.layers[1].exists());
    f.store.remove("docker.io/library/a:two").unwrap();
    assert!(f.store.get(&a.id).unwrap().is_none());
    assert!(!a.layers[1].exists(), "a's own layer goes");
    assert!(a.layers[0].exists(), "the shared base stays");
    let still = f.store.get("b").unwrap().unwrap();
    assert!(still.layers.iter().all(|l| l.join(".").exists()));
    assert_eq!(
        fs::read(still.layers[0].join("base/f")).unwrap().len(),
        4096
    );

    // Removing something absent is fine (CRI RemoveImage is idempotent).
    f.store.remove("a").unwrap();
    f.store.remove(&a.id).unwrap();
    // By id removes the image with all its names.
    f.store.remove(&b.id).unwrap();
    assert!(f.store.list().unwrap().is_empty());
    assert_eq!(f.count("layers"), 0);
    assert_eq!(f.count("blobs/sha256"), 0);
}

#[test]
fn garbage_collection_removes_least_recently_used_unused_images() {
    let f = Fixture::new();
    let mk = |n: u8| layer_tar(&[file(&format!("data{n}"), &vec![n; 200_000])]).unwrap();
    let a = small_image(&f, "a.tar", "a", &[mk(1)]);
    let b = small_image(&f, "b.tar", "b", &[mk(2)]);
    let c = small_image(&f, "c.tar", "c", &[mk(3)]);
    let d = small_image(&f, "d.tar", "d", &[mk(4)]);
    for id in [&b.id, &c.id, &a.id, &d.id] {
        f.store.mark_used(id);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let usage = f.store.disk_usage().unwrap();
    assert!(usage > 800_000, "{usage}");
    let in_use: HashSet<String> = [b.id.clone()].into();

    // Under the high threshold nothing happens.
    assert!(
        f.store
            .garbage_collect(&in_use, usage, 0)
            .unwrap()
            .is_empty()
    );
    assert_eq!(f.store.list().unwrap().len(), 4);

    // Free a little: the least recently used unused image (c; b is in use) goes.
    let removed = f
        .store
        .garbage_collect(&in_use, usage - 1, usage - 1)
        .unwrap();
    assert_eq!(removed, vec![c.id.clone()]);
    assert!(!c.layers[0].exists());
    let after = f.store.disk_usage().unwrap();
    assert!(after <= usage - 200_000, "{after} vs {usage}");

    // Free everything possible: a then d, never b.
    let removed = f.store.garbage_collect(&in_use, 0, 0).unwrap();
    assert_eq!(removed, vec![a.id.clone(), d.id.clone()]);
    let left: Vec<String> = f.store.list().unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(left, vec![b.id.clone()]);
}

#[test]
fn open_cleans_staging_and_sweeps_orphans() {
    let f = Fixture::new();
    let img = small_image(&f, "a.tar", "a", &[layer_tar(&[file("x", b"x")]).unwrap()]);
    let root = f.dir.path().join("store");
    fs::create_dir_all(root.join("tmp/layer-crashed/usr")).unwrap();
    fs::write(root.join("tmp/partial-blob"), b"junk").unwrap();
    // As if a crash happened between a layer rename and the index write.
    fs::create_dir(root.join("layers").join("f".repeat(64))).unwrap();
    let store = ImageStore::open(&root).unwrap();
    assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    store.import_archive(&f.path("a.tar")).unwrap();
    assert!(!root.join("layers").join("f".repeat(64)).exists());
    assert_eq!(store.get("a").unwrap().unwrap().layers, img.layers);
}

#[test]
fn corrupt_index_is_reported() {
    let f = Fixture::new();
    fs::write(f.dir.path().join("store/index.json"), b"{not json").unwrap();
    let err = ImageStore::open(f.dir.path().join("store")).unwrap_err();
    assert!(matches!(err, ImageError::CorruptIndex { .. }), "{err}");
}

#[test]
fn devices_xattrs_and_modes_are_preserved() {
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    b.append_data(&mut h, "dev/null", std::io::empty()).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.canopy", b"yes".as_slice())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o4755);
    h.set_uid(1000);
    h.set_gid(2000);
    h.set_mtime(1_600_000_000);
    h.set_size(2);
    b.append_data(&mut h, "usr/bin/suid", b"hi".as_slice())
        .unwrap();
    let layer = b.into_inner().unwrap();
    let img = small_image(&f, "dev.tar", "dev", &[layer]);
    let root = &img.layers[0];
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    let suid = fs::metadata(root.join("usr/bin/suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755);
    assert_eq!((suid.uid(), suid.gid()), (1000, 2000));
    assert_eq!(suid.mtime(), 1_600_000_000);
    assert_eq!(
        xattr::get(root.join("usr/bin/suid"), "user.canopy").unwrap(),
        Some(b"yes".to_vec())
    );
    assert_eq!(fs::metadata(root).unwrap().mode() & 0o777, 0o755);
}

#[test]
fn concurrent_imports_and_reads() {
    let f = Fixture::new();
    let archive = f.path("busybox.tar");
    busybox_oci_archive(&archive, "busybox").unwrap();
    // A second handle on the same root: serialised by the file lock, not the mutex.
    let other = ImageStore::open(f.dir.path().join("store")).unwrap();
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = [&f.store, &other, &f.store]
            .into_iter()
            .map(|store| {
                let archive = archive.clone();
                s.spawn(move || store.import_archive(&archive).unwrap().remove(0).id)
            })
            .collect();
        let reader = s.spawn(|| {
            for _ in 0..50 {
                // Never a half image: either absent or complete.
                if let Some(img) = other.get("busybox").unwrap() {
                    assert!(img.layers[0].join("bin/busybox").is_file());
                }
            }
        });
        reader.join().unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(f.store.list().unwrap().len(), 1);
    assert_eq!(f.count("layers"), 1);
}

#[test]
fn repeated_layers_are_stacked_once_at_their_topmost_position() {
    let f = Fixture::new();
    let x = layer_tar(&[file("x", b"x")]).unwrap();
    let y = layer_tar(&[file("x", b"y")]).unwrap();
    let img = small_image(&f, "rep.tar", "rep", &[x.clone(), y.clone(), x]);
    assert_eq!(img.layers.len(), 2);
    assert_eq!(fs::read(img.layers[0].join("x")).unwrap(), b"y");
    assert_eq!(fs::read(img.layers[1].join("x")).unwrap(), b"x");
    assert_eq!(img.size, 2);
}

/// The real consumers: overlayfs must read our whiteouts as whiteouts, and the busybox
/// fixture must run. Needs root (as the agent does), like CI.
#[test]
fn layers_work_as_overlayfs_lower_dirs_and_busybox_runs() {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let f = Fixture::new();
    let base = layer_tar(&[
        dir("a"),
        file("a/x", b"x"),
        file("a/y", b"y"),
        dir("d"),
        file("d/z", b"z"),
        file("e/gone", b"g"),
    ])
    .unwrap();
    let top = layer_tar(&[
        file("a/.wh.x", b""),
        file("d/.wh..wh..opq", b""),
        file("d/new", b"new"),
        file("e/.wh.gone", b""),
    ])
    .unwrap();
    let img = small_image(&f, "wh.tar", "wh:1", &[base, top]);
    let merged = f.path("merged");
    fs::create_dir(&merged).unwrap();
    // overlayfs lists lower dirs top first.
    let lower: Vec<String> = img
        .layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect();
    let opts = format!("lowerdir={}", lower.join(":"));
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .unwrap_or_else(|e| panic!("mounting overlay ({opts}) failed: {e}; this test needs root"));
    let names = |p: &str| {
        let mut v: Vec<String> = fs::read_dir(merged.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (a, d, e) = (names("a"), names("d"), names("e"));
    umount2(&merged, MntFlags::MNT_DETACH).unwrap();
    assert_eq!(a, vec!["y"]);
    assert_eq!(d, vec!["new"]);
    assert!(e.is_empty(), "{e:?}");

    let archive = f.path("busybox.tar");
    busybox_oci_archive(&archive, "busybox").unwrap();
    let bb = f.store.import_archive(&archive).unwrap().remove(0);
    let out = std::process::Command::new("chroot")
        .arg(&bb.layers[0])
        .args([
            "/bin/sh",
            "-c",
            "echo hello from $(id -un); ls /tmp >/dev/null && grep -c nobody /etc/passwd",
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from root\n1\n");
}
