"""``--weights`` and user code that fails: module versions survive loading, and whatever a
user's factory, weights file or model raises reaches the user as one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camserve.errors import CamserveError
from camserve.export import load_model, load_weights
from camserve.pipeline.runtime import GraphSession

#: User code for the factory tests, written to a temporary folder put on the path.
USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    def raising_factory():
        raise ValueError("no checkpoint\\nat /nowhere")

    class BrokenForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            raise KeyError("sensor calibration missing")

    def broken_forward():
        return BrokenForward()
''')


def _cli(*args: str, path: Path | None = None) -> subprocess.CompletedProcess:
    """``camserve ARGS`` in a subprocess, with ``path`` (user modules) on PYTHONPATH."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "camserve.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    """stderr of a run that must have failed the user-error way: exit 2, one line, no traceback."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    return res.stderr


def _user_module(tmp_path: Path, name: str) -> Path:
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    return tmp_path


def _mnasnet(seed: int) -> nn.Module:
    """mnasnet0_5 with random weights and random BatchNorm statistics (so buffers count too)."""
    torch.manual_seed(seed)
    model = torchvision.models.mnasnet0_5(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_weights_only_load_keeps_module_versions(tmp_path):
    """What load_weights relies on: torch.save(model.state_dict()) keeps ``_metadata`` through
    a weights_only load, plain and nested (a file without it is covered by the next test)."""
    state = _mnasnet(0).state_dict()
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state}, tmp_path / "nested.pt")
    plain = torch.load(tmp_path / "w.pt", weights_only=True)
    nested = torch.load(tmp_path / "nested.pt", weights_only=True)["state_dict"]
    assert plain._metadata[""]["version"] == 2 and nested._metadata == plain._metadata


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "no_metadata"])
def test_versioned_module_loads(tmp_path, wrap):
    src = _mnasnet(1).state_dict()
    payload = {"plain": src, "state_dict": {"state_dict": src}, "model": {"model": src}, "no_metadata": dict(src)}[wrap]
    torch.save(payload, tmp_path / "w.pt")
    dst = torchvision.models.mnasnet0_5(weights=None)
    load_weights(dst, tmp_path / "w.pt")
    assert all(torch.equal(v, src[k]) for k, v in dst.state_dict().items())


def test_plain_dict_without_num_batches_tracked_loads(tmp_path):
    """Hand-converted weights often lack num_batches_tracked; eval-mode export never reads it."""
    src = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pt")
    load_weights(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), tmp_path / "w.pt")


class _RaisesOnLoad(nn.Module):
    """A module whose own loading hook raises ``error`` (as versioned user modules do)."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error
        self.fc = nn.Linear(2, 2)

    def _load_from_state_dict(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error", [ValueError("bad version\n3"), TypeError("expected int"), KeyError("fc.scale")])
def test_any_load_state_dict_error_is_one_camserve_line(tmp_path, error):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CamserveError) as info:
        load_weights(_RaisesOnLoad(error), tmp_path / "w.pt")
    text = str(info.value)
    assert "\n" not in text and str(tmp_path / "w.pt") in text and type(error).__name__ in text
    assert str(error).splitlines()[0].strip("'") in text


def test_factory_errors_name_the_spec(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_user_module(tmp_path, "cs_user_inproc")))
    (tmp_path / "cs_import_fails.py").write_text("1 / 0\n")
    with pytest.raises(CamserveError, match=r"'cs_user_inproc:raising_factory' failed: ValueError: no checkpoint; at"):
        load_model("cs_user_inproc:raising_factory")
    with pytest.raises(CamserveError, match=r"cannot import 'cs_import_fails:f': ZeroDivisionError"):
        load_model("cs_import_fails:f")
    with pytest.raises(CamserveError, match=r"'cs_user_inproc:torch' failed: TypeError"):
        load_model("cs_user_inproc:torch")  # not callable


def test_cli_mnasnet_weights_round_trip(tmp_path):
    """The reported bug: a standard torch.save(model.state_dict()) of mnasnet0_5 exported with
    --weights (about 30 s on two cores at 64 px); the graph answers that model's logits."""
    model = _mnasnet(2)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    res = _cli("export", "torchvision:mnasnet0_5", "--weights", str(tmp_path / "w.pt"), "--target-layer", "layers.-1",
               "--input-size", "64", "--out", str(tmp_path / "mn"))
    assert res.returncode == 0, res.stderr
    image = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(image)).numpy()
    got = GraphSession(tmp_path / "mn").run(image).logits
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())


def test_cli_weights_whose_loading_raises(tmp_path):
    """MNASNet raises ValueError for a module version it does not know: one line, exit 2."""
    state = torchvision.models.mnasnet0_5(weights=None).state_dict()
    state._metadata[""]["version"] = 3
    torch.save(state, tmp_path / "w.pt")
    err = _one_line_error(_cli("export", "torchvision:mnasnet0_5", "--weights", str(tmp_path / "w.pt"),
                               "--target-layer", "layers.-1", "--out", str(tmp_path / "out")))
    assert str(tmp_path / "w.pt") in err and "ValueError: version should be set to 1 or 2 instead of 3" in err


def test_cli_factory_that_raises(tmp_path):
    err = _one_line_error(_cli("export", "cs_user_factory:raising_factory", "--target-layer", "conv",
                               "--out", str(tmp_path / "out"), path=_user_module(tmp_path, "cs_user_factory")))
    assert "'cs_user_factory:raising_factory'" in err and "ValueError: no checkpoint; at /nowhere" in err


def test_cli_model_whose_forward_raises(tmp_path):
    err = _one_line_error(_cli("export", "cs_user_forward:broken_forward", "--target-layer", "conv", "--input-size", "16",
                               "--out", str(tmp_path / "out"), path=_user_module(tmp_path, "cs_user_forward")))
    assert "exporting 'cs_user_forward:broken_forward' failed: KeyError" in err and "sensor calibration missing" in err
