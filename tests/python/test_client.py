"""The official Python `kubernetes` client, unchanged, against a running Canopy server.

Run by crates/canopy/tests/python_client.rs with KUBECONFIG pointing at the server.
Exits non-zero on the first failed check.
"""
import os
import sys
import threading
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    core = client.CoreV1Api()
    apps = client.AppsV1Api()

    version = client.VersionApi().get_code()
    check(version.minor == "33", f"server minor version {version.minor}")

    names = [ns.metadata.name for ns in core.list_namespace().items]
    check("default" in names and "kube-system" in names, f"namespaces {names}")

    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="py")))
    cm = core.create_namespaced_config_map(
        "py",
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings", labels={"app": "py"}), data={"k": "v"}),
    )
    check(cm.metadata.uid and cm.metadata.resource_version, "created configmap has uid and resourceVersion")
    got = core.read_namespaced_config_map("settings", "py")
    check(got.data == {"k": "v"}, f"read back {got.data}")

    try:
        core.create_namespaced_config_map("py", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings")))
        check(False, "duplicate create must fail")
    except ApiException as e:
        check(e.status == 409, f"duplicate create status {e.status}")

    apps.create_namespaced_deployment(
        "py",
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels={"app": "web"}),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels={"app": "web"}),
                    spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx:1.25")]),
                ),
            ),
        ),
    )
    deployments = apps.list_namespaced_deployment("py", label_selector="").items
    check([d.metadata.name for d in deployments] == ["web"], "deployment listed")
    check(deployments[0].spec.strategy.type == "RollingUpdate", "deployment defaults applied")

    listed = core.list_namespaced_config_map("py", label_selector="app=py")
    check(len(listed.items) == 1, f"label selector list {len(listed.items)}")

    # Watch from the list's resourceVersion: the changes made afterwards arrive in order.
    rv = listed.metadata.resource_version
    seen = []
    w = watch.Watch()

    def make_changes():
        time.sleep(0.5)
        core.patch_namespaced_config_map("settings", "py", {"data": {"k": "v2"}})
        core.create_namespaced_config_map(
            "py", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="second", labels={"app": "py"}))
        )
        core.delete_namespaced_config_map("second", "py")

    threading.Thread(target=make_changes).start()
    for event in w.stream(
        core.list_namespaced_config_map, "py", label_selector="app=py", resource_version=rv, timeout_seconds=15
    ):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 3:
            w.stop()
    check(
        seen == [("MODIFIED", "settings"), ("ADDED", "second"), ("DELETED", "second")],
        f"watch events {seen}",
    )

    pods = core.list_pod_for_all_namespaces(limit=1)
    check(pods.items == [] or len(pods.items) == 1, "limit honoured")
    print("python kubernetes client: all checks passed")


if __name__ == "__main__":
    main()
