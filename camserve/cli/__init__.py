"""The ``camserve`` command line: one entry point, one sub-command per module.

Each module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its
sub-parser and sets ``func`` on it. A :class:`~camserve.errors.CamserveError` becomes a
one-line message on stderr and exit code 2; a reader of stdout that goes away (``| head``)
ends the command quietly with exit code 141; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from camserve.errors import CamserveError  # noqa: E402

#: Sub-command modules, imported lazily so ``camserve --help`` does not import torch.
COMMANDS: tuple[str, ...] = (
    "camserve.export.cli",
    "camserve.serving.torchserve.archive", "camserve.cli.serve", "camserve.cli.kserve", "camserve.serving.client",
    "camserve.audit.cli", "camserve.compare.cli", "camserve.cli.methods", "camserve.cli.concepts",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camserve", description="CAM explanations for served vision models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


#: Exit status when the reader of stdout went away (``camserve audit export | head``), as a
#: process killed by SIGPIPE reports it.
EXIT_BROKEN_PIPE = 128 + 13


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            code = int(args.func(args) or 0)
        except CamserveError as exc:
            print(f"camserve {args.command}: error: {exc}", file=sys.stderr)
            code = 2
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass

