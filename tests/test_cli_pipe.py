"""Every CLI command that writes to stdout ends quietly when its reader goes away (``| head``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _audit_fixture import audit_config, sample_record
from camserve.audit import open_sink
from camserve.audit.records import prepare

CAMSERVE = [sys.executable, "-m", "camserve.cli"]


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory):
    """A SQLite audit log whose export is far larger than a pipe's buffer (64 KiB)."""
    config = audit_config("sqlite", tmp_path_factory.mktemp("pipe") / "audit")
    sink = open_sink(config)
    try:
        sink.append([prepare(sample_record(i), "pipe") for i in range(1500)])
    finally:
        sink.close()
    return config.path


def piped(args: list[str]) -> tuple[int, str]:
    """Run ``camserve ARGS | head -c 200``: (camserve's exit status, its stderr)."""
    reader_first = "import subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE); " \
        "p.stdout.read(200); p.stdout.close(); err = p.stderr.read(); sys.stderr.buffer.write(err); sys.exit(p.wait())"
    proc = subprocess.run([sys.executable, "-c", reader_first, *CAMSERVE, *args], capture_output=True, text=True,
                          env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"}, timeout=120)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("command", [["audit", "export"], ["audit", "export", "--format", "csv"], ["audit", "list"],
                                     ["audit", "show"]])
def test_audit_commands_end_quietly_when_the_reader_goes_away(audit_path, command):
    code, stderr = piped([*command, "--path", str(audit_path)])
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert code == 141, (code, stderr)


def test_help_ends_quietly_when_the_reader_goes_away():
    code, stderr = piped(["--help"] + [])
    assert "Traceback" not in stderr, stderr
    assert code in (0, 141)


def test_shell_pipeline_into_head(audit_path):
    proc = subprocess.run(f"{' '.join(CAMSERVE)} audit export --path {audit_path} | head -n 2", shell=True,
                          capture_output=True, text=True, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"}, timeout=120)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr


def test_methods_ends_quietly_when_the_reader_goes_away():
    code, stderr = piped(["methods", "--json"])
    assert "Traceback" not in stderr, stderr
    assert code in (0, 141)
