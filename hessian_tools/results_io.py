"""Append-only JSON-lines results files that survive kills and concurrent writers.

Each record is one line, written with a single `os.write` on an O_APPEND descriptor while holding an exclusive
`flock`, so two processes never interleave lines. A kill in the middle of a write can leave at most one partial
last line (no trailing newline): readers ignore it and the next writer cuts it off before appending.
"""

import fcntl
import json
import os
from pathlib import Path


def read_records(path) -> list[dict]:
    """All complete records of `path` (an absent file has none); a partial last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def append_record(path, record: dict, key=None) -> bool:
    """Append one record as one line; cut a partial last line left by a killed writer first.

    With `key` (a function of a record), the record is not written when a successful record (status not
    "error") with the same key is already in the file, checked under the lock, so concurrent writers that
    computed the same result write it once. Returns whether the record was written.
    """
    line = (json.dumps(record, allow_nan=False, sort_keys=True) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _cut_partial_tail(fd)
        if key is not None and _holds(fd, key(record), key):
            return False
        os.write(fd, line)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # closing releases the lock


def _cut_partial_tail(fd: int) -> None:
    data = _read_all(fd)
    if data and not data.endswith(b"\n"):
        os.ftruncate(fd, data.rfind(b"\n") + 1)


def _read_all(fd: int) -> bytes:
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, size)


def _holds(fd: int, wanted, key) -> bool:
    data = _read_all(fd)
    records = (json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip())
    return any(r.get("status") != "error" and key(r) == wanted for r in records)
