"""Faults at a real TorchServe: broken models at load, and a full disk under the audit's heatmap store.

Broken models: next to the good tiny CNN, one archive whose graph bytes were changed after
archiving and one without its ``manifest.json``. ``camserve serve`` returns as soon as the
good model is READY and the broken ones' workers died (it used to wait for the 180 s start
timeout and then stop everything), names each broken model and why on stderr, and
``logs/model_log.log`` has the worker's error line; the good model keeps answering while
TorchServe retries the broken ones. With only broken models, ``serve`` fails at once.

Full disk: the SQLite audit log (heatmaps stored, ``store_heatmaps``) lives on a 256 KiB
tmpfs mounted for the test and filled to ENOSPC after the first answers; one server per
policy checks what it promises (docs/audit.md): ``block`` answers 503 after ``timeout_s``
(and answers 200 when space returns during the wait), ``fail-closed`` 503 at once,
``fail-open`` answers and counts the lost records. The worker never dies, refused records
are never written later, and once space is freed answers are recorded again and the chain
verifies.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _server_fixture import http, png_bytes, sample_image, tiny_export
from camserve.serving.torchserve.load_errors import load_failures
from camserve.config import PORT_FIELDS

PORTS = PORT_FIELDS  # every port camserve serve opens, all free ones in tests
PORT_ARGS = [a for p in PORTS for a in (f"--{p.removesuffix('_port').replace('_', '-')}-port", "0")]
DIED = "Backend worker process died."


# ----------------------------------------------------------- broken models ---


def rewrite_mar(src: Path, dst: Path, name: str, change) -> Path:
    """A copy of archive ``src`` renamed to model ``name``; ``change(file, bytes)`` -> bytes or None (drop)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "MAR-INF/MANIFEST.json":
                meta = json.loads(data)
                meta["model"]["modelName"] = name
                data = json.dumps(meta).encode()
            data = change(item.filename, data)
            if data is not None:
                zout.writestr(item, data)
    return dst


def flip_tail(name: str, data: bytes) -> bytes:
    """The graph's last 64 bytes zeroed (storage corruption after archiving)."""
    return data[:-64] + bytes(64) if name == "model.onnx" else data


def broken_archives(store: Path, good: Path) -> None:
    rewrite_mar(good, store / "corrupt.mar", "corrupt", flip_tail)
    rewrite_mar(good, store / "nomanifest.mar", "nomanifest", lambda n, d: None if n == "manifest.json" else d)


def serve(store: Path, run_dir: Path) -> tuple[int, str, float]:
    """``camserve serve`` (the real CLI) -> (exit code, stderr, seconds)."""
    from camserve.cli import main

    err = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["serve", "--model-store", str(store), "--run-dir", str(run_dir), *PORT_ARGS, "--ort-threads", "1"])
    return code, err.getvalue(), time.monotonic() - start


def model_log(run_dir: Path) -> str:
    return (run_dir / "logs" / "model_log.log").read_text(errors="replace")


def eventually(check, timeout: float = 15.0):
    """``check()`` once truthy, polled: worker log lines and metrics reach the frontend's
    files and endpoint through the worker's stdout, a moment after the answer itself."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def auth(instance, api: str = "inference") -> dict[str, str]:
    return {"Authorization": f"Bearer {instance.key(api)}"}


def workers(instance, model: str) -> list[tuple[str, int]]:
    status, _, body = http("GET", f"{instance.management_url}/models/{model}", headers=auth(instance, "management"))
    assert status == 200
    return [(w["status"], w["pid"]) for w in json.loads(body)[0]["workers"]]


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory) -> Path:
    from camserve.serving.torchserve.archive import build_archive

    store = tmp_path_factory.mktemp("good-store")
    return build_archive(tiny_export(tmp_path_factory.getbasetemp()), name="tiny", version="1.0", model_store=store)


@pytest.fixture(scope="module")
def broken_neighbours(tmp_path_factory, good_archive):
    """``camserve serve`` over tiny (good), corrupt and nomanifest; always stopped afterwards."""
    from camserve.serving.torchserve.server import Instance, stop

    store = tmp_path_factory.mktemp("mixed-store")
    (store / "tiny.mar").write_bytes(good_archive.read_bytes())
    broken_archives(store, good_archive)
    run_dir = tmp_path_factory.mktemp("mixed-run")
    try:
        code, stderr, seconds = serve(store, run_dir)
        yield Instance.load(run_dir), code, stderr, seconds
    finally:
        if (run_dir / "state.json").is_file() or (run_dir / "tmp" / ".model_server.pid").is_file():
            stop(run_dir)


@pytest.mark.server
def test_serve_reports_broken_models_instead_of_waiting(broken_neighbours):
    instance, code, stderr, seconds = broken_neighbours
    assert code == 0, stderr
    assert seconds < 90, f"serve took {seconds:.0f} s (start timeout 180 s): it waited for the broken models"
    lines = stderr.splitlines()
    corrupt = [line for line in lines if "model corrupt 1.0 did not load" in line]
    missing = [line for line in lines if "model nomanifest 1.0 did not load" in line]
    assert len(corrupt) == 1 and "does not match the manifest's sha256" in corrupt[0], stderr
    assert len(missing) == 1 and "no manifest at" in missing[0] and "manifest.json" in missing[0], stderr
    assert set(instance.failed) == {"corrupt 1.0", "nomanifest 1.0"}  # kept in state.json too
    assert [s for s, _ in workers(instance, "tiny")] == ["READY"]


@pytest.mark.server
def test_model_log_names_each_problem(broken_neighbours):
    instance, *_ = broken_neighbours
    def logged(check) -> bool:
        return eventually(lambda: any(check(line) for line in model_log(instance.run_dir).splitlines()))

    assert logged(lambda line: "-corrupt_1.0-" in line and "ManifestError: graph file" in line
                  and "does not match the manifest's sha256" in line)
    assert logged(lambda line: "-nomanifest_1.0-" in line and "ManifestError: no manifest at" in line)
    assert not any("-tiny_1.0-" in line and DIED in line for line in model_log(instance.run_dir).splitlines())


@pytest.mark.server
def test_good_model_keeps_serving_while_broken_ones_are_retried(broken_neighbours):
    instance, *_ = broken_neighbours
    pid = workers(instance, "tiny")[0][1]
    deadline = time.monotonic() + 60  # TorchServe retries the broken workers with back-off: see a second death
    while time.monotonic() < deadline and model_log(instance.run_dir).count(f"corrupt_1.0-stdout MODEL_LOG - {DIED}") < 2:
        time.sleep(0.5)
    assert model_log(instance.run_dir).count(f"corrupt_1.0-stdout MODEL_LOG - {DIED}") >= 2
    body = png_bytes(sample_image(3))
    headers = {**auth(instance), "Content-Type": "image/png"}

    def call(model: str) -> int:
        try:  # TorchServe holds a request for a model without a worker (until one loads): give up early
            return http("POST", f"{instance.inference_url}/explanations/{model}", body, headers, timeout=5 if model != "tiny" else 60)[0]
        except OSError:
            return 0

    with ThreadPoolExecutor(12) as pool:  # requests stuck on the broken models do not hold up the good one
        results = list(pool.map(call, ["corrupt", "nomanifest"] * 2 + ["tiny"] * 16))
    assert results[4:] == [200] * 16
    assert 200 not in results[:4]
    for broken in ("corrupt", "nomanifest"):
        assert "READY" not in [s for s, _ in workers(instance, broken)]
    assert workers(instance, "tiny") == [("READY", pid)]


@pytest.mark.server
def test_serve_fails_at_once_when_no_model_loads(tmp_path, good_archive):
    from camserve.serving.torchserve.server import instance_processes

    store = tmp_path / "store"
    store.mkdir()
    broken_archives(store, good_archive)
    run_dir = tmp_path / "run"
    code, stderr, seconds = serve(store, run_dir)
    assert code == 2 and seconds < 90, (code, seconds, stderr)
    assert "no model loaded" in stderr and "does not match the manifest's sha256" in stderr and "no manifest at" in stderr
    pid = int((run_dir / "tmp" / ".model_server.pid").read_text().split()[0]) if (run_dir / "tmp" / ".model_server.pid").is_file() else 0
    assert instance_processes(run_dir, pid) == []  # stopped, workers included


def test_load_failures_reads_the_dead_workers_reason(tmp_path):
    """The model-log reader on a log shaped like TorchServe 0.12's (no server needed)."""
    prefix = "2026-11-26T05:38:21,527 [INFO ] W-{port}-{worker}-stdout MODEL_LOG - "
    lines = [
        ("9000", "a_b_1.0", "Torch worker started."),
        ("9000", "a_b_1.0", DIED),
        ("9000", "a_b_1.0", "Traceback (most recent call last):"),
        ("9000", "a_b_1.0", "FileNotFoundError: [Errno 2] No such file or directory: 'x/manifest.json'"),
        ("9000", "a_b_1.0", ""),
        ("9000", "a_b_1.0", "The above exception was the direct cause of the following exception:"),
        ("9000", "a_b_1.0", "    raise ManifestError(f\"no manifest at {path}\") from exc"),
        ("9000", "a_b_1.0", "camserve.errors.ManifestError: no manifest at x/manifest.json"),
        ("9001", "good_2", "Python runtime: 3.11.7"),
        ("9002", "onnx_1.0", DIED),
        ("9002", "onnx_1.0", "onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF"),
        ("9003", "silent_1.0", DIED),
        ("9004", "other_1.0", DIED),  # not one of ours
    ]
    log = tmp_path / "model_log.log"
    log.write_text("".join(prefix.format(port=p, worker=w) + m + "\n" for p, w, m in lines))
    models = {"a_b": ["1.0"], "good": ["2"], "onnx": ["1.0"], "silent": ["1.0"]}
    found = load_failures(log, models)
    assert found == {
        ("a_b", "1.0"): "camserve.errors.ManifestError: no manifest at x/manifest.json",
        ("onnx", "1.0"): "onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF",
        ("silent", "1.0"): "its worker died while loading (no error logged)",
    }
    assert load_failures(log, models, offset=log.stat().st_size) == {}  # an earlier run's lines are skipped
    assert load_failures(tmp_path / "missing.log", models) == {}


# --------------------------------------------------------------- full disk ---


def fill(folder: Path) -> None:
    """Write ``folder/filler`` until the filesystem refuses another byte (ENOSPC)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)


#: The audit timeout of the full-disk servers: long enough that a refusal "at once" on a
#: busy machine is still told apart from one that waited it out.
TIMEOUT_S = 5.0


@pytest.fixture(scope="module", params=["block", "fail-closed", "fail-open"])
def full_disk_server(request, tmp_path_factory, good_archive):
    """(instance, policy, mount point, audit folder): one worker, SQLite audit with heatmaps on a 256 KiB tmpfs."""
    from camserve.config import load_config
    from camserve.serving.torchserve.server import start, stop

    policy = request.param
    base = tmp_path_factory.mktemp(f"disk-{policy}")
    mnt = base / "fs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:  # as root a read-only folder would not stop the writer: no honest stand-in
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the full-disk test needs one")
    run_dir = base / "run"
    try:
        config = load_config(env={}, overrides={
            "server": {p: 0 for p in PORTS},
            "runtime": {"ort_threads": 1},
            "audit": {"path": str(mnt / "audit"), "policy": policy, "timeout_s": TIMEOUT_S, "store_heatmaps": True},
        })
        yield start(config, run_dir=run_dir, model_store=good_archive.parent), policy, mnt, mnt / "audit"
    finally:
        if (run_dir / "state.json").is_file():
            stop(run_dir)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def explain(instance, seed: int) -> tuple[int, dict, float]:
    start = time.monotonic()
    status, _, body = http("POST", f"{instance.inference_url}/explanations/tiny", png_bytes(sample_image(seed)),
                           {**auth(instance), "Content-Type": "image/png"})
    return status, json.loads(body), time.monotonic() - start


def stored(audit: Path) -> tuple[list[str], int]:
    """(request ids of the records, heatmap blobs) in the SQLite log."""
    conn = sqlite3.connect(f"file:{audit / 'audit.sqlite'}?mode=ro", uri=True)
    try:
        ids = [r[0] for r in conn.execute("SELECT request_id FROM records ORDER BY seq")]
        return ids, conn.execute("SELECT count(*) FROM blobs WHERE kind = 'heatmap'").fetchone()[0]
    finally:
        conn.close()


def counter(instance, name: str) -> float:
    from camserve.pipeline.metrics import parse_prometheus

    status, _, text = http("GET", f"{instance.metrics_url}/metrics")
    assert status == 200
    return sum(v for (n, labels), v in parse_prometheus(text.decode()).items() if n == name and dict(labels).get("model_name") == "tiny")


@pytest.mark.server
def test_full_heatmap_disk_applies_the_policy_and_recovers(full_disk_server, capsys):
    from camserve.cli import main

    instance, policy, mnt, audit = full_disk_server
    pid = workers(instance, "tiny")[0][1]
    # storage works: answers recorded, their heatmaps stored
    first = [explain(instance, s) for s in (1, 2)]
    assert [s for s, _, _ in first] == [200, 200]
    ids, heatmaps = stored(audit)
    assert [a["request_id"] for _, a, _ in first] == ids[-2:] and heatmaps >= 2
    failures, lost = counter(instance, "camserve_audit_sink_failures_total"), counter(instance, "camserve_audit_records_lost_total")

    fill(mnt)
    full = []
    for seed in (10, 11, 12):
        fill(mnt)  # whatever SQLite freed in between is taken again
        full.append(explain(instance, seed))
    assert eventually(lambda: "database or disk is full" in model_log(instance.run_dir))  # the worker's log names the reason
    for status, answer, seconds in full:
        if policy == "fail-open":
            assert status == 200 and answer["images"][0]["explanations"], answer
            # each answer's loss is logged by the audit writer after the answer left: poll for it
            assert eventually(lambda: any(answer["request_id"] in line and "database or disk is full" in line
                                          for line in model_log(instance.run_dir).splitlines()
                                          if "AUDIT RECORDS LOST" in line)), answer["request_id"]
        else:
            assert status == 503 and answer["error"]["kind"] == "audit_unavailable", answer
            assert "could not be written" in answer["error"]["message"] and policy in answer["error"]["message"]
            if policy == "block":
                assert TIMEOUT_S - 0.5 <= seconds < 60, seconds  # waited for timeout_s while the writer retried
            else:
                assert seconds < TIMEOUT_S - 0.5, seconds  # at once: never waited out the timeout
    assert eventually(lambda: counter(instance, "camserve_audit_sink_failures_total") >= failures + 3)
    lost_now = lost + (3 if policy == "fail-open" else 0)
    assert eventually(lambda: counter(instance, "camserve_audit_records_lost_total") == lost_now)

    if policy == "block":  # space comes back while a batch waits: it is answered, with its record
        fill(mnt)
        retries = model_log(instance.run_dir).count("retrying")
        result = {}
        waiter = threading.Thread(target=lambda: result.update(out=explain(instance, 20)))
        waiter.start()
        deadline = time.monotonic() + 10
        while model_log(instance.run_dir).count("retrying") == retries and time.monotonic() < deadline:
            time.sleep(0.05)
        os.unlink(mnt / "filler")
        waiter.join()
        status, answer, _ = result["out"]
        assert status == 200, answer
        assert answer["request_id"] in stored(audit)[0]

    (mnt / "filler").unlink(missing_ok=True)
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda s: explain(instance, s), range(30, 34)))
    assert [s for s, _, _ in after] == [200] * 4
    ids, _ = stored(audit)
    assert all(a["request_id"] in ids for _, a, _ in after)
    assert not any(a["request_id"] in ids for _, a, _ in full)  # refused or lost records never appear later
    assert workers(instance, "tiny") == [("READY", pid)] and DIED not in model_log(instance.run_dir)  # no crash
    capsys.readouterr()
    assert main(["audit", "verify", "--path", str(audit)]) == 0
    assert "OK" in capsys.readouterr().out
