"""``camserve compare``: A/B comparison of two model versions' answers and explanations.

Writes ``OUT/report.html`` (self-contained) and ``OUT/summary.json`` (every figure), and
one line on stdout. Exit 0 when every gate passes, 1 when a gate (``--min-agreement``,
``--min-cam-iou``, ``--min-road``) fails, 2 on an error (one line on stderr). A run that
fails leaves no report: stale ``report.html``/``summary.json`` in ``OUT`` are removed
before any input is read, and the new ones are written (to temporary names, then renamed)
only once every input is compared. On a terminal, a progress bar on stderr counts inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from camserve.errors import InputError
from camserve.compare.analysis import analyse, apply_gates, name_sides
from camserve.compare.similarity import TOP_SHARE
from camserve.compare.text import fmt

OUTPUTS = ("report.html", "summary.json")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _share(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _rate(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def _margin(text: str) -> float:
    v = float(text)
    if not 0.0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return v


def summary_line(summary: dict[str, Any], report: Path) -> str:
    """The one stdout line: sides by name, agreement, mean IoU per method, mean ROAD per side."""
    ag, names = summary["agreement"], summary["names"]
    ious = ", ".join(f"{m} {fmt(summary['similarity'][m]['iou'].get('mean'))}" for m in summary["methods"])
    line = (f"{summary['n_images']} inputs, A {names['a']} vs B {names['b']}: top-1 agreement {fmt(ag['top1'])} "
            f"(95% CI {fmt(ag['ci95'][0])}-{fmt(ag['ci95'][1])}), mean IoU {ious}")
    roads = [(m, f["road"]) for m, f in summary.get("faithfulness", {}).items() if "road" in f]
    if roads:
        line += "; mean ROAD " + ", ".join(f"{m} A {fmt(r['a'])} B {fmt(r['b'])}" for m, r in roads)
    return f"{line} -> {report}"


def run(args: argparse.Namespace) -> int:
    from camserve.compare.faithfulness import metrics_of
    from camserve.compare.report import render_html
    from camserve.compare.runner import collect, mode_of

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    for name in OUTPUTS:  # a failed run must not leave an older report looking current
        (out / name).unlink(missing_ok=True)
    mode = mode_of(args)
    metrics = metrics_of(args.metrics, args.min_road, mode)
    pairs, model_a, model_b = collect(args, mode, metrics)
    summary = {"mode": mode, **name_sides({}, model_a, model_b),
               **analyse(pairs, args_methods(args), share=args.top_share, metrics=metrics)}
    apply_gates(summary, args.min_agreement, args.min_cam_iou, args.min_road)
    page = render_html(summary, pairs, args.show)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    _atomic_write(out / "report.html", page)
    print(summary_line(summary, out / "report.html"))
    if not summary["passed"]:
        print(f"camserve compare: gate failed: {', '.join(summary['failed_gates'])}", file=sys.stderr)
        return 1
    return 0


def args_methods(args: argparse.Namespace) -> list[str]:
    from camserve.compare.runner import methods_of

    return methods_of(args.methods)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare", help="A/B-compare two model versions: answers, explanations, latency",
        description="Compare two model versions over the same inputs. Sides are served models "
                    "(--a/--b URLs: http://HOST:PORT/predictions/NAME/VERSION or http://HOST:PORT/NAME/VERSION, "
                    "with --images), export folders (--export-a/--export-b with --images, no server), or "
                    "NAME/VERSION in an audit log (--audit, inputs matched by SHA-256). "
                    "Faithfulness (--metrics) is asked of served sides and computed for export sides; "
                    "an audit log has none. A progress bar (done/total, rate, time left) is drawn on "
                    "stderr when it is a terminal. Exit 1 when a gate fails, 2 on an error.")
    p.add_argument("--a", help="side A: model URL, or NAME/VERSION with --audit")
    p.add_argument("--b", help="side B: model URL, or NAME/VERSION with --audit")
    p.add_argument("--images", help="folder of input images (PNG, JPEG, WebP, BMP)")
    p.add_argument("--audit", help="audit log: SQLite file, audit folder, or PostgreSQL DSN")
    p.add_argument("--export-a", help="side A: export folder (offline, no server)")
    p.add_argument("--export-b", help="side B: export folder (offline, no server)")
    p.add_argument("--methods", default="gradcam", help="comma-separated CAM methods (default gradcam)")
    p.add_argument("--out", default="compare_report", help="report folder (report.html, summary.json)")
    p.add_argument("--min-agreement", type=_rate, help="gate: minimum top-1 agreement rate (exit 1 below it)")
    p.add_argument("--min-cam-iou", type=_rate, help="gate: minimum mean top-region IoU per method (exit 1 below it)")
    p.add_argument("--metrics", metavar="LIST",
                   help="faithfulness metrics of each side's top-1 maps, comma-separated: road (also gives road_morf, "
                        "road_lerf), road_morf, road_lerf, confidence_change, drop, increase; reported per method "
                        "as both sides' means and B-A (default none: road costs 18 forwards and 18 sparse solves "
                        "per image and method)")
    p.add_argument("--min-road", type=_margin, metavar="MARGIN",
                   help="gate (implies road in --metrics): exit 1 when, for any method, mean ROAD of B < mean ROAD "
                        "of A - MARGIN, i.e. B's explanations are less faithful by more than MARGIN (0: any drop fails)")
    p.add_argument("--top-share", type=_share, default=TOP_SHARE, help="share of each map's pixels in its top region (default 0.2)")
    p.add_argument("--topk", type=int, default=5, help="predictions kept per side (default 5)")
    p.add_argument("--show", type=int, default=12, help="cases shown with overlays per ranked list (default 12)")
    p.add_argument("--token", help="inference token (else read from --key-file or --run-dir)")
    p.add_argument("--key-file", help="TorchServe key_file.json")
    p.add_argument("--run-dir", default="serve_run", help="camserve serve's run folder, for its key file (default serve_run)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.set_defaults(func=run)
