"""The Kubernetes example parses, its ConfigMap holds a host file flowsteer accepts, and its DaemonSet applies the ConfigMap's host file to each node's own
network namespace with the node's bpffs, so the steering outlives the pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flowsteer.hostfile.spec import parse

MANIFEST = Path(__file__).resolve().parents[2] / "packaging" / "k8s" / "flowsteer-daemonset.yaml"


def documents() -> dict[str, dict[str, Any]]:
    """Returns the manifest's documents by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def test_configmap_holds_a_valid_host_file() -> None:
    text = documents()["ConfigMap"]["data"]["host.toml"]
    spec = parse(text, "toml", "ConfigMap flowsteer-host")
    assert spec.bindings and spec.groups and spec.rules  # every hook has a section, and something in it


def test_daemonset_applies_the_configmap_on_the_node() -> None:
    docs = documents()
    daemonset, configmap = docs["DaemonSet"], docs["ConfigMap"]
    pod = daemonset["spec"]["template"]["spec"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= daemonset["spec"]["template"]["metadata"][
        "labels"].items()
    assert pod["hostNetwork"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["host-file"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    (init,) = pod["initContainers"]
    assert init["command"] == ["flowsteer", "apply", "/etc/flowsteer/host.toml"]
    for container in [init, *pod["containers"]]:
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"host-file": "/etc/flowsteer", "bpffs": "/sys/fs/bpf"}
        assert container["securityContext"]["privileged"] is True
    assert "flowsteer apply /etc/flowsteer/host.toml" in pod["containers"][0]["command"][-1]
