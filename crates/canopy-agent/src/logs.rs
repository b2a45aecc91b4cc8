//! Rotation of containers' log files, as the kubelet's container log manager does it: a
//! `<attempt>.log` larger than the limit is renamed `<attempt>.log.<time>`, the container's
//! monitor notices the rename and reopens the path (`canopy shim` checks the inode once a
//! second), and the oldest rotated files beyond the limit are removed. `kubectl logs` reads
//! the current file, as upstream's, so a log request never reads more than the limit.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// When log files rotate (the kubelet's containerLogMaxSize, containerLogMaxFiles and
/// containerLogMonitorInterval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRotation {
    /// A file larger than this is rotated.
    pub max_size: u64,
    /// Files kept per container run, the current one included.
    pub max_files: usize,
    /// How often files are checked.
    pub interval: Duration,
}

/// Checks every container log under `log_dir` each interval until shutdown.
pub async fn rotation_loop(log_dir: PathBuf, rotation: LogRotation, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(rotation.interval) => {}
        }
        let dir = log_dir.clone();
        let rotated = tokio::task::spawn_blocking(move || rotate_all(&dir, rotation, &now_stamp()))
            .await
            .unwrap_or_default();
        if rotated > 0 {
            tracing::debug!(files = rotated, "rotated container logs");
        }
    }
}

/// The suffix of a rotated file (upstream's `20060102-150405`), sortable as text.
fn now_stamp() -> String {
    chrono::Utc::now().format("%Y%m%d-%H%M%S%.6f").to_string()
}

/// Rotates the logs under `<log_dir>/<pod>/<container>/`; returns how many files it rotated.
pub fn rotate_all(log_dir: &Path, rotation: LogRotation, stamp: &str) -> usize {
    let mut rotated = 0;
    let dirs = std::fs::read_dir(log_dir).into_iter().flatten().flatten();
    for pod in dirs {
        let containers = std::fs::read_dir(pod.path())
            .into_iter()
            .flatten()
            .flatten();
        for container in containers {
            rotated += rotate_container(&container.path(), rotation, stamp);
        }
    }
    rotated
}

fn rotate_container(dir: &Path, rotation: LogRotation, stamp: &str) -> usize {
    let mut rotated = 0;
    let names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for current in names.iter().filter(|n| n.ends_with(".log")) {
        let path = dir.join(current);
        let big = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.is_file() && m.len() > rotation.max_size);
        if big && std::fs::rename(&path, dir.join(format!("{current}.{stamp}"))).is_ok() {
            rotated += 1;
        }
    }
    // Keep the newest max_files - 1 rotated files of each run, whether or not the monitor
    // has reopened its current file yet (it does so within a second of a rotation).
    let mut by_run: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for name in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        if let Some((run, _)) = name.split_once(".log.") {
            by_run.entry(run.to_string()).or_default().push(name);
        }
    }
    for mut old in by_run.into_values() {
        old.sort();
        let excess = old
            .len()
            .saturating_sub(rotation.max_files.saturating_sub(1));
        for name in old.into_iter().take(excess) {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
    rotated
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_big_files_and_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ns_pod_uid").join("main");
        std::fs::create_dir_all(&dir).unwrap();
        let rotation = LogRotation {
            max_size: 10,
            max_files: 3,
            interval: Duration::from_secs(1),
        };
        for (i, stamp) in ["20260101-000001", "20260101-000002", "20260101-000003"]
            .iter()
            .enumerate()
        {
            std::fs::write(dir.join("0.log"), format!("line {i} is long enough")).unwrap();
            assert_eq!(rotate_all(root.path(), rotation, stamp), 1);
        }
        std::fs::write(dir.join("0.log"), "short").unwrap();
        std::fs::write(dir.join("1.log"), "short too").unwrap();
        assert_eq!(rotate_all(root.path(), rotation, "20260101-000004"), 0);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        // The current file, and the two newest rotated ones (max 3 files per run).
        assert_eq!(
            names,
            [
                "0.log",
                "0.log.20260101-000002",
                "0.log.20260101-000003",
                "1.log"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("0.log.20260101-000003")).unwrap(),
            "line 2 is long enough"
        );
        // Right after a rotation the monitor has not reopened its file yet: the run's
        // rotated files are still pruned.
        std::fs::write(dir.join("0.log"), "long enough to rotate again").unwrap();
        assert_eq!(rotate_all(root.path(), rotation, "20260101-000005"), 1);
        assert!(!dir.join("0.log").exists());
        std::fs::write(dir.join("0.log.20260101-000006"), "x").unwrap();
        rotate_all(root.path(), rotation, "20260101-000007");
        let rotated = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("0.log.")
            })
            .count();
        assert_eq!(rotated, 2);
    }
}
