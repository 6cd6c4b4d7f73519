"""A TorchServe instance that ``camserve serve`` started: where to reach it, and its state file.

:class:`Instance` is what ``state.json`` in a run folder holds (addresses, pid, models, the
versions that failed to load); ``camserve stop``, the health check and the client read it back.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from camserve.errors import CamserveError


class ServerError(CamserveError):
    """TorchServe cannot be started, found or stopped."""

    kind = "server_error"
    status = 500



def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Instance:
    """A running (or configured) TorchServe instance and where to reach it."""

    run_dir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    models: dict[str, list[str]]
    pid: int = 0
    #: ``{"NAME VERSION": reason}``: versions whose worker died while loading at start
    #: (TorchServe keeps retrying them with back-off; every other version is READY).
    failed: dict[str, str] = field(default_factory=dict)
    #: The token-free health check (:mod:`camserve.serving.torchserve.health`): its address and process.
    health_url: str = ""
    health_pid: int = 0

    @classmethod
    def load(cls, run_dir: str | Path) -> Instance:
        path = Path(run_dir) / "state.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            raise ServerError(f"no camserve server state in {run_dir} (was it started with camserve serve?)") from None
        return cls(run_dir=Path(data.pop("run_dir")), **data)

    def save(self) -> None:
        data = dict(self.__dict__, run_dir=str(self.run_dir))
        (self.run_dir / "state.json").write_text(json.dumps(data, indent=2) + "\n")

    def key(self, api: str = "management") -> str | None:
        """The token for ``api`` (management or inference); None when token auth is off."""
        path = self.run_dir / "key_file.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text()).get(api, {}).get("key")

    def env(self) -> dict[str, str]:
        tmp = str(self.run_dir / "tmp")
        logs = str(self.run_dir / "logs")
        return {"TMPDIR": tmp, "TEMP": tmp, "LOG_LOCATION": logs, "METRICS_LOCATION": logs, "ORT_DISABLE_TELEMETRY": "1"}
