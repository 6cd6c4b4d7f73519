"""``camserve kserve serve`` / ``camserve kserve stop``: camserve models on KServe's model server.

``serve`` starts :mod:`camserve.serving.kserve.server` as its own process (KServe's ``ModelServer``
with camserve's models), on 127.0.0.1 unless told otherwise, and returns once every model
answers ready (``GET /v2/models/NAME/ready``). The run folder (mode 0700) holds the spec,
``state.json`` (address, pid), ``logs/kserve.log`` and, by default, the audit log.
Needs the optional extra: ``pip install 'camserve[kserve]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from camserve.errors import CamserveError


class KServeError(CamserveError):
    kind = "kserve_error"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _process(run_dir: Path):
    """The server process of ``run_dir`` from its state, recognised by its command line."""
    import psutil

    try:
        state = json.loads((run_dir / "state.json").read_text())
        proc = psutil.Process(state["pid"])
        if "camserve.serving.kserve.server" in proc.cmdline():
            return proc
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def start(exports: list[str], *, run_dir: str | Path, names: list[str] | None = None, version: str | None = None,
          host: str = "127.0.0.1", http_port: int = 8080, grpc_port: int = 8081, grpc: bool = True,
          config_file: str | None = None, timeout: float = 180.0, foreground: bool = False,
          workers: int = 1) -> dict[str, Any]:
    """Start the server for ``exports`` and wait until every model is ready; returns the state.

    ``workers``: REST processes sharing the port (each loads every model; gRPC, if enabled, is
    served by the parent process with its own copy). ``foreground``: become the server
    process instead (a container's main process).
    """
    import importlib.util

    if importlib.util.find_spec("kserve") is None:  # not imported here: it parses this process's argv
        raise KServeError("the kserve package is not installed: pip install 'camserve[kserve]'")
    from camserve.config import load_config
    from camserve.manifest import Manifest
    from camserve.serving.torchserve.server import free_port

    if not isinstance(workers, int) or workers < 1:
        raise KServeError(f"--workers must be a whole number >= 1, got {workers!r}")
    load_config(config_file)  # a bad setting is one line here, not a traceback in the server's log

    run_dir = Path(run_dir).resolve()
    if _process(run_dir) is not None:
        raise KServeError(f"a KServe server from {run_dir} is already running (camserve kserve stop --run-dir {run_dir})")
    models = []
    for i, export in enumerate(exports):
        manifest = Manifest.load(Path(export))  # a missing or broken export is named now, not in the server log
        name = names[i] if names and i < len(names) else manifest.model_name
        models.append({"name": name, "export_dir": str(Path(export).resolve()), "version": version or manifest.model_version})
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    spec = {"models": models, "host": host, "workers": workers, "http_port": http_port or free_port(host), "grpc": grpc,
            "grpc_port": grpc_port or free_port(host), "run_dir": str(run_dir),
            "config_file": str(Path(config_file).resolve()) if config_file else None}
    shutil.rmtree(run_dir / "metrics", ignore_errors=True)  # a previous run's processes are not this one's
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")  # ONNX Runtime has its own threads (see camserve.serving.torchserve.server)
    command = [sys.executable, "-m", "camserve.serving.kserve.server", str(run_dir / "spec.json")]
    if foreground:
        os.execve(sys.executable, command, env)
    with open(run_dir / "logs" / "kserve.log", "ab") as log:
        proc = subprocess.Popen(command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{spec['http_port']}"
    state = {"pid": proc.pid, "url": url, "grpc": f"{host}:{spec['grpc_port']}" if grpc else "",
             "models": {m["name"]: m["version"] for m in models}, "run_dir": str(run_dir), "workers": workers}
    (run_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    deadline = time.monotonic() + timeout
    # With workers, every process that loaded the models publishes its counters: wait for all.
    loaded = workers + (1 if grpc else 0) if workers > 1 else 0
    while not (all(_ready(f"{url}/v2/models/{m['name']}/ready") for m in models)
               and len(list((run_dir / "metrics").glob("*.json"))) >= loaded):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(run_dir)
            tail = (run_dir / "logs" / "kserve.log").read_text(errors="replace").strip().splitlines()[-5:]
            why = "exited" if proc.poll() is not None else f"was not ready after {timeout:.0f} s"
            raise KServeError(f"the KServe server {why} (see {run_dir / 'logs' / 'kserve.log'}): " + " | ".join(tail))
        time.sleep(0.3)
    return state


def stop(run_dir: str | Path, timeout: float = 30.0) -> bool:
    """Stop the server of ``run_dir`` (SIGTERM, then SIGKILL). False if none was running."""
    import psutil

    proc = _process(Path(run_dir).resolve())
    if proc is None:
        return False
    procs = [proc, *proc.children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return True


def _serve(args: argparse.Namespace) -> int:
    state = start(args.exports, run_dir=args.run_dir, names=args.name, version=args.version, host=args.host,
                  http_port=args.http_port, grpc_port=args.grpc_port, grpc=not args.no_grpc, config_file=args.config,
                  foreground=args.foreground, workers=args.workers)
    print(f"camserve: KServe serving {', '.join(f'{n} {v}' for n, v in state['models'].items())}")
    print(f"  REST (v1, v2) {state['url']}   metrics {state['url']}/metrics   health {state['url']}/v2/health/ready")
    if state["grpc"]:
        print(f"  gRPC (v2)     {state['grpc']}")
    print(f"  logs          {Path(state['run_dir']) / 'logs'}\n  stop with     camserve kserve stop --run-dir {args.run_dir}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    print("camserve: stopped" if stop(args.run_dir) else "camserve: no KServe server was running")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("kserve", help="serve models with KServe's model server (v1 + Open Inference Protocol v2)")
    sub = p.add_subparsers(dest="kserve_command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="start the server; returns when every model is ready")
    s.add_argument("exports", nargs="+", help="export folders (camserve export --out)")
    s.add_argument("--name", action="append", help="model name per export, in order (default: the manifest's)")
    s.add_argument("--version", help="model version (default: the manifest's)")
    s.add_argument("--run-dir", default="ks_run", help="instance folder: spec, state, logs, audit (default ks_run)")
    s.add_argument("--config", help="camserve YAML/JSON configuration file (limits, runtime, audit)")
    s.add_argument("--host", default="127.0.0.1", help="bind address of REST and gRPC (default 127.0.0.1)")
    s.add_argument("--http-port", type=int, default=8080, help="REST port (0 = a free one; default 8080)")
    s.add_argument("--grpc-port", type=int, default=8081, help="gRPC port (0 = a free one; default 8081)")
    s.add_argument("--no-grpc", action="store_true", help="do not start the gRPC server")
    s.add_argument("--workers", type=int, default=1,
                   help="REST processes sharing the port, each with its own copy of the models (default 1)")
    s.add_argument("--foreground", action="store_true", help="run the server in this process (a container's command)")
    s.set_defaults(func=_serve)
    from camserve.serving.kserve.manifest import register as register_manifest

    register_manifest(sub)
    q = sub.add_parser("stop", help="stop the server started by camserve kserve serve")
    q.add_argument("--run-dir", default="ks_run")
    q.set_defaults(func=_stop)
