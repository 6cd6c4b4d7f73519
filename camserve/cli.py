"""The ``camserve`` command line: one entry point, one sub-command per module.

Each module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its
sub-parser and sets ``func`` on it. A :class:`~camserve.errors.CamserveError` becomes a
one-line message on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .errors import CamserveError  # noqa: E402

#: Sub-command modules, imported lazily so ``camserve --help`` does not import torch.
COMMANDS: tuple[str, ...] = (
    "camserve.export.cli",
    "camserve.archive", "camserve.serve_cli", "camserve.client",
    "camserve.audit.cli", "camserve.compare.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camserve", description="CAM explanations for served vision models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CamserveError as exc:
        print(f"camserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
