"""Results files: append-only JSON-lines logs of records that survive kills, full disks and concurrent writers.

A results file holds one record per line: an Estimate dict (hessian_tools.records) checked against RECORD.
Writers append with one checked write on an O_APPEND descriptor under an exclusive `flock`, then fsync, so
two processes never interleave lines. Nothing valid is ever rewritten:
  - a last line without its newline that is a complete record is kept (the newline is added first);
  - a last line that is not (a writer killed mid-line) is moved to the quarantine file beside the results
    file (`quarantine_path`: FILE.quarantine.jsonl) before it is cut off, so no byte is lost;
  - a broken line in the middle (not JSON, not UTF-8, not an object, not a valid record) stays where it is,
    is copied to the quarantine file once, and is reported (one line each) by readers and writers;
  - a file that is not a results file at all (text, binary, JSON scalars) is refused, byte-identical;
  - a write that fails (ENOSPC, EIO) is undone (the file is cut back to its size before) and reported as one
    line; a half line that could not be undone is quarantined by the next writer.
Quarantine entries are JSON lines {"file", "line", "offset", "reason", "base64"} (the exact bytes).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hessian_tools.errors import UserError
from hessian_tools.paths import input_file, os_error, write_all
from hessian_tools.records import ERROR_KINDS
from hessian_tools.schema import Bool, Float, Int, MapOf, Nullable, Obj, SchemaError, Str, check

QUARANTINE_SUFFIX = ".quarantine.jsonl"
# One record: Estimate.to_dict(). A failure is a status other than "ok" with a null value, never "ok" and null.
RECORD = Obj({
    "quantity": Str(nonempty=True), "value": Nullable(Float()), "error": Nullable(Float(low=0)),
    "error_kind": Str(ERROR_KINDS), "converged": Bool(), "hvp_count": Int(low=0), "wall_time_s": Float(low=0),
    "settings": MapOf(), "provenance": MapOf(), "payload": MapOf(), "status": Str(nonempty=True)})


def check_record(record) -> dict:
    """The record if it matches RECORD (and status "ok" carries a value); SchemaError naming the field."""
    record = check(record, RECORD, prefix="record")
    if record["status"] == "ok" and record["value"] is None:
        raise SchemaError("record.value", 'a number when status is "ok" (a failure has another status)', "null")
    return record


@dataclass
class Line:
    """A line that is not a valid record: its 1-based number, byte offset, bytes and why."""

    number: int
    offset: int
    data: bytes
    reason: str


@dataclass
class Scan:
    """What a results file holds: valid records, broken lines, and an unterminated last line."""

    path: Path
    records: list = field(default_factory=list)
    broken: list = field(default_factory=list)  # Line, complete lines only
    tail: Line | None = None  # the last line when it has no newline
    tail_record: dict | None = None  # the tail parsed as a valid record
    objects: int = 0  # lines that parse as JSON objects (valid records or not)

    def invalid(self) -> list:
        """The lines to quarantine: the broken ones, and a non-blank last line without its newline that is not
        valid (a writer killed mid-line)."""
        cut = self.tail is not None and self.tail_record is None and self.tail.data.strip()
        return self.broken + ([self.tail] if cut else [])


def quarantine_path(path) -> Path:
    """Where the broken lines of results file `path` are kept: FILE.quarantine.jsonl beside it."""
    path = Path(path)
    return path.with_name(path.name + QUARANTINE_SUFFIX)


def _parse(data: bytes, checker, noun: str) -> tuple[dict | None, str | None, bool]:
    """(the line checked by `checker`, reason it is not a valid `noun`, whether it is a JSON object)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start})", False
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})", False
    if not isinstance(obj, dict):
        return None, f"a JSON {type(obj).__name__}, not a {noun} object", False
    try:
        return checker(obj), None, True
    except SchemaError as exc:
        return None, f"not a valid {noun}: {exc}", True


def scan_bytes(path: Path, data: bytes, checker=None, noun: str = "record") -> Scan:
    """Classify the lines of a JSON-lines file's bytes (blank lines are ignored): valid when `checker` (a
    function returning the checked object or raising SchemaError; default check_record) accepts them."""
    scan, offset = Scan(path), 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        last = number == len(lines)
        if last and not raw:
            break
        if raw.strip():
            record, reason, is_object = _parse(raw, checker or check_record, noun)
            scan.objects += is_object
            if last:
                scan.tail = Line(number, offset, raw, reason or "")
                scan.tail_record = record
            elif record is not None:
                scan.records.append(record)
            else:
                scan.broken.append(Line(number, offset, raw, reason))
        elif last:
            scan.tail = Line(number, offset, raw, "an unterminated blank line")
        offset += len(raw) + 1
    if scan.tail is not None and scan.tail_record is not None:
        scan.records.append(scan.tail_record)
    return scan


def _refuse_foreign(scan: Scan, data: bytes):
    """UserError unless the bytes look like a results file: empty, some line a JSON object, or one
    unterminated line that starts a record (a first write cut short)."""
    if not data.strip() or scan.objects:
        return
    if scan.tail is not None and not scan.broken and scan.tail.data.lstrip().startswith(b'{"'):
        return
    first = (scan.broken or [scan.tail])[0]
    raise UserError(f"{scan.path}: is not a results file (line {first.number} is {first.reason}); it was left "
                    "as it is: name a new file or an existing results file")


def report_lines(scan: Scan) -> list[str]:
    """One line per broken line of the file (for stderr)."""
    where = quarantine_path(scan.path)
    return [f"{scan.path}: line {line.number} is {line.reason}; skipped (left in place, a copy is kept in {where})"
            for line in scan.broken]


def warn(line: str):
    """One line on stderr, as the command line writes its messages."""
    print(f"hessian-tools: {line}", file=sys.stderr)


def read_records(path, report=warn) -> list[dict]:
    """All valid records of `path` (an absent file has none). Broken lines are skipped and each is reported
    by `report` (one line; default: stderr; None: silent); an unterminated last line counts if it is a
    complete record. UserError for a file that is not a results file, or cannot be read."""
    return read_results(path, report).records


def read_results(path, report=warn) -> Scan:
    """The Scan of `path` (records, broken lines, tail); reported and refused as in `read_records`."""
    path = Path(path)
    if not os.path.lexists(path):
        return Scan(path)
    input_file(path, "results file")
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # no half-written line of a concurrent writer
            data = _read_all(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise os_error(exc, path, "read the results file") from None
    scan = scan_bytes(path, data)
    _refuse_foreign(scan, data)
    if report is not None:
        for line in report_lines(scan):
            report(line)
        if scan.tail is not None and scan.tail_record is None:
            report(f"{path}: its last line is incomplete (a writer was killed?); skipped, the next write moves it to "
                   f"{quarantine_path(path)}")
    return scan


def append_record(path, record: dict, key=None, report=warn) -> bool:
    """Append one record as one line (see the module docstring for what happens to broken lines first).

    With `key` (a function of a record), the record is not written when the file already holds one with the
    same key that makes it redundant, checked under the lock so concurrent writers write it once: for a
    result (status other than "error"), any result; for a failure, a result or a failure with the same status
    and payload message. Returns whether the record was written. UserError (one line) when the record is
    not valid, `path` is not a results file or cannot be written (the file is then as it was).
    """
    record = check_record(json.loads(json.dumps(record, allow_nan=True)) if isinstance(record, dict) else record)
    line = (json.dumps(record, allow_nan=False, sort_keys=True) + "\n").encode("utf-8")
    path = Path(path)
    if os.path.lexists(path):
        input_file(path, "results file")  # a directory, FIFO or device is refused before it is opened
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise os_error(exc, path, "open the results file for appending") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        scan = _repair(fd, path, report)
        if key is not None and _redundant(scan.records, record, key):
            return False
        ends_open = scan.tail is not None and scan.tail_record is not None  # a complete last record, no newline
        _append(fd, path, b"\n" + line if ends_open else line)
        return True
    finally:
        os.close(fd)  # closing releases the lock


def _read_all(fd: int) -> bytes:
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _append(fd: int, path: Path, data: bytes):
    """Write `data` at the end and fsync; on failure cut the file back to its size before and raise."""
    size = os.lseek(fd, 0, os.SEEK_END)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            pass  # the half line is quarantined by the next writer
        raise os_error(exc, path, "append a record (the file is as it was)") from None


def _repair(fd: int, path: Path, report) -> Scan:
    """Under the lock: refuse a foreign file, quarantine new broken lines, and move an unterminated last line
    that is not a complete record to the quarantine file (a complete one gets its newline with the next line)."""
    data = _read_all(fd)
    scan = scan_bytes(path, data)
    _refuse_foreign(scan, data)
    moved = scan.invalid()[len(scan.broken):]  # the cut last line, if any
    quarantine(path, scan.invalid())
    if report is not None:
        for line in report_lines(scan):
            report(line)
    if scan.tail is not None and scan.tail_record is None:
        os.ftruncate(fd, scan.tail.offset)
        os.fsync(fd)
        if moved and report is not None:
            report(f"{path}: moved its incomplete last line (line {scan.tail.number}, {len(scan.tail.data)} bytes) to "
                   f"{quarantine_path(path)}")
    return scan


def _entry_id(offset: int, data: bytes) -> str:
    return f"{offset}:{hashlib.sha256(data).hexdigest()}"


def quarantine(path: Path, lines: list, what: str = "results file"):
    """Copy broken lines (Line) of `path` into its quarantine file, each once (keyed by offset and content);
    fsynced. UserError (one line) when that file cannot be written."""
    if not lines:
        return
    target = quarantine_path(path)
    known = set()
    if target.is_file():
        for raw in target.read_bytes().splitlines():
            try:
                entry = json.loads(raw)
                known.add(_entry_id(entry["offset"], base64.b64decode(entry["base64"])))
            except (ValueError, KeyError, TypeError):
                continue
    new = [line for line in lines if _entry_id(line.offset, line.data) not in known]
    if not new:
        return
    text = "".join(json.dumps({"file": str(path), "line": line.number, "offset": line.offset, "reason": line.reason,
                               "base64": base64.b64encode(line.data).decode("ascii")}) + "\n" for line in new)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise os_error(exc, target, f"keep the broken lines of the {what} (nothing was changed)") from None
    try:
        _append(fd, target, text.encode("utf-8"))
    finally:
        os.close(fd)


def _redundant(records: list, record: dict, key) -> bool:
    wanted = key(record)
    same = [r for r in records if key(r) == wanted]
    if any(r.get("status") != "error" for r in same):
        return True
    if record.get("status") == "error":
        message = (record.get("payload") or {}).get("message")
        return any(r.get("status") == record.get("status") and (r.get("payload") or {}).get("message") == message
                   for r in same)
    return False
