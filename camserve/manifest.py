"""The manifest: everything the server needs to know about an exported graph.

Written by the export step next to ``model.onnx``; read by the handler, the CAM core and
the CLI. It is plain JSON with a versioned schema so that an archive made by one release
of camserve is refused clearly (not misread) by a release that does not understand it.

Graph contract (what the manifest promises about the ONNX file)::

    inputs : image      float32 [N, 3, H, W]   (dynamic N)
             cotangent  float32 [N, num_outputs]
    outputs: logits     float32 [N, num_outputs]
             activations_i, gradients_i  for every target layer i, in manifest order,
             with gradients_i = d(sum(cotangent * logits)) / d(activations_i)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from camserve.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
GRAPH_FILE = "model.onnx"

Layout = Literal["NCHW", "NHWC", "tokens"]
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "tokens")


@dataclass(frozen=True)
class LayerSpec:
    """One target layer as the graph exposes it.

    ``shape`` is the per-sample activation shape (batch dimension left out):
    ``[C, h, w]`` for NCHW, ``[h, w, C]`` for NHWC, ``[T, C]`` for tokens, where
    ``T = prefix_tokens + grid[0] * grid[1]``.
    """

    name: str
    layout: Layout
    shape: tuple[int, ...]
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ManifestError(f"layer {self.name!r}: unknown layout {self.layout!r}, expected one of {LAYOUTS}")
        if self.layout == "tokens":
            if self.grid is None or len(self.shape) != 2:
                raise ManifestError(f"layer {self.name!r}: token layout needs a grid and a [T, C] shape, got {self.shape}")
            tokens = self.prefix_tokens + self.grid[0] * self.grid[1]
            if tokens != self.shape[0]:
                raise ManifestError(
                    f"layer {self.name!r}: {self.shape[0]} tokens != {self.prefix_tokens} prefix + grid {self.grid}"
                )
        elif len(self.shape) != 3:
            raise ManifestError(f"layer {self.name!r}: {self.layout} layout needs a 3-d shape, got {self.shape}")

    @property
    def channels(self) -> int:
        return {"NCHW": self.shape[0], "NHWC": self.shape[-1], "tokens": self.shape[-1]}[self.layout]

    @property
    def spatial(self) -> tuple[int, int]:
        """The (h, w) of the map this layer's activations become."""
        if self.layout == "NCHW":
            return (self.shape[1], self.shape[2])
        if self.layout == "NHWC":
            return (self.shape[0], self.shape[1])
        assert self.grid is not None
        return self.grid


OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
KINDS = ("classifier", "embedding", "segmentation", "detection")


@dataclass(frozen=True)
class Manifest:
    """Metadata of one exported model (see the module docstring for the graph contract)."""

    model_name: str
    model_version: str
    input_size: tuple[int, int]
    labels: tuple[str, ...]
    target_layers: tuple[LayerSpec, ...]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    graph_file: str = GRAPH_FILE
    graph_sha256: str = ""
    opset: int = 0
    ir_version: int = 0
    packages: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    #: Optional second graph: target-layer activations -> logits (AblationCAM). Its inputs
    #: are ("activations",) where the first target layer is a cut of the model, else
    #: ("image", "activations") (the logits also depend on values before the layer).
    head_graph_file: str | None = None
    head_inputs: tuple[str, ...] = ()
    #: Opt-in extra graphs (``camserve export --extras``): name -> ``{"file", "sha256",
    #: "outputs", "parity", "batch_norms_folded", "ort_level", "ort_prepacking"}`` (the last
    #: three since batch norms are folded; absent, ``ort_level`` reads ``basic`` and
    #: ``ort_prepacking`` true); each has the main graph's inputs (see camserve.export.extras).
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The forward-only graph (image -> logits, :mod:`camserve.pipeline.forward`) for the
    #: faithfulness metrics' perturbation runs; None in exports made before it existed
    #: (the runtime then cuts it from ``graph_file`` at load).
    forward_graph_file: str | None = None
    forward_graph_sha256: str = ""
    #: What turns the outputs into probabilities: ``softmax`` (one class of K) or ``sigmoid``
    #: (independent labels: multi-label, or a binary head with K = 1). With ``sigmoid``
    #: predictions list the labels whose probability is at least ``threshold``.
    output_activation: str = "softmax"
    threshold: float = 0.5
    #: ``classifier`` (outputs are class scores), ``embedding`` (outputs are an embedding
    #: ``[N, D]``; targets are cosine similarities to concepts, :mod:`camserve.concepts`) or
    #: ``segmentation`` (outputs are a map ``[N, K, H, W]``; a target is a class over the
    #: pixels predicted as it, :func:`camserve.export.trace.segmentation_cotangent`) or
    #: ``detection`` (a one-image graph answering boxes, scores, labels and activations,
    #: :mod:`camserve.export.detection`; ``threshold`` is then the lowest detection score
    #: answered).
    kind: str = "classifier"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ManifestError(f"output_activation must be one of {', '.join(OUTPUT_ACTIVATIONS)}, got {self.output_activation!r}")
        if self.kind not in KINDS:
            raise ManifestError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ManifestError(f"threshold must be in (0, 1), got {self.threshold!r}")

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def segmentation(self) -> bool:
        return self.kind == "segmentation"

    @property
    def detection(self) -> bool:
        return self.kind == "detection"

    @property
    def embedding(self) -> bool:
        return self.kind == "embedding"

    @property
    def binary(self) -> bool:
        """A single sigmoid output: one label, present or absent (pytorch-grad-cam's
        ``BinaryClassifierOutputTarget`` explains either category)."""
        return self.output_activation == "sigmoid" and self.num_outputs == 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"manifest schema_version {version!r} is not supported (this camserve reads {SCHEMA_VERSION})")
        try:
            layers = tuple(
                LayerSpec(
                    name=lay["name"],
                    layout=lay["layout"],
                    shape=tuple(lay["shape"]),
                    grid=tuple(lay["grid"]) if lay.get("grid") else None,
                    prefix_tokens=int(lay.get("prefix_tokens", 0)),
                )
                for lay in data["target_layers"]
            )
            fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            fields.update(
                target_layers=layers,
                input_size=tuple(data["input_size"]),
                labels=tuple(data["labels"]),
                mean=tuple(data["mean"]),
                std=tuple(data["std"]),
                head_inputs=tuple(data.get("head_inputs") or ()),
            )
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or has a malformed field: {exc}") from exc

    @classmethod
    def load(cls, directory_or_file: str | Path) -> Manifest:
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ManifestError(f"no manifest at {path}") from exc
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (graphs can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
