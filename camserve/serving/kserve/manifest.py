"""``camserve kserve manifest``: what a team applies to run a camserve model on a KServe cluster.

Writes into ``--out``:

* ``inferenceservice.yaml``: a ``serving.kserve.io/v1beta1`` InferenceService whose custom
  predictor container runs ``camserve kserve serve --foreground`` on the export that KServe's
  storage initializer downloads from ``storageUri`` to ``/mnt/models`` (env ``STORAGE_URI``),
  with resources, ``minReplicas``/``maxReplicas`` and a concurrency target, readiness and
  liveness probes on KServe's health routes, Prometheus annotations pointing at the model
  server's own port (where camserve's metrics are; KServe's ``enable-prometheus-scraping``
  alone would scrape the queue-proxy), and the audit DSN from a Secret;
* ``Dockerfile`` (CPU, ``python:3.11-slim``) and ``Dockerfile.cuda`` (CUDA 13 runtime base)
  for the predictor image: the camserve wheel with its ``kserve`` extra, ONNX Runtime, no
  torch;
* ``README.md``: the commands, in order.

The InferenceService is built from the ``kserve`` SDK's typed models and the container from
``kubernetes.client``'s, so field names are checked by their own code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from camserve.errors import CamserveError

PORT = 8080
MOUNT = "/mnt/models"


def _kserve() -> Any:
    """The ``kserve`` package, imported with an empty command line (kserve parses it at import)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
        import kserve.models  # noqa: F401
    except ImportError:
        raise CamserveError("the kserve package is not installed: pip install 'camserve[kserve]'") from None
    finally:
        sys.argv = argv
    return kserve


def container(name: str, version: str, image: str, storage_uri: str, *, cpu: str, memory: str, gpus: int,
              audit_secret: str | None) -> Any:
    """The predictor container (``kubernetes.client.V1Container``)."""
    from kubernetes import client as k8s

    env = [k8s.V1EnvVar(name="STORAGE_URI", value=storage_uri), k8s.V1EnvVar(name="ORT_DISABLE_TELEMETRY", value="1")]
    if audit_secret:  # one PostgreSQL chain for every replica
        env += [k8s.V1EnvVar(name="CAMSERVE_AUDIT_SINK", value="postgres"),
                k8s.V1EnvVar(name="CAMSERVE_AUDIT_DSN", value_from=k8s.V1EnvVarSource(
                    secret_key_ref=k8s.V1SecretKeySelector(name=audit_secret, key="dsn")))]
    else:  # per replica, lost with the pod: say so in the README
        env.append(k8s.V1EnvVar(name="CAMSERVE_AUDIT_PATH", value="/tmp/camserve-audit"))
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    probe = lambda path, delay: k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=path, port=PORT),  # noqa: E731
                                             initial_delay_seconds=delay, period_seconds=10, failure_threshold=6)
    return k8s.V1Container(
        name="kserve-container",
        image=image,
        command=["camserve", "kserve", "serve", MOUNT, "--name", name, "--version", version, "--host", "0.0.0.0",
                 "--http-port", str(PORT), "--no-grpc", "--run-dir", "/tmp/ks_run", "--foreground"],
        env=env,
        ports=[k8s.V1ContainerPort(container_port=PORT, name="http1", protocol="TCP")],
        resources=k8s.V1ResourceRequirements(requests={"cpu": cpu, "memory": memory}, limits=limits),
        readiness_probe=probe(f"/v2/models/{name}/ready", 5),
        liveness_probe=probe("/v2/health/live", 30),
    )


def inference_service(name: str, version: str, image: str, storage_uri: str, *, min_replicas: int = 1,
                      max_replicas: int = 4, concurrency: int = 8, cpu: str = "2", memory: str = "4Gi", gpus: int = 0,
                      audit_secret: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    """The InferenceService as a plain dict (camelCase, as applied)."""
    from kubernetes import client as k8s

    if not 1 <= min_replicas <= max_replicas:
        raise CamserveError(f"replicas must satisfy 1 <= min ({min_replicas}) <= max ({max_replicas})")
    kserve = _kserve()
    m = kserve.models
    isvc = m.V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels={"app.kubernetes.io/name": "camserve"},
                                  annotations={"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                                               "prometheus.io/path": "/metrics"}),
        spec=m.V1beta1InferenceServiceSpec(predictor=m.V1beta1PredictorSpec(
            min_replicas=min_replicas, max_replicas=max_replicas, scale_metric="concurrency", scale_target=concurrency,
            timeout=120,
            containers=[container(name, version, image, storage_uri, cpu=cpu, memory=memory, gpus=gpus,
                                  audit_secret=audit_secret)],
        )),
    )
    return kserve.ApiClient().sanitize_for_serialization(isvc)  # camelCase, no nulls


DOCKERFILE = """\
# The camserve predictor image for KServe: ONNX Runtime + camserve, no torch.
# Build from the checkout root after `python -m pip wheel --no-deps -w dist .`:
#   docker build -f {path} -t REGISTRY/camserve:TAG .
FROM {base}
{setup}ENV ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
COPY dist/camserve-*.whl /tmp/
RUN python3 -m pip install --no-cache-dir "$(ls /tmp/camserve-*.whl)[kserve]" && rm /tmp/camserve-*.whl
RUN useradd --uid 1000 --create-home camserve
USER 1000
EXPOSE {port}
"""
CUDA_SETUP = ("RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 \\\n"
              "    && rm -rf /var/lib/apt/lists/*\nENV PIP_BREAK_SYSTEM_PACKAGES=1\n")

README = """\
# Deploying {name} {version} on KServe

Written by `camserve kserve manifest`. Nothing here was applied to a cluster by camserve's
tests (none can run on the build machine): the InferenceService was built from the kserve
SDK's typed models, its container checked with kubernetes-validate as a Pod, and both
Dockerfiles were written, not built.

1. Put the export folder (model.onnx, manifest.json) at `{storage_uri}`.
2. Build and push the predictor image (CPU or CUDA):

       python -m pip wheel --no-deps -w dist .
       docker build -f deploy/Dockerfile -t {image} . && docker push {image}

3. {audit_step}
4. `kubectl apply -f inferenceservice.yaml`, then
   `curl -H 'Content-Type: application/json' http://<ingress>/v2/models/{name}/infer -d @request.json`.

Probes use `/v2/models/{name}/ready` and `/v2/health/live` (no token). Authentication belongs
to the ingress or service mesh in front of the predictor. Prometheus scrapes the model server
itself (`prometheus.io/port: {port}`), where camserve's metrics are.
"""


def write(out: str | Path, export_dir: str | Path, *, name: str | None, image: str, storage_uri: str,
          **options: Any) -> list[Path]:
    """Write the InferenceService, the Dockerfiles and the README into ``out``; returns the files."""
    from camserve.manifest import Manifest

    manifest = Manifest.load(Path(export_dir))
    name = name or manifest.model_name
    version = manifest.model_version
    isvc = inference_service(name, version, image, storage_uri, **options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    audit = options.get("audit_secret")
    audit_step = (f"Create the audit DSN secret: `kubectl create secret generic {audit} "
                  f"--from-literal=dsn=postgresql://USER:PASSWORD@HOST:5432/camserve`." if audit else
                  "Audit: without `--audit-secret` each replica keeps a SQLite log in its own /tmp, lost "
                  "with the pod; pass `--audit-secret NAME` for one PostgreSQL chain for all replicas.")
    files = {
        "inferenceservice.yaml": yaml.safe_dump(isvc, sort_keys=False),
        "Dockerfile": DOCKERFILE.format(path="deploy/Dockerfile", base="python:3.11-slim", setup="", port=PORT),
        "Dockerfile.cuda": DOCKERFILE.format(path="deploy/Dockerfile.cuda", base="nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04",
                                             setup=CUDA_SETUP, port=PORT),
        "README.md": README.format(name=name, version=version, storage_uri=storage_uri, image=image, port=PORT,
                                   audit_step=audit_step),
    }
    for file, text in files.items():
        (out / file).write_text(text)
    return [out / f for f in files]


def _run(args: argparse.Namespace) -> int:
    written = write(args.out, args.export, name=args.name, image=args.image, storage_uri=args.storage_uri,
                    min_replicas=args.min_replicas, max_replicas=args.max_replicas, concurrency=args.concurrency,
                    cpu=args.cpu, memory=args.memory, gpus=args.gpus, audit_secret=args.audit_secret,
                    namespace=args.namespace)
    print("camserve: wrote " + ", ".join(str(p) for p in written))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("manifest", help="write an InferenceService, Dockerfiles and a README for a KServe cluster")
    p.add_argument("export", help="export folder (for the model's name and version)")
    p.add_argument("--name", help="InferenceService and model name (default: the manifest's)")
    p.add_argument("--image", required=True, help="predictor image, e.g. REGISTRY/camserve:0.2")
    p.add_argument("--storage-uri", required=True, help="where the export folder lies, e.g. s3://bucket/resnet50")
    p.add_argument("--out", default="deploy", help="output folder (default deploy)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8, help="autoscaling target: requests in flight per replica")
    p.add_argument("--cpu", default="2")
    p.add_argument("--memory", default="4Gi")
    p.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu per replica (use Dockerfile.cuda)")
    p.add_argument("--audit-secret", help="Secret holding the PostgreSQL audit DSN under key 'dsn'")
    p.add_argument("--namespace")
    p.set_defaults(func=_run)
