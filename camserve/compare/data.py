"""What a comparison is made of: one side's answer for one input, and a pair of them.

Every source (HTTP server, export directory, audit log) reduces its answers to these, so
metrics and report never know where an answer came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camserve.errors import CamserveError, InputError

#: Image files the folder sources read (case-insensitive suffixes).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CompareError(CamserveError):
    """A comparison cannot be made (unreachable side, unknown model, no common inputs)."""

    kind = "compare_error"


@dataclass
class Answer:
    """One side's answer for one input.

    ``predictions``: top-k ``{"index", "label", "score"}`` (softmax scores, best first);
    ``cams[method]``: the top-1 class's map, float32 ``[H, W]`` in [0, 1], or None when the
    source has no map (an audit log without stored heatmaps); ``peaks[method]``: the map's
    peak ``(x, y)`` in input-image pixels when only a summary is known; ``latency_ms``: the
    side's time for this input (client wall clock over HTTP, graph + CAM time offline,
    the server's ``timings_ms`` total from an audit log); ``metrics[method]``: the top-1
    map's faithfulness figures ``{name: value}`` (NaN where undefined) when asked for
    (:mod:`.faithfulness`).
    """

    predictions: list[dict]
    cams: dict[str, np.ndarray | None]
    latency_ms: float
    peaks: dict[str, tuple[int, int]] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def top1(self) -> int:
        return int(self.predictions[0]["index"])


@dataclass
class Pair:
    """Both sides' answers for one input; ``image`` (uint8 RGB) when known, for overlays."""

    key: str
    a: Answer
    b: Answer
    image: np.ndarray | None = None


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; InputError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_images(folder: str | Path, max_pixels: int = 40_000_000) -> list[tuple[Path, bytes, np.ndarray]]:
    """(path, bytes, decoded RGB) of every image in ``folder``; InputError naming an unreadable one."""
    from camserve.pipeline import imageio

    out = []
    for path in image_files(folder):
        try:
            data = path.read_bytes()
            rgb = imageio.decode(data, max_pixels)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        except CamserveError as exc:
            raise InputError(f"{path} is not a readable image: {exc}") from None
        out.append((path, data, rgb))
    return out


def top_predictions(logits: np.ndarray, labels: tuple[str, ...] | list[str], k: int = 5) -> list[list[dict]]:
    """Softmax top-``k`` of logits ``[N, K]`` as prediction dicts (the server's format)."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return [[{"index": int(c), "label": labels[c] if c < len(labels) else str(c), "score": round(float(p[i, c]), 6)}
             for c in row] for i, row in enumerate(order)]
