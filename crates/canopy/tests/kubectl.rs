//! The real kubectl against a real server, on both stores: create, apply, get (-o wide, -w),
//! label, annotate, patch, scale, edit, set image, explain, delete, namespace termination.

mod common;

use std::{io::Read, process::Stdio, time::Duration};

use common::{Backend, Cluster, eventually, kubectl_bin};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: nginx
        image: nginx:1.25
        ports: [{containerPort: 80}]
"#;

fn workflow(backend: Backend) {
    let c = Cluster::start(backend);
    let version = c.kubectl_ok(&["version", "-o", "json"]);
    assert!(version.contains("\"minor\": \"33\""), "{version}");

    // Typed create (protobuf bodies from kubectl 1.33) and YAML through stdin.
    c.kubectl_ok(&["create", "namespace", "shop"]);
    c.kubectl_ok(&[
        "-n",
        "shop",
        "create",
        "configmap",
        "settings",
        "--from-literal=color=blue",
    ]);
    let cm = c.kubectl_ok(&[
        "-n",
        "shop",
        "get",
        "configmap",
        "settings",
        "-o",
        "jsonpath={.data.color}",
    ]);
    assert_eq!(cm, "blue");

    // apply creates, then apply again is a no-op, then apply with a change patches.
    assert!(
        c.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)
            .contains("deployment.apps/web created")
    );
    assert!(
        c.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)
            .contains("unchanged")
    );
    let changed = DEPLOYMENT.replace("replicas: 2", "replicas: 4");
    assert!(
        c.kubectl_stdin(&["apply", "-f", "-"], &changed)
            .contains("configured")
    );
    assert_eq!(
        c.kubectl_ok(&[
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "4"
    );

    // get -o wide prints upstream's columns.
    let wide = c.kubectl_ok(&["-n", "shop", "get", "deploy", "-o", "wide"]);
    let header = wide.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "READY",
        "UP-TO-DATE",
        "AVAILABLE",
        "AGE",
        "CONTAINERS",
        "IMAGES",
        "SELECTOR",
    ] {
        assert!(header.contains(column), "missing {column} in {header:?}");
    }
    assert!(
        wide.contains("nginx:1.25") && wide.contains("app=web"),
        "{wide}"
    );
    let namespaces = c.kubectl_ok(&["get", "namespaces"]);
    assert!(
        namespaces.contains("shop") && namespaces.contains("Active"),
        "{namespaces}"
    );

    // label, annotate, patch (all three types), scale, set image.
    c.kubectl_ok(&["-n", "shop", "label", "deploy", "web", "tier=frontend"]);
    c.kubectl_ok(&["-n", "shop", "annotate", "deploy", "web", "owner=team-a"]);
    let labels = c.kubectl_ok(&[
        "-n",
        "shop",
        "get",
        "deploy",
        "-l",
        "tier=frontend",
        "-o",
        "name",
    ]);
    assert_eq!(labels.trim(), "deployment.apps/web");
    c.kubectl_ok(&["-n", "shop", "label", "deploy", "web", "tier-"]);
    assert!(
        c.kubectl_ok(&["-n", "shop", "get", "deploy", "-l", "tier", "-o", "name"])
            .trim()
            .is_empty()
    );
    c.kubectl_ok(&[
        "-n",
        "shop",
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    c.kubectl_ok(&[
        "-n",
        "shop",
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/revisionHistoryLimit","value":3}]"#,
    ]);
    c.kubectl_ok(&["-n", "shop", "patch", "deploy", "web", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"nginx","env":[{"name":"MODE","value":"prod"}]}]}}}}"#]);
    c.kubectl_ok(&["-n", "shop", "scale", "deploy", "web", "--replicas=6"]);
    c.kubectl_ok(&[
        "-n",
        "shop",
        "set",
        "image",
        "deploy/web",
        "nginx=nginx:1.26",
    ]);
    let got = c.kubectl_ok(&[
        "-n", "shop", "get", "deploy", "web", "-o",
        "jsonpath={.spec.replicas} {.spec.paused} {.spec.revisionHistoryLimit} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[0].value} {.metadata.annotations.owner}",
    ]);
    assert_eq!(got, "6 true 3 nginx:1.26 prod team-a");

    // edit with a non-interactive editor.
    let editor = c.data_dir().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/replicas: 6/replicas: 9/' \"$1\"\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&editor)
        .status()
        .unwrap();
    let out = c.kubectl_env(
        &["-n", "shop", "edit", "deploy", "web"],
        &[("EDITOR", editor.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        c.kubectl_ok(&[
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "9"
    );

    // Server-side apply: conflicts with the fields others changed, then force.
    let ssa = c.kubectl_stdin_status(&["apply", "--server-side", "-f", "-"], DEPLOYMENT);
    assert!(!ssa.0 && ssa.1.contains("conflict"), "{}", ssa.1);
    c.kubectl_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        DEPLOYMENT,
    );
    assert_eq!(
        c.kubectl_ok(&[
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "2"
    );

    // explain reads the OpenAPI documents.
    let explain = c.kubectl_ok(&["explain", "deployment.spec.strategy"]);
    assert!(
        explain.contains("rollingUpdate") && explain.contains("RollingUpdate"),
        "{explain}"
    );

    // get -w streams changes as table rows.
    let mut watch = std::process::Command::new(kubectl_bin())
        .args(["-n", "shop", "get", "pods", "-w", "--request-timeout=20s"])
        .env("KUBECONFIG", c.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    std::thread::sleep(Duration::from_millis(700));
    c.kubectl_ok(&[
        "-n",
        "shop",
        "run",
        "probe",
        "--image=busybox",
        "--restart=Never",
        "--",
        "sleep",
        "3600",
    ]);
    c.kubectl_ok(&["-n", "shop", "label", "pod", "probe", "seen=yes"]);
    c.kubectl_ok(&["-n", "shop", "delete", "pod", "probe"]);
    std::thread::sleep(Duration::from_millis(700));
    let _ = watch.kill();
    let mut streamed = String::new();
    watch
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut streamed)
        .unwrap();
    let _ = watch.wait();
    assert!(
        streamed.lines().next().unwrap_or("").starts_with("NAME"),
        "{streamed}"
    );
    assert!(
        streamed.lines().filter(|l| l.starts_with("probe")).count() >= 2,
        "{streamed}"
    );

    // delete, and namespace deletion waits for the namespace's content to go.
    c.kubectl_ok(&["-n", "shop", "delete", "deploy", "web"]);
    assert!(
        c.kubectl_ok(&["-n", "shop", "get", "deploy", "-o", "name"])
            .trim()
            .is_empty()
    );
    c.kubectl_ok(&["delete", "namespace", "shop", "--timeout=30s"]);
    assert!(eventually(Duration::from_secs(10), || {
        !c.kubectl(&["get", "namespace", "shop"]).status.success()
    }));
    let out = c.kubectl(&[
        "-n",
        "shop",
        "create",
        "configmap",
        "late",
        "--from-literal=a=b",
    ]);
    assert!(
        !out.status.success(),
        "creating in a deleted namespace must fail"
    );
}

trait StdinStatus {
    fn kubectl_stdin_status(&self, args: &[&str], input: &str) -> (bool, String);
}

impl StdinStatus for Cluster {
    fn kubectl_stdin_status(&self, args: &[&str], input: &str) -> (bool, String) {
        use std::io::Write;
        let mut child = std::process::Command::new(kubectl_bin())
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

#[test]
fn kubectl_on_embedded_store() {
    workflow(Backend::Embedded);
}

#[test]
fn kubectl_on_etcd() {
    workflow(Backend::Etcd);
}
