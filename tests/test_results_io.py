"""Append-only results files: no partial or interleaved lines, also after a killed writer, nothing valid ever
rewritten or lost, foreign files refused byte-identical, broken lines quarantined, full disks reported."""

import base64
import errno
import json
import multiprocessing as mp
import os

import pytest

from hessian_tools import results_io
from hessian_tools.errors import UserError
from hessian_tools.records import Estimate
from hessian_tools.results_io import append_record, quarantine_path, read_records


def rec(i=0, status="ok", message=None, **fields):
    """A valid record (Estimate.to_dict()) tagged by provenance["i"]."""
    value = None if status != "ok" else 1.0 + i
    est = Estimate("lambda_max", value, None if value is None else 0.1, "certified" if value else "none",
                   value is not None, 3, 0.5, {"tol": 1e-6}, {"i": i}, {"message": message} if message else {},
                   status=status)
    return {**est.to_dict(), **fields}


def line(record) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def tags(path):
    return [r["provenance"]["i"] for r in read_records(path, report=None)]


def quarantined(path) -> list[bytes]:
    q = quarantine_path(path)
    return [base64.b64decode(json.loads(raw)["base64"]) for raw in q.read_bytes().splitlines()] if q.exists() else []


def _writer(path, tag, n):
    for i in range(n):
        append_record(path, rec(i, payload={"writer": tag, "pad": "x" * 2000}))


def test_partial_last_line_is_moved_to_quarantine_not_lost(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, rec(1))
    with open(path, "ab") as f:
        f.write(b'{"quantity": "lambda_max", "trunc')  # a writer killed mid-line
    assert tags(path) == [1]
    append_record(path, rec(3))
    assert tags(path) == [1, 3]
    assert path.read_bytes().count(b"\n") == 2
    assert quarantined(path) == [b'{"quantity": "lambda_max", "trunc']


def test_concurrent_writers_do_not_interleave(tmp_path):
    path = tmp_path / "r.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, tag, 50)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records = read_records(path)
    assert len(records) == 100
    for tag in "ab":
        assert [r["provenance"]["i"] for r in records if r["payload"]["writer"] == tag] == list(range(50))


def _keyed_writer(path, n):
    for i in range(n):
        append_record(path, rec(i), key=lambda r: r["provenance"]["i"])


def test_concurrent_writers_of_the_same_results_write_each_once(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, rec(0, status="error", message="boom"))  # a failed attempt does not block the result
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_keyed_writer, args=(path, 30)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    ok = [r["provenance"]["i"] for r in read_records(path) if r["status"] == "ok"]
    assert sorted(ok) == list(range(30))
    assert append_record(path, rec(5), key=lambda r: r["provenance"]["i"]) is False


def test_failure_records_are_deduplicated_under_the_lock(tmp_path):
    path, key = tmp_path / "r.jsonl", (lambda r: r["provenance"]["i"])
    assert append_record(path, rec(1, status="error", message="boom"), key=key)
    assert not append_record(path, rec(1, status="error", message="boom"), key=key)  # the same failure again
    assert append_record(path, rec(1, status="error", message="other"), key=key)  # a new reason is news
    assert append_record(path, rec(1), key=key)  # the result after failures
    assert not append_record(path, rec(1, status="error", message="late"), key=key)  # a result is there
    assert append_record(path, rec(1, status="error", message="boom"))  # without a key: always written
    assert len(read_records(path)) == 4


def _concurrent_failures(path):
    for _ in range(20):
        append_record(path, rec(7, status="error", message="same reason"), key=lambda r: r["provenance"]["i"])


def test_concurrent_failure_records_are_written_once(tmp_path):
    path = tmp_path / "r.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_concurrent_failures, args=(path,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(read_records(path)) == 1


VALID = line(rec(1))
# name -> (bytes before, records read, records after one append, bytes quarantined by that append, message)
FILES = {
    "empty": (b"", [], [9], [], None),
    "newline only": (b"\n", [], [9], [], None),
    "last record without newline": (VALID[:-1], [1], [1, 9], [], None),
    "partial tail": (VALID + b'{"quantity": "lam', [1], [1, 9], [b'{"quantity": "lam'], "incomplete last line"),
    "only a partial first write": (b'{"error": 0.1, "err', [], [9], [b'{"error": 0.1, "err'], "incomplete"),
    "text line in the middle": (VALID + b"oops\n" + line(rec(2)), [1, 2], [1, 2, 9], [b"oops"], "line 2 is not JSON"),
    "non-UTF-8 line": (VALID + b"\xff\xfe\x00\n" + line(rec(2)), [1, 2], [1, 2, 9], [b"\xff\xfe\x00"], "not UTF-8"),
    "JSON scalar line": (VALID + b"12\n", [1], [1, 9], [b"12"], "a JSON int"),
    "null provenance": (VALID + line(rec(2, provenance=None)), [1], [1, 9], [line(rec(2, provenance=None))[:-1]],
                        "provenance must be an object, got null"),
    "ok with null value": (VALID + line({**rec(2), "value": None}), [1], [1, 9],
                           [line({**rec(2), "value": None})[:-1]], "value must be a number"),
    "value as a string": (VALID + line(rec(2, value="1.5")), [1], [1, 9], [line(rec(2, value="1.5"))[:-1]],
                          "value must be a finite number or null, got '1.5'"),
    "unknown field": (VALID + line(rec(2, extra=1)), [1], [1, 9], [line(rec(2, extra=1))[:-1]], "unknown key extra"),
    "NaN value": (VALID + VALID.replace(b'"value": 2.0', b'"value": NaN'), [1], [1, 9],
                  [VALID.replace(b'"value": 2.0', b'"value": NaN')[:-1]], "value must be a finite number or null, got NaN"),
}
FOREIGN = {
    "notes without newline": b"my notes about the runs",
    "notes": b"# notes\nlambda_max looks high\n",
    "binary": bytes(range(256)) * 4,
    "non-UTF-8 text": "caf\u00e9 cr\u00e8me\n".encode("latin-1"),
    "JSON scalars": b"1\n2\n3\n",
    "JSON lists": b"[1, 2]\n[3]\n",
    "a JSON string": b'"hello"\n',
}


@pytest.mark.parametrize("name", FILES)
def test_results_file_table(tmp_path, name, capsys):
    before, read, after, moved, message = FILES[name]
    path = tmp_path / "r.jsonl"
    path.write_bytes(before)
    assert tags(path) == read
    append_record(path, rec(9))
    assert tags(path) == after
    assert quarantined(path) == moved
    err = capsys.readouterr().err
    if message:
        assert message in err and all(line.startswith("hessian-tools: ") for line in err.splitlines())
    tail_moved = moved and not before.endswith(b"\n")
    assert path.read_bytes().startswith(before[:before.rfind(b"\n") + 1] if tail_moved else before)  # not rewritten
    append_record(path, rec(10))
    assert quarantined(path) == moved  # each broken line is kept once


@pytest.mark.parametrize("name", FOREIGN)
def test_foreign_files_are_refused_byte_identical(tmp_path, name):
    path = tmp_path / "notes.jsonl"
    path.write_bytes(FOREIGN[name])
    for action in (lambda: append_record(path, rec(1)), lambda: read_records(path)):
        with pytest.raises(UserError, match="is not a results file") as exc:
            action()
        assert "\n" not in str(exc.value)
    assert path.read_bytes() == FOREIGN[name]
    assert not quarantine_path(path).exists()


def test_refused_records_leave_the_file_as_it_was(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, rec(1))
    before = path.read_bytes()
    for bad, match in ((rec(2, value=float("nan")), "value must be a finite number or null, got NaN"),
                       ({**rec(2), "value": None}, 'value must be a number when status is "ok"'),
                       (rec(2, provenance=None), "record.provenance must be an object"),
                       ({"a": 1}, "record.quantity is missing")):
        with pytest.raises(UserError, match=match):
            append_record(path, bad)
    assert path.read_bytes() == before


@pytest.mark.parametrize("where, match", [
    ("dir", "is a directory"), ("file/r.jsonl", "a file of that name is in the way"),
    ("fifo", "is a FIFO"), ("x" * 300 + ".jsonl", "the name is too long")])
def test_unusable_paths_are_one_line_errors(tmp_path, where, match):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("notes")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match=match) as exc:
        append_record(tmp_path / where, rec(1))
    assert "\n" not in str(exc.value)
    try:
        assert read_records(tmp_path / where) == []  # nothing there to read
    except UserError as exc:
        assert match in str(exc) and "\n" not in str(exc)
    assert (tmp_path / "file").read_text() == "notes"


class Disk:
    """os.write that writes `room` more bytes, then fails with `error` (a full disk); os.fsync failing too."""

    def __init__(self, monkeypatch, room, error=errno.ENOSPC, fsync_error=None):
        self.room, self.error = room, error
        real_write, real_fsync = os.write, os.fsync

        def write(fd, data):
            if self.room <= 0:
                raise OSError(self.error, os.strerror(self.error))
            n = real_write(fd, bytes(data[: self.room]))
            self.room -= n
            return n

        def fsync(fd):
            if fsync_error:
                raise OSError(fsync_error, os.strerror(fsync_error))
            return real_fsync(fd)

        monkeypatch.setattr(results_io.os, "fsync", fsync)
        monkeypatch.setattr("hessian_tools.paths.os.write", write)


@pytest.mark.parametrize("room, fsync_error, before", [
    (0, None, VALID), (40, None, VALID), (40, None, VALID[:-1]), (10**6, errno.EIO, VALID),
    (0, None, VALID + b'{"half'), (10**6, errno.EIO, VALID + b"{}\n")])
def test_a_full_disk_is_an_error_and_leaves_the_file_as_it_was(tmp_path, monkeypatch, room, fsync_error, before):
    path = tmp_path / "r.jsonl"
    path.write_bytes(before)
    Disk(monkeypatch, room, fsync_error=fsync_error)
    with pytest.raises(UserError, match="cannot") as exc:
        append_record(path, rec(2))
    assert "\n" not in str(exc.value)
    assert path.read_bytes() == before


def test_a_half_line_left_by_a_failed_undo_is_quarantined_next_time(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    path.write_bytes(VALID)
    Disk(monkeypatch, 30)
    monkeypatch.setattr(results_io.os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(UserError):
        append_record(path, rec(2))
    monkeypatch.undo()
    append_record(path, rec(3))
    assert tags(path) == [1, 3] and len(quarantined(path)) == 1


def test_a_real_full_disk(mounted, fill_disk):
    disk = mounted("size=64k")
    path = disk / "r.jsonl"
    append_record(path, rec(1))
    fill_disk(disk)
    before = path.read_bytes()
    with pytest.raises(UserError, match="the disk is full"):
        for i in range(1000):  # the page of the results file may still have room for a few records
            append_record(path, rec(2, payload={"pad": "x" * 3000}))
    assert path.read_bytes().startswith(before)
    assert len(read_records(path)) == path.read_bytes().count(b"\n")  # no half line
