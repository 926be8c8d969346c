"""What `deploy/` asks of a cluster must exist: every image it names is built by a file in
this repository at the package's version, every Kubernetes manifest is valid against the
Kubernetes schemas (strict: an unknown field is an error), and the kustomization applies
exactly the manifests beside it. A manifest naming `ghcr.io/example/warmpool:0.1.0`, which
nothing built, went unnoticed for a release."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def images_named(node: Any) -> list[str]:
    """Every container image a manifest names (``image:`` anywhere in it)."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images_named(v)]
    if isinstance(node, list):
        return [i for v in node for i in images_named(v)]
    return []


def makefile_images() -> dict[str, Path]:
    """The images the Makefile builds (``IMAGE ?=``, ``VLLM_IMAGE ?=``) and the file each
    is built from (the ``-f`` of the target whose ``-t`` names it)."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    names = {var: value.replace("$(VERSION)", VERSION) for var, value in
             re.findall(r"^(\w*IMAGE) \?= (\S+)$", text, re.M)}
    built = {}
    for var, name in names.items():
        for recipe in re.findall(r"build .*?-f (\S+) -t \$\(" + var + r"\)", text):
            built[name] = REPO / recipe
    return built


def test_every_image_named_under_deploy_is_built_here_at_the_package_version() -> None:
    built = makefile_images()
    assert built, "the Makefile builds no image"
    assert all(path.is_file() for path in built.values()), built
    named = {image for path in sorted(DEPLOY.rglob("*.yaml"))
             for doc in documents(path) for image in images_named(doc)}
    assert named, "no manifest names an image"
    assert named <= set(built), f"named but not built here: {sorted(named - set(built))}"
    assert all(image.endswith(f":{VERSION}") for image in named), named


def test_the_kustomization_applies_the_manifests_beside_it() -> None:
    [kustomization] = documents(KUBERNETES / "kustomization.yaml")
    manifests = sorted(p.name for p in KUBERNETES.glob("*.yaml")
                       if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == manifests
    named = {image.rsplit(":", 1)[0] for name in manifests
             for doc in documents(KUBERNETES / name) for image in images_named(doc)}
    assert {i["name"] for i in kustomization["images"]} == named
    assert all(i.get("newTag") == VERSION for i in kustomization["images"])


@pytest.mark.parametrize("manifest", sorted(p.name for p in KUBERNETES.glob("*.yaml")
                                            if p.name != "kustomization.yaml"))
def test_manifests_are_valid_kubernetes(manifest: str) -> None:
    version = kubernetes_validate.latest_version()
    for doc in documents(KUBERNETES / manifest):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_serving_pod_meets_the_pool_where_the_daemonset_keeps_it() -> None:
    """The attach works only with the same uid, hostIPC, nodes and host directories as the
    DaemonSet's, and vLLM given the files directory with the warmpool load format."""
    [daemonset] = [d for d in documents(KUBERNETES / "daemonset.yaml")
                   if d["kind"] == "DaemonSet"]
    [serving] = [d for d in documents(KUBERNETES / "serving-vllm.yaml")
                 if d["kind"] == "Deployment"]
    pool, pod = daemonset["spec"]["template"]["spec"], serving["spec"]["template"]["spec"]
    assert pod["hostIPC"] is pool["hostIPC"] is True
    assert pod["securityContext"]["runAsUser"] == pool["securityContext"]["runAsUser"]
    assert pod["nodeSelector"] == pool["nodeSelector"]
    paths = {v["name"]: v["hostPath"]["path"] for v in pool["volumes"] if "hostPath" in v}
    assert {v["hostPath"]["path"] for v in pod["volumes"]} <= set(paths.values())
    [container] = pod["containers"]
    command = " ".join(container["args"])
    assert "warmpool metadata" in command and "--files-dir" in command
    assert "--load-format warmpool" in command
