"""Collect both sides' answers for every input, in one of three modes.

* ``http``: both sides are served model versions; each image is sent to A then B (so the
  two see the same load), one request at a time.
* ``export``: both sides are export directories run in this process (no server).
* ``audit``: both sides are ``NAME/VERSION`` in an audit log; inputs both answered are
  matched by SHA-256 of the bytes sent.

``metrics`` (faithfulness names, :mod:`.faithfulness`) are asked of served sides and
computed for export sides. On a terminal, a progress bar on stderr counts the inputs
(:mod:`.progress`).
"""

from __future__ import annotations

from typing import Any, Callable

from camserve.errors import InputError
from camserve.compare.data import Answer, Pair, read_images
from camserve.compare.progress import bar
from camserve.compare.sources import ExportSide, HTTPSide, audit_answers, open_audit


def _pairs(inputs: list, answer_a: Callable[[str, bytes, Any], Answer], answer_b: Callable[[str, bytes, Any], Answer],
           desc: str) -> list[Pair]:
    """A then B for each ``(path, bytes, rgb)`` input, in order, counted by the progress bar."""
    pairs = []
    with bar(len(inputs), desc) as progress:
        for path, data, rgb in inputs:
            pairs.append(Pair(key=path.name, a=answer_a(path.name, data, rgb), b=answer_b(path.name, data, rgb), image=rgb))
            progress.update()
    return pairs


def collect_http(url_a: str, url_b: str, images_dir: str, methods: list[str], token_a: str | None,
                 token_b: str | None, timeout: float, topk: int = 5,
                 metrics: tuple[str, ...] = ()) -> tuple[list[Pair], dict, dict]:
    inputs = read_images(images_dir)  # every image is read and decoded before the first request
    a = HTTPSide(url_a, token_a, methods, timeout, topk, metrics)
    b = HTTPSide(url_b, token_b, methods, timeout, topk, metrics)
    pairs = _pairs(inputs, lambda name, data, _rgb: a.answer(name, data), lambda name, data, _rgb: b.answer(name, data),
                   "comparing")
    return pairs, a.model, b.model


def collect_export(dir_a: str, dir_b: str, images_dir: str, methods: list[str], topk: int = 5,
                   metrics: tuple[str, ...] = ()) -> tuple[list[Pair], dict, dict]:
    inputs = read_images(images_dir)
    a = ExportSide(dir_a, methods, topk=topk, metrics=metrics)
    b = ExportSide(dir_b, methods, topk=topk, metrics=metrics)
    desc = "comparing" + (f" (+{', '.join(metrics)})" if metrics else "")
    pairs = _pairs(inputs, lambda _name, _data, rgb: a.answer(rgb), lambda _name, _data, rgb: b.answer(rgb), desc)
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


def mode_of(args: Any) -> str:
    """``export``, ``audit`` or ``http`` from the sides named; InputError when they do not fit one mode."""
    if args.export_a or args.export_b:
        if not (args.export_a and args.export_b and args.images):
            raise InputError("export mode needs --export-a DIR, --export-b DIR and --images DIR")
        if args.a or args.b or args.audit:
            raise InputError("--export-a/--export-b compare two export folders: leave out --a, --b and --audit")
        return "export"
    if not (args.a and args.b):
        raise InputError("name both sides: --a and --b (URLs, or NAME/VERSION with --audit), or --export-a and --export-b")
    if args.audit:
        if args.images:
            raise InputError("--audit compares the inputs both versions answered: leave out --images")
        return "audit"
    if not args.images:
        raise InputError("comparing two served models needs --images DIR")
    return "http"


def collect(args: Any, mode: str, metrics: tuple[str, ...] = ()) -> tuple[list[Pair], dict, dict]:
    """(pairs, model A, model B) for the parsed command line in ``mode`` (:func:`mode_of`)."""
    methods = methods_of(args.methods)
    if mode == "export":
        return collect_export(args.export_a, args.export_b, args.images, methods, args.topk, metrics)
    if mode == "audit":
        return collect_audit(args.audit, args.a, args.b, methods, args.topk)
    from camserve.serving.client import token_from

    token = token_from(args)
    return collect_http(args.a, args.b, args.images, methods, token, token, args.timeout, args.topk, metrics)
