"""Faithfulness sampled on a live endpoint, off the answer's critical path.

:class:`Sampler` takes a share of explained requests (``metrics.sample_rate``) *after* their
answers are built and scores their maps in one background thread per worker process:

* the thread runs at the lowest CPU priority (``nice 19``) with its own forward-only ONNX
  Runtime session of one intra-op thread, so under load it only uses cycles the request
  path leaves idle (a session's thread pool would run at normal priority);
* its queue holds ``metrics.sample_queue`` requests; a draw that finds it full is dropped,
  so a busy server scores less rather than serving slower;
* every outcome is counted in ``camserve_faithfulness_samples_total{outcome=scored|dropped|failed}``,
  scores go to the ``camserve_faithfulness{metric, method}`` histogram and, through
  ``on_scored``, into the audit log as a record of outcome ``faithfulness`` that names the
  request (``request_id``, ``input_sha256``) it scores.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger("camserve.faithfulness")


@dataclass
class Job:
    """One sampled request: its preprocessed images and what was explained for them."""

    request_id: str
    model: dict[str, str]
    input_sha256: list[str]
    images: np.ndarray  # [n, 3, H, W]
    logits: np.ndarray  # [n, K]
    classes: list[list[int]]  # per image, its targets
    cams: dict[str, list[np.ndarray]]  # method -> per image [T, H, W]


class _Explained:
    """The slice of an explanation that :func:`camserve.pipeline.scoring.score_explanation` reads."""

    def __init__(self, job: Job) -> None:
        self.logits, self.classes, self.cams = job.logits, job.classes, job.cams


class Sampler:
    """Draws explained requests and scores them in the background (see the module docstring)."""

    def __init__(self, session: Any, metrics: tuple[str, ...], rate: float, queue_size: int, recorder: Any,
                 on_scored: Callable[[dict[str, Any]], None] | None = None, seed: int | None = None) -> None:
        self.session, self.metrics, self.rate, self.recorder = session, tuple(metrics), float(rate), recorder
        self.on_scored = on_scored
        self._random = random.Random(seed)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._forward: Any = None
        self._thread = threading.Thread(target=self._run, name="camserve-faithfulness", daemon=True)
        self._thread.start()

    def draw(self) -> bool:
        """Whether this explained request is one of the sampled share."""
        return self.rate > 0 and self._random.random() < self.rate

    def offer(self, job: Job) -> bool:
        """Queue ``job`` for scoring; False (and counted ``dropped``) when the queue is full."""
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            self.recorder.sample("dropped")
            return False

    def close(self, timeout: float = 10.0) -> None:
        """Score what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def _forward_logits(self, images: np.ndarray) -> np.ndarray:
        if self._forward is None:  # loaded in this thread, on first use: no cost for unsampled workers
            from camserve.pipeline.runtime import load_forward, session_options

            s = self.session
            self._forward = load_forward(s.directory, s.manifest, session_options(1), s.providers)
        return self._forward.run(["logits"], {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._score(job)
            except Exception:  # noqa: BLE001 - a failed sample must not end the thread
                log.exception("faithfulness sample of request %s failed", getattr(job, "request_id", "?"))
                self.recorder.sample("failed")
            finally:
                self._queue.task_done()

    def _score(self, job: Job) -> None:
        from camserve.pipeline.scoring import as_json, score_explanation

        methods = list(job.cams)
        holder = type("Forward", (), {"forward_logits": staticmethod(self._forward_logits)})
        scores, seconds = score_explanation(holder, job.images, _Explained(job), methods, self.metrics, self.session.manifest)
        entries = []
        for method, per_image in scores.items():
            for i, values in enumerate(per_image):
                for name, v in values.items():
                    for x in v[np.isfinite(v)]:
                        self.recorder.faithfulness(method, name, float(x))
                entries += [{"image": i, "method": method, "target": {"index": int(c)}, "metrics": as_json(values, t)}
                            for t, c in enumerate(job.classes[i])]
        self.recorder.sample("scored")
        if self.on_scored is not None:
            self.on_scored({"time": time.time(), "request_id": job.request_id, "model": job.model,
                            "input_sha256": job.input_sha256, "outcome": "faithfulness", "status": 200,
                            "faithfulness": entries, "timings_ms": {"metrics": round(seconds * 1000.0, 3)}})
