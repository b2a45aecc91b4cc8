//! Pulls from a real registry: Debian's `docker-registry` (distribution), started on a free
//! loopback port with filesystem storage in a temp dir. CI installs the package; a missing
//! binary is a failure, not a skip.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use canopy_image::testing::busybox_oci_archive;
use canopy_image::{ImageStore, PullOptions, RegistryAuth};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciImageIndex, OciImageManifest, OciManifest};

const REGISTRY: &str = "/usr/bin/docker-registry";

struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Registry {
    assert!(
        Path::new(REGISTRY).exists(),
        "{REGISTRY} is missing: install Debian's docker-registry package (apt-get install docker-registry)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(REGISTRY)
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry {
        child,
        addr,
        _dir: dir,
    }
}

/// Reads every file of an OCI layout tar.
fn read_layout(archive: &Path) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    let mut a = tar::Archive::new(fs::File::open(archive).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(p, data);
    }
    out
}

fn blob<'a>(files: &'a HashMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    &files[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))]
}

fn client() -> oci_client::Client {
    // As the store does before it pulls: Canopy's rustls has ring as its only provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// Pushes the busybox fixture as `<addr>/<repo>:<tag>`; returns the registry's manifest digest.
async fn push_busybox(addr: &str, repo: &str, tag: &str, archive: &Path) -> String {
    let files = read_layout(archive);
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: OciImageManifest = serde_json::from_slice(blob(&files, manifest_digest)).unwrap();
    let layers: Vec<ImageLayer> = manifest
        .layers
        .iter()
        .map(|l| ImageLayer::new(blob(&files, &l.digest).to_vec(), l.media_type.clone(), None))
        .collect();
    let config = Config::new(
        blob(&files, &manifest.config.digest).to_vec(),
        manifest.config.media_type.clone(),
        None,
    );
    let reference: oci_client::Reference = format!("{addr}/{repo}:{tag}").parse().unwrap();
    let c = client();
    c.push(
        &reference,
        &layers,
        config,
        &oci_client::secrets::RegistryAuth::Anonymous,
        Some(manifest),
    )
    .await
    .unwrap();
    c.fetch_manifest_digest(&reference, &oci_client::secrets::RegistryAuth::Anonymous)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_local_registry() {
    let registry = start_registry();
    let addr = registry.addr.clone();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("busybox.tar");
    busybox_oci_archive(&archive, "busybox").unwrap();
    let digest = push_busybox(&addr, "library/busybox", "1.0", &archive).await;

    // The reference image, imported from the archive, for comparison.
    let local = ImageStore::open(work.path().join("local")).unwrap();
    let expected = local.import_archive(&archive).unwrap().remove(0);

    let store = ImageStore::open(work.path().join("pulled")).unwrap();
    let name = format!("{addr}/library/busybox:1.0");
    let img = store.pull(&name, &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(img.id, expected.id);
    assert_eq!(img.names, vec![name.clone()]);
    assert_eq!(
        img.repo_digests,
        vec![format!("{addr}/library/busybox@{digest}")]
    );
    assert_eq!(img.config, expected.config);
    assert_eq!(img.layers.len(), 1);
    assert_eq!(img.size, expected.size);
    assert!(
        fs::symlink_metadata(img.layers[0].join("bin/busybox"))
            .unwrap()
            .is_file()
    );
    assert_eq!(
        fs::read_link(img.layers[0].join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        store
            .get(&format!("{addr}/library/busybox@{digest}"))
            .unwrap()
            .unwrap()
            .id,
        img.id
    );

    // Pull by digest into another store: no name, the repo digest only.
    let store2 = ImageStore::open(work.path().join("pulled2")).unwrap();
    let by_digest = store2
        .pull_with(
            &format!("{addr}/library/busybox@{digest}"),
            &RegistryAuth::Anonymous,
            &PullOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(by_digest.id, img.id);
    assert!(by_digest.names.is_empty());

    // Pulling again is idempotent and re-uses the unpacked layer.
    let again = store.pull(&name, &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(again.layers, img.layers);
    assert_eq!(store.list().unwrap().len(), 1);

    // Unknown tag and unknown digest: clear registry errors, nothing stored.
    let err = store
        .pull(
            &format!("{addr}/library/busybox:nope"),
            &RegistryAuth::Anonymous,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("busybox:nope"), "{err}");
    let bogus = format!("{addr}/library/busybox@sha256:{}", "1".repeat(64));
    assert!(store.pull(&bogus, &RegistryAuth::Anonymous).await.is_err());
    assert_eq!(store.list().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_the_host_platform_from_an_index() {
    let registry = start_registry();
    let addr = registry.addr.clone();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("busybox.tar");
    busybox_oci_archive(&archive, "busybox").unwrap();
    let manifest_digest = push_busybox(&addr, "multi", "single", &archive).await;
    let size = {
        let files = read_layout(&archive);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        index["manifests"][0]["size"].as_i64().unwrap()
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let entry = |architecture: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": size,
            "platform": {"architecture": architecture, "os": "linux"},
        })
    };
    let index: OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("s390x"), entry(arch)],
    }))
    .unwrap();
    let reference: oci_client::Reference = format!("{addr}/multi:latest").parse().unwrap();
    client()
        .push_manifest(&reference, &OciManifest::ImageIndex(index))
        .await
        .unwrap();
    let index_digest = client()
        .fetch_manifest_digest(&reference, &oci_client::secrets::RegistryAuth::Anonymous)
        .await
        .unwrap();
    assert_ne!(index_digest, manifest_digest);

    let store = ImageStore::open(work.path().join("pulled")).unwrap();
    let img = store
        .pull(&format!("{addr}/multi"), &RegistryAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(img.names, vec![format!("{addr}/multi:latest")]);
    assert_eq!(
        img.repo_digests,
        vec![format!("{addr}/multi@{index_digest}")]
    );
    assert_eq!(img.config.cmd, vec!["sh"]);
}
