"""``camserve audit list|show|export|verify``: read the audit log of a server.

The log is found like the server finds it: ``--config`` (or ``$CAMSERVE_CONFIG``) and the
environment give ``audit.sink``/``path``/``dsn``; ``--sink``, ``--path`` and ``--dsn``
override them; a relative path is taken inside ``--run-dir`` (default ``serve_run``).
Filters (all commands but verify): ``--since``/``--until`` (ISO times, UTC unless given),
``--model``, ``--version``, ``--class`` (a top prediction or explained target),
``--request-id``, ``--input-sha256``, ``--outcome``, ``--limit``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from camserve.errors import InputError
from camserve.audit.records import Filter, Stored, parse_time
from camserve.audit.sink import Sink, open_sink
from camserve.audit.verify import verify


def _sink(args: argparse.Namespace) -> Sink:
    from camserve.config import load_config

    config = load_config(args.config, overrides={"audit": {"sink": args.sink, "path": args.path, "dsn": args.dsn}})
    return open_sink(config.audit, base=args.run_dir)


def _filter(args: argparse.Namespace) -> Filter:
    return Filter(
        start=parse_time(args.since) if args.since else None,
        end=parse_time(args.until) if args.until else None,
        model=args.model, version=args.version, cls=args.cls, request_id=args.request_id,
        input_sha256=args.input_sha256, outcome=args.outcome, limit=args.limit,
    )


def _top(record: dict[str, Any]) -> str:
    tops = [f"{p[0]['label']}({p[0]['index']}) {p[0]['score']:.3f}" for img in record.get("images") or [] if (p := img.get("predictions"))]
    return "; ".join(tops)


def _list(args: argparse.Namespace) -> int:
    sink = _sink(args)
    n = 0
    print(f"{'seq':>7}  {'time (UTC)':<27} {'request id':<36}  {'model':<12} {'version':<8} {'outcome':<16} top prediction")
    for row in sink.rows(_filter(args)):
        c, rec = row.cols, row.record()
        print(f"{row.seq:>7}  {c['time']:<27} {c['request_id']:<36}  {c['model']:<12} {c['version']:<8} {c['outcome']:<16} {_top(rec)}")
        n += 1
    print(f"{n} record(s) in {sink.describe()}", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    import dataclasses

    sink = _sink(args)
    flt = _filter(args)
    if args.target_request_id:
        flt = dataclasses.replace(flt, request_id=args.target_request_id)
    rows = [r for r in sink.rows(flt) if args.seq is None or r.seq == args.seq]
    if not rows:
        raise InputError(f"no audit record matches (request id {args.target_request_id!r}, seq {args.seq}) in {sink.describe()}")
    out_dir = Path(args.out_dir)
    for row in rows:
        rec = row.record()
        print(json.dumps({**rec, "hash": row.hash}, indent=2))
        for path in write_overlays(sink, rec, out_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def write_overlays(sink: Sink, rec: dict[str, Any], out_dir: Path) -> list[Path]:
    """Each stored heatmap as an overlay on its stored input (or alone, when the input is not stored)."""
    import numpy as np

    from camserve.pipeline import imageio
    from camserve.pipeline import render

    written = []
    for i, img in enumerate(rec.get("images") or []):
        shas = rec.get("input_sha256") or []
        data = sink.blob(shas[i]) if rec.get("inputs_stored") and i < len(shas) else None
        rgb = imageio.decode(data, 10**9) if data else None
        for e in img.get("explanations") or []:
            png = sink.blob(e["heatmap_sha256"]) if e.get("heatmap_sha256") else None
            if png is None:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = f"{rec.get('request_id') or rec.get('seq')}.{i}.{e['method']}.{target_name(e['target'])}"
            if rgb is not None:
                cam = render.decode_image(png, grayscale=True).astype(np.float32) / 255.0
                path = out_dir / f"{stem}.overlay.png"
                path.write_bytes(render.overlay_bytes(rgb, cam, "png"))
            else:
                path = out_dir / f"{stem}.heatmap.png"
                path.write_bytes(png)
            written.append(path)
    return written


def target_name(target: dict[str, Any]) -> str:
    """An explanation's target in file names and CSV cells: the class index, or ``detections``
    for a detector's map over all its kept detections."""
    return str(target["index"]) if "index" in target else "detections"


CSV_FIELDS = ("seq", "time", "request_id", "model", "version", "graph_sha256", "outcome", "status",
              "input_sha256", "image_sizes", "top_class", "top_score", "targets", "hash")


def csv_row(row: Stored) -> dict[str, Any]:
    rec = row.record()
    images = rec.get("images") or []
    top = [img["predictions"][0] for img in images if img.get("predictions")]
    return {
        "seq": row.seq, "time": rec.get("time"), "request_id": rec.get("request_id"),
        "model": (rec.get("model") or {}).get("name"), "version": (rec.get("model") or {}).get("version"),
        "graph_sha256": (rec.get("model") or {}).get("graph_sha256"), "outcome": rec.get("outcome"),
        "status": rec.get("status"), "input_sha256": " ".join(rec.get("input_sha256") or []),
        "image_sizes": " ".join(f"{w}x{h}" for w, h in rec.get("image_sizes") or []),
        "top_class": " ".join(str(p["index"]) for p in top), "top_score": " ".join(str(p["score"]) for p in top),
        "targets": " ".join(f"{e['method']}:{target_name(e['target'])}" for img in images for e in img.get("explanations") or []),
        "hash": row.hash,
    }


def _export(args: argparse.Namespace) -> int:
    sink = _sink(args)
    out = open(args.out, "w", newline="", encoding="utf-8") if args.out and args.out != "-" else sys.stdout
    n = 0
    try:
        if args.format == "csv":
            writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in sink.rows(_filter(args)):
                writer.writerow(csv_row(row))
                n += 1
        else:
            for row in sink.rows(_filter(args)):
                out.write(row.body[:-1] + f',"hash":"{row.hash}"}}\n')
                n += 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {n} record(s) from {sink.describe()}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    sink = _sink(args)
    report = verify(sink)
    for w in report.warnings:
        print(f"warning: {w}")
    for p in report.problems:
        print(f"FAILED: {p}")
    state = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
    print(f"{sink.describe()}: {report.records} record(s), head seq {report.head_seq} hash {report.head_hash}: {state}")
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("audit", help="read and verify the audit log (list, show, export, verify)")
    sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("where the log is")
    g.add_argument("--config", help="camserve YAML/JSON configuration file (its audit section)")
    g.add_argument("--run-dir", default="serve_run", help="server run folder; a relative audit path is inside it (default serve_run)")
    g.add_argument("--sink", choices=("sqlite", "jsonl", "postgres"), help="audit backend (default from config: sqlite)")
    g.add_argument("--path", help="audit folder (SQLite file, JSON Lines files, blobs)")
    g.add_argument("--dsn", help="PostgreSQL connection string")
    filters = argparse.ArgumentParser(add_help=False)
    f = filters.add_argument_group("filters")
    f.add_argument("--since", help="records at or after this ISO time (UTC unless given)")
    f.add_argument("--until", help="records before this ISO time")
    f.add_argument("--model")
    f.add_argument("--version")
    f.add_argument("--class", dest="cls", type=int, help="a top prediction or explained target class index")
    f.add_argument("--request-id")
    f.add_argument("--input-sha256")
    f.add_argument("--outcome", help="answered, or an error kind (not_an_image, audit_unavailable, ...)")
    f.add_argument("--limit", type=int)
    q = sub.add_parser("list", parents=[common, filters], help="one line per record")
    q.set_defaults(func=_list)
    q = sub.add_parser("show", parents=[common, filters], help="print records and write their stored overlays")
    q.add_argument("target_request_id", nargs="?", metavar="REQUEST_ID")
    q.add_argument("--seq", type=int, help="the record with this sequence number")
    q.add_argument("--out-dir", default=".", help="where overlays / heatmaps are written (default .)")
    q.set_defaults(func=_show)
    q = sub.add_parser("export", parents=[common, filters], help="write records as CSV or JSON Lines")
    q.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    q.add_argument("--out", help="output file (default stdout)")
    q.set_defaults(func=_export)
    q = sub.add_parser("verify", parents=[common], help="check the hash chain; exit 1 naming each bad record")
    q.set_defaults(func=_verify)
