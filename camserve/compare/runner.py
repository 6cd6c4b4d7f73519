"""Collect both sides' answers for every input, in one of three modes.

* ``http``: both sides are served model versions; each image is sent to A then B (so the
  two see the same load), one request at a time.
* ``export``: both sides are export directories run in this process (no server).
* ``audit``: both sides are ``NAME/VERSION`` in an audit log; inputs both answered are
  matched by SHA-256 of the bytes sent.
"""

from __future__ import annotations

from typing import Any

from camserve.errors import InputError
from camserve.compare.data import Pair, read_images
from camserve.compare.sources import ExportSide, HTTPSide, audit_answers, open_audit


def collect_http(url_a: str, url_b: str, images_dir: str, methods: list[str], token_a: str | None,
                 token_b: str | None, timeout: float, topk: int = 5) -> tuple[list[Pair], dict, dict]:
    inputs = read_images(images_dir)  # every image is read and decoded before the first request
    a = HTTPSide(url_a, token_a, methods, timeout, topk)
    b = HTTPSide(url_b, token_b, methods, timeout, topk)
    pairs = [Pair(key=path.name, a=a.answer(path.name, data), b=b.answer(path.name, data), image=rgb)
             for path, data, rgb in inputs]
    return pairs, a.model, b.model


def collect_export(dir_a: str, dir_b: str, images_dir: str, methods: list[str], topk: int = 5) -> tuple[list[Pair], dict, dict]:
    inputs = read_images(images_dir)
    a, b = ExportSide(dir_a, methods, topk=topk), ExportSide(dir_b, methods, topk=topk)
    pairs = [Pair(key=path.name, a=a.answer(rgb), b=b.answer(rgb), image=rgb) for path, _data, rgb in inputs]
    return pairs, a.model, b.model


def collect_audit(path: str, ref_a: str, ref_b: str, methods: list[str], topk: int = 5) -> tuple[list[Pair], dict, dict]:
    from camserve.pipeline import imageio
    from camserve.compare.data import CompareError

    sink = open_audit(path)
    try:
        ans_a, in_a, model_a = audit_answers(sink, ref_a, methods, topk)
        ans_b, in_b, model_b = audit_answers(sink, ref_b, methods, topk)
    finally:
        sink.close()
    common = sorted(set(ans_a) & set(ans_b))
    if not common:
        raise CompareError(f"no input was answered (and explained with {', '.join(methods)}) by both {ref_a} and {ref_b} "
                           f"in {path}: {len(ans_a)} and {len(ans_b)} inputs")
    pairs = []
    for sha in common:
        data = in_a.get(sha) or in_b.get(sha)
        try:
            rgb = imageio.decode(data, 10**9) if data else None
        except InputError:
            rgb = None
        pairs.append(Pair(key=sha[:16], a=ans_a[sha], b=ans_b[sha], image=rgb))
    return pairs, model_a, model_b


def methods_of(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise InputError(f"--methods needs at least one CAM method, got {text!r}")
    if len(set(methods)) != len(methods):
        raise InputError(f"--methods names a method twice: {text!r}")
    return methods


def collect(args: Any) -> tuple[str, list[Pair], dict, dict]:
    """(mode, pairs, model A, model B) for the parsed command line; InputError when the mode is ambiguous."""
    methods = methods_of(args.methods)
    if args.export_a or args.export_b:
        if not (args.export_a and args.export_b and args.images):
            raise InputError("export mode needs --export-a DIR, --export-b DIR and --images DIR")
        if args.a or args.b or args.audit:
            raise InputError("--export-a/--export-b compare two export folders: leave out --a, --b and --audit")
        return ("export", *collect_export(args.export_a, args.export_b, args.images, methods, args.topk))
    if not (args.a and args.b):
        raise InputError("name both sides: --a and --b (URLs, or NAME/VERSION with --audit), or --export-a and --export-b")
    if args.audit:
        if args.images:
            raise InputError("--audit compares the inputs both versions answered: leave out --images")
        return ("audit", *collect_audit(args.audit, args.a, args.b, methods, args.topk))
    if not args.images:
        raise InputError("comparing two served models needs --images DIR")
    from camserve.serving.client import token_from

    token = token_from(args)
    return ("http", *collect_http(args.a, args.b, args.images, methods, token, token, args.timeout, args.topk))
