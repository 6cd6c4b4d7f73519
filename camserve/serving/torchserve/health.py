"""A health check that needs no secret: ``GET /ping`` and ``GET /ready`` on their own port.

With token authorization on (camserve's default), TorchServe refuses its own ``/ping``
without the inference key, so a load balancer or a Kubernetes probe cannot use it.
``camserve serve`` therefore starts this small process next to TorchServe, bound to
``server.host`` (127.0.0.1 by default) on ``server.health_port``:

* ``GET /ping``  200 ``{"status": "Healthy"}`` while TorchServe's frontend answers
  (its metrics endpoint, which needs no key), else 503 ``{"status": "Unhealthy"}``;
* ``GET /ready`` 200 ``{"status": "Ready"}`` while every served model version has a READY
  worker (the management API, read with the run folder's management key), else 503
  ``{"status": "NotReady"}``.

The answers reveal nothing else (no model names, versions, counts or software versions);
any other path or method is a 404/405 with the same one-field body. Checks are cached for
one second, so a probe storm costs TorchServe at most one request per second per check.
The process exits by itself when the TorchServe frontend it watches is gone, and
``camserve stop`` stops it (:func:`start_health`, :func:`health_process`). When the
management key has expired (TorchServe's ``token_expiration_min``), the readiness check
renews it with the API key (:func:`camserve.serving.torchserve.server.management_get`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from camserve.serving.torchserve.server import Instance

CACHE_S = 1.0
ANSWERS = {True: (200, "Healthy"), False: (503, "Unhealthy")}
READY = {True: (200, "Ready"), False: (503, "NotReady")}


class Checks:
    """The two checks of one run folder, each cached for :data:`CACHE_S` seconds."""

    def __init__(self, run_dir: Path) -> None:
        from camserve.serving.torchserve.server import Instance

        self.run_dir = run_dir
        self.instance = Instance.load(run_dir)
        self._cache: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def cached(self, name: str, check: Callable[[], bool]) -> bool:
        with self._lock:
            at, value = self._cache.get(name, (0.0, False))
            if time.monotonic() - at < CACHE_S:
                return value
            try:
                value = bool(check())
            except Exception:  # noqa: BLE001 - any failure to check is "not healthy"
                value = False
            self._cache[name] = (time.monotonic(), value)
            return value

    def alive(self) -> bool:
        return self.cached("ping", self._frontend_answers)

    def ready(self) -> bool:
        return self.cached("ready", self._all_ready)

    def _frontend_answers(self) -> bool:
        with urllib.request.urlopen(f"{self.instance.metrics_url}/metrics", timeout=5) as resp:
            resp.read(1)
            return resp.status == 200

    def _all_ready(self) -> bool:
        from camserve.serving.torchserve.server import ready_models  # renews an expired management key itself

        ready = ready_models(self.instance)
        return all(
            version in ready.get(name, [])
            for name, versions in self.instance.models.items()
            for version in versions
            if f"{name} {version}" not in self.instance.failed
        )


def make_handler(checks: Checks) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "camserve-health"
        sys_version = ""

        def _answer(self, status: int, text: str) -> None:
            body = json.dumps({"status": text}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in ("/ping", "/healthz", "/live"):
                self._answer(*ANSWERS[checks.alive()])
            elif path in ("/ready", "/readyz"):
                self._answer(*READY[checks.alive() and checks.ready()])
            else:
                self._answer(404, "NotFound")

        do_HEAD = do_GET

        def _refuse(self) -> None:
            self._answer(405, "MethodNotAllowed")

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log
            pass

    return Handler


def serve(run_dir: Path, host: str, port: int, watch_pid: int) -> None:
    """Answer health checks until the frontend ``watch_pid`` is gone."""
    from camserve.serving.torchserve.server import _alive

    checks = Checks(run_dir)
    httpd = ThreadingHTTPServer((host, port), make_handler(checks))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    while watch_pid and _alive(watch_pid):
        time.sleep(2.0)
    httpd.shutdown()


def start_health(instance: "Instance", host: str, port: int, env: dict[str, str], timeout: float = 30.0) -> "Instance":
    """Start this module as the instance's health process and wait until it answers."""
    from camserve.serving.torchserve.server import Instance, ServerError, stop

    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    log = open(instance.run_dir / "logs" / "health.log", "ab")
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "camserve.serving.torchserve.health", "--run-dir", str(instance.run_dir), "--host", host,
             "--port", str(port), "--watch-pid", str(instance.pid)],
            cwd=instance.run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # it answers (503 while the frontend is busy still means it is up)
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(instance.run_dir)
            raise ServerError(f"the health check did not start on {url} (see {instance.run_dir / 'logs' / 'health.log'})")
        time.sleep(0.2)
    instance = Instance(**{**instance.__dict__, "health_url": url, "health_pid": proc.pid})
    instance.save()
    return instance


def health_process(run_dir: Path) -> Any:
    """The health-check process of ``run_dir``, recognised by its command line (pids get reused)."""
    import psutil

    from camserve.serving.torchserve.server import Instance, ServerError

    state = run_dir / "state.json"
    if not state.is_file():
        return None
    try:
        proc = psutil.Process(Instance.load(run_dir).health_pid or -1)
        cmd = proc.cmdline()
        if "camserve.serving.torchserve.health" in cmd and str(run_dir) in cmd:
            return proc
    except (psutil.Error, ValueError, ServerError):
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m camserve.serving.torchserve.health", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--watch-pid", type=int, required=True, help="exit once this TorchServe frontend is gone")
    args = p.parse_args(argv)
    serve(Path(args.run_dir), args.host, args.port, args.watch_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
