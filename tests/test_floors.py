"""``bench/floors.py``: the multiply-add counts behind the README's arithmetic floors.

The counts are checked against brute force (every output position and tap of a real
convolution, padding taps excluded) and the split at a layer against a model whose
layers' costs are known.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import floors  # noqa: E402  (bench/floors.py)


@pytest.mark.parametrize("n_in,kernel,stride,padding,dilation", [
    (4, 3, 1, 1, 1), (14, 3, 1, 12, 12), (14, 3, 1, 36, 36), (224, 7, 2, 3, 1), (7, 1, 1, 0, 1), (9, 3, 2, 1, 2),
])
def test_valid_taps_counts_the_taps_that_read_the_input(n_in, kernel, stride, padding, dilation):
    n_out = (n_in + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    brute = sum(0 <= o * stride - padding + j * dilation < n_in for o in range(n_out) for j in range(kernel))
    assert floors.valid_taps(n_in, n_out, kernel, stride, padding, dilation) == brute


def test_padding_taps_do_not_count():
    # 3x3 with padding 1 on 4 x 4: per axis 4 positions x 3 taps, less the 2 that read padding
    assert floors.valid_taps(4, 4, 3, 1, 1, 1) == 10
    # a rate-36 tap never lands inside a 14-wide map: only the centre tap reads the input
    assert floors.valid_taps(14, 14, 3, 1, 36, 36) == 14


def test_layer_macs_of_a_conv_equal_the_nonzero_products_of_its_forward():
    conv = nn.Conv2d(2, 5, 3, padding=2, dilation=2, groups=1, bias=False)
    x = torch.ones(1, 2, 6, 6)
    [layer] = floors.layer_macs(conv, x)[0]
    # with every input and weight 1, each output sums the products of the taps that read the
    # input: the output's total is the number of multiply-adds
    with torch.no_grad():
        nn.init.ones_(conv.weight)
        assert layer.macs == int(conv(x).sum())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)       # 8*8 positions, 9 taps less borders
        self.body = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_the_floor_counts_the_layers_after_the_target():
    net, x = Net().eval(), torch.zeros(1, 3, 8, 8)
    stem = floors.valid_taps(8, 8, 3, 1, 1, 1) ** 2 * 3 * 8
    body, head = 64 * 8 * 8, 8 * 4
    forward = stem + body + head
    assert [m.macs for m in floors.layer_macs(net, x)[0]] == [stem, body, head]
    assert floors.floor(net, x, "body") == pytest.approx(((forward + head) / forward, forward, head))
    assert floors.floor(net, x, "stem") == pytest.approx(((forward + body + head) / forward, forward, body + head))
    assert floors.floor(net, x, None) == pytest.approx((2.0, forward, forward))
    assert np.isclose(floors.floor(net, x, "body.1")[0], (forward + head) / forward)


def test_a_conv_target_counts_from_after_its_own_forward():
    net, x = Net().eval(), torch.zeros(1, 3, 8, 8)
    assert floors.layer_macs(net, x, "stem")[1] == 1
    assert floors.layer_macs(net, x, "body.0")[1] == 2
    assert floors.layer_macs(net, x, None)[1] == 0
