"""A small shapes segmenter (offline, torch): the localization proof of segmentation explanations.

:func:`build_segmenter` puts a per-pixel head on the trained shapes classifier's first three
conv blocks (:func:`camserve.demo.shapes.train_shapes_model`; frozen, stride 4): a 3x3 conv,
ReLU and a 1x1 classifier over background + the four shapes, upsampled bilinearly to the
input like an FCN, answering torchvision's ``{"out": [N, K, H, W]}``. :func:`train_head`
trains the head in seconds on fresh shapes whose masks are the pixels of the shape's colour.
A class's Grad-CAM over its predicted pixels (``--kind segmentation``) must peak inside the
shape's box.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from camserve.demo import shapes

#: The backbone's last module in the classifier's ``features`` (as the shapes detector's).
BACKBONE_END = 10
LABELS: tuple[str, ...] = ("background",) + shapes.CLASSES


def masks(data: shapes.ShapeSet) -> np.ndarray:
    """Per-pixel class ``[N, S, S]`` int64: 0 background, ``1 + shape`` on the shape's pixels
    (only the shape has its colour)."""
    on = (data.images == data.colours[:, None, None, :]).all(axis=-1)
    return np.where(on, data.shapes[:, None, None] + 1, 0).astype(np.int64)


def build_segmenter(classifier: Any, mean: tuple[float, ...], std: tuple[float, ...], width: int = 16,
                    seed: int = 0) -> Any:
    """A segmenter around a trained shapes classifier's backbone (untrained head)."""
    import torch
    from torch import nn

    class ShapesSegmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.backbone = classifier.features[:BACKBONE_END]
            c = classifier.features[BACKBONE_END - 3].out_channels
            self.classifier = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, len(LABELS), 1))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.classifier(self.backbone((x - self.mean) / self.std))
            return {"out": nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}

    with torch.random.fork_rng():  # the head's initial weights: the same whatever ran before
        torch.manual_seed(seed)
        return ShapesSegmenter().eval()


def train_head(segmenter: Any, info: shapes.ShapesModelInfo, steps: int = 300, seed: int = 0,
               batch_size: int = 32, lr: float = 0.01) -> float:
    """Train the head (the backbone stays frozen) on fresh shapes; returns the held-out mean
    IoU of the predicted and true shape masks over 200 images."""
    import torch

    from camserve.demo.frozen import pixels, train_head

    size = info.input_size
    data = shapes.make_shapes(2000, seed + 29, size)
    x_all = pixels(data.images)
    with torch.no_grad():
        feats = segmenter.backbone((x_all - segmenter.mean) / segmenter.std)

    def loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.interpolate(segmenter.classifier(f), size=(size, size), mode="bilinear",
                                                 align_corners=False)
        return torch.nn.functional.cross_entropy(logits, y)

    train_head(segmenter, list(segmenter.classifier.parameters()), feats, torch.from_numpy(masks(data)), loss,
               steps=steps, seed=seed, batch_size=batch_size, lr=lr)
    test = shapes.make_shapes(200, seed + shapes.HELDOUT_SEED_OFFSET, size)
    with torch.no_grad():
        pred = segmenter(pixels(test.images))["out"].argmax(1).numpy()
    truth = masks(test)
    inter = ((pred == truth) & (truth > 0)).sum(axis=(1, 2))
    union = ((pred > 0) | (truth > 0)).sum(axis=(1, 2))
    return float((inter / np.maximum(union, 1)).mean())
