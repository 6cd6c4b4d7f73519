"""Soak a real TorchServe with a mixed request load; report errors, memory, descriptors and the audit.

A fixed count of requests (``--requests``) is sent from ``--concurrency`` client threads, each
on its own keep-alive connection, cycling through a deterministic mix of

* good images: PNG, JPEG, WebP and BMP of several sizes (grayscale and RGBA too), on
  ``/predictions`` (predictions only) and ``/explanations`` (summaries, PNG heatmaps, top-k);
* multipart batches of two or three images with a JSON ``params`` field;
* bad inputs: an empty body, text, a truncated JPEG, a PNG whose header declares
  20000 x 20000 pixels, an unknown CAM method, a class index out of range.

Every answer must be well-formed: the status expected for its input (200, or the 4xx of its
error kind: never a 5xx), a JSON body of schema ``camserve/1`` with a ``request_id``, one
image entry per image sent, or the expected ``error.kind``. After a warm-up of the same mix,
each worker's RSS (``VmRSS`` in ``/proc/<pid>/status``) and the open descriptors of the
frontend and the workers (``/proc/<pid>/fd``) are read; they are read again after the run
(the frontend's once the clients' connections are closed). The audit log must hold one
record per answer, with the answers' request ids, and its chain must verify.

    python bench/soak.py [--requests 2000] [--concurrency 32] [--workers 2] [--json PATH]
    python bench/soak.py --run-dir serve_run --model tiny   # a server already running (its audit in serve_run/audit)

Without ``--run-dir`` it exports the tests' tiny CNN (32 px), archives it and serves it with
``--workers`` workers and the SQLite audit log, then stops it. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from camserve.config import PORT_FIELDS

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
PORTS = PORT_FIELDS  # every port camserve serve opens, all free ones in tests
#: Allowed growth of the open descriptors between warm-up and the end of the run.
FD_MARGIN = {"frontend": 8, "worker": 2}
#: Allowed growth of a worker's RSS between warm-up and the end of the run.
RSS_MARGIN = 0.10


# ------------------------------------------------------------------ requests ---


@dataclass(frozen=True)
class Job:
    """One request of the mix and what its answer must be."""

    kind: str
    path: str
    body: bytes
    ctype: str
    params: str | None
    status: int
    error: str | None = None
    images: int = 1


def picture(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth random uint8 image (H, W, C) in OpenCV's BGR(A) order."""
    import cv2

    small = np.random.default_rng(seed).integers(0, 256, (6, 5, channels), dtype=np.uint8)
    out = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return out if channels > 1 else out[:, :, None]


def encoded(image: np.ndarray, ext: str) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image)
    assert ok, ext
    return buf.tobytes()


def declared_png(side: int = 20000) -> bytes:
    """A tiny PNG whose header declares side x side pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request with (name, type, bytes) parts."""
    boundary = "camserve-soak-7d1e"
    out = []
    for name, ctype, data in parts:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                   f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def catalogue(model: str, variant: int) -> list[Job]:
    """Every kind of request once; ``variant`` changes the pixels (seeds) of the good ones."""
    v = variant * 10
    pred, expl = f"/predictions/{model}", f"/explanations/{model}"
    jpeg = encoded(picture(v + 3, 90, 120), ".jpg")
    parts = [("a", "image/png", encoded(picture(v + 6, 40, 48), ".png")),
             ("b", "image/jpeg", encoded(picture(v + 7, 64, 80), ".jpg"))]
    pair, pair_type = multipart(parts + [("params", "application/json", b'{"target": [1, 4], "output": "summary"}')])
    trio, trio_type = multipart(parts + [("c", "image/webp", encoded(picture(v + 8, 33, 31), ".webp")),
                                         ("params", "application/json", b'{"methods": ["gradcam", "layercam"]}')])
    good = encoded(picture(v + 9, 40, 48), ".png")
    return [
        Job("png", pred, encoded(picture(v + 1, 40, 48), ".png"), "image/png", None, 200),
        Job("png-gray", expl, encoded(picture(v + 2, 37, 53, 1), ".png"), "image/png", "output=summary", 200),
        Job("jpeg", expl, jpeg, "image/jpeg", "output=png", 200),
        Job("webp-rgba", pred, encoded(picture(v + 4, 64, 64, 4), ".webp"), "image/webp", "target=topk&topk=2&output=summary", 200),
        Job("bmp-large", expl, encoded(picture(v + 5, 300, 400), ".bmp"), "application/octet-stream", "output=summary", 200),
        Job("multipart-2", pred, pair, pair_type, None, 200, images=2),
        Job("multipart-3", expl, trio, trio_type, None, 200, images=3),
        Job("empty", expl, b"", "application/octet-stream", None, 415, "not_an_image"),
        Job("not-an-image", expl, b"this is not an image at all", "application/octet-stream", None, 415, "not_an_image"),
        Job("truncated-jpeg", expl, jpeg[: len(jpeg) // 3], "image/jpeg", None, 415, "not_an_image"),
        Job("huge-declared-png", expl, declared_png(), "image/png", None, 413, "image_too_large"),
        Job("unknown-method", expl, good, "image/png", "methods=nosuchcam", 400, "bad_parameter"),
        Job("class-out-of-range", expl, good, "image/png", "target=7", 400, "bad_parameter"),
    ]


def mix(count: int, model: str, seed: int = 0, variants: int = 4) -> list[Job]:
    """``count`` requests: every kind equally often, in a fixed random order."""
    kinds = [catalogue(model, v) for v in range(variants)]
    order = np.random.default_rng(seed).permutation(count)
    return [kinds[(i // len(kinds[0])) % variants][i % len(kinds[0])] for i in order]


# ------------------------------------------------------------------- driving ---


@dataclass
class Outcome:
    job: Job
    status: int  # 0: no HTTP answer (connection error)
    ctype: str
    answer: dict[str, Any] | None
    problem: str | None = None


def drive(url: str, token: str | None, jobs: list[Job], concurrency: int, timeout: float = 120.0) -> list[Outcome]:
    """Send ``jobs`` from ``concurrency`` threads (one keep-alive connection each)."""
    target = urlsplit(url)
    lock = threading.Lock()
    queue = iter(range(len(jobs)))
    out: list[Outcome | None] = [None] * len(jobs)

    def client() -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                conn.close()
                return
            job = jobs[i]
            headers = {"Content-Type": job.ctype}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if job.params:
                headers["X-Camserve-Params"] = job.params
            try:
                conn.request("POST", job.path, body=job.body, headers=headers)
                resp = conn.getresponse()
                raw, status, ctype = resp.read(), resp.status, resp.getheader("content-type") or ""
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
                out[i] = Outcome(job, 0, "", None, f"{job.kind}: no answer ({type(exc).__name__}: {exc})")
                continue
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            out[i] = Outcome(job, status, ctype, answer if isinstance(answer, dict) else None)
            out[i].problem = judge(out[i])

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in out if o is not None]


def judge(o: Outcome) -> str | None:
    """Why this answer is not the well-formed one its request calls for (None when it is)."""
    job, a = o.job, o.answer
    if o.status != job.status:
        return f"{job.kind}: status {o.status}, expected {job.status}"
    if not o.ctype.startswith("application/json") or a is None:
        return f"{job.kind}: answer is not a JSON object (content type {o.ctype!r})"
    if a.get("schema") != "camserve/1" or not a.get("request_id") or "model" not in a:
        return f"{job.kind}: answer lacks schema, request_id or model"
    if job.error:
        err = a.get("error") or {}
        if err.get("kind") != job.error or err.get("status") != job.status or not err.get("message"):
            return f"{job.kind}: error {err!r}, expected kind {job.error}"
        return None
    images = a.get("images") or []
    if len(images) != job.images or not all(img.get("predictions") for img in images):
        return f"{job.kind}: {len(images)} image entries with predictions, expected {job.images}"
    if job.path.startswith("/explanations") and not all(img.get("explanations") for img in images):
        return f"{job.kind}: an explained image has no explanations"
    return None


# ------------------------------------------------------------------ processes ---


def processes(instance: Any) -> tuple[int, list[int]]:
    """(frontend pid, worker pids) of a camserve instance, found as ``camserve.serving.torchserve.server`` stops them."""
    from camserve.serving.torchserve.server import instance_processes

    workers = []
    for proc in instance_processes(instance.run_dir, instance.pid):
        try:
            if any("model_service_worker" in arg for arg in proc.cmdline()):
                workers.append(proc.pid)
        except Exception:  # noqa: BLE001 - a process that just ended is simply not counted
            continue
    return instance.pid, sorted(workers)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(instance: Any) -> dict[str, Any]:
    frontend, workers = processes(instance)
    return {"frontend": {"pid": frontend, "fds": fd_count(frontend), "rss_kb": rss_kb(frontend)},
            "workers": {str(w): {"rss_kb": rss_kb(w), "fds": fd_count(w)} for w in workers}}


def settled_fds(pid: int, limit: int, wait_s: float = 15.0) -> int:
    """The process's descriptor count once at most ``limit`` (closing client sockets takes a moment)."""
    deadline = time.monotonic() + wait_s
    count = fd_count(pid)
    while count > limit and time.monotonic() < deadline:
        time.sleep(0.25)
        count = fd_count(pid)
    return count


# ---------------------------------------------------------------------- soak ---


def audit_ids(audit: Any) -> list[str]:
    """Request ids of every record in the log, in chain order ([] when there is no log yet)."""
    from camserve.audit import SinkError, open_sink

    sink = open_sink(audit)
    try:
        return [row.record()["request_id"] for row in sink.rows()]
    except SinkError:
        return []
    finally:
        sink.close()


def soak(instance: Any, audit: Any, *, model: str = "tiny", requests: int = 2000, concurrency: int = 32,
         warmup: int = 208, seed: int = 0) -> dict[str, Any]:
    """Warm up, snapshot, run ``requests`` mixed requests, snapshot again; the figures (see ``checks``)."""
    from camserve.audit import open_sink, verify

    token = instance.key("inference")
    warm = drive(instance.inference_url, token, mix(warmup, model, seed + 1), concurrency)
    before = snapshot(instance)
    records_before = len(audit_ids(audit))
    jobs = mix(requests, model, seed)
    start = time.perf_counter()
    outcomes = drive(instance.inference_url, token, jobs, concurrency)
    seconds = time.perf_counter() - start
    after = snapshot(instance)
    after["frontend"]["fds"] = settled_fds(before["frontend"]["pid"], before["frontend"]["fds"] + FD_MARGIN["frontend"])
    ids = audit_ids(audit)[records_before:]
    answered = [o.answer["request_id"] for o in outcomes if o.answer and o.answer.get("request_id")]
    stored = set(ids)
    report = verify(open_sink(audit))
    errors: dict[str, int] = {}
    for o in outcomes:
        kind = (o.answer or {}).get("error", {}).get("kind") if o.answer else None
        key = kind or ("no_answer" if o.status == 0 else f"http_{o.status}" if o.status != 200 else None)
        if key:
            errors[key] = errors.get(key, 0) + 1
    problems = [o.problem for o in outcomes if o.problem]
    return {
        "requests": len(jobs),
        "answers": len(outcomes),
        "concurrency": concurrency,
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(jobs) / seconds, 1),
        "warmup": {"requests": len(warm), "problems": sum(1 for o in warm if o.problem)},
        "status": {str(s): sum(1 for o in outcomes if o.status == s) for s in sorted({o.status for o in outcomes})},
        "errors_by_kind": dict(sorted(errors.items())),
        "good_5xx": sum(1 for o in outcomes if o.job.status == 200 and (o.status >= 500 or o.status == 0)),
        "problems": len(problems),
        "problem_examples": problems[:10],
        "memory_kb": {"before": {p: w["rss_kb"] for p, w in before["workers"].items()},
                      "after": {p: w["rss_kb"] for p, w in after["workers"].items()}},
        "fds": {"frontend": {"before": before["frontend"]["fds"], "after": after["frontend"]["fds"]},
                "workers": {p: {"before": w["fds"], "after": after["workers"].get(p, {}).get("fds")}
                            for p, w in before["workers"].items()}},
        "records": {"answered": len(answered), "written": len(ids), "lost": len([r for r in answered if r not in stored]),
                    "unanswered": len(stored - set(answered)), "duplicates": len(ids) - len(stored),
                    "verify_ok": report.ok, "chain_records": report.records},
    }


def checks(f: dict[str, Any]) -> dict[str, bool]:
    """Each soak requirement, True where met."""
    mem, fds, rec = f["memory_kb"], f["fds"], f["records"]
    return {
        "every_request_answered": f["answers"] == f["requests"] and "no_answer" not in f["errors_by_kind"],
        "no_5xx_for_good_input": f["good_5xx"] == 0,
        "every_answer_well_formed": f["problems"] == 0,
        "same_workers_throughout": bool(mem["before"]) and set(mem["before"]) == set(mem["after"]),
        "worker_rss_within_10pct": all(mem["after"].get(p, 0) <= (1 + RSS_MARGIN) * kb for p, kb in mem["before"].items()),
        "frontend_fds_stable": fds["frontend"]["after"] <= fds["frontend"]["before"] + FD_MARGIN["frontend"],
        "worker_fds_stable": all(w["after"] is not None and abs(w["after"] - w["before"]) <= FD_MARGIN["worker"]
                                 for w in fds["workers"].values()),
        "records_lost_zero": rec["lost"] == 0,
        "records_equal_answers": rec["written"] == rec["answered"] == f["answers"] and rec["unanswered"] == 0 == rec["duplicates"],
        "audit_chain_verifies": rec["verify_ok"],
    }


# ----------------------------------------------------------------- standalone ---


def start_server(work: Path, export_dir: Path, *, workers: int = 2, name: str = "tiny") -> tuple[Any, Any]:
    """Archive ``export_dir`` and serve it (``workers`` workers, SQLite audit in the run folder)."""
    from camserve.serving.torchserve.archive import build_archive
    from camserve.config import load_config
    from camserve.serving.torchserve.server import start

    store = work / "model_store"
    build_archive(export_dir, name=name, version="1.0", model_store=store, force=True)
    config = load_config(env={}, overrides={
        "server": {**{p: 0 for p in PORTS}, "workers": workers, "batch_size": 8, "max_batch_delay_ms": 5},
        "runtime": {"ort_threads": 1},
        "audit": {"enabled": True, "sink": "sqlite", "path": "audit"},
    })
    instance = start(config, run_dir=work / "run", model_store=store)
    return instance, replace(config.audit, path=str(instance.run_dir / "audit"))  # where start put it


def render(f: dict[str, Any], ok: dict[str, bool]) -> str:
    mem = ", ".join(f"{f['memory_kb']['before'][p] / 1024:.0f} -> {f['memory_kb']['after'].get(p, 0) / 1024:.0f} MB"
                    for p in f["memory_kb"]["before"])
    wfds = ", ".join(f"{w['before']} -> {w['after']}" for w in f["fds"]["workers"].values())
    rec = f["records"]
    lines = [
        f"requests        {f['requests']} at concurrency {f['concurrency']} in {f['seconds']} s ({f['requests_per_s']}/s)",
        f"status          {f['status']}",
        f"errors by kind  {f['errors_by_kind']}",
        f"good input 5xx  {f['good_5xx']}; malformed answers {f['problems']}",
        f"worker RSS      {mem} (after warm-up -> after the run)",
        f"open fds        frontend {f['fds']['frontend']['before']} -> {f['fds']['frontend']['after']}; workers {wfds}",
        f"audit records   {rec['written']} written for {rec['answered']} answers; lost {rec['lost']}; verify "
        f"{'ok' if rec['verify_ok'] else 'FAILED'} ({rec['chain_records']} in the chain)",
    ]
    lines += [f"  {'ok  ' if v else 'FAIL'} {k}" for k, v in ok.items()]
    lines += [f"  problem: {p}" for p in f["problem_examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=208)
    p.add_argument("--workers", type=int, default=2, help="workers of the server this script starts")
    p.add_argument("--run-dir", help="soak a server already started with camserve serve from this folder")
    p.add_argument("--model", default="tiny", help="model name (with --run-dir)")
    p.add_argument("--audit-path", help="audit folder of that server (default RUN_DIR/audit, SQLite)")
    p.add_argument("--json", help="also write the figures and checks as JSON here")
    args = p.parse_args(argv)
    from camserve.config import AuditConfig
    from camserve.serving.torchserve.server import Instance, stop

    work = None
    try:
        if args.run_dir:
            instance = Instance.load(args.run_dir)
            audit = AuditConfig(path=args.audit_path or str(Path(args.run_dir).resolve() / "audit"))
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from _server_fixture import tiny_export  # the tests' tiny CNN (32 px, 5 classes)

            work = Path(tempfile.mkdtemp(prefix="camserve-soak-"))
            instance, audit = start_server(work, tiny_export(work), workers=args.workers)
        figures = soak(instance, audit, model=args.model, requests=args.requests, concurrency=args.concurrency,
                       warmup=args.warmup)
    finally:
        if work is not None:
            if (work / "run" / "state.json").is_file():
                stop(work / "run")
            shutil.rmtree(work, ignore_errors=True)
    ok = checks(figures)
    print(render(figures, ok))
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "checks": ok}, indent=2) + "\n")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
