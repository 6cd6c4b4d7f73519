"""A regular (non-editable) install of the camserve wheel exports, archives and serves.

The wheel is built from a copy of the checkout and installed with ``--no-deps`` into a fresh
venv. The heavy dependencies (torch, onnxruntime, torchserve, ...) come from the project's
.venv through a path line in a ``.pth`` file: the path is appended to ``sys.path``, but
``.pth`` files inside it are not processed, so the editable camserve finder of .venv stays
inactive and ``import camserve`` can only find the wheel. Every camserve step then runs
through the new venv's ``camserve`` script with its cwd outside the checkout, and the
TorchServe worker is checked to run the new venv's Python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil
import pytest

from _server_fixture import LABELS, http, png_bytes, sample_image

pytestmark = [pytest.mark.server, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: What the wheel is built from (copied, so the build leaves no build/ or egg-info in the checkout).
SOURCES = ("pyproject.toml", "README.md", "camserve", "export", "handler")
#: .venv's site-packages (this interpreter's): torch, onnxruntime, torchserve, numpy, ...
DEPS_SITE = Path(sysconfig.get_path("purelib"))
#: Generous per-step limit: on a busy 2-core host an export or a server start takes minutes at worst.
STEP_TIMEOUT = 300


@dataclass(frozen=True)
class Venv:
    """A fresh venv holding the camserve wheel: its folder, bin folder and site-packages."""

    root: Path
    site: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"


def run(cmd: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` and return its stdout; a failure shows the command's whole output."""
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def build_wheel(work: Path) -> Path:
    """Build camserve's wheel from a copy of the checkout, offline (the .venv's setuptools)."""
    src = work / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy2(path, src / name)
    out = work / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src], cwd=work)
    (wheel,) = out.glob("camserve-*.whl")
    return wheel


def entry_point_script(venv: Venv, dist: str, name: str) -> Path:
    """Write the console script ``name`` of the installed ``dist`` into the venv, run by ITS python.

    pip would write the same script when installing ``dist`` there; ``torchserve`` started this
    way hands its own ``sys.executable`` (the new venv's python) to the workers.
    """
    (ep,) = [e for e in metadata.distribution(dist).entry_points if e.group == "console_scripts" and e.name == name]
    script = venv.bin / name
    script.write_text(f"#!{venv.python}\nimport sys\nfrom {ep.module} import {ep.attr}\nsys.exit({ep.attr}())\n")
    script.chmod(0o755)
    return script


def make_venv(root: Path, wheel: Path) -> Venv:
    """A fresh venv with the wheel installed (no deps), then .venv's site-packages on its path."""
    run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    site = Path(run([root / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root).strip())
    venv = Venv(root, site)
    # Installed before the .pth exists: pip must not see .venv's editable camserve.
    run([sys.executable, "-m", "pip", "--python", venv.python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    (site / "zz_camserve_test_deps.pth").write_text(f"{DEPS_SITE}\n")
    entry_point_script(venv, "torchserve", "torchserve")
    entry_point_script(venv, "torch-model-archiver", "torch-model-archiver")
    return venv


def clean_env(venv: Venv) -> dict[str, str]:
    """This process's environment without anything that could lead back to the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP") and not k.startswith("CAMSERVE")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(str(REPO))]
    env["PATH"] = os.pathsep.join([str(venv.bin), *path])
    env["ORT_DISABLE_TELEMETRY"] = "1"
    return env


def imported_files(python: Path | str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    """Where ``python`` (in ``env`` and ``cwd``) imports camserve and the archived handler from."""
    code = ("import json, camserve; from camserve.serving.torchserve.archive import handler_file; "
            "print(json.dumps({'camserve': camserve.__file__, 'handler': str(handler_file())}))")
    return json.loads(run([python, "-c", code], cwd=cwd, env=env))


def assert_from_wheel(files: dict[str, str], venv: Venv) -> None:
    """Every file lies in the new venv's site-packages, none in the checkout."""
    for what, path in files.items():
        assert Path(path).is_relative_to(venv.site), f"{what} comes from {path}, not from {venv.site}"
        assert not Path(path).resolve().is_relative_to(REPO), f"{what} comes from the checkout: {path}"


def export_tiny(venv: Venv, work: Path, env: dict[str, str]) -> Path:
    """``camserve export`` of the tests' tiny CNN through a factory spec."""
    factory = work / "factory"
    factory.mkdir()
    (factory / "tiny_factory.py").write_text(
        "from _server_fixture import tiny_model\n\n\ndef build():\n    return tiny_model(0)\n"
    )
    labels = work / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = work / "export"
    # The factory module and _server_fixture only (tests/ holds no camserve package).
    env = {**env, "PYTHONPATH": os.pathsep.join([str(factory), str(TESTS)])}
    run([venv.bin / "camserve", "export", "tiny_factory:build", "--target-layer", "2", "--input-size", "32",
         "--labels", labels, "--name", "tiny", "--out", out], cwd=work, env=env)
    return out


def port_flags(venv: Venv, work: Path, env: dict[str, str]) -> list[str]:
    """``--NAME-port 0`` for every port ``camserve serve`` offers: free ports, no clash with other runs."""
    names = dict.fromkeys(re.findall(r"--([a-z-]+)-port\b", run([venv.bin / "camserve", "serve", "--help"], cwd=work, env=env)))
    assert {"inference", "management", "metrics", "grpc-inference", "grpc-management"} <= set(names), names
    return [a for name in names for a in (f"--{name}-port", "0")]


def worker_process(run_dir: Path) -> psutil.Process:
    """The TorchServe worker of model tiny, from the management API."""
    state = json.loads((run_dir / "state.json").read_text())
    key = json.loads((run_dir / "key_file.json").read_text())["management"]["key"]
    status, _, body = http("GET", f"{state['management_url']}/models/tiny", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, body
    (worker,) = json.loads(body)[0]["workers"]
    return psutil.Process(int(worker["pid"]))


def check_worker(worker: psutil.Process, venv: Venv) -> str:
    """Assert the worker runs the new venv's python and that, replayed in the worker's own
    environment and cwd (TorchServe puts the model folder and its cwd on PYTHONPATH), that
    python imports camserve from the wheel; returns what was seen."""
    python = worker.cmdline()[0]
    assert Path(python) == venv.python, worker.cmdline()
    files = imported_files(python, worker.environ(), Path(worker.cwd()))
    assert_from_wheel(files, venv)
    return f"worker {worker.pid}: {python}, PYTHONPATH={worker.environ().get('PYTHONPATH')}, imports {files['camserve']}"


def predict(run_dir: Path) -> tuple[int, bytes]:
    """POST a PNG to /predictions/tiny with the inference token, asking for Grad-CAM."""
    state = json.loads((run_dir / "state.json").read_text())
    key = json.loads((run_dir / "key_file.json").read_text())["inference"]["key"]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png", "X-Camserve-Params": "methods=gradcam"}
    status, _, body = http("POST", f"{state['inference_url']}/predictions/tiny", png_bytes(sample_image(5)), headers,
                           timeout=STEP_TIMEOUT)
    return status, body


def stop_server(venv: Venv, run_dir: Path, work: Path, env: dict[str, str]) -> str:
    """``camserve stop`` from the new venv; the in-process stop backs it up so nothing outlives the test."""
    if not (run_dir / "state.json").exists() and not (run_dir / "tmp" / ".model_server.pid").exists():
        return "no server was started"  # keeps a failed start's own error in front
    try:
        return run([venv.bin / "camserve", "stop", "--run-dir", run_dir], cwd=work, env=env)
    finally:
        if (run_dir / "state.json").exists() or (run_dir / "tmp" / ".model_server.pid").exists():
            from camserve.serving.torchserve.server import stop

            stop(run_dir)


def test_wheel_install_exports_archives_and_serves(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    assert "camserve/_handler/camserve_handler.py" in zipfile.ZipFile(wheel).namelist()
    venv = make_venv(tmp_path / "venv", wheel)
    env = clean_env(venv)
    work = tmp_path / "work"
    work.mkdir()
    assert_from_wheel(imported_files(venv.python, env, work), venv)

    export = export_tiny(venv, work, env)
    store = work / "model_store"
    run([venv.bin / "camserve", "archive", export, "--name", "tiny", "--model-store", store], cwd=work, env=env)
    with zipfile.ZipFile(store / "tiny.mar") as mar:
        assert mar.read("camserve_handler.py") == (REPO / "handler" / "camserve_handler.py").read_bytes()

    run_dir = work / "serve_run"
    serve = [venv.bin / "camserve", "serve", "--model-store", store, "--run-dir", run_dir, *port_flags(venv, work, env),
             "--workers", "1", "--ort-threads", "1"]
    try:
        print(run(serve, cwd=work, env=env))  # returns once the worker is READY
        print(check_worker(worker_process(run_dir), venv))
        status, body = predict(run_dir)
        assert status == 200, body[:500]
        image = json.loads(body)["images"][0]
        methods = [e["method"] for e in image["explanations"]]
        assert image["predictions"] and methods and set(methods) == {"gradcam"}, image
    finally:
        stopped = stop_server(venv, run_dir, work, env)
    assert "camserve: stopped" in stopped
