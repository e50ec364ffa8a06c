"""Append-only results files: no partial or interleaved lines, also after a killed writer."""

import multiprocessing as mp

import pytest

from hessian_tools.results_io import append_record, read_records


def _writer(path, tag, n):
    for i in range(n):
        append_record(path, {"writer": tag, "i": i, "pad": "x" * 2000})


def test_partial_last_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "trunc')  # a writer killed mid-line
    assert read_records(path) == [{"a": 1}]
    append_record(path, {"a": 3})
    assert read_records(path) == [{"a": 1}, {"a": 3}]
    assert path.read_bytes().count(b"\n") == 2


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
        assert [r["i"] for r in records if r["writer"] == tag] == list(range(50))


def test_non_finite_values_are_refused(tmp_path):
    with pytest.raises(ValueError):
        append_record(tmp_path / "r.jsonl", {"value": float("nan")})


def _keyed_writer(path, n):
    for i in range(n):
        append_record(path, {"unit": i, "status": "ok"}, key=lambda r: r["unit"])


def test_concurrent_writers_of_the_same_results_write_each_once(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"unit": 0, "status": "error"})  # a failed attempt does not block the result
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_keyed_writer, args=(path, 30)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    ok = [r["unit"] for r in read_records(path) if r["status"] == "ok"]
    assert sorted(ok) == list(range(30))
    assert append_record(path, {"unit": 5, "status": "ok"}, key=lambda r: r["unit"]) is False
