"""ONNX Runtime sessions over an exported graph: the only model math on the request path.

``GraphSession`` loads ``model.onnx`` + ``manifest.json`` and answers one call per batch
with logits, activations and gradients. Provider choice is deliberate: CUDA only when a
GPU is really there (so CPU hosts print no provider errors), else CPU.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ONNX Runtime phones home unless told not to; only loopback traffic is allowed here.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort  # noqa: E402

from camserve.config import POST_PROCESSING  # noqa: E402
from camserve.errors import InputError, ManifestError  # noqa: E402
from camserve.pipeline import malloc  # noqa: E402
from camserve.manifest import Manifest, sha256_file  # noqa: E402


def cuda_available() -> bool:
    """True when ONNX Runtime has a CUDA provider *and* a GPU is visible."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def default_providers() -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_available() else ["CPUExecutionProvider"]


def create_session(model: str | Path | bytes, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """An ONNX Runtime session over a graph file (or its bytes), loaded with large buffers
    mapped on their own (:func:`camserve.pipeline.malloc.loading`): the load peak is the live
    maximum, the same in every process."""
    with malloc.loading():
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options, providers=providers)


def session_options(intra_op_threads: int | None = None, spin: bool | None = None) -> ort.SessionOptions:
    """Session options set on purpose: fixed threads (no oversubscription with several
    workers), full graph optimization, sequential execution, quiet logs. ``CAMSERVE_SPIN=0``
    stops the intra-op threads from spin-waiting after a run: each session has its own
    threads, and where two sessions take turns on the same cores (the benchmarks' side-by-side
    runs) the idle one's spinning slowed the other's run by up to 1.5x (vit_b_32, batch 1).
    ``spin`` overrides the variable (the device post-processing's sessions never spin)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads or int(os.environ.get("CAMSERVE_THREADS", "0")) or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not (spin if spin is not None else os.environ.get("CAMSERVE_SPIN", "1") != "0"):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


EXTRA_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def extra_session_options(intra_op_threads: int | None = None, level: str = "basic",
                          prepacking: bool = True) -> ort.SessionOptions:
    """Options of an extra graph (``camserve export --extras``) at the optimization level its
    manifest entry names (``ort_level``; exports before it: ``basic``). Basic where all of
    ONNX Runtime's optimizations would keep fused copies of the weights beside the unfused
    ones an input-gradient backward needs (resnet50 ``fullgrad.onnx`` with its batch norms
    unfolded: 485 MB at load against 390 MB basic, the main graph 313 MB); all where the
    export left nothing to duplicate (batch norms folded into the convolutions,
    :mod:`camserve.export.folding`): resnet50's graphs 1.2-1.6x faster, within 1.3x the main
    graph's load peak (``bench/bench_extras.py``).

    ``prepacking=False`` (``ort_prepacking`` in the entry) keeps ONNX Runtime from packing
    MatMul weights at load. ShapleyCAM's double backward reads each weight in several
    places; packed, vit_b_16's ``shapley.onnx`` peaked at 458 or 646-708 MB at load depending
    on the process's address layout, unpacked at 413-468 MB every time. Loaded through
    :func:`create_session` the packed peak is steady too (495 against 465 MB, batch 1 11%
    faster), but the unpacked graph is the closer one to torch's double backward: resnet50's
    ``g - hvp / 2`` reads a max relative error of 4.8e-3 unpacked against 2.0e-2 packed over
    the export's parity cases (session 14), so ShapleyCAM's graph stays unpacked."""
    if level not in EXTRA_LEVELS:
        raise ManifestError(f"unknown ort_level {level!r} for an extra graph (known: {', '.join(EXTRA_LEVELS)})")
    opts = session_options(intra_op_threads)
    opts.graph_optimization_level = EXTRA_LEVELS[level]
    if not prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def load_forward(directory: Path, manifest: Manifest, options: ort.SessionOptions, providers: list[str],
                 verify_hash: bool = True) -> ort.InferenceSession:
    """A session over the export's forward-only graph, cut from the explain graph in memory
    when the export predates ``forward.onnx``."""
    from camserve.pipeline.forward import forward_model_bytes

    if manifest.forward_graph_file:
        path = directory / manifest.forward_graph_file
        if not path.is_file():
            raise ManifestError(f"forward graph {path} named by the manifest does not exist")
        if verify_hash and manifest.forward_graph_sha256 and sha256_file(path) != manifest.forward_graph_sha256:
            raise ManifestError(f"forward graph {path} does not match the manifest's sha256 (corrupted or replaced)")
        return create_session(path, options, providers)
    return create_session(forward_model_bytes(directory / manifest.graph_file), options, providers)


@dataclass(frozen=True)
class GraphOutputs:
    """One batch's answer: logits [N, K] and, per target layer, activations and gradients."""

    logits: np.ndarray
    activations: list[np.ndarray]
    gradients: list[np.ndarray]


class DeviceOutputs:
    """One batch's answer with the logits on the host and the activations and gradients left
    where the session ran them (``values``: ``ort.OrtValue`` in the graph's output order,
    ``activations_0, gradients_0, ...``), for :class:`camserve.cam.device.DevicePost`.
    ``activations`` and ``gradients`` copy them to the host on first use, as
    :class:`GraphOutputs` has them, for the methods that run in numpy."""

    def __init__(self, logits: np.ndarray, values: list[Any]) -> None:
        self.logits, self.values = logits, values

    @functools.cached_property
    def _host(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.values]

    @property
    def activations(self) -> list[np.ndarray]:
        return self._host[0::2]

    @property
    def gradients(self) -> list[np.ndarray]:
        return self._host[1::2]


class GraphSession:
    """An ONNX Runtime session over an export directory (graph + manifest)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        verify_hash: bool = True,
        post_processing: str = "auto",
    ) -> None:
        if post_processing not in POST_PROCESSING:
            raise ValueError(f"post_processing must be one of {', '.join(POST_PROCESSING)}, got {post_processing!r}")
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        graph = checked_graph(self.directory, self.manifest, verify_hash)
        self.providers = providers or default_providers()
        self.options = session_options(intra_op_threads)
        self.session = create_session(graph, self.options, self.providers)
        self._layer_count = len(self.manifest.target_layers)
        #: segmentation graphs exported since client masks: a ``region [N, 1, H, W]`` input
        self.has_region = "region" in {i.name for i in self.session.get_inputs()}
        self._head: ort.InferenceSession | None = None
        #: Extra graphs (``camserve export --extras``), loaded now: the export opted in, and a
        #: first request should not pay for loading them.
        self.extras: dict[str, ort.InferenceSession] = {}
        for name, entry in self.manifest.extras.items():
            path = checked_extra(self.directory, entry, verify_hash)
            options = extra_session_options(intra_op_threads, entry.get("ort_level", "basic"),
                                            bool(entry.get("ort_prepacking", True)))
            self.extras[name] = create_session(path, options, self.providers)
        self._extra_outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.extras.items()}
        self._verify_hash = verify_hash
        self._forward: ort.InferenceSession | None = None
        self._forward_lock = threading.Lock()
        #: where the explain graph leaves its outputs for :meth:`run_on_device`
        self.device_type = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        #: the device post-processing graphs (:mod:`camserve.cam.device`), or None: numpy on the host
        self.post: Any = None
        if post_processing == "device" or (post_processing == "auto" and self.device_type == "cuda"):
            from camserve.cam.device import DevicePost

            # its own threads must not spin between runs: they would take the cores from the next graph run
            post_options = session_options(intra_op_threads, spin=False)
            self.post = DevicePost(self.manifest.target_layers, post_options, self.providers)
            for method in self.post.methods:  # at load, not in a first request (every image has the input size)
                self.post.session(method, self.manifest.input_size)

    @property
    def head(self) -> ort.InferenceSession:
        """The optional activations -> logits graph (loaded on first use)."""
        if self._head is None:
            name = self.manifest.head_graph_file
            if not name:
                raise ManifestError("this export has no head graph (re-export with head=True for AblationCAM)")
            self._head = create_session(self.directory / name, self.options, self.providers)
        return self._head

    @property
    def forward(self) -> ort.InferenceSession:
        """The forward-only graph (image -> logits), loaded on first use: the faithfulness
        metrics' perturbation runs (:mod:`camserve.pipeline.forward`)."""
        with self._forward_lock:
            if self._forward is None:
                self._forward = load_forward(self.directory, self.manifest, self.options, self.providers, self._verify_hash)
            return self._forward

    def forward_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits of ``images`` [N, 3, H, W] through the forward-only graph (no backward)."""
        return self.forward.run(["logits"], {"image": self.check_images(images)})[0]

    def check_images(self, images: np.ndarray) -> np.ndarray:
        return check_images(images, self.manifest)

    def run(
        self,
        images: np.ndarray,
        cotangent: np.ndarray | None = None,
        target_rank: np.ndarray | None = None,
        region: np.ndarray | None = None,
    ) -> GraphOutputs:
        """Run the graph once for a batch.

        ``cotangent`` [N, K] weights the logits whose gradient is taken (``None``: zeros).
        ``target_rank`` [N] int64: where ``>= 0`` the row's cotangent is replaced by the
        one-hot vector of the logit of that rank (0 = top-1), so top-k explanations need
        no separate forward pass; ``None`` means -1 for every row (cotangent as given).
        ``region`` [N, H, W] (segmentation): a row's mask of the pixels whose outputs are
        explained, or -1 for the pixels predicted as each class (``None``: -1 everywhere).
        """
        feeds = self._feeds(images, cotangent, target_rank, region)
        out = self.session.run(None, feeds)
        m = self._layer_count
        return GraphOutputs(logits=out[0], activations=list(out[1 : 1 + 2 * m : 2]), gradients=list(out[2 : 2 + 2 * m : 2]))

    def run_on_device(self, images: np.ndarray, cotangent: np.ndarray | None = None,
                      target_rank: np.ndarray | None = None, region: np.ndarray | None = None) -> DeviceOutputs:
        """:meth:`run`, with the activations and gradients left on the session's device
        (IOBinding): only the logits come back to the host."""
        values = self._run_bound(self.session, self._feeds(images, cotangent, target_rank, region))
        return DeviceOutputs(values[0].numpy(), list(values[1:]))

    def _run_bound(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[Any]:
        """One run of ``session`` whose outputs stay on the session's device (``ort.OrtValue``),
        but ``logits``, bound to the host."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu" if out.name == "logits" else self.device_type)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _feeds(self, images: np.ndarray, cotangent: np.ndarray | None, target_rank: np.ndarray | None,
               region: np.ndarray | None = None) -> dict[str, np.ndarray]:
        images = self.check_images(images)
        extra: dict[str, np.ndarray] = {}
        if self.has_region:
            extra["region"] = self.check_region(region, images)
        elif region is not None:
            raise ManifestError("this segmentation export takes no client mask: re-export it with this camserve version")
        n, k = images.shape[0], self.manifest.num_outputs
        if cotangent is None:
            cotangent = np.zeros((n, k), dtype=np.float32)
        if cotangent.shape != (n, k):
            raise InputError(f"cotangent must have shape [{n}, {k}], got {list(cotangent.shape)}")
        if target_rank is None:
            target_rank = np.full(n, -1, dtype=np.int64)
        target_rank = np.asarray(target_rank, dtype=np.int64)
        if target_rank.shape != (n,) or target_rank.max(initial=-1) >= k:
            raise InputError(f"target_rank must be [{n}] ints below {k}, got {target_rank.tolist()}")
        return {
            "image": images,
            "cotangent": np.ascontiguousarray(cotangent, dtype=np.float32),
            "target_rank": target_rank,
            **extra,
        }

    def check_region(self, region: np.ndarray | None, images: np.ndarray) -> np.ndarray:
        """The ``region`` feed ``[N, 1, H, W]`` float32 (see :meth:`run`)."""
        n, _, h, w = images.shape
        if region is None:
            return np.full((n, 1, h, w), -1.0, dtype=np.float32)
        region = np.asarray(region, dtype=np.float32)
        if region.shape != (n, h, w):
            raise InputError(f"region must have shape [{n}, {h}, {w}], got {list(region.shape)}")
        return np.ascontiguousarray(region[:, None])

    def run_extra(self, name: str, images: np.ndarray, cotangent: np.ndarray | None = None,
                  target_rank: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run extra graph ``name`` (same inputs as :meth:`run`); returns its outputs by name."""
        if name not in self.extras:
            raise ManifestError(f"this export has no {name!r} graph (re-export with --extras {name})")
        feeds = self._feeds(images, cotangent, target_rank)
        session = self.extras[name]
        return dict(zip(self._extra_outputs[name], session.run(None, feeds)))

    def run_extra_on_device(self, name: str, images: np.ndarray, cotangent: np.ndarray | None = None,
                            target_rank: np.ndarray | None = None) -> dict[str, Any]:
        """:meth:`run_extra` with every output but the logits left on the session's device
        (``ort.OrtValue``), for :class:`camserve.cam.device.DevicePost`."""
        if name not in self.extras:
            raise ManifestError(f"this export has no {name!r} graph (re-export with --extras {name})")
        values = self._run_bound(self.extras[name], self._feeds(images, cotangent, target_rank))
        return {out: v.numpy() if out == "logits" else v for out, v in zip(self._extra_outputs[name], values)}

    @property
    def threads(self) -> int:
        """ONNX Runtime's intra-op threads: post-processing may use as many, since those cores
        are idle once the graph has answered (``camserve.cam.parallel``)."""
        return int(self.options.intra_op_num_threads)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits only (ScoreCAM's masked runs); the zero cotangent makes the backward trivial."""
        return self.run(images).logits

    def head_logits(self, activations: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        """Logits from the first target layer's activations, through the head graph.

        ``images`` (same batch) is needed only when ``manifest.head_inputs`` names it: the
        layer is not a cut of the model (ViT's ``ln_1``), so earlier values matter too.
        """
        feeds = {"activations": np.ascontiguousarray(activations, dtype=np.float32)}
        if "image" in self.manifest.head_inputs:
            if images is None or images.shape[0] != activations.shape[0]:
                raise InputError("this head graph needs the images (one per activation row) as well")
            feeds["image"] = self.check_images(images)
        return self.head.run(["logits"], feeds)[0]


def check_images(images: np.ndarray, manifest: Manifest) -> np.ndarray:
    """``images`` as the graph takes them: float32 ``[N, 3, H, W]`` at the manifest's input size."""
    h, w = manifest.input_size
    if images.ndim != 4 or images.shape[1:] != (3, h, w):
        raise InputError(f"images must have shape [N, 3, {h}, {w}], got {list(images.shape)}")
    return np.ascontiguousarray(images, dtype=np.float32)


def checked_graph(directory: Path, manifest: Manifest, verify_hash: bool) -> Path:
    """The manifest's graph file in ``directory``, present and (``verify_hash``) unchanged."""
    graph = directory / manifest.graph_file
    if not graph.is_file():
        raise ManifestError(f"graph file {graph} named by the manifest does not exist")
    if verify_hash and manifest.graph_sha256 and sha256_file(graph) != manifest.graph_sha256:
        raise ManifestError(f"graph file {graph} does not match the manifest's sha256 (corrupted or replaced)")
    return graph


def checked_extra(directory: Path, entry: dict[str, Any], verify_hash: bool) -> Path:
    """An extra graph's file (a manifest ``extras`` entry) in ``directory``, present and
    (``verify_hash``) unchanged."""
    path = directory / entry["file"]
    if not path.is_file():
        raise ManifestError(f"extra graph {path} named by the manifest does not exist")
    if verify_hash and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise ManifestError(f"extra graph {path} does not match the manifest's sha256 (corrupted or replaced)")
    return path


def open_session(directory: str | Path, **kwargs) -> GraphSession:
    """The session an export needs: :class:`GraphSession`, or for a detector
    :class:`camserve.pipeline.detection.DetectionSession` (same keyword arguments)."""
    if Manifest.load(directory).kind == "detection":
        from camserve.pipeline.detection import DetectionSession

        kwargs.pop("post_processing", None)  # EigenCAM per box: no device post-processing
        return DetectionSession(directory, **kwargs)  # type: ignore[return-value]
    return GraphSession(directory, **kwargs)
