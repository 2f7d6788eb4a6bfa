"""deploy/kubernetes: the manifests parse, validate against the Kubernetes schemas, and agree with the service.

Cross-checks: every IMAGEAI_* variable is a real setting (and its value one Settings accepts), every setting is
documented in serving/README.md, the probes are routes the running service answers, the port is BentoML's, the
image names are the Bentos', the user is the image's. Rendering with kustomize needs kubectl (skipped without it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import REPO_ROOT, Server

from serving.config import ENV_PREFIX, Settings, cpu_quota

K8S = REPO_ROOT / "deploy" / "kubernetes"
BASE, GPU = K8S / "base", K8S / "overlays" / "gpu"
# the oldest Kubernetes the manifests are meant for (autoscaling/v2, policy/v1, seccompProfile) and the newest schema
KUBERNETES_VERSIONS = ("1.25.0", "latest")


def _validate(resource: dict[str, Any], version: str) -> None:
    """Raise unless the resource fits the schema of that Kubernetes version; strict: no unknown fields."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    kubernetes_validate.validate(resource, version, strict=True)


def _yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: KEY=VALUE lines, # comments."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _base() -> dict[str, dict[str, Any]]:
    kustomization = _yaml(BASE / "kustomization.yaml")[0]
    resources = [doc for name in kustomization["resources"] for doc in _yaml(BASE / name)]
    return {doc["kind"]: doc for doc in resources}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _settings_env(*folders: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for folder in folders:
        env.update(_env_file(folder / "config.env"))
    return env


@pytest.mark.parametrize("folders", [(BASE,), (BASE, GPU)], ids=["base", "gpu"])
def test_environment_names_and_values_are_settings(folders: tuple[Path, ...]) -> None:
    env = _settings_env(*folders)
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert {key for key in env if key.startswith(ENV_PREFIX)} <= fields, "a variable the service does not read"
    assert {key for key in env if not key.startswith(ENV_PREFIX)} <= {"BENTOML_DO_NOT_TRACK"}
    settings = Settings.from_env(env)  # the values validate
    cpu_limit = _container(_base()["Deployment"])["resources"]["limits"]["cpu"]
    if GPU in folders:
        cpu_limit = _yaml(GPU / "gpu.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
            "cpu"
        ]
    assert settings.workers * settings.intra_op_threads == int(cpu_limit), "workers x threads should fill the CPU limit"


def test_every_setting_is_documented_in_one_table() -> None:
    documented = set(re.findall(r"^\| `(IMAGEAI_[A-Z0-9_]+)` \|", (REPO_ROOT / "serving/README.md").read_text(), re.M))
    assert documented == {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def test_manifests_agree_with_the_service_and_the_bentos() -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.container.generate import BENTO_UID_GID

    resources = _base()
    deployment, service, hpa, pdb = (resources[kind] for kind in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                                                  "PodDisruptionBudget"))  # fmt: skip
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    [port] = container["ports"]
    assert port["containerPort"] == BentoMLContainer.http.port.get() == 3000
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": port["name"]}, probe
    labels = pod["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):  # fmt: skip
        assert selector.items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imageai"}
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == BENTO_UID_GID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["envFrom"] == [{"configMapRef": {"name": "imageai-config"}}]
    # the images are those `bentoml containerize` makes from the two bentofiles
    assert container["image"] == yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())["name"]
    gpu_image = _yaml(GPU / "kustomization.yaml")[0]["images"][0]["newName"]
    assert gpu_image == yaml.safe_load((REPO_ROOT / "serving/bentofile.gpu.yaml").read_text())["name"]
    gpu_limits = _yaml(GPU / "gpu.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_base_manifests_validate_against_the_kubernetes_schema(version: str) -> None:
    for resource in _base().values():
        _validate(resource, version)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("folder", [BASE, GPU], ids=["base", "gpu"])
def test_kustomize_renders_valid_manifests(folder: Path) -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True)
    resources = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered.stdout) if doc}
    assert set(resources) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for resource in resources.values():
        for version in KUBERNETES_VERSIONS:
            _validate(resource, version)
    config, container = resources["ConfigMap"], _container(resources["Deployment"])
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]  # the hashed name
    Settings.from_env(config["data"])
    if folder == GPU:
        assert container["image"] == "imageai-gpu:latest" and config["data"]["IMAGEAI_DEVICE"] == "cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize(
    ("files", "cores"),
    [({"cpu.max": "200000 100000\n"}, 2), ({"cpu.max": "150000 100000"}, 1), ({"cpu.max": "max 100000"}, None),
     ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
     ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None), ({}, None)],
)  # fmt: skip
def test_cpu_quota_caps_the_cores_a_pod_uses(tmp_path: Path, files: dict[str, str], cores: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == cores


@pytest.mark.slow
def test_probe_paths_answer_on_the_running_service(server: Server) -> None:
    container = _container(_base()["Deployment"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert httpx.get(server.url + container[probe]["httpGet"]["path"]).status_code == 200, probe
