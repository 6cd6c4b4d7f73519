"""Cost of the faithfulness metrics per image: camserve vs pytorch-grad-cam 1.5.7.

resnet50 (torchvision, random weights; BatchNorm statistics randomized as
tests/test_extra_methods.py ``randomize_bn`` does, so the softmax is not flat), ``--size`` px,
``--threads`` threads on both sides (``torch.set_num_threads``; camserve's ``GraphSession``
``intra_op_threads`` and ``impute(threads=)``). Per image, on the same preprocessed image, the
same map and the same target class (the image's top-1):

* ROADCombined (9 percentiles x MoRF + LeRF): camserve ``score_maps(forward, ..., ["road"],
  base_logits=...)`` (the unperturbed logits come from one forward done beforehand, as a
  request's explanation has them) vs ``pytorch_grad_cam.metrics.road.ROADCombined()(t, cams,
  [ClassifierOutputSoftmaxTarget(c)], model)``.
* CamMult ``drop``: ``score_maps(..., ["drop"])`` (1 forward) vs ``DropInConfidence()``.

Where the time goes: camserve's imputation (the kept-pixel masks + ``camserve.faithfulness.road.impute``
for both orders) and its forwards (the 2 x 9 imputed images through the forward-only graph,
in the two calls ``score_maps`` makes) are timed separately on the same inputs;
pytorch-grad-cam's ``NoisyLinearImputer`` calls (split into its ``setup_sparse_system`` and
``spsolve``) and its model forwards are timed inside the same ROADCombined call by wrapping.

The maps are smooth synthetic blobs (``--cams blobs``: a few Gaussians in [0, 1], no ties) or
camserve's GradCAM of the image (``--cams gradcam``; ReLU'd maps tie at 0, where
pytorch-grad-cam keeps no pixel and scores NaN through a singular system). The two sides run
interleaved per image (order reversed every other image, so machine noise hits both); one
warm-up image first. Medians over images. The export is cached in ``--work``.

    python bench/bench_faithfulness.py [--images 4] [--size 224] [--threads 2] [--cams blobs] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench_cam.py

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extras import build_model  # noqa: E402  (the randomized-BN recipe)

NAME, LAYER, SPEED_GOAL = "resnet50", "layer4.-1", 5.0


def exported(size: int, work: Path, log) -> Path:
    from camserve.export import export_model

    out = work / f"{NAME}-{size}"
    if not (out / "manifest.json").exists():
        log(f"exporting {NAME} at {size} px into {out} (a minute or so) ...")
        export_model(build_model(NAME, size), [LAYER], out, input_size=size, model_name=NAME, check=False)
    return out


def blobs(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``[n, size, size]`` float32 in [0, 1]: 3 Gaussians each plus a faint texture (no ties)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((n, size, size))
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            s = rng.uniform(0.08, 0.25) * size
            out[i] += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        out[i] += 1e-3 * rng.random((size, size))
        out[i] = (out[i] - out[i].min()) / (out[i].max() - out[i].min())
    return out.astype(np.float32)


class Clock:
    """Seconds and calls accumulated per key by the wrappers below."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def reset(self) -> None:
        self.s, self.n = {}, {}

    def wrap(self, key: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t0
                self.n[key] = self.n.get(key, 0) + 1
        return timed


def instrument_pgc(model, clock: Clock):
    """A model wrapper timing every forward, and pytorch-grad-cam's imputer patched to time
    its calls and their two parts (system setup, sparse solve)."""
    import torch
    from pytorch_grad_cam.metrics import road

    class Timed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return clock.wrap("forward", self.inner)(x)

    cls = road.NoisyLinearImputer
    cls.__call__ = clock.wrap("impute", cls.__call__)
    cls.setup_sparse_system = staticmethod(clock.wrap("setup", cls.setup_sparse_system))
    road.spsolve = clock.wrap("solve", road.spsolve)
    return Timed(model).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="images timed (after one warm-up image)")
    ap.add_argument("--size", type=int, default=224, help="input px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cams", choices=["blobs", "gradcam"], default="blobs")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "camserve-bench-faithfulness",
                    help="export cache")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from camserve.faithfulness import road, score_maps
    from camserve.faithfulness.road import PERCENTILES, impute
    from camserve.pipeline.runtime import GraphSession

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    directory = exported(args.size, args.work, log)
    session = GraphSession(directory, intra_op_threads=args.threads, verify_hash=False, providers=["CPUExecutionProvider"])
    forward = session.forward_logits
    model = build_model(NAME, args.size)
    clock = Clock()
    timed_model = instrument_pgc(model, clock)

    n = args.images + 1  # image 0: warm-up
    x = np.random.default_rng(7).standard_normal((n, 3, args.size, args.size), dtype=np.float32)
    logits = np.concatenate([forward(x[i : i + 1]) for i in range(n)])
    with torch.no_grad():
        diff = float(np.abs(model(torch.from_numpy(x[:1])).numpy() - logits[:1]).max())
    log(f"max |logits(torch) - logits(ORT)| = {diff:.2e} (same weights)")
    if diff > 1e-2:
        raise SystemExit(f"bench_faithfulness: torch and ORT disagree ({diff:.2e}): stale export in {directory}?")
    classes = logits.argmax(1)
    if args.cams == "blobs":
        cams = blobs(n, args.size)
    else:
        from camserve.cam import explain

        cams = np.stack([explain(session, x[i : i + 1], [[int(classes[i])]], ["gradcam"]).cams["gradcam"][0][0] for i in range(n)])
    cams = np.ascontiguousarray(cams, dtype=np.float32)
    tx = torch.from_numpy(x)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    log(f"top-1 softmax per image: {', '.join(f'{p:.3f}' for p in prob.max(1))}")

    def ours(i: int, metric: str) -> dict:
        return score_maps(forward, x[i : i + 1], cams[i : i + 1], classes[i : i + 1], [metric],
                          base_logits=logits[i : i + 1], threads=args.threads)

    def theirs(i: int, metric) -> np.ndarray:
        return metric(tx[i : i + 1], cams[i : i + 1], [ClassifierOutputSoftmaxTarget(int(classes[i]))], timed_model)

    def masks_of(cam: np.ndarray, morf: bool) -> np.ndarray:
        """[P, H, W] kept pixels of one map per percentile, as ``score_maps`` computes them."""
        if hasattr(road, "removal_rank"):  # one sort per map serves every percentile
            rank = road.removal_rank(cam, morf)[0]
            return rank[None] < np.array([road.kept_count(rank.size, q) for q in PERCENTILES])[:, None, None]
        return np.stack([road.keep_masks(cam, q, morf)[0] for q in PERCENTILES])  # one sort per percentile

    def ours_split(i: int) -> tuple[float, float, float]:
        """(masks s, impute s, forwards s) of one image's ROAD, timed apart on the same inputs."""
        t0 = time.perf_counter()
        keeps = [masks_of(cams[i : i + 1], morf) for morf in (True, False)]
        t1 = time.perf_counter()
        source = np.repeat(x[i : i + 1], len(PERCENTILES), axis=0)
        imputed = [impute(source, k, threads=args.threads)[0] for k in keeps]
        t2 = time.perf_counter()
        for batch in imputed:  # as score_maps: one forward call per order (9 images, < FORWARD_CHUNK)
            forward(batch)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    rows: dict[str, list] = {k: [] for k in ("road_ours", "road_theirs", "drop_ours", "drop_theirs", "split", "pgc", "values")}
    for i in range(n):
        warm = i == 0
        log(f"image {i}{' (warm-up)' if warm else ''} ...")
        t: dict[str, float] = {}
        vals: dict[str, float] = {}
        for side in (("ours", "theirs") if i % 2 else ("theirs", "ours")):
            if side == "ours":
                t0 = time.perf_counter()
                vals["road_ours"] = float(ours(i, "road")["road"][0])
                t["road_ours"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                vals["drop_ours"] = float(ours(i, "drop")["drop"][0])
                t["drop_ours"] = time.perf_counter() - t0
            else:
                clock.reset()
                t0 = time.perf_counter()
                vals["road_theirs"] = float(theirs(i, ROADCombined())[0])
                t["road_theirs"] = time.perf_counter() - t0
                pgc = (dict(clock.s), dict(clock.n))
                t0 = time.perf_counter()
                vals["drop_theirs"] = float(theirs(i, DropInConfidence())[0])
                t["drop_theirs"] = time.perf_counter() - t0
        split = ours_split(i)
        log(f"  road {t['road_ours']:.2f} s vs {t['road_theirs']:.2f} s (pgc: {', '.join(f'{k} {v:.2f} s' for k, v in pgc[0].items())}); "
            f"road {vals['road_ours']:+.4f} vs {vals['road_theirs']:+.4f}, drop {vals['drop_ours']:.4f} vs {vals['drop_theirs']:.4f}")
        if warm:
            continue
        for k in ("road_ours", "road_theirs", "drop_ours", "drop_theirs"):
            rows[k].append(t[k])
        rows["split"].append(split)
        rows["pgc"].append(pgc)
        rows["values"].append(vals)

    med = lambda v: statistics.median(v) * 1e3  # noqa: E731  (ms)
    road_o, road_t = med(rows["road_ours"]), med(rows["road_theirs"])
    drop_o, drop_t = med(rows["drop_ours"]), med(rows["drop_theirs"])
    masks, imp, fwd = (med([s[j] for s in rows["split"]]) for j in range(3))
    pk = lambda key: med([p[0].get(key, 0.0) for p in rows["pgc"]])  # noqa: E731
    calls = lambda key: rows["pgc"][0][1].get(key, 0)  # noqa: E731
    p_imp, p_setup, p_solve, p_fwd = pk("impute"), pk("setup"), pk("solve"), pk("forward")
    p_other = med([v - p[0].get("impute", 0.0) - p[0].get("forward", 0.0) for v, p in zip(rows["road_theirs"], rows["pgc"])])
    speed = road_t / road_o
    goal = f">= {SPEED_GOAL:g}x: {'ok' if speed >= SPEED_GOAL else 'MISSED'}"
    p = len(PERCENTILES)

    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {NAME} {args.size} px, {args.threads} threads, "
          f"{args.cams} maps, median over {args.images} images (+1 warm-up), interleaved per image")
    print("\n### ROADCombined and CamMult drop, ms per image\n")
    print("| metric | implementation | ms/image | imputation ms | forwards ms | other ms | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(f"| road | camserve `score_maps` | {road_o:.0f} | {imp:.0f} (+ masks {masks:.0f}), 2x{p} sparse solves | "
          f"{fwd:.0f} (2 ORT calls x {p} images) | {road_o - masks - imp - fwd:.0f} | {speed:.2f}x ({goal}) |")
    print(f"| road | pytorch-grad-cam `ROADCombined` | {road_t:.0f} | {p_imp:.0f} ({calls('impute')} calls: setup "
          f"{p_setup:.0f} + spsolve {p_solve:.0f}) | {p_fwd:.0f} ({calls('forward')} torch calls x 1 image) | {p_other:.0f} | 1x |")
    print(f"| drop | camserve `score_maps` | {drop_o:.1f} | | 1 ORT call | | {drop_t / drop_o:.2f}x |")
    print(f"| drop | pytorch-grad-cam `DropInConfidence` | {drop_t:.1f} | | 2 torch calls | | 1x |")
    v = rows["values"]
    print(f"\n- camserve's split is timed apart on the same inputs (masks + impute for both orders; the 2 forward "
          f"calls), so its parts need not add up to the total; pytorch-grad-cam's is measured inside the timed call.")
    print(f"- road per image, camserve vs pytorch-grad-cam (different noise draws): "
          + ", ".join(f"{r['road_ours']:+.3f}/{r['road_theirs']:+.3f}" for r in v)
          + f"; drop: " + ", ".join(f"{r['drop_ours']:.3f}/{r['drop_theirs']:.3f}" for r in v))
    print("- per image, pytorch-grad-cam's ROAD s / camserve's (road; pgc forwards s): " + ", ".join(
        f"{b / a:.1f}x ({b:.1f}; {q[0].get('forward', 0.0):.1f})"
        for a, b, q in zip(rows["road_ours"], rows["road_theirs"], rows["pgc"])))
    print(f"- max |logits(torch) - logits(ORT)| = {diff:.1e}; load average {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs)")
    print("\nReproduce:\n\n    python bench/bench_faithfulness.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
