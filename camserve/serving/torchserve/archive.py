"""``camserve archive``: an export folder -> ``model_store/NAME.mar`` for TorchServe.

The archive holds the ONNX graph(s), the manifest, the thin handler and a
``model-config.yaml`` (batch size, batch delay, workers); the camserve package itself is
installed in the server's environment, not copied into the archive. The version goes into
the archive's MANIFEST, so two archives of one model with different versions (written
under different file names with ``--mar-name``) are registered side by side.

The handler's home in the repository is ``handler/``; pyproject.toml installs that folder
as the package ``camserve._handler``, so a wheel install finds the handler as an editable
one does (:func:`handler_file`).
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from camserve.errors import CamserveError
from camserve.manifest import Manifest, sha256_file

HANDLER_PACKAGE = "camserve._handler"
HANDLER_NAME = "camserve_handler.py"


class ArchiveError(CamserveError):
    kind = "archive_error"


def handler_file() -> Path:
    """The TorchServe handler installed with the package (``camserve._handler``).

    Raises :class:`ArchiveError` when the install lacks it (a broken or outdated install).
    """
    try:
        resource = importlib.resources.files(HANDLER_PACKAGE) / HANDLER_NAME
    except ModuleNotFoundError:
        resource = None
    # A real file, not a zip member: torch-model-archiver reads it from the file system.
    if not isinstance(resource, Path) or not resource.is_file():
        raise ArchiveError(f"the TorchServe handler {HANDLER_NAME} is missing from this camserve install "
                           f"(package {HANDLER_PACKAGE}); reinstall camserve")
    return resource


def export_files(export_dir: Path) -> tuple[Manifest, list[Path]]:
    """The manifest and every file the graph needs, checked (graph present, hash matches)."""
    manifest = Manifest.load(export_dir)
    files = [export_dir / "manifest.json", export_dir / manifest.graph_file]
    if manifest.forward_graph_file:
        files.append(export_dir / manifest.forward_graph_file)
    if manifest.head_graph_file:
        files.append(export_dir / manifest.head_graph_file)
    files += [export_dir / entry["file"] for entry in manifest.extras.values()]  # camserve export --extras
    if (export_dir / "concepts.npz").is_file():  # an embedding model's registered concepts
        files.append(export_dir / "concepts.npz")
    files += [p for p in (export_dir / f"{f.name}.data" for f in list(files)) if p.is_file()]
    for path in files:
        if not path.is_file():
            raise ArchiveError(f"{path} named by the manifest does not exist")
    graph = export_dir / manifest.graph_file
    if manifest.graph_sha256 and sha256_file(graph) != manifest.graph_sha256:
        raise ArchiveError(f"{graph} does not match the manifest's sha256 (re-export the model)")
    return manifest, files


def build_archive(
    export_dir: str | Path,
    *,
    name: str,
    version: str,
    model_store: str | Path,
    mar_name: str | None = None,
    batch_size: int = 8,
    max_batch_delay_ms: int = 10,
    workers: int | None = None,
    response_timeout_s: int = 120,
    handler: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write ``model_store/<mar_name or name>.mar`` and return its path.

    ``handler`` defaults to camserve's own (:func:`handler_file`).
    """
    handler = Path(handler) if handler is not None else handler_file()
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ArchiveError(f"export folder {export_dir} does not exist")
    if not name or "/" in name or name.startswith("."):
        raise ArchiveError(f"model name {name!r} is not valid (no slashes, not empty)")
    _manifest, files = export_files(export_dir)
    store = Path(model_store)
    store.mkdir(parents=True, exist_ok=True)
    target = store / f"{mar_name or name}.mar"
    if target.exists() and not force:
        raise ArchiveError(f"{target} exists (pass --force to replace it)")
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    if not archiver.exists():
        archiver = Path(shutil.which("torch-model-archiver") or "torch-model-archiver")
    with tempfile.TemporaryDirectory(prefix="camserve-archive-") as tmp:
        config = Path(tmp) / "model-config.yaml"
        settings: dict[str, int] = {
            "batchSize": batch_size,
            "maxBatchDelay": max_batch_delay_ms,
            "responseTimeout": response_timeout_s,
        }
        if workers is not None:
            # TorchServe lets the archive's worker count win over config.properties, so it
            # is written only when asked: otherwise `camserve serve --workers` decides.
            settings |= {"minWorkers": workers, "maxWorkers": workers}
        config.write_text(yaml.safe_dump(settings))
        cmd = [
            str(archiver),
            "--model-name", name,
            "--version", str(version),
            "--handler", str(handler),
            "--extra-files", ",".join(str(f) for f in files),
            "--config-file", str(config),
            "--export-path", tmp,
            "--archive-format", "default",
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except OSError as exc:
            raise ArchiveError(f"cannot run torch-model-archiver: {exc.strerror} (pip install torch-model-archiver)") from None
        built = Path(tmp) / f"{name}.mar"
        if out.returncode != 0 or not built.is_file():
            raise ArchiveError(f"torch-model-archiver failed: {(out.stdout + out.stderr).strip()[-800:]}")
        shutil.move(str(built), str(target))
    return target


def _run(args: argparse.Namespace) -> int:
    if args.kserve_layout:
        from camserve.serving.torchserve.kserve_layout import write_layout

        fixed = [f"--{k.replace('_', '-')}" for k in ("model_store", "mar_name", "batch_size", "max_batch_delay", "workers")
                 if getattr(args, k) is not None]
        if fixed:
            raise ArchiveError(f"{', '.join(fixed)} cannot be combined with --kserve-layout "
                               "(KServe's runtime reads DIR/model-store; batch size and workers are 1 there)")
        path = write_layout(args.kserve_layout, args.export_dir, name=args.name, version=args.version, force=args.force)
        print(f"camserve: wrote {path} and {Path(args.kserve_layout) / 'config' / 'config.properties'}")
        return 0
    path = build_archive(
        args.export_dir,
        name=args.name,
        version=args.version,
        model_store=args.model_store or "model_store",
        mar_name=args.mar_name,
        batch_size=8 if args.batch_size is None else args.batch_size,
        max_batch_delay_ms=10 if args.max_batch_delay is None else args.max_batch_delay,
        workers=args.workers,
        force=args.force,
    )
    print(f"camserve: wrote {path}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("archive", help="build a TorchServe .mar from an export folder")
    p.add_argument("export_dir", help="folder with model.onnx and manifest.json (camserve export)")
    p.add_argument("--name", required=True, help="model name served under /predictions/NAME")
    p.add_argument("--version", default="1.0", help="model version (default 1.0)")
    p.add_argument("--model-store", help="output folder (default model_store)")
    p.add_argument("--mar-name", help="archive file name without .mar (default NAME; use NAME-V to keep versions side by side)")
    p.add_argument("--batch-size", type=int, help="server-side batch size (default 8)")
    p.add_argument("--max-batch-delay", type=int, help="milliseconds to wait to fill a batch (default 10)")
    p.add_argument("--workers", type=int, default=None, help="workers per model version, fixed in the archive (default: as `camserve serve --workers` says)")
    p.add_argument("--kserve-layout", metavar="DIR", help="write KServe's TorchServe-runtime layout instead: DIR/model-store/NAME.mar "
                   "(batch size 1) + DIR/config/config.properties; upload DIR as the storageUri")
    p.add_argument("--force", action="store_true", help="replace an existing archive")
    p.set_defaults(func=_run)
