"""Every ``camserve`` command in README.md and docs/*.md parses as written, and each one that
talks to a running server says where its key is (``--run-dir``), since token authorization is
on by default and a refused token is TorchServe's ``400 InvalidKeyException``."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from camserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, str]]:
    """``(file, command)`` for each ``camserve ...`` line of the docs' sh blocks (continuations joined)."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), flags=re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split("  #", 1)[0].strip()
                if line.startswith("camserve "):
                    found.append((path.name, line))
    return found


COMMANDS = commands()


def test_the_docs_have_examples():
    names = {shlex.split(c)[1] for _, c in COMMANDS}
    assert {"export", "archive", "serve", "explain", "stop", "compare", "audit"} <= names


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{f}:{c[:60]}" for f, c in COMMANDS])
def test_example_parses_and_finds_the_servers_key(where, command):
    argv = shlex.split(command)[1:]
    args = build_parser().parse_args(argv)  # an unknown flag or a missing argument exits here
    talks_to_server = argv[0] == "explain" or (argv[0] == "compare" and str(args.a or "").startswith("http"))
    if talks_to_server:
        assert "--run-dir" in argv or "--token" in argv or "--key-file" in argv, (
            f"{where}: {command!r} talks to a token-protected server without --run-dir")
        assert args.run_dir == "serve_run" or args.token or args.key_file  # the run folder camserve serve defaults to
