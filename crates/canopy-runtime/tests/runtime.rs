//! End-to-end tests with runc and busybox-static (run as root).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use canopy_runtime::*;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_uid(tag: &str) -> String {
    format!(
        "t{}-{}-{}-{}",
        std::process::id(),
        tag,
        COUNTER.fetch_add(1, Ordering::SeqCst),
        chrono::Utc::now().timestamp_micros() % 1_000_000
    )
}

/// A busybox image layer.
fn make_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let busybox = if Path::new("/bin/busybox").exists() {
        "/bin/busybox"
    } else {
        "/usr/bin/busybox"
    };
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

struct Env {
    tmp: tempfile::TempDir,
    rt: Runtime,
    layer: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("canopy-rt-")
            .tempdir()
            .unwrap();
        let layer = tmp.path().join("layer");
        make_rootfs(&layer);
        let rt = Runtime::new(Self::config(tmp.path())).unwrap();
        Env { tmp, rt, layer }
    }

    fn config(base: &Path) -> RuntimeConfig {
        RuntimeConfig {
            runtime_binary: "runc".into(),
            shim_binary: env!("CARGO_BIN_EXE_canopy-shim").into(),
            root_dir: base.join("root"),
            state_dir: base.join("state"),
            cgroup_parent: "canopy-test".into(),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
    fn root_dir(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    async fn sandbox(&self, tag: &str) -> Sandbox {
        let uid = unique_uid(tag);
        self.rt
            .create_sandbox(&SandboxSpec {
                pod_uid: uid.clone(),
                namespace: "default".into(),
                name: format!("pod-{tag}"),
                hostname: String::new(),
                dns: DnsConfig {
                    nameservers: vec!["10.96.0.10".into()],
                    searches: vec!["default.svc.cluster.local".into()],
                    options: vec!["ndots:5".into()],
                },
                hosts: vec![("10.1.2.3".into(), vec![format!("pod-{tag}")])],
            })
            .await
            .unwrap()
    }

    fn spec(&self, sb: &Sandbox, name: &str, script: &str) -> ContainerSpec {
        ContainerSpec {
            pod_uid: sb.pod_uid.clone(),
            name: name.into(),
            attempt: 0,
            lower_dirs: vec![self.layer.clone()],
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            log_path: self
                .tmp
                .path()
                .join("logs")
                .join(&sb.pod_uid)
                .join(format!("{name}.log")),
            labels: BTreeMap::from([("io.kubernetes.container.name".into(), name.into())]),
            ..Default::default()
        }
    }

    async fn wait_exit(&self, id: &str, timeout: Duration) -> ContainerState {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.rt.container_status(id).await.unwrap().unwrap();
            if matches!(st.state, ContainerState::Exited { .. }) {
                return st.state;
            }
            assert!(Instant::now() < deadline, "{id} did not exit: {st:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run(&self, sb: &Sandbox, spec: &ContainerSpec) -> (ContainerState, String) {
        let st = self.rt.start_container(sb, spec).await.unwrap();
        let state = self.wait_exit(&st.id, Duration::from_secs(30)).await;
        let log = std::fs::read_to_string(&spec.log_path).unwrap_or_default();
        (state, log)
    }

    /// Removes the sandbox and checks that nothing of it is left.
    async fn teardown(&self, sb: &Sandbox) {
        self.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
        self.assert_clean(&sb.pod_uid);
    }

    /// Everything of the pod is gone: mounts, cgroups, netns file, processes.
    fn assert_clean(&self, pod_uid: &str) {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let state = self.state_dir();
        for line in mountinfo.lines() {
            let mp = PathBuf::from(line.split(' ').nth(4).unwrap());
            assert!(
                (!mp.starts_with(&state) || mp == state) && !mp.starts_with(self.root_dir()),
                "mount left: {line}"
            );
            assert!(!line.contains(pod_uid), "mount left: {line}");
        }
        assert!(
            !Path::new("/run/netns")
                .join(format!("canopy-{pod_uid}"))
                .exists()
        );
        for e in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let p = e.path().join("canopy-test").join(format!("pod{pod_uid}"));
            assert!(!p.exists(), "cgroup left: {}", p.display());
        }
        let p = Path::new("/sys/fs/cgroup/canopy-test").join(format!("pod{pod_uid}"));
        assert!(!p.exists(), "cgroup left: {}", p.display());
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_err() {
                continue;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            {
                // An orphaned zombie waiting for the host's init to reap it.
                continue;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cg = std::fs::read(e.path().join("cgroup")).unwrap_or_default();
            let has = |d: &[u8]| d.windows(pod_uid.len()).any(|w| w == pod_uid.as_bytes());
            assert!(
                !has(&cmd) && !has(&cg),
                "process {name} left: {}",
                String::from_utf8_lossy(&cmd)
            );
        }
        assert!(!state.join("sandboxes").join(pod_uid).exists());
        let leftovers: Vec<_> = std::fs::read_dir(state.join("containers"))
            .unwrap()
            .chain(std::fs::read_dir(self.root_dir().join("containers")).unwrap())
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(pod_uid))
            .map(|e| e.path())
            .collect();
        assert!(leftovers.is_empty(), "left: {leftovers:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Runtime::new bind-mounted the state dir onto itself.
        let _ = nix::mount::umount2(&self.state_dir(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn log_lines(log: &str) -> Vec<(String, String, String)> {
    log.lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let ts = p.next().unwrap();
            assert!(
                chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
                "bad timestamp in {l:?}"
            );
            (
                p.next().unwrap().to_string(),
                p.next().unwrap().to_string(),
                p.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_logs_and_exit_codes() {
    let env = Env::new();
    let sb = env.sandbox("logs").await;
    let (state, log) = env
        .run(&sb, &env.spec(&sb, "hello", "echo hello; echo err >&2"))
        .await;
    match state {
        ContainerState::Exited {
            exit_code,
            signal,
            oom_killed,
            started_at,
            finished_at,
        } => {
            assert_eq!((exit_code, signal, oom_killed), (0, None, false));
            assert!(started_at.unwrap() <= finished_at);
        }
        other => panic!("{other:?}"),
    }
    let mut lines = log_lines(&log);
    lines.sort();
    assert_eq!(
        lines,
        vec![
            ("stderr".into(), "F".into(), "err".into()),
            ("stdout".into(), "F".into(), "hello".into())
        ]
    );

    let (state, log) = env
        .run(&sb, &env.spec(&sb, "three", "printf partial; exit 3"))
        .await;
    assert!(matches!(
        state,
        ContainerState::Exited {
            exit_code: 3,
            signal: None,
            ..
        }
    ));
    assert_eq!(
        log_lines(&log),
        vec![("stdout".into(), "P".into(), "partial".into())]
    );

    let listed = env.rt.list_containers(&sb.pod_uid).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0].labels["io.kubernetes.container.name"],
        listed[0].name
    );

    env.teardown(&sb).await;
    // Idempotent.
    env.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failure_is_reported() {
    let env = Env::new();
    let sb = env.sandbox("fail").await;
    let mut spec = env.spec(&sb, "missing", "");
    spec.args = vec!["/no/such/binary".into()];
    let err = env.rt.start_container(&sb, &spec).await.unwrap_err();
    match &err {
        RuntimeError::StartFailed { message, .. } => {
            assert!(
                message.contains("no such file") || message.contains("not found"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        env.rt
            .list_containers(&sb.pod_uid)
            .await
            .unwrap()
            .is_empty()
    );
    env.teardown(&sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_grace_and_kill() {
    let env = Env::new();
    let sb = env.sandbox("stop").await;
    let mut events = env.rt.subscribe();
    let st = env
        .rt
        .start_container(
            &sb,
            &env.spec(&sb, "term", "trap 'exit 143' TERM; sleep 100 & wait $!"),
        )
        .await
        .unwrap();
    assert!(matches!(st.state, ContainerState::Running { .. }), "{st:?}");
    let t = Instant::now();
    env.rt
        .stop_container(&st.id, Duration::from_secs(10), None)
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    let state = env
        .rt
        .container_status(&st.id)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 143, .. }),
        "{state:?}"
    );

    let st2 = env
        .rt
        .start_container(
            &sb,
            &env.spec(&sb, "stubborn", "trap '' TERM; sleep 100; true"),
        )
        .await
        .unwrap();
    let t = Instant::now();
    env.rt
        .stop_container(&st2.id, Duration::from_secs(1), Some("TERM"))
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1));
    let state = env
        .rt
        .container_status(&st2.id)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert!(
        matches!(
            state,
            ContainerState::Exited {
                exit_code: 137,
                signal: Some(9),
                ..
            }
        ),
        "{state:?}"
    );

    // The watcher reported both lifecycles.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < 4 && Instant::now() < deadline {
        if let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
            seen.push((ev.id, ev.kind));
        }
    }
    for id in [&st.id, &st2.id] {
        assert!(
            seen.contains(&(id.clone(), ContainerEventKind::Started)),
            "{seen:?}"
        );
        assert!(
            seen.contains(&(id.clone(), ContainerEventKind::Exited)),
            "{seen:?}"
        );
    }

    env.teardown(&sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kill_is_reported() {
    let env = Env::new();
    let sb = env.sandbox("oom").await;
    let mut spec = env.spec(&sb, "hog", "");
    spec.args = vec!["tail".into(), "/dev/zero".into()];
    spec.memory_limit_bytes = Some(16 << 20);
    let (state, _) = env.run(&sb, &spec).await;
    assert!(
        matches!(
            state,
            ContainerState::Exited {
                oom_killed: true,
                exit_code: 137,
                ..
            }
        ),
        "{state:?}"
    );
    env.teardown(&sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_shares_namespaces_and_files() {
    let env = Env::new();
    let sb = env.sandbox("share").await;
    assert_eq!(sb.hostname, "pod-share");
    assert!(sb.netns_path.exists());
    // Idempotent create returns the same sandbox.
    let again = env
        .rt
        .create_sandbox(&SandboxSpec {
            pod_uid: sb.pod_uid.clone(),
            name: "pod-share".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again, sb);
    assert!(env.rt.list_sandboxes().await.unwrap().contains(&sb));

    let server = env
        .rt
        .start_container(
            &sb,
            &env.spec(
                &sb,
                "server",
                "hostname; cat /etc/hostname; readlink /proc/self/ns/net; readlink /proc/self/ns/ipc; \
                 grep 10.1.2.3 /etc/hosts; grep nameserver /etc/resolv.conf; \
                 mkdir /www && echo pong > /www/index.html && exec httpd -f -p 8080 -h /www",
            ),
        )
        .await
        .unwrap();
    let (state, client_log) = env
        .run(
            &sb,
            &env.spec(
                &sb,
                "client",
                "readlink /proc/self/ns/net; readlink /proc/self/ns/ipc; \
                 for i in $(seq 100); do wget -q -O - http://127.0.0.1:8080/index.html && exit 0; sleep 0.1; done; exit 1",
            ),
        )
        .await;
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 0, .. }),
        "{state:?} {client_log}"
    );
    let server_log = std::fs::read_to_string(env.spec(&sb, "server", "").log_path).unwrap();
    let out: Vec<String> = log_lines(&server_log).into_iter().map(|l| l.2).collect();
    assert_eq!(out.len(), 6, "{out:?}");
    assert_eq!(out[0], "pod-share");
    assert_eq!(out[1], "pod-share");
    assert!(out[2].starts_with("net:["), "{out:?}");
    assert!(out[3].starts_with("ipc:["), "{out:?}");
    assert!(out[4].starts_with("10.1.2.3"), "{out:?}");
    assert_eq!(out[5], "nameserver 10.96.0.10");
    let client: Vec<String> = log_lines(&client_log).into_iter().map(|l| l.2).collect();
    assert_eq!(client.len(), 3, "{client:?}");
    assert_eq!(client[0], out[2], "same network namespace");
    assert_eq!(client[1], out[3], "same IPC namespace");
    assert_eq!(client[2], "pong");
    let server = env.rt.container_status(&server.id).await.unwrap().unwrap();
    assert!(
        matches!(server.state, ContainerState::Running { .. }),
        "{server:?}"
    );

    env.teardown(&sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_env_cwd_and_exec() {
    let env = Env::new();
    let sb = env.sandbox("user").await;
    let mut spec = env.spec(&sb, "who", "id -u; id -g; echo $FOO; pwd");
    spec.user = Some("65534".into());
    spec.env = vec![("FOO".into(), "bar baz".into())];
    spec.working_dir = Some("/tmp".into());
    let (state, log) = env.run(&sb, &spec).await;
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 0, .. }),
        "{state:?}"
    );
    let out: Vec<String> = log_lines(&log).into_iter().map(|l| l.2).collect();
    assert_eq!(out, vec!["65534", "65534", "bar baz", "/tmp"]);

    let mut spec = env.spec(&sb, "named", "id -u");
    spec.user = Some("nobody".into());
    let (_, log) = env.run(&sb, &spec).await;
    assert_eq!(log_lines(&log)[0].2, "65534");

    let st = env
        .rt
        .start_container(&sb, &env.spec(&sb, "sleeper", "sleep 100"))
        .await
        .unwrap();
    let out = env
        .rt
        .exec_sync(
            &st.id,
            &["cat".into(), "/etc/hostname".into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        (out.exit_code, out.stdout.as_slice()),
        (0, &b"pod-user\n"[..])
    );
    let out = env
        .rt
        .exec_sync(
            &st.id,
            &["sh".into(), "-c".into(), "exit 7".into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 7);
    let t = Instant::now();
    let err = env
        .rt
        .exec_sync(
            &st.id,
            &["sleep".into(), "30".into()],
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Timeout(_)), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // The timed-out process was killed inside the container too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ps = env
        .rt
        .exec_sync(&st.id, &["ps".into()], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains("sleep 30"),
        "{}",
        String::from_utf8_lossy(&ps.stdout)
    );

    env.teardown(&sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_adoption() {
    let mut env = Env::new();
    let sb = env.sandbox("adopt").await;
    let st = env
        .rt
        .start_container(
            &sb,
            &env.spec(&sb, "long", "trap 'exit 143' TERM; sleep 100 & wait $!"),
        )
        .await
        .unwrap();
    // A fresh runtime on the same directories (as after an agent restart).
    let fresh = Runtime::new(Env::config(env.tmp.path())).unwrap();
    drop(std::mem::replace(&mut env.rt, fresh));
    let rt2 = env.rt.clone();
    assert_eq!(rt2.list_sandboxes().await.unwrap(), vec![sb.clone()]);
    let listed = rt2.list_containers(&sb.pod_uid).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        matches!(listed[0].state, ContainerState::Running { .. }),
        "{listed:?}"
    );
    rt2.stop_container(&st.id, Duration::from_secs(10), None)
        .await
        .unwrap();
    let state = rt2.container_status(&st.id).await.unwrap().unwrap().state;
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 143, .. }),
        "{state:?}"
    );
    rt2.remove_sandbox(&sb.pod_uid).await.unwrap();
    env.assert_clean(&sb.pod_uid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_remove_cycles_leak_nothing() {
    let env = Env::new();
    for i in 0..50 {
        let sb = env.sandbox("loop").await;
        let script = if i % 5 == 0 { "sleep 100" } else { "echo hi" };
        env.rt
            .start_container(&sb, &env.spec(&sb, "c", script))
            .await
            .unwrap();
        env.teardown(&sb).await;
    }
    assert!(env.rt.list_sandboxes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_shim_reports_unknown_exit() {
    let env = Env::new();
    let sb = env.sandbox("shimdie").await;
    env.rt
        .set_sandbox_hosts(&sb.pod_uid, &[("10.9.9.9".into(), vec!["late".into()])])
        .await
        .unwrap();
    let st = env
        .rt
        .start_container(
            &sb,
            &env.spec(&sb, "orphan", "grep late /etc/hosts; sleep 100"),
        )
        .await
        .unwrap();
    let shim_pid: i32 = std::fs::read_to_string(
        env.state_dir()
            .join("containers")
            .join(&st.id)
            .join("shim.pid"),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(&env.spec(&sb, "orphan", "").log_path).unwrap();
    assert!(log.contains("10.9.9.9\tlate"), "{log}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = env
        .rt
        .container_status(&st.id)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert!(matches!(state, ContainerState::Running { .. }), "{state:?}");
    env.rt
        .stop_container(&st.id, Duration::from_secs(1), None)
        .await
        .unwrap();
    let state = env
        .rt
        .container_status(&st.id)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert!(
        matches!(
            state,
            ContainerState::Exited {
                exit_code: 255,
                signal: None,
                ..
            }
        ),
        "{state:?}"
    );
    env.teardown(&sb).await;
}

#[test]
fn runtime_is_shareable() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Runtime>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rotation_is_followed() {
    let env = Env::new();
    let sb = env.sandbox("rotate").await;
    let spec = env.spec(
        &sb,
        "ticker",
        "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.1; done",
    );
    env.rt.start_container(&sb, &spec).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rotated = spec.log_path.with_extension("log.1");
    std::fs::rename(&spec.log_path, &rotated).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let new = std::fs::read_to_string(&spec.log_path).unwrap();
    assert!(!log_lines(&new).is_empty());
    assert!(!log_lines(&std::fs::read_to_string(&rotated).unwrap()).is_empty());
    env.teardown(&sb).await;
}
