"""A small shapes detector (offline, torch): the localization proof of detection explanations.

:class:`ShapesDetector` is torchvision-shaped (``model(list_of_images) -> [{"boxes",
"scores", "labels"}]``, a ``backbone`` module, label 0 = background) so it exports and serves
like a torchvision detector. It reuses the trained shapes classifier
(:func:`camserve.demo.shapes.train_shapes_model`): its first three conv blocks are the
``backbone`` (stride 4), the rest of it names the class, and a box head trained here in
seconds regresses the one shape's box: a centre by soft-argmax over a 1x1-conv heat map of
the backbone's features, and a width and height from their pooled features.

EigenCAM of the backbone's maps (what the detection graph explains) must peak inside the
shape's box; the classifier's last block is not the backbone because its first principal
component is not the shape (measured on 100 held-out images: peak inside the box 99 % at
``features.9``, 50 % at ``features.12``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from camserve.demo import shapes

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: The backbone's last module in the classifier's ``features``.
BACKBONE_END = 10
LABELS: tuple[str, ...] = ("__background__",) + shapes.CLASSES


def build_detector(classifier: Any, mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0) -> Any:
    """A :class:`ShapesDetector` around a trained shapes classifier (untrained box head)."""
    import torch
    from torch import nn

    class ShapesDetector(nn.Module):
        """One detection per image: the shape's box, the classifier's class and probability."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.backbone = classifier.features[:BACKBONE_END]
            self.rest = nn.Sequential(classifier.features[BACKBONE_END:], classifier.pool, classifier.flatten, classifier.fc)
            c = classifier.features[BACKBONE_END - 3].out_channels
            self.centre = nn.Conv2d(c, 1, 1)
            self.size = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 2))

        def boxes(self, features: torch.Tensor, height: int, width: int) -> torch.Tensor:
            """``[N, 4]`` x1, y1, x2, y2 in input pixels."""
            n, _, h, w = features.shape
            weights = torch.softmax(self.centre(features).reshape(n, h * w), dim=1).reshape(n, h, w)
            ys = (torch.arange(h, dtype=features.dtype) + 0.5) * (height / h)
            xs = (torch.arange(w, dtype=features.dtype) + 0.5) * (width / w)
            cy, cx = (weights.sum(2) * ys).sum(1), (weights.sum(1) * xs).sum(1)
            half = torch.sigmoid(self.size(features)) * 0.5 * torch.tensor([width, height], dtype=features.dtype)
            return torch.stack([cx - half[:, 0], cy - half[:, 1], cx + half[:, 0], cy + half[:, 1]], dim=1)

        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            x = (torch.stack(list(images)) - self.mean) / self.std
            features = self.backbone(x)
            probs = torch.softmax(self.rest(features), dim=1)
            scores, classes = probs.max(dim=1)
            boxes = self.boxes(features, x.shape[-2], x.shape[-1])
            return [{"boxes": boxes[i : i + 1], "scores": scores[i : i + 1], "labels": classes[i : i + 1] + 1}
                    for i in range(x.shape[0])]

    with torch.random.fork_rng():  # the head's initial weights: the same whatever ran before
        torch.manual_seed(seed)
        return ShapesDetector().eval()


def train_box_head(detector: Any, info: shapes.ShapesModelInfo, steps: int = 300, seed: int = 0,
                   batch_size: int = 32, lr: float = 0.01) -> float:
    """Train the box head (the classifier stays frozen) on fresh shapes; returns the mean IoU
    of the predicted and true boxes on 200 held-out images."""
    import torch

    from camserve.demo.frozen import pixels, train_head

    size = info.input_size
    data = shapes.make_shapes(3000, seed + 17, size)
    x_all = pixels(data.images)
    # boxes as the pixel spans the shapes cover: [x0, x1 + 1)
    y_all = torch.from_numpy(data.boxes.astype(np.float32) + np.array([0, 0, 1, 1], np.float32))
    with torch.no_grad():
        feats = detector.backbone((x_all - detector.mean) / detector.std)
    train_head(detector, list(detector.centre.parameters()) + list(detector.size.parameters()), feats, y_all,
               lambda f, y: (detector.boxes(f, size, size) - y).abs().mean(), steps=steps, seed=seed,
               batch_size=batch_size, lr=lr)
    test = shapes.make_shapes(200, seed + shapes.HELDOUT_SEED_OFFSET, size)
    with torch.no_grad():
        out = detector(list(pixels(test.images)))
    pred = torch.cat([o["boxes"] for o in out]).numpy()
    return float(box_iou(pred, test.boxes.astype(np.float32) + np.array([0, 0, 1, 1], np.float32)).mean())


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired boxes ``[N, 4]`` (x1, y1, x2, y2)."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)
