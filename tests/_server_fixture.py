"""Shared test helpers: a tiny exported CNN and a real TorchServe instance around it.

The export (about 10 s) is cached per test session in this module, so test modules that
import it share one export per version.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

LABELS = ["circle", "square", "triangle", "cross", "ring"]
INPUT = 32
_EXPORTS: dict[str, Path] = {}


def tiny_model(seed: int):
    """Two conv layers on 32 x 32 inputs, five classes, fixed random weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, len(LABELS)),
    )
    return model.eval()


def tiny_export(base: Path, version: str = "1.0", seed: int = 0) -> Path:
    """Export the tiny CNN once per (version, seed) per session; returns the export folder."""
    key = f"{version}-{seed}"
    if key not in _EXPORTS:
        from camserve.export import export_model

        out = base / f"tiny-export-{key}"
        export_model(
            tiny_model(seed),
            target_layers=["2"],
            out_dir=out,
            input_size=INPUT,
            labels=LABELS,
            model_name="tiny",
            model_version=version,
            mean=(0.5, 0.45, 0.4),
            std=(0.25, 0.25, 0.3),
        )
        _EXPORTS[key] = out
    return _EXPORTS[key]


def sample_image(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth random uint8 RGB image (H, W, 3)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def png_bytes(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image[:, :, ::-1])
    assert ok
    return buf.tobytes()


def http(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for any status; never raises on 4xx/5xx."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def kserve_explain(url: str, model: str, image_png: bytes, parameters: dict[str, Any]) -> tuple[int, bytes]:
    """(status, body) of a KServe v1 ``:explain`` of one image with ``parameters``."""
    import base64

    payload = {"instances": [{"image": {"b64": base64.b64encode(image_png).decode()}}], "parameters": parameters}
    status, _, body = http("POST", f"{url}/v1/models/{model}:explain", json.dumps(payload).encode(),
                           {"Content-Type": "application/json"})
    return status, body


def without_field(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answer images without their ``field`` (KServe names instances, TorchServe parts)."""
    return [{k: v for k, v in im.items() if k != "field"} for im in images]


def multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """Encode (name, content type, bytes) parts as multipart/form-data: (body, content type)."""
    boundary = "camserve-test-boundary-7f3a"
    chunks = []
    for name, ctype, data in parts:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def direct_explanation(export_dir: Path, images: list[np.ndarray], targets: list[Any], methods: list[str]):
    """The CAM module run directly (no server) on the same decoded images."""
    from camserve import cam
    from camserve.pipeline import imageio
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(export_dir, intra_op_threads=1)
    m = session.manifest
    batch = imageio.preprocess(images, m.input_size, m.mean, m.std, m.channel_order)
    return cam.explain(session, batch, targets, methods)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def array_of(entry: dict[str, Any]) -> np.ndarray:
    from camserve.pipeline.render import from_float16

    return from_float16(entry["array"])[0]


def answer_json(body: bytes) -> dict[str, Any]:
    return json.loads(body)


@contextlib.contextmanager
def serving(exports: dict[str, Path], base: Path) -> Iterator[Any]:
    """A real TorchServe on free loopback ports serving one archive per ``exports`` entry
    (name -> export directory; version 1.0, one ONNX thread, no audit), stopped afterwards."""
    from camserve.config import PORT_FIELDS, load_config
    from camserve.serving.torchserve.archive import build_archive
    from camserve.serving.torchserve.server import start, stop

    store = base / "store"
    store.mkdir()
    for name, export in exports.items():
        build_archive(export, name=name, version="1.0", model_store=store)
    config = load_config(env={}, overrides={"server": {p: 0 for p in PORT_FIELDS}, "runtime": {"ort_threads": 1},
                                            "audit": {"enabled": False}})
    instance = start(config, run_dir=base / "run", model_store=store)
    try:
        yield instance
    finally:
        stop(base / "run")
