"""``camserve serve`` / ``camserve stop``: one TorchServe instance per run folder, safe defaults.

Everything an instance owns lives in its run folder: ``config.properties`` (generated),
``metrics.yaml``, ``logs/``, ``tmp/`` (its own ``TMPDIR`` and ``TEMP``: TorchServe keeps the
pid file and the worker sockets there, so two instances never steal each other's),
``key_file.json`` (token authorization keys; TorchServe writes it in its cwd) and
``state.json`` (addresses and pid, read by ``stop`` and the client).

Defaults: every address 127.0.0.1, token authorization on, model registration API off,
gRPC ports set explicitly (a clash there would kill the server after start), Prometheus
metrics mode, batching as configured. Readiness is not ``/ping`` (healthy before any model
loads) but the management API reporting a READY worker for every model version; a version
whose worker died while loading is reported with the reason from the model log
(:mod:`camserve.serving.torchserve.load_errors`) instead of being waited for until the start timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from camserve.audit.metrics import write_metrics_config  # camserve's metrics YAML plus the audit counters
from camserve.config import CONFIG_ENV, PORT_FIELDS, Config, to_env
from camserve.serving.torchserve.instance import Instance, ServerError, free_port
from camserve.serving.torchserve.java import find_java
from camserve.serving.torchserve.load_errors import load_failures
from camserve.serving.torchserve.properties import (
    check_ports,
    limit_properties,
    mar_identity,
    model_entries,
    properties,
    resolve_ports,
    version_key,
)

#: Where these names lived before the split; callers keep importing them from here.
__all__ = ["Instance", "ServerError", "check_ports", "free_port", "limit_properties", "mar_identity", "model_entries",
           "properties", "resolve_ports", "start", "stop", "version_key", "wait_ready"]

def _request(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, None
    try:
        return status, json.loads(body or b"null")
    except ValueError:  # TorchServe's token API answers text that is not always JSON
        return status, None


def management_get(instance: Instance, path: str) -> tuple[int, Any]:
    """GET ``path`` on the management API with the run folder's key.

    TorchServe's keys expire (``token_expiration_min``); a refused key (TorchServe's 400
    InvalidKeyException) is renewed once with the API key, which does not expire, and the
    call repeated: a long-running health check or a slow start outlives any one key.
    """
    status, data = _request(f"{instance.management_url}{path}", instance.key("management"))
    api = instance.key("API")
    if status == 400 and api:
        renewed, _ = _request(f"{instance.management_url}/token?type=management", api)
        if renewed == 200:  # TorchServe wrote the new key to key_file.json
            status, data = _request(f"{instance.management_url}{path}", instance.key("management"))
    return status, data


def ready_models(instance: Instance) -> dict[str, list[str]]:
    """``{model: [versions with a READY worker]}`` from the management API."""
    out: dict[str, list[str]] = {}
    for name in instance.models:
        status, data = management_get(instance, f"/models/{name}/all")
        if status != 200 or not isinstance(data, list):
            continue
        out[name] = [
            str(entry.get("modelVersion")) for entry in data if any(w.get("status") == "READY" for w in entry.get("workers", []))
        ]
    return out


def wait_ready(instance: Instance, timeout: float, proc_alive=lambda: True, log_offset: int = 0) -> dict[str, str]:
    """Poll the management API until every model version has a READY worker or failed to load.

    A version fails to load when its worker dies while loading (reason from the model log
    after ``log_offset``); TorchServe would retry it forever, so waiting for it would only
    end at ``timeout``. Returns ``{"NAME VERSION": reason}`` of the failed versions, and
    raises :class:`ServerError` naming each reason when none loaded.
    """
    deadline = time.monotonic() + timeout
    log = instance.run_dir / "logs" / "model_log.log"
    seen: dict[tuple[str, str], str] = {}
    while time.monotonic() < deadline:
        try:
            ready = ready_models(instance)
        except (OSError, ValueError):
            ready = {}
        missing = {(name, v) for name, versions in instance.models.items() for v in versions if v not in ready.get(name, [])}
        # a death counts once seen in two polls: its traceback (the reason) is logged after it
        deaths = load_failures(log, instance.models, log_offset)
        failed = {key: why for key, why in deaths.items() if key in missing and key in seen}
        seen = deaths
        if missing and set(failed) == missing and proc_alive():
            report = "; ".join(f"{n} {v}: {why}" for (n, v), why in sorted(failed.items()))
            if len(failed) == sum(len(v) for v in instance.models.values()):
                raise ServerError(f"no model loaded ({report}); see {log}")
            return {f"{n} {v}": why for (n, v), why in sorted(failed.items())}
        if not missing:
            return {}
        if not proc_alive():
            reason = start_error(instance.run_dir)
            raise ServerError(f"TorchServe exited during start ({reason or 'no reason logged'}); see {instance.run_dir / 'logs'}")
        time.sleep(0.5)
    raise ServerError(
        f"no READY worker for every model after {timeout:.0f} s; see {instance.run_dir / 'logs' / 'model_log.log'}:\n"
        + log_tail(instance.run_dir)
    )


def log_tail(run_dir: Path, lines: int = 15) -> str:
    path = run_dir / "logs" / "model_log.log"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


#: Starts tried when free ports were asked for (port 0) and one was taken meanwhile.
PORT_ATTEMPTS = 3


def start(
    config: Config,
    *,
    run_dir: str | Path,
    model_store: str | Path,
    models: str = "all",
    inference_host: str | None = None,
    wait: bool = True,
    config_file: str | Path | None = None,
) -> Instance:
    """Start TorchServe for ``models`` (``all`` or comma-separated .mar names) and wait until READY.

    A free port (0) is found by binding and releasing it, so on a busy host another process
    can take it before TorchServe binds it; such a start is retried with new free ports
    (:data:`PORT_ATTEMPTS` in all). Fixed ports are never retried.
    """
    auto = any(getattr(config.server, name) == 0 for name in PORT_FIELDS)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            return _start(config, run_dir=run_dir, model_store=model_store, models=models,
                          inference_host=inference_host, wait=wait, config_file=config_file)
        except ServerError as exc:
            if not auto or "already in use" not in str(exc) or attempt == PORT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _start(
    config: Config,
    *,
    run_dir: str | Path,
    model_store: str | Path,
    models: str,
    inference_host: str | None,
    wait: bool,
    config_file: str | Path | None,
) -> Instance:
    run_dir = Path(run_dir).resolve()
    store = Path(model_store).resolve()
    if not store.is_dir():
        raise ServerError(f"model store {store} does not exist (build archives with camserve archive)")
    mars = sorted(store.glob("*.mar")) if models == "all" else [store / (m if m.endswith(".mar") else f"{m}.mar") for m in models.split(",")]
    for mar in mars:
        if not mar.is_file():
            raise ServerError(f"model archive {mar} does not exist")
    if not mars:
        raise ServerError(f"no .mar archives in {store}")
    java = find_java()
    if (run_dir / "state.json").is_file() and _alive(Instance.load(run_dir).pid):
        raise ServerError(f"a server from {run_dir} is already running (camserve stop --run-dir {run_dir})")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # it will hold the API keys
    for sub in ("logs", "tmp"):
        (run_dir / sub).mkdir(exist_ok=True)
    config = resolve_ports(config)
    check_ports(config, inference_host)
    write_metrics_config(run_dir / "metrics.yaml")
    if not Path(config.audit.path).is_absolute():  # the audit log lives in the run folder by default
        config = config.with_overrides({"audit": {"path": str(run_dir / config.audit.path)}})
    (run_dir / "config.properties").write_text(properties(config, run_dir, store, mars, inference_host))
    identities: dict[str, list[str]] = {}
    for mar in mars:
        name, version = mar_identity(mar)
        identities.setdefault(name, []).append(version)
    s = config.server
    host = s.host
    instance = Instance(
        run_dir=run_dir,
        inference_url=f"http://{'127.0.0.1' if (inference_host or host) == '0.0.0.0' else (inference_host or host)}:{s.inference_port}",
        management_url=f"http://{host}:{s.management_port}",
        metrics_url=f"http://{host}:{s.metrics_port}",
        models=identities,
    )
    env = {**os.environ, **instance.env(), **to_env(config), "JAVA_HOME": str(Path(java).resolve().parent.parent)}
    # ONNX Runtime has its threads; numpy's BLAS spinning up its own pool beside them made
    # the CAM post-processing (batched SVD/matmul) 10-30x slower on a busy host.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    if config_file:
        env[CONFIG_ENV] = str(Path(config_file).resolve())
    torchserve = Path(sys.executable).parent / "torchserve"
    cmd = [str(torchserve) if torchserve.exists() else "torchserve", "--start", "--ncs", "--ts-config", str(run_dir / "config.properties")]
    # The frontend inherits the launcher's stdout: a file, not a pipe nobody would drain.
    console = run_dir / "logs" / "console.log"
    pid_file = run_dir / "tmp" / ".model_server.pid"
    pid_file.unlink(missing_ok=True)
    model_log = run_dir / "logs" / "model_log.log"
    log_offset = model_log.stat().st_size if model_log.is_file() else 0  # the log outlives restarts
    with open(console, "ab") as log:
        code = subprocess.run(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120).returncode
    text = console.read_text(errors="replace")
    if code != 0 or "java not found" in text or not pid_file.is_file():
        raise ServerError(f"torchserve --start failed (see {console}): {text.strip()[-800:]}")
    instance = Instance(**{**instance.__dict__, "pid": int(pid_file.read_text().split()[0])})
    instance.save()
    if wait:
        try:
            failed = wait_ready(instance, s.startup_timeout_s, proc_alive=lambda: _alive(instance.pid), log_offset=log_offset)
        except ServerError:
            stop(run_dir)
            raise
        if failed:
            instance = Instance(**{**instance.__dict__, "failed": failed})
            instance.save()
    keys = run_dir / "key_file.json"
    if keys.exists():
        keys.chmod(0o600)
    if wait:
        from camserve.serving.torchserve.health import start_health

        # beside the inference API: a probe reaches it where clients reach inference
        instance = start_health(instance, inference_host or host, s.health_port, env)
    return instance


def instance_processes(run_dir: Path, pid: int) -> list:
    """The frontend of ``run_dir`` (if alive), its children, and workers it left behind.

    Workers are recognised by their socket path, which lies in this instance's own tmp
    folder: a frontend that dies during start leaves its worker running otherwise.
    """
    import psutil

    procs = {}
    try:
        frontend = psutil.Process(pid)
        if "org.pytorch.serve.ModelServer" in frontend.cmdline():  # else the pid was reused
            procs[frontend.pid] = frontend
            procs.update((c.pid, c) for c in frontend.children(recursive=True))
    except psutil.Error:
        pass
    marker = f"{run_dir / 'tmp' / '.ts.sock'}."
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []):
                procs.setdefault(proc.pid, proc)
        except psutil.Error:
            continue
    return list(procs.values())


def start_error(run_dir: Path) -> str:
    """The first line of the frontend's console that says why it stopped."""
    console = run_dir / "logs" / "console.log"
    lines = console.read_text(errors="replace").splitlines() if console.is_file() else []
    for pattern in ("already in use", "Exception", "ERROR", "rror"):
        for line in lines:
            if pattern in line:
                return line.strip()[:300]
    return ""


def stop(run_dir: str | Path, timeout: float = 30.0) -> bool:
    """Stop the instance of ``run_dir`` (frontend and its workers). False if none was running."""
    import psutil

    run_dir = Path(run_dir).resolve()
    pid_file = run_dir / "tmp" / ".model_server.pid"
    if (run_dir / "state.json").is_file():
        pid = Instance.load(run_dir).pid
    elif pid_file.is_file():  # a start that failed before writing its state
        pid = int(pid_file.read_text().split()[0])
    else:
        raise ServerError(f"no camserve server state in {run_dir} (was it started with camserve serve?)")
    from camserve.serving.torchserve.health import health_process

    procs = instance_processes(run_dir, pid)
    health = health_process(run_dir)
    if health is not None:
        health.terminate()
        procs.append(health)
    if not procs:
        return False
    torchserve = Path(sys.executable).parent / "torchserve"
    subprocess.run(
        [str(torchserve) if torchserve.exists() else "torchserve", "--stop"],
        cwd=run_dir,
        env={**os.environ, **Instance(run_dir, "", "", "", {}).env()},
        capture_output=True,
        timeout=60,
    )
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:  # only the frontend's own process tree, by pid
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return True
