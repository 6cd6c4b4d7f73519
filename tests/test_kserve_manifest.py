"""``camserve kserve manifest``: the InferenceService maps onto KServe's typed model with nothing
lost, its container is a valid Pod container for Kubernetes' own schema, and the container's
command, run as written here (paths and host swapped for the test's), serves the model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from _server_fixture import tiny_export

if importlib.util.find_spec("kserve") is None:  # not imported here: kserve parses the command line at import
    pytest.skip("camserve[kserve] is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from camserve.cli import main

    export = tiny_export(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("deploy")
    code = main(["kserve", "manifest", str(export), "--image", "registry.example/camserve:0.2", "--storage-uri",
                 "s3://models/tiny", "--out", str(out), "--audit-secret", "camserve-audit", "--max-replicas", "3"])
    assert code == 0
    return export, out, yaml.safe_load((out / "inferenceservice.yaml").read_text())


def test_inference_service_fields(written):
    _, out, isvc = written
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    meta, predictor = isvc["metadata"], isvc["spec"]["predictor"]
    assert meta["name"] == "tiny" and meta["annotations"]["prometheus.io/port"] == "8080"
    assert "serving.kserve.io/enable-prometheus-scraping" not in meta["annotations"]  # it would scrape the queue-proxy
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"], predictor["scaleTarget"]) == (1, 3, "concurrency", 8)
    (container,) = predictor["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["STORAGE_URI"]["value"] == "s3://models/tiny"
    assert env["CAMSERVE_AUDIT_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "camserve-audit", "key": "dsn"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/tiny/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["command"][:4] == ["camserve", "kserve", "serve", "/mnt/models"] and "--foreground" in container["command"]
    for name in ("Dockerfile", "Dockerfile.cuda", "README.md"):
        assert (out / name).is_file()
    assert "torch" not in (out / "Dockerfile").read_text().lower().replace("no torch", "")
    assert "camserve-audit" in (out / "README.md").read_text()


def unknown_fields(value, klass: str, path: str = "") -> list[str]:
    """Keys of ``value`` that the typed model ``klass`` (kserve's V1beta1*, else kubernetes'
    V1*) does not have, recursively through its declared attribute types."""
    import re

    import kserve.models
    from kubernetes.client import models as k8s_models

    if m := re.fullmatch(r"list\[(.+)\]", klass):
        return [bad for i, item in enumerate(value) for bad in unknown_fields(item, m[1], f"{path}[{i}]")]
    if m := re.fullmatch(r"dict\(str, (.+)\)", klass):
        return [bad for k, item in value.items() for bad in unknown_fields(item, m[1], f"{path}.{k}")]
    model = getattr(kserve.models, klass, None) or getattr(k8s_models, klass, None)
    if model is None:  # str, int, object, ...
        return []
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    out = []
    for key, item in value.items():
        if key not in by_key:
            out.append(f"{path}.{key}")
        else:
            out += unknown_fields(item, model.openapi_types[by_key[key]], f"{path}.{key}")
    return out


def test_every_field_is_known_to_kserves_typed_model(written):
    _, _, isvc = written
    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses the command line at import
    try:
        import kserve.models  # noqa: F401
    finally:
        sys.argv = argv
    assert unknown_fields(isvc, "V1beta1InferenceService") == []
    assert unknown_fields({**isvc, "spec": {"predictor": {"minReplica": 1}}}, "V1beta1InferenceService") == [".spec.predictor.minReplica"]


def test_container_is_valid_for_kubernetes(written):
    import kubernetes_validate

    _, _, isvc = written
    (container,) = isvc["spec"]["predictor"]["containers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "camserve-predictor"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    broken = {**pod, "spec": {"containers": [{**container, "readinessProbe": {"httpGet": {"path": 8080}}}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.server
def test_the_containers_command_serves_the_model(written, tmp_path):
    """The manifest's command (export path, host, port and run folder swapped for the test's) in the foreground."""
    from camserve.serving.torchserve.server import free_port

    export, _, isvc = written
    (container,) = isvc["spec"]["predictor"]["containers"]
    port = free_port()
    swap = {"/mnt/models": str(export), "0.0.0.0": "127.0.0.1", "8080": str(port), "/tmp/ks_run": str(tmp_path / "run")}
    command = [swap.get(arg, arg) for arg in container["command"]]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.pop("STORAGE_URI")
    env.pop("CAMSERVE_AUDIT_SINK")  # the secret's PostgreSQL DSN: a local SQLite log instead
    env = {**os.environ, **env, "CAMSERVE_AUDIT_PATH": str(tmp_path / "audit")}
    camserve = os.path.join(os.path.dirname(sys.executable), "camserve")
    proc = subprocess.Popen([camserve, *command[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the container's command exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/tiny/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.5)
        assert proc.poll() is None  # the command itself is the server (a container's main process)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
