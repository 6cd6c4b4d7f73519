"""Why a model version's worker failed to load, read from TorchServe's ``model_log.log``.

TorchServe never marks a model as failed: a worker that dies while loading (a corrupted
graph, a missing manifest, a handler that raises in ``initialize``) is restarted with a
growing back-off, forever, and the management API shows it as not READY like one still
loading. The reason is only in the model log, in the dead worker's lines::

    ... [INFO ] W-9000-corrupt_1.0-stdout MODEL_LOG - Backend worker process died.
    ... [INFO ] W-9000-corrupt_1.0-stdout MODEL_LOG - Traceback (most recent call last):
    ...
    ... [INFO ] W-9000-corrupt_1.0-stdout MODEL_LOG - camserve.errors.ManifestError: graph file ... does not match ...

The worker thread is named ``W-<port>-<model name>_<version>``; the last ``SomeError: message``
line after "Backend worker process died." is the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

LINE = re.compile(r"\bW-\d+-(?P<worker>\S+)-std(?:out|err) MODEL_LOG - (?P<msg>.*)$")
DIED = "Backend worker process died."
#: ``ValueError: ...``, ``camserve.errors.ManifestError: ...``, ``onnxruntime...InvalidProtobuf: ...``
#: (not indented, as traceback frames are; a bare name only when it ends in Error or Exception).
EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*: .+|[A-Z]\w*(?:Error|Exception))$")


def load_failures(log: str | Path, models: dict[str, list[str]], offset: int = 0) -> dict[tuple[str, str], str]:
    """``{(name, version): reason}`` for every version of ``models`` whose worker died in ``log``.

    Only the log after byte ``offset`` is read (the run folder's log outlives restarts).
    The reason is the worker's last exception line after it died, else a generic sentence.
    """
    path = Path(log)
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    workers = {f"{name}_{version}": (name, version) for name, versions in models.items() for version in versions}
    out: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        m = LINE.search(line)
        if not m or m.group("worker") not in workers:
            continue
        key, msg = workers[m.group("worker")], m.group("msg").rstrip()
        if msg == DIED:
            out[key] = out.get(key) or "its worker died while loading (no error logged)"
        elif key in out and EXCEPTION.match(msg):
            out[key] = msg
    return out
