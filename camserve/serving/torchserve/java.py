"""Finding the Java runtime TorchServe's frontend needs (11 or newer), with a clear way out.

pip brings no Java, and ``torchserve --start`` without one prints "java not found" and still
exits 0; so ``camserve serve`` checks first: ``$JAVA_HOME/bin/java``, else ``java`` on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from camserve.errors import CamserveError

JAVA_HINT = (
    "TorchServe needs a Java runtime 11 or newer: install one (Debian/Ubuntu: "
    "`apt-get install openjdk-17-jre-headless`) or set JAVA_HOME to a JDK/JRE folder"
)


class JavaError(CamserveError):
    """No usable Java runtime (missing or older than 11)."""

    kind = "java_missing"
    status = 500


def java_version(java: str) -> int:
    """Major version of a ``java`` binary (8 for "1.8.0_x", 17 for "17.0.2")."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise JavaError(f"cannot run {java}: {exc.strerror}. {JAVA_HINT}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise JavaError(f"cannot read the version of {java}. {JAVA_HINT}")
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    return minor if major == 1 else major


def find_java(env: dict[str, str] | None = None) -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH, version 11+, else a clear :class:`JavaError`."""
    env = dict(os.environ) if env is None else env
    home = env.get("JAVA_HOME")
    if home:
        java = str(Path(home) / "bin" / "java")
        if not os.access(java, os.X_OK):
            raise JavaError(f"JAVA_HOME={home} has no bin/java. {JAVA_HINT}")
    else:
        java = shutil.which("java", path=env.get("PATH")) or ""
        if not java:
            raise JavaError(f"no Java runtime found (JAVA_HOME unset, no java on PATH). {JAVA_HINT}")
    major = java_version(java)
    if major < 11:
        raise JavaError(f"{java} is Java {major}, too old. {JAVA_HINT}")
    return java
