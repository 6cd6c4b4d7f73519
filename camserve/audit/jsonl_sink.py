"""JSON Lines audit sink: one record per line, rotated files, for log shippers.

Layout of the folder::

    audit.jsonl                     the active file (appended)
    audit.000000004097.jsonl        rotated files, named by their first seq (sorted = chain order)
    audit.lock                      flock'ed by the one writer appending at a time
    blobs/ab/ab12....png            stored heatmaps / input images, one file per content hash

A line is the record's canonical body with its hash appended as the last key:
``{...,"prev_hash":"...","seq":7,"hash":"<sha256 of the text before>"}`` -- the body is
recovered textually (no re-serialisation), so the hash is checked against the exact bytes.
Writers take ``flock`` on ``audit.lock``, read the active file's last line (the chain
head) and append their lines with one ``write``. A line cut short by a killed writer (no
final newline) was never acknowledged; the next writer removes it before appending.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from camserve.audit.records import GENESIS, Filter, Stored, chain, columns, limited
from camserve.audit.sink import Blob, Sink, SinkError, owner_only_dir, touch_private

ACTIVE = "audit.jsonl"
ROTATED = re.compile(r"^audit\.(\d{12})\.jsonl$")
HASH_TAIL = re.compile(r',"hash":"([0-9a-f]{64})"\}$')
EXT = {"heatmap": ".png", "input": ".bin"}


def split_line(line: str) -> tuple[str, str] | None:
    """(body text, stored hash) of one line, or None when it is not of that form."""
    m = HASH_TAIL.search(line)
    return (line[: m.start()] + "}", m.group(1)) if m else None


class JSONLSink(Sink):
    name = "jsonl"

    def __init__(self, folder: str | Path, rotate_bytes: int = 64 * 1024 * 1024, fsync: bool = False) -> None:
        self.folder = Path(folder)
        self.rotate_bytes = rotate_bytes
        self.fsync = fsync
        #: (inode, size, seq, hash) of the active file after our last append: skips re-reading it.
        self._head: tuple[int, int, int, str] | None = None
        #: Warnings met while reading (torn tails), for ``verify``.
        self.warnings: list[str] = []

    def describe(self) -> str:
        return f"jsonl {self.folder}"

    # ------------------------------------------------------------------ write ---

    def append(self, records: list[dict[str, Any]], blobs: list[Blob] = ()) -> list[tuple[int, str]]:
        try:
            owner_only_dir(self.folder)
            for sha, kind, data in blobs:
                self._put_blob(sha, kind, data)
            touch_private(self.folder / "audit.lock")
            with open(self.folder / "audit.lock", "r+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    return self._append_locked(records)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as exc:
            self._head = None
            raise SinkError(f"cannot write to the JSON Lines audit log {self.folder}: {exc}") from None

    def _append_locked(self, records: list[dict[str, Any]]) -> list[tuple[int, str]]:
        active = self.folder / ACTIVE
        touch_private(active)
        fd = os.open(active, os.O_RDWR | os.O_APPEND)
        try:
            st = os.fstat(fd)
            if self._head and self._head[:2] == (st.st_ino, st.st_size):
                seq, prev = self._head[2:]
            else:
                seq, prev = self._tail(fd, st.st_size)
            if os.fstat(fd).st_size >= self.rotate_bytes:
                first = self._first_seq(active)
                os.rename(active, self.folder / f"audit.{first:012d}.jsonl")
                os.close(fd)
                touch_private(active)
                fd = os.open(active, os.O_RDWR | os.O_APPEND)
            lines, out = [], []
            for n, _prev, body, digest in chain(records, seq, prev):
                lines.append(body[:-1] + f',"hash":"{digest}"}}\n')
                out.append((n, digest))
            if out:
                seq, prev = out[-1]
            data = "".join(lines).encode("utf-8")
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            if self.fsync:
                os.fsync(fd)
            st = os.fstat(fd)
            self._head = (st.st_ino, st.st_size, seq, prev)
            return out
        finally:
            os.close(fd)

    def _tail(self, fd: int, size: int) -> tuple[int, str]:
        """The chain head (seq, hash) from the active file's last line (else the newest rotated file)."""
        if size == 0:
            rotated = self._files()[:-1]
            if not rotated:
                return 0, GENESIS
            with open(rotated[-1], "rb") as f:
                return self._last_of(f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1])
        chunk = 65536
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start)
        while b"\n" not in data[:-1] and start > 0:  # a line longer than the chunk
            start = max(0, start - chunk)
            data = os.pread(fd, size - start, start)
        if not data.endswith(b"\n"):  # torn by a killed writer: never acknowledged, drop it
            cut = data.rfind(b"\n") + 1
            os.ftruncate(fd, start + cut)
            data = data[:cut]
            if not data:
                return self._tail(fd, start + cut) if start + cut else (0, GENESIS)
        return self._last_of(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])

    @staticmethod
    def _last_of(line: bytes) -> tuple[int, str]:
        parts = split_line(line.decode("utf-8"))
        if parts is None:
            raise OSError("the last line of the audit log is not a sealed record; run camserve audit verify")
        return int(json.loads(parts[0])["seq"]), parts[1]

    def _first_seq(self, path: Path) -> int:
        with open(path, "rb") as f:
            parts = split_line(f.readline().decode("utf-8").rstrip("\n"))
        return int(json.loads(parts[0])["seq"]) if parts else 0

    def _put_blob(self, sha: str, kind: str, data: bytes) -> None:
        path = self.folder / "blobs" / sha[:2] / f"{sha}{EXT.get(kind, '.bin')}"
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------- read ---

    def _files(self) -> list[Path]:
        rotated = sorted(p for p in self.folder.glob("audit.*.jsonl") if ROTATED.match(p.name))
        return rotated + [self.folder / ACTIVE]

    def rows(self, flt: Filter | None = None) -> Iterator[Stored]:
        if not (self.folder / ACTIVE).exists():
            raise SinkError(f"no JSON Lines audit log in {self.folder}")
        return limited(self._all(), flt or Filter())

    def _all(self) -> Iterator[Stored]:
        self.warnings = []
        for path in self._files():
            if not path.exists():
                continue
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    where = f"{path.name}:{n}"
                    if not raw.endswith(b"\n"):
                        self.warnings.append(f"{where}: an unfinished last line (a writer was killed mid-write; never acknowledged)")
                        continue
                    line = raw.decode("utf-8", errors="replace").rstrip("\n")
                    parts = split_line(line)
                    try:
                        body, digest = parts if parts else (line, "")
                        rec = json.loads(body)
                        seq, prev, cols = int(rec.get("seq", -1)), str(rec.get("prev_hash", "")), columns(rec)
                    except (ValueError, TypeError, AttributeError, KeyError):
                        seq, prev, cols = -1, "", columns({})
                        body = line
                    yield Stored(seq, digest, prev, body, cols, where)

    def blob(self, sha256: str) -> bytes | None:
        for ext in set(EXT.values()):
            path = self.folder / "blobs" / sha256[:2] / f"{sha256}{ext}"
            if path.is_file():
                return path.read_bytes()
        return None
