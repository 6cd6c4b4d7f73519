"""The self-contained HTML report: figures, distribution plots, mean maps, overlays.

Everything is inline (plots, mean maps and overlays as base64 PNG ``data:`` URIs, CSS in
the page), so the file can be mailed or attached to a review as is. Figures are rounded
to 3 significant digits (:func:`.text.fmt`; ``summary.json`` keeps 6 decimals), sides are
named ``NAME/VERSION (graph 1a2b3c4d)``. matplotlib (Agg backend) is imported only here,
only when a report is written.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from camserve.compare.aggregate import mean_maps
from camserve.compare.analysis import METRICS
from camserve.compare.data import Pair
from camserve.compare.text import fmt, side_where

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
    """The map blended on its image (or coloured alone without one), scaled up to ``MIN_SIDE``."""
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
    return ", ".join(f"{html.escape(str(p['label']))} {fmt(p['score'])}" for p in preds[:3])


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _case(pair: Pair, info: dict[str, Any], methods: list[str]) -> str:
    """One input of a gallery: both top-3, each method's figures and A / B overlays."""
    rows = [f"<b>{_esc(pair.key)}</b><br>A: {_top(pair.a.predictions)}<br>B: {_top(pair.b.predictions)}<br>"]
    for m in methods:
        c = info["cam"][m]
        rows.append(f"{_esc(m)}: IoU {fmt(c['iou'])}, r {fmt(c['pearson'])}, rho {fmt(c['spearman'])}, "
                    f"peak {fmt(c['peak_px'])} px<br>")
        faith = (info.get("faithfulness") or {}).get(m)
        if faith and "road" in faith["a"]:
            rows.append(f"ROAD A {fmt(faith['a']['road'])}, B {fmt(faith['b'].get('road'))}<br>")
        for side, ans in (("A", pair.a), ("B", pair.b)):
            uri = _overlay_uri(pair.image, ans.cams.get(m))
            if uri:
                rows.append(f'<figure><img alt="{side} {_esc(m)}" src="{uri}"><figcaption>{side}</figcaption></figure>')
    return '<div class="case">' + "".join(rows) + "</div>"


def _dist_table(summary: dict[str, Any]) -> str:
    cols = ("n", "mean", "min", "p05", "p25", "median", "p75", "p95", "max")
    out = ["<table><tr><th class=l>method</th><th class=l>measure</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for m in summary["methods"]:
        for k in (*METRICS, "iou_when_agree"):
            d = summary["similarity"][m][k]
            cells = "".join(f"<td>{'' if d.get(c) is None else (d[c] if c == 'n' else fmt(d[c]))}</td>" for c in cols)
            out.append(f"<tr><td class=l>{_esc(m)}</td><td class=l>{LABELS.get(k, 'IoU (answers agree)')}</td>{cells}</tr>")
    return "".join(out) + "</table>"


def _sides(summary: dict[str, Any]) -> str:
    """The header: both sides by name, and where their answers came from."""
    names = summary["names"]
    rows = "".join(f"<tr><td class=l>{s.upper()}</td><td class=l><b>{_esc(names[s])}</b></td>"
                   f"<td class=l><code>{_esc(side_where(summary[s]) or summary['mode'])}</code></td></tr>" for s in ("a", "b"))
    return (f"<h1>camserve compare: {_esc(names['a'])} vs {_esc(names['b'])}</h1>"
            f"<table><tr><th class=l>side</th><th class=l>model</th><th class=l>source ({_esc(summary['mode'])})</th></tr>"
            f"{rows}</table>")


def _gates(summary: dict[str, Any]) -> str:
    verdict = ('<p class="pass">all gates passed</p>' if summary.get("passed", True)
               else f'<p class="fail">gates failed: {_esc(", ".join(summary["failed_gates"]))}</p>')
    rows = "".join(f"<tr><td class=l>{_esc(g['name'] + (' ' + g['method'] if 'method' in g else ''))}</td>"
                   f"<td>{fmt(g['value'], sign=g['name'] == 'min_road')}</td><td>{fmt(g['threshold'], sign=g['name'] == 'min_road')}</td>"
                   f"<td class=l>{'pass' if g['passed'] else 'FAIL'}</td></tr>" for g in summary.get("gates", []))
    note = ("<p>min_road: value = mean ROAD of B - mean ROAD of A, threshold = -margin.</p>"
            if any(g["name"] == "min_road" for g in summary.get("gates", [])) else "")
    table = f"<table><tr><th class=l>gate</th><th>value</th><th>threshold</th><th class=l>result</th></tr>{rows}</table>"
    return verdict + (table + note if rows else "")


def _latency(summary: dict[str, Any]) -> str:
    lat, names = summary["latency_ms"], summary["names"]
    return ("<h2>Latency (ms)</h2><table><tr><th class=l>side</th><th>p50</th><th>p95</th><th>p99</th><th>mean</th></tr>"
            + "".join(f"<tr><td class=l>{s.upper()} {_esc(names[s])}</td>" + "".join(f"<td>{fmt(lat[s][q])}</td>" for q in
                      ("p50", "p95", "p99", "mean")) + "</tr>" for s in ("a", "b")) + "</table>")


def _aggregate(summary: dict[str, Any], pairs: list[Pair]) -> str:
    """Per method, the mean map of A beside the mean map of B, on one colour scale."""
    parts = ["<h2>Mean explanation over the image set</h2>"]
    names = summary["names"]
    for m in summary["methods"]:
        means = mean_maps(pairs, m)
        if means is None:
            parts.append(f"<p>{_esc(m)}: no input has maps on both sides (no stored heatmaps).</p>")
            continue
        a, b, n = means
        top = max(float(a.max()), float(b.max()))
        scale = top if top > 0 else 1.0
        agg = summary["aggregate"].get(m, {})
        parts.append(f"<h3>{_esc(m)}</h3><p>Mean over {n} inputs with maps on both sides; one colour scale for A and B "
                     f"(blue 0 to red {fmt(top)}). Mean maps: IoU {fmt(agg.get('iou'))}, r {fmt(agg.get('pearson'))}, "
                     f"peak distance {fmt(agg.get('peak_px'))} px.</p>")
        for side, mean in (("A", a), ("B", b)):
            uri = _overlay_uri(None, np.clip(mean / scale, 0.0, 1.0).astype(np.float32))
            label = f"{side} {names[side.lower()]}: mean {m}"
            parts.append(f'<figure><img alt="{_esc(label)}" src="{uri}"><figcaption>{_esc(label)}</figcaption></figure>')
    return "".join(parts)


def _faithfulness(summary: dict[str, Any]) -> str:
    """Per method and metric: both sides' means, B - A and the inputs counted."""
    head = "<h2>Faithfulness</h2>"
    if summary["mode"] == "audit":
        return head + "<p>Not available: an audit log holds no model to re-run (compare served or exported sides).</p>"
    if not summary.get("metrics"):
        return head + "<p>Not measured (ask with --metrics road,drop,...).</p>"
    names = summary["names"]
    rows = "".join(f"<tr><td class=l>{_esc(m)}</td><td class=l>{_esc(k)}</td><td>{fmt(v['a'])}</td><td>{fmt(v['b'])}</td>"
                   f"<td>{fmt(v['delta'], sign=True)}</td><td>{v['n']}</td></tr>"
                   for m, per in summary["faithfulness"].items() for k, v in per.items())
    return (head + "<p>Means over the inputs where both sides' value is defined (higher ROAD = more faithful).</p>"
            f"<table><tr><th class=l>method</th><th class=l>metric</th><th>A {_esc(names['a'])}</th>"
            f"<th>B {_esc(names['b'])}</th><th>B - A</th><th>n</th></tr>{rows}</table>")


def _galleries(summary: dict[str, Any], pairs: list[Pair], top_n: int) -> list[str]:
    """The two ranked galleries, each replaced by one line when nothing diverges."""
    by_key = {p.key: p for p in pairs}
    info = {im["key"]: im for im in summary["images"]}
    div = summary["divergence"]
    if div["unknown"]:
        same = (f"no divergence: the explanations of the {div['identical']} inputs compared where the answers agree are "
                f"the same; {div['unknown']} more could not be compared (no maps or peaks)")
    elif div["identical"]:
        same = f"no divergence: the explanations of all {div['identical']} inputs where the answers agree are the same"
    else:
        same = "no input where the answers agree"
    out = []
    for title, keys, empty in (
        (f"Answers agree, explanations diverge most (by {summary['ranking_method']} IoU)", summary["divergent"], same),
        ("Answers differ (most confident first)", summary["disagreements"],
         f"no divergence: both sides give the same top-1 class on all {summary['n_images']} inputs"),
    ):
        shown = keys[:top_n]
        out.append(f"<h2>{_esc(title)}</h2>")
        if not keys:
            out.append(f"<p>{_esc(empty)}.</p>")
            continue
        more = f", first {len(shown)} shown" if len(keys) > len(shown) else ""
        out.append(f"<p>{len(keys)} inputs{more}.</p>")
        out.append("".join(_case(by_key[k], info[k], summary["methods"]) for k in shown))
    return out


def render_html(summary: dict[str, Any], pairs: list[Pair], top_n: int = 12) -> str:
    """The whole report page for a finished (complete) comparison."""
    ag = summary["agreement"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>camserve compare</title>",
        f"<style>{CSS}</style></head><body>",
        _sides(summary),
        _gates(summary),
        f"<h2>Answers</h2><p>{summary['n_images']} inputs; top-1 agreement <b>{fmt(ag['top1'])}</b> "
        f"({ag['agree']}/{ag['n']}, 95% Wilson interval {fmt(ag['ci95'][0])}-{fmt(ag['ci95'][1])}).</p>",
        _latency(summary),
        f"<h2>Explanation similarity</h2><p>Region = top {summary['top_share']:.0%} of each map.</p>", _dist_table(summary),
    ]
    parts += [f'<figure><img alt="{_esc(t)}" src="{uri}"><figcaption>{_esc(t)}</figcaption></figure>'
              for t, uri in plots(summary)]
    parts += [_aggregate(summary, pairs), _faithfulness(summary), *_galleries(summary, pairs, top_n), "</body></html>"]
    return "\n".join(parts)
