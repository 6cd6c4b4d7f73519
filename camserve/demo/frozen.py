"""Training a small head on a frozen backbone's features: the shapes detector's and segmenter's
(:mod:`camserve.demo.detector`, :mod:`camserve.demo.segmenter`), seconds on one CPU core."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1] (the models normalize)."""
    import torch

    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def train_head(model: Any, params: list[Any], features: torch.Tensor, targets: torch.Tensor,
               loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, steps: int, seed: int,
               batch_size: int = 32, lr: float = 0.01) -> None:
    """Adam on ``params`` alone over mini-batches of precomputed ``features`` and ``targets``;
    every parameter of ``model`` is left without ``requires_grad`` and the model in eval mode.
    One thread, a seeded generator: the same seed trains the same head."""
    import torch

    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(features), (batch_size,), generator=gen)
            value = loss(features[idx], targets[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        for p in model.parameters():
            p.requires_grad_(False)
    model.eval()
