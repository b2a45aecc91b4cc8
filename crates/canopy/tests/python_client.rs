//! The official Python `kubernetes` client against Canopy (tests/python/test_client.py).

mod common;

use std::path::PathBuf;

use common::{Backend, Cluster};

/// The Python with the `kubernetes` package: `$CANOPY_TEST_PYTHON`, else the repository's
/// `.venv` that `.ci/run` creates.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CANOPY_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the kubernetes package: run .ci/run (it creates .venv) or set CANOPY_TEST_PYTHON"
    );
    venv
}

#[test]
fn python_kubernetes_client_lists_and_watches() {
    let c = Cluster::start(Backend::Embedded);
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/test_client.py");
    let out = std::process::Command::new(python())
        .arg(script)
        .env("KUBECONFIG", c.kubeconfig())
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python client test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
