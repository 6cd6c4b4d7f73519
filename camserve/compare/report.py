"""The self-contained HTML report: figures, distribution plots and side-by-side overlays.

Everything is inline (plots and overlays as base64 PNG ``data:`` URIs, CSS in the page),
so the file can be mailed or attached to a review as is. matplotlib (Agg backend) is
imported only here, only when a report is written.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np

from camserve.compare.analysis import METRICS
from camserve.compare.data import Pair

LABELS = {"pearson": "Pearson r", "spearman": "Spearman rho", "iou": "IoU of top regions",
          "peak_px": "peak distance (px)", "peak_norm": "peak distance / diagonal"}
#: Overlays are scaled up (nearest) to at least this side so small inputs stay visible.
MIN_SIDE = 192

CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.fail{color:#b00;font-weight:bold}.pass{color:#070;font-weight:bold}.case{display:inline-block;margin:6px;
padding:6px;border:1px solid #ddd;vertical-align:top;font-size:12px}.case img{width:192px;height:auto;
image-rendering:pixelated}figure{display:inline-block;margin:4px}"""


def _b64png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _b64png(buf.getvalue())


def plots(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, data URI) of each distribution plot: one figure per method, one for latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    images = summary["images"]
    for m in summary["methods"]:
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 2.6))
        for ax, k in zip(axes, METRICS):
            v = np.array([np.nan if im["cam"][m][k] is None else im["cam"][m][k] for im in images], np.float64)
            agree = np.array([im["agree"] for im in images])
            for sel, label, colour in ((agree, "answers agree", "tab:blue"), (~agree, "answers differ", "tab:red")):
                vals = v[sel & np.isfinite(v)]
                if vals.size:
                    ax.hist(vals, bins=20, alpha=0.6, label=label, color=colour)
            ax.set_title(LABELS[k], fontsize=9)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7)
        fig.suptitle(f"CAM similarity, {m}", fontsize=10, y=1.04)
        out.append((f"CAM similarity ({m})", _fig_png(fig)))
    fig, ax = plt.subplots(figsize=(5, 2.6))
    lat = [[im[s]["latency_ms"] for im in images] for s in ("a", "b")]
    ax.boxplot(lat, whis=(1, 99))
    ax.set_xticks([1, 2], ["A", "B"])
    ax.set_ylabel("ms")
    ax.set_title("latency per input (whiskers p1-p99)", fontsize=9)
    out.append(("Latency", _fig_png(fig)))
    return out


def _overlay_uri(image: np.ndarray | None, cam: np.ndarray | None) -> str | None:
    import cv2

    from camserve.pipeline import render

    if cam is None:
        return None
    if image is None:  # no stored input: the coloured map alone
        image_rgb = render.colorize(cam[None])[0]
    else:
        image_rgb = render.overlay(image, cam)
    h, w = image_rgb.shape[:2]
    f = max(1, int(np.ceil(MIN_SIDE / max(1, min(h, w)))))
    if f > 1:
        image_rgb = cv2.resize(image_rgb, (w * f, h * f), interpolation=cv2.INTER_NEAREST)
    return _b64png(render.encode_png(image_rgb))


def _top(preds: list[dict]) -> str:
    return ", ".join(f"{html.escape(str(p['label']))} {float(p['score']):.3f}" for p in preds[:3])


def _case(pair: Pair, info: dict[str, Any], methods: list[str]) -> str:
    rows = [f"<b>{html.escape(pair.key)}</b><br>A: {_top(pair.a.predictions)}<br>B: {_top(pair.b.predictions)}<br>"]
    for m in methods:
        c = info["cam"][m]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"{html.escape(m)}: IoU {fmt(c['iou'])}, r {fmt(c['pearson'])}, rho {fmt(c['spearman'])}, "
                    f"peak {fmt(c['peak_px'])} px<br>")
        for side, ans in (("A", pair.a), ("B", pair.b)):
            uri = _overlay_uri(pair.image, ans.cams.get(m))
            if uri:
                rows.append(f'<figure><img alt="{side} {html.escape(m)}" src="{uri}"><figcaption>{side}</figcaption></figure>')
    return '<div class="case">' + "".join(rows) + "</div>"


def _dist_table(summary: dict[str, Any]) -> str:
    cols = ("n", "mean", "min", "p05", "p25", "median", "p75", "p95", "max")
    out = ["<table><tr><th class=l>method</th><th class=l>measure</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for m in summary["methods"]:
        for k in (*METRICS, "iou_when_agree"):
            d = summary["similarity"][m][k]
            cells = "".join(f"<td>{'' if d.get(c) is None else d[c]}</td>" for c in cols)
            out.append(f"<tr><td class=l>{html.escape(m)}</td><td class=l>{LABELS.get(k, 'IoU (answers agree)')}</td>{cells}</tr>")
    return "".join(out) + "</table>"


def render_html(summary: dict[str, Any], pairs: list[Pair], top_n: int = 12) -> str:
    """The whole report page for a finished (complete) comparison."""
    by_key = {p.key: p for p in pairs}
    info = {im["key"]: im for im in summary["images"]}
    methods = summary["methods"]
    ag = summary["agreement"]
    lat = summary["latency_ms"]
    verdict = ('<p class="pass">all gates passed</p>' if summary.get("passed", True)
               else f'<p class="fail">gates failed: {html.escape(", ".join(summary["failed_gates"]))}</p>')
    gates = "".join(f"<tr><td class=l>{html.escape(g['name'] + (' ' + g['method'] if 'method' in g else ''))}</td>"
                    f"<td>{g['value']}</td><td>{g['threshold']}</td><td class=l>{'pass' if g['passed'] else 'FAIL'}</td></tr>"
                    for g in summary.get("gates", []))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>camserve compare</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>camserve compare: A vs B</h1><p>A: <code>{html.escape(json.dumps(summary['a']))}</code><br>"
        f"B: <code>{html.escape(json.dumps(summary['b']))}</code></p>",
        verdict,
        f"<table><tr><th class=l>gate</th><th>value</th><th>threshold</th><th class=l>result</th></tr>{gates}</table>" if gates else "",
        f"<h2>Answers</h2><p>{summary['n_images']} inputs; top-1 agreement <b>{ag['top1']:.3f}</b> "
        f"({ag['agree']}/{ag['n']}, 95% Wilson interval {ag['ci95'][0]:.3f}-{ag['ci95'][1]:.3f}).</p>",
        "<h2>Latency (ms)</h2><table><tr><th class=l>side</th><th>p50</th><th>p95</th><th>p99</th><th>mean</th></tr>"
        + "".join(f"<tr><td class=l>{s.upper()}</td><td>{lat[s]['p50']}</td><td>{lat[s]['p95']}</td><td>{lat[s]['p99']}</td>"
                  f"<td>{lat[s]['mean']}</td></tr>" for s in ("a", "b")) + "</table>",
        f"<h2>Explanation similarity</h2><p>Region = top {summary['top_share']:.0%} of each map.</p>", _dist_table(summary),
    ]
    parts += [f'<figure><img alt="{html.escape(t)}" src="{uri}"><figcaption>{html.escape(t)}</figcaption></figure>'
              for t, uri in plots(summary)]
    for title, keys, empty in (
        (f"Answers agree, explanations diverge most (by {summary['ranking_method']} IoU)", summary["divergent"], "no input where the answers agree"),
        ("Answers differ (most confident first)", summary["disagreements"], "no input where the answers differ"),
    ):
        shown = keys[:top_n]
        parts.append(f"<h2>{html.escape(title)}</h2><p>{len(keys)} inputs{', first ' + str(len(shown)) + ' shown' if len(keys) > len(shown) else ''}.</p>")
        parts.append("".join(_case(by_key[k], info[k], methods) for k in shown) or f"<p>{empty}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
