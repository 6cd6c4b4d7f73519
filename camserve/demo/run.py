"""``python -m camserve.demo.run --out demo_out``: the whole product in one command (``make demo``).

Trains the small synthetic-shapes CNN (:mod:`camserve.demo.shapes`), exports it, archives it,
starts a real TorchServe on free loopback ports, explains sample images through HTTP with
the client code (several CAM methods per request), writes the overlays, the JSON answers
and a labelled contact sheet, and stops the server (always, also on error). Everything goes
under the ``--out`` folder::

    export/        model.onnx + manifest.json
    model_store/   shapes.mar
    serve_run/     the TorchServe instance (config, logs, keys)
    samples/       the input PNGs and samples.json (true class and shape box)
    results/       <sample>.camserve.json and <sample>.<method>.<class>.overlay.png
    contact_sheet.png, demo_summary.json

Because each sample holds one shape whose class is the label, "the CAM peak lies in the
shape's box" is a check the summary can print per method. A CamserveError prints one line
and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from camserve.errors import CamserveError, InputError  # noqa: E402

#: Contact sheet geometry: tiles of TILE px, PAD px apart, under a HEADER px title bar.
TILE, PAD, HEADER = 176, 6, 44
#: Samples shown per sheet row (each sample is its input plus one overlay per method).
SAMPLES_PER_ROW = 2
MODEL_NAME = "shapes"


@dataclass
class SampleResult:
    """One explained sample: truth, prediction, and per method the peak and the overlay file."""

    image: Path
    label: str
    box: list[int]
    predicted: str = ""
    score: float = 0.0
    latency_ms: float = 0.0
    batch_images: int = 0
    peaks: dict[str, list[int] | None] = field(default_factory=dict)
    overlays: dict[str, Path] = field(default_factory=dict)
    answer_file: Path | None = None

    @property
    def correct(self) -> bool:
        return self.predicted == self.label


def peak_in_box(peak: list[int] | None, box: list[int]) -> bool:
    """True when the (x, y) peak lies inside the inclusive box [x0, y0, x1, y1]."""
    return peak is not None and box[0] <= peak[0] <= box[2] and box[1] <= peak[1] <= box[3]


# ------------------------------------------------------------------ steps ------------


def build_archive_from_training(out: Path, args: argparse.Namespace, timings: dict[str, float],
                                log: Callable[[str], None]) -> tuple[Path, Any]:
    """Train, export and archive the shapes model; returns (model store, ShapesModelInfo)."""
    from camserve.demo import shapes as demo
    from camserve.serving.torchserve.archive import build_archive

    t = time.perf_counter()
    model, info = demo.train_shapes_model(seed=args.seed, steps=args.steps)
    timings["train_s"] = time.perf_counter() - t
    log(f"trained the shapes CNN: {info.steps} steps, held-out accuracy {info.heldout_accuracy:.1%} "
        f"({timings['train_s']:.1f} s)")
    t = time.perf_counter()
    demo.export_shapes_model(model, info, out / "export", model_name=MODEL_NAME, check=True)
    timings["export_s"] = time.perf_counter() - t
    log(f"exported to {out / 'export'} (parity with PyTorch checked, {timings['export_s']:.1f} s)")
    t = time.perf_counter()
    mar = build_archive(out / "export", name=MODEL_NAME, version="1.0", model_store=out / "model_store",
                        batch_size=8, max_batch_delay_ms=10, force=True)
    timings["archive_s"] = time.perf_counter() - t
    log(f"archived {mar} ({timings['archive_s']:.1f} s)")
    return out / "model_store", info


def explain_one(url: str, token: str | None, image: Path, methods: list[str], results: Path,
                timeout: float) -> tuple[dict[str, Any], float]:
    """POST one sample to /explanations with the client code; writes overlays + JSON."""
    from camserve.serving.client import ClientError, post_image, write_outputs

    t = time.perf_counter()
    try:
        answer = post_image(url, image.read_bytes(), "image/png", token, timeout,
                            {"methods": ",".join(methods), "output": "overlay"})
    except (TimeoutError, ConnectionError) as exc:  # a read timeout or reset escapes post_image
        raise ClientError(f"no answer from {url} within {timeout:g} s ({type(exc).__name__})") from None
    latency = (time.perf_counter() - t) * 1000.0
    write_outputs(image, answer, results)
    return answer, latency


def explain_samples(instance: Any, samples: list[dict[str, Any]], sample_dir: Path, methods: list[str],
                    results: Path, concurrency: int, timeout: float) -> list[SampleResult]:
    """Explain every sample through HTTP (``concurrency`` requests in flight, so the server
    batches them) and collect predictions, peaks and overlay files."""
    from camserve.serving.client import ClientError, explain_url

    url = explain_url(instance.inference_url, MODEL_NAME, None)
    token = instance.key("inference")
    out = [SampleResult(image=sample_dir / s["file"], label=s["label"], box=list(s["box"])) for s in samples]
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(explain_one, url, token, r.image, methods, results, timeout) for r in out]
        answers = []
        for r, fut in zip(out, futures):
            try:
                answers.append(fut.result())
            except ClientError as exc:
                raise ClientError(f"{r.image.name}: {exc}") from None
    for r, (answer, latency) in zip(out, answers):
        entry = answer["images"][0]
        top = entry["predictions"][0]
        r.predicted, r.score, r.latency_ms = top["label"], float(top["score"]), latency
        r.batch_images = int(answer.get("batch", {}).get("images", 0))
        for exp in entry["explanations"]:
            r.peaks[exp["method"]] = exp["summary"]["peak"]
            r.overlays[exp["method"]] = results / exp["overlay_file"]
        r.answer_file = results / f"{r.image.stem}.camserve.json"
        missing = [m for m in methods if m not in r.overlays]
        if missing:
            raise CamserveError(f"{r.image.name}: the answer has no explanation for {', '.join(missing)}")
    return out


# ------------------------------------------------------------------ sheet ------------


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _tile(image: np.ndarray, box: list[int], peak: list[int] | None, wrong: bool) -> np.ndarray:
    """``image`` upscaled to TILE px with the true box (white) and the CAM peak (a cross,
    white inside the box, magenta outside) drawn; a red frame marks a wrong prediction."""
    h, w = image.shape[:2]
    sx, sy = TILE / w, TILE / h
    tile = cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_NEAREST if max(h, w) <= TILE // 2 else cv2.INTER_AREA)
    p0 = (int(box[0] * sx), int(box[1] * sy))
    p1 = (int((box[2] + 1) * sx) - 1, int((box[3] + 1) * sy) - 1)
    cv2.rectangle(tile, p0, p1, (255, 255, 255), 1, cv2.LINE_AA)
    if peak is not None:
        c = (int((peak[0] + 0.5) * sx), int((peak[1] + 0.5) * sy))
        colour = (255, 255, 255) if peak_in_box(peak, box) else (255, 0, 255)
        cv2.drawMarker(tile, c, (0, 0, 0), cv2.MARKER_CROSS, 15, 4, cv2.LINE_AA)
        cv2.drawMarker(tile, c, colour, cv2.MARKER_CROSS, 13, 2, cv2.LINE_AA)
    if wrong:
        cv2.rectangle(tile, (0, 0), (TILE - 1, TILE - 1), (230, 0, 0), 4)
    return tile


def render_sheet(results: list[SampleResult], methods: list[str]) -> np.ndarray:
    """The contact sheet, uint8 RGB: per sample its input (true class, shape box) and one
    overlay per method (predicted class and score, CAM peak), under a legend bar."""
    from camserve.demo.sheet import contact_sheet

    tiles, labels = [], []
    for i, r in enumerate(results):
        tiles.append(_tile(_read_rgb(r.image), r.box, None, False))
        labels.append(f"#{i} true: {r.label}")
        for m in methods:
            tiles.append(_tile(_read_rgb(r.overlays[m]), r.box, r.peaks.get(m), not r.correct))
            labels.append(f"{m}: {r.predicted} {r.score:.2f}")
    grid = contact_sheet(tiles, labels, columns=SAMPLES_PER_ROW * (1 + len(methods)), tile_size=TILE, pad=PAD)
    bar = np.full((HEADER, grid.shape[1], 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    acc = sum(r.correct for r in results) / len(results)
    title = f"camserve demo: {MODEL_NAME} CNN served by TorchServe, {len(results)} samples, accuracy {acc:.0%}"
    legend = "white box: true shape   cross: CAM peak (magenta = outside the box)   red frame: wrong prediction"
    cv2.putText(bar, title, (PAD + 1, 18), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(bar, legend, (PAD + 1, 37), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    return np.concatenate([bar, grid], axis=0)


# ------------------------------------------------------------------ main -------------


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo, start to end; returns the summary also written to demo_summary.json."""
    from camserve.demo import shapes as demo
    from camserve.serving.torchserve import server
    from camserve.config import PORT_FIELDS, load_config
    from camserve.serving.torchserve.java import find_java
    from camserve.pipeline.render import encode_png

    t_all = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or args.samples < 1:
        raise InputError(f"the demo needs at least one method and one sample, got methods={args.methods!r}, "
                         f"samples={args.samples}")
    from camserve.cam.registry import get_method

    for m in methods:  # refuse an unknown method now, not after training
        get_method(m)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    find_java()  # fail in a second, not after training, when there is no Java
    timings: dict[str, float] = {}
    store, info = build_archive_from_training(out, args, timings, log)
    sample_paths = demo.write_samples(out / "samples", n=args.samples, seed=args.sample_seed, size=args.sample_size)
    samples = json.loads((out / "samples" / "samples.json").read_text())
    log(f"wrote {len(sample_paths)} samples to {out / 'samples'}")

    run_dir = out / "serve_run"
    ports = {p: 0 for p in PORT_FIELDS}
    config = load_config(overrides={"server": {**ports, "host": "127.0.0.1", "batch_size": 8,
                                                "max_batch_delay_ms": 10, "workers": 1},
                                    "runtime": {"ort_threads": 1}})
    results_dir = out / "results"
    results_dir.mkdir(exist_ok=True)
    if (run_dir / "state.json").is_file() and server.stop(run_dir):  # the folder is the demo's own
        log(f"stopped a server left running in {run_dir} by an earlier demo")
    t = time.perf_counter()
    try:
        instance = server.start(config, run_dir=run_dir, model_store=store, models=MODEL_NAME)
        timings["server_start_s"] = time.perf_counter() - t
        log(f"TorchServe READY at {instance.inference_url} ({timings['server_start_s']:.1f} s)")
        t = time.perf_counter()
        results = explain_samples(instance, samples, out / "samples", methods, results_dir,
                                  args.concurrency, args.timeout)
        timings["explain_s"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        if (run_dir / "state.json").is_file() or (run_dir / "tmp" / ".model_server.pid").is_file():
            server.stop(run_dir)
        timings["server_stop_s"] = time.perf_counter() - t
    log(f"stopped TorchServe ({timings['server_stop_s']:.1f} s)")

    sheet = render_sheet(results, methods)
    sheet_path = out / "contact_sheet.png"
    sheet_path.write_bytes(encode_png(sheet))
    timings["total_s"] = time.perf_counter() - t_all
    latencies = np.array([r.latency_ms for r in results])
    summary = {
        "model": {"name": MODEL_NAME, "heldout_accuracy": info.heldout_accuracy, "steps": info.steps,
                  "labels": list(info.labels), "input_size": info.input_size},
        "methods": methods,
        "samples": len(results),
        "accuracy": sum(r.correct for r in results) / len(results),
        "peak_in_box": {m: sum(peak_in_box(r.peaks.get(m), r.box) for r in results) / len(results) for m in methods},
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "max": float(latencies.max())},
        "max_batch_images": max(r.batch_images for r in results),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "contact_sheet": {"file": sheet_path.name, "width": int(sheet.shape[1]), "height": int(sheet.shape[0])},
        "results": [
            {"image": str(r.image.relative_to(out)), "label": r.label, "box": r.box, "predicted": r.predicted,
             "score": r.score, "answer": str(r.answer_file.relative_to(out)) if r.answer_file else None,
             "explanations": {m: {"peak": r.peaks.get(m), "peak_in_box": peak_in_box(r.peaks.get(m), r.box),
                                  "overlay": str(r.overlays[m].relative_to(out))} for m in methods}}
            for r in results
        ],
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(summary, out, log)
    return summary


def print_summary(s: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    t = s["timings_s"]
    rows = [("accuracy on the samples", f"{s['accuracy']:.0%} (held-out accuracy {s['model']['heldout_accuracy']:.1%})")]
    rows += [(f"{m} peak in shape box", f"{share:.0%} of the samples") for m, share in s["peak_in_box"].items()]
    rows += [
        ("request latency", f"p50 {s['latency_ms']['p50']:.0f} ms, max {s['latency_ms']['max']:.0f} ms "
                            f"(largest server batch: {s['max_batch_images']} images)"),
        ("time", f"train {t['train_s']:.0f} s, export {t['export_s']:.0f} s, archive {t['archive_s']:.0f} s, "
                 f"server start {t.get('server_start_s', 0):.0f} s, explain {t.get('explain_s', 0):.1f} s, "
                 f"stop {t['server_stop_s']:.0f} s; total {t['total_s']:.0f} s"),
        ("contact sheet", str(out / s["contact_sheet"]["file"])),
        ("overlays + JSON answers", str(out / "results")),
        ("summary", str(out / "demo_summary.json")),
        ("server logs", str(out / "serve_run" / "logs")),
    ]
    width = max(len(name) for name, _ in rows) + 2
    log("")
    log(f"camserve demo: {s['samples']} samples explained through TorchServe with {', '.join(s['methods'])}")
    for name, value in rows:
        log(f"  {name:{width}s}{value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m camserve.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--samples", type=int, default=12, help="sample images to explain (default 12)")
    p.add_argument("--sample-size", type=int, default=128, help="sample image side in pixels (default 128)")
    p.add_argument("--sample-seed", type=int, default=7, help="seed of the sample images (default 7)")
    p.add_argument("--methods", default="gradcam,gradcam++", help="comma-separated CAM methods (default gradcam,gradcam++)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--steps", type=int, default=260, help="training steps (default 260)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except CamserveError as exc:
        print(f"camserve demo: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
