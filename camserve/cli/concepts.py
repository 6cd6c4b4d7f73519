"""``camserve concepts``: register the concepts an embedding model's explanations compare to."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def _add(args: argparse.Namespace) -> int:
    from camserve import concepts
    from camserve.errors import InputError
    from camserve.pipeline import imageio
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(args.export, intra_op_threads=args.threads or None)
    m = session.manifest
    if not m.embedding:
        raise InputError(f"{args.export} holds a {m.kind} export; concepts apply to embedding models (camserve export --kind embedding)")
    name = concepts.check_name(args.name)
    images = []
    for path in args.images:
        try:
            images.append(imageio.decode(Path(path).read_bytes(), 10**9))
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
    x = imageio.preprocess(images, m.input_size, m.mean, m.std, m.channel_order)
    vector = session.forward_logits(x).mean(axis=0)
    registry = concepts.load(args.export)
    replaced = name in registry
    registry[name] = vector
    concepts.save(args.export, registry)
    print(f"{'replaced' if replaced else 'added'} concept {name!r}: mean embedding of {len(images)} images "
          f"(|f| = {float(np.linalg.norm(vector)):.4g}); {len(registry)} concepts in {Path(args.export) / concepts.CONCEPTS_FILE}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from camserve import concepts

    for name, vector in concepts.load(args.export).items():
        print(f"{name}\t{vector.shape[0]} dims\t|f| = {float(np.linalg.norm(vector)):.4g}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("concepts", help="register concepts of an embedding model (similarity targets)")
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("add", help="store the mean embedding of images as a named concept in EXPORT/concepts.npz")
    a.add_argument("export", help="export folder of an embedding model (camserve export --kind embedding)")
    a.add_argument("--name", required=True, help="concept name (letters, digits, _ . -)")
    a.add_argument("images", nargs="+", help="images of the concept")
    a.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: all cores)")
    a.set_defaults(func=_add)
    ls = sub.add_parser("list", help="list the registered concepts")
    ls.add_argument("export")
    ls.set_defaults(func=_list)
