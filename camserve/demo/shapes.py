"""The synthetic-shapes task: images, a small CNN, and its training (offline, torch).

Used by the localization test and by ``make demo``. Each image holds one coloured shape
(the class: circle, square, triangle or cross) at a random place and size on a cluttered
background (smooth noise, thin lines and small blobs in other colours). Because the class is
visible only in the shape, a CNN that classifies well must look at the shape, so its
Grad-CAM peak should fall inside the shape's box: the localization proof of issue 3.

``shortcut=True`` instead makes the label predictable from a small marker in a corner (the
corner and colour encode the class) while the shape drawn is random: a model trained on it
learns the shortcut, and its CAMs point at the corner.

The request path never imports this module; torch is imported inside the functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from camserve.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Saturated colours; a shape takes one, clutter only the others (never the shape's).
PALETTE = np.array(
    [(255, 60, 60), (60, 220, 60), (70, 110, 255), (255, 220, 40), (230, 60, 230), (40, 220, 230), (255, 150, 40)],
    dtype=np.uint8,
)
#: Shape half-extent range, as a share of the image side.
R_MIN, R_MAX = 0.12, 0.22
#: Corner marker colours for the shortcut mode, one per class (not in PALETTE).
MARKER_COLOURS = np.array([(255, 255, 255), (0, 0, 0), (255, 128, 200), (128, 255, 128)], dtype=np.uint8)


@dataclass(frozen=True)
class ShapeSet:
    """A batch of synthetic images.

    ``images`` uint8 RGB ``N x S x S x 3``; ``labels`` int64 ``N`` (the target class);
    ``shapes`` int64 ``N`` (the class of the shape drawn; equal to ``labels`` unless
    ``shortcut``); ``boxes`` int64 ``N x 4``: the shape's inclusive ``[x0, y0, x1, y1]``
    (tight on its pixels); ``colours`` uint8 ``N x 3``: the shape's colour (only the
    shape's pixels have it); ``markers`` int64 ``N x 4`` the corner marker's box (shortcut
    mode) or ``None``.
    """

    images: np.ndarray
    labels: np.ndarray
    shapes: np.ndarray
    boxes: np.ndarray
    colours: np.ndarray
    markers: np.ndarray | None = None


def _shape_mask(kind: int, size: int, cx: int, cy: int, r: int, angle: float) -> np.ndarray:
    """Boolean ``size x size`` mask of one shape of half-extent ``r`` centred at (cx, cy)."""
    mask = np.zeros((size, size), np.uint8)
    if kind == 0:
        cv2.circle(mask, (cx, cy), r, 1, -1)
    elif kind == 1:
        cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
    elif kind == 2:
        a = angle + np.array([0.0, 2.0944, 4.1888])  # equilateral, rotated
        pts = np.stack([cx + r * np.sin(a), cy - r * np.cos(a)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:
        t = max(2, r // 3)
        cv2.rectangle(mask, (cx - r, cy - t), (cx + r, cy + t), 1, -1)
        cv2.rectangle(mask, (cx - t, cy - r), (cx + t, cy + r), 1, -1)
    return mask.astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth dark noise (values <= 110, so no pixel can equal a palette colour)."""
    low = rng.integers(0, 90, (4, 4, 3), dtype=np.uint8)
    bg = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    bg += rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    return np.clip(bg, 0, 110).astype(np.uint8)


def _clutter(rng: np.random.Generator, img: np.ndarray, colours: np.ndarray) -> None:
    """Thin lines and small blobs (radius <= size/20) in the given colours, in place."""
    size = img.shape[0]
    for _ in range(int(rng.integers(3, 7))):
        c = tuple(int(v) for v in colours[rng.integers(len(colours))])
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), c, 1, cv2.LINE_8)
    for _ in range(int(rng.integers(3, 7))):
        c = tuple(int(v) for v in colours[rng.integers(len(colours))])
        p = rng.integers(0, size, 2)
        cv2.circle(img, (int(p[0]), int(p[1])), int(rng.integers(1, max(2, size // 20) + 1)), c, -1)


def make_shapes(n: int, seed: int = 0, size: int = 64, *, shortcut: bool = False) -> ShapeSet:
    """``n`` synthetic images, deterministic in ``seed`` (same seed, same images).

    Shapes have a half-extent of ``R_MIN``-``R_MAX`` of ``size`` (16-29 px wide at 64 px)
    and lie fully inside the image, anywhere: a "peak at the image centre" guess lands in
    the box only ~37 % of the time, so "CAM peak inside the box" is a real test. The shape
    is drawn last, so its pixels are exactly its colour and ``boxes`` is tight (in
    shortcut mode it keeps clear of the corners, so marker and shape never overlap).
    """
    if n < 1 or size < 32:
        raise InputError(f"make_shapes needs n >= 1 and size >= 32, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    k = len(CLASSES)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = rng.integers(0, k, n)
    shapes = rng.integers(0, k, n) if shortcut else labels.copy()
    boxes = np.empty((n, 4), np.int64)
    colours = np.empty((n, 3), np.uint8)
    markers = np.empty((n, 4), np.int64) if shortcut else None
    m = max(3, size // 16)  # marker side
    margin = m + 2 if shortcut else 0  # keeps the shape off the corner markers
    for i in range(n):  # drawing is per image (OpenCV primitives); fine offline
        img = _background(rng, size)
        ci = int(rng.integers(len(PALETTE)))
        _clutter(rng, img, np.delete(PALETTE, ci, axis=0))
        r = int(rng.integers(round(R_MIN * size), round(R_MAX * size) + 1))
        cx, cy = (int(v) for v in rng.integers(r + 1 + margin, size - r - 1 - margin, 2))
        mask = _shape_mask(int(shapes[i]), size, cx, cy, r, float(rng.uniform(0, 2 * np.pi)))
        img[mask] = PALETTE[ci]
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
        colours[i] = PALETTE[ci]
        if markers is not None:
            corner = int(labels[i])
            x0 = 1 if corner in (0, 2) else size - 1 - m
            y0 = 1 if corner in (0, 1) else size - 1 - m
            img[y0 : y0 + m, x0 : x0 + m] = MARKER_COLOURS[corner]
            markers[i] = (x0, y0, x0 + m - 1, y0 + m - 1)
        images[i] = img
    return ShapeSet(images=images, labels=labels.astype(np.int64), shapes=shapes.astype(np.int64), boxes=boxes,
                    colours=colours, markers=markers)


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 RGB ``N x H x W x 3`` -> float32 ``N x 3 x H x W``: ``(x / 255 - mean) / std``."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ------------------------------------------------------------------ model ------------


def build_model(num_classes: int = len(CLASSES), width: int = 8) -> torch.nn.Module:
    """A small CNN: four conv blocks (conv, batch norm, ReLU), global average pooling and a
    linear head.

    ``S x S`` input -> stride-2 stem (``width``) -> block (``2 width``) -> 2x max-pool ->
    two blocks (``4 width``) at ``S/4``, the last one dilated (3 x 3 taps 2 apart). The last
    block's ReLU (``features.12``, ``TARGET_LAYER``) is 16 x 16 for a 64 px input: fine
    enough for Grad-CAM to localize a shape a quarter of the image wide, while a training
    step stays cheap on one CPU core. The dilation widens what each last-layer cell sees
    (a whole square rather than one of its corners, where undilated CAMs tend to peak just
    outside the box). GradCAM peaks inside the box on 100 held-out images (torch, 260
    steps): undilated seeds 0/2: 97/91 %; dilated seeds 0/1/2/3: 99/95/97/88 %. Only named
    ``nn.Sequential`` parts, so dotted names address every layer.
    """
    from collections import OrderedDict

    from torch import nn

    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        return [conv, nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    features = nn.Sequential(
        *block(3, w, stride=2),  # 0-2
        *block(w, 2 * w), nn.MaxPool2d(2),  # 3-6
        *block(2 * w, 4 * w),  # 7-9
        *block(4 * w, 4 * w, dilation=2),  # 10-12
    )
    return nn.Sequential(OrderedDict(
        features=features, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4 * w, num_classes),
    ))


#: Dotted name of the Grad-CAM target layer of :func:`build_model`.
TARGET_LAYER = "features.12"


@dataclass(frozen=True)
class ShapesModelInfo:
    """What the export step and the tests need to know about a trained shapes model."""

    labels: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    target_layer: str
    heldout_accuracy: float
    train_seconds: float
    seed: int
    steps: int
    shortcut: bool = False
    history: list[float] = field(default_factory=list)


#: Held-out images come from this seed offset: a random stream independent of the pool's.
HELDOUT_SEED_OFFSET = 1_000_003


def train_shapes_model(seed: int = 0, steps: int = 260, *, size: int = 64, batch_size: int = 32,
                       pool: int = 3000, heldout: int = 400, lr: float = 0.01, width: int = 8,
                       threads: int = 1, shortcut: bool = False) -> tuple[torch.nn.Module, ShapesModelInfo]:
    """Train :func:`build_model` on :func:`make_shapes` images, in seconds on one core.

    A fixed pool of ``pool`` images (seed ``seed``) is augmented with random flips and
    90-degree turns (labels are invariant; not in shortcut mode, where they would move the
    marker); Adam with a one-cycle schedule. Accuracy is measured on ``heldout`` fresh
    images (seed ``seed + HELDOUT_SEED_OFFSET``).

    Torch runs on ``threads`` threads while training (restored afterwards). One by default,
    on purpose: the tensors are so small that OpenMP synchronization dominates, and on a
    2-core box shared with other processes two threads measured 5-10x *slower* per step
    than one. Defaults measured: held-out accuracy 97/99/98/95 % for seeds 0/1/2/3, about
    17 s of CPU time (33-70 s wall on a 2-core box while three other jobs ran on it).
    Returns the model in eval mode and its :class:`ShapesModelInfo`.
    """
    import torch
    from torch import nn

    if steps < 1 or batch_size < 2:
        raise InputError(f"training needs steps >= 1 and batch_size >= 2, got {steps}, {batch_size}")
    t0 = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        torch.manual_seed(seed)
        data = make_shapes(pool, seed, size, shortcut=shortcut)
        mean = tuple(float(v) for v in data.images.reshape(-1, 3).mean(0) / 255.0)
        std = tuple(float(v) for v in data.images.reshape(-1, 3).std(0) / 255.0)
        x_all = torch.from_numpy(normalize(data.images, mean, std))
        y_all = torch.from_numpy(data.labels)
        model = build_model(len(CLASSES), width)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(seed)
        history = []
        model.train()
        for step in range(steps):
            idx = torch.randint(0, pool, (batch_size,), generator=gen)
            x, y = x_all[idx], y_all[idx]
            if not shortcut:  # flips and turns keep the class; they would move the marker
                if torch.rand((), generator=gen) < 0.5:
                    x = x.flip(3)
                x = torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), dims=(2, 3))
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 25 == 0 or step == steps - 1:
                history.append(round(loss.item(), 4))
        model.eval()
        test = make_shapes(heldout, seed + HELDOUT_SEED_OFFSET, size, shortcut=shortcut)
        accuracy = float((predict(model, test.images, mean, std) == test.labels).mean())
    finally:
        torch.set_num_threads(previous_threads)
    info = ShapesModelInfo(labels=CLASSES, mean=mean, std=std, input_size=size, target_layer=TARGET_LAYER,
                           heldout_accuracy=accuracy, train_seconds=time.perf_counter() - t0, seed=seed,
                           steps=steps, shortcut=shortcut, history=history)
    return model, info


def predict(model: torch.nn.Module, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
            batch_size: int = 256) -> np.ndarray:
    """Predicted class indices (int64 ``N``) of uint8 RGB images, with torch, no gradients."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(normalize(images[start : start + batch_size], mean, std))
            out.append(model(x).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64)


# ------------------------------------------------------------------ files ------------


def write_samples(directory: str | Path, n: int = 8, seed: int = 7, size: int = 64, *,
                  shortcut: bool = False) -> list[Path]:
    """Write ``n`` sample images as PNG (``sample_000_circle.png`` ...) plus ``samples.json``
    (file, label, shape box), for the demo's HTTP requests. Returns the image paths."""
    import json

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = make_shapes(n, seed, size, shortcut=shortcut)
    paths, records = [], []
    for i in range(n):
        label = CLASSES[int(data.labels[i])]
        path = out / f"sample_{i:03d}_{label}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(data.images[i], cv2.COLOR_RGB2BGR)):
            raise InputError(f"could not write {path}")
        paths.append(path)
        records.append({"file": path.name, "label": label, "box": [int(v) for v in data.boxes[i]]})
    (out / "samples.json").write_text(json.dumps(records, indent=1) + "\n")
    return paths


def export_shapes_model(model: torch.nn.Module, info: ShapesModelInfo, out_dir: str | Path, *,
                        model_name: str = "shapes", model_version: str = "1.0", head: bool = False,
                        check: bool = True, threads: int = 1, extras: tuple[str, ...] = ()) -> Any:
    """Export a trained shapes model with ``camserve.export.export_model`` (target layer,
    labels, mean/std and input size from ``info``); torch on ``threads`` threads meanwhile
    (see :func:`train_shapes_model` for why one). Returns the Manifest."""
    import torch

    from camserve.export import export_model

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return export_model(model, [info.target_layer], out_dir, input_size=info.input_size,
                            labels=list(info.labels), model_name=model_name, model_version=model_version,
                            mean=info.mean, std=info.std, head=head, check=check, extras=extras)
    finally:
        torch.set_num_threads(previous)
