"""BENCHMARKS.md sections: each script replaces only its own."""

from hessian_tools.benchmarks_md import markers, write_section


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "mine", "first")  # a new file
    write_section(path, "other", "keep me")
    path.write_text(path.read_text() + "after\n")
    write_section(path, "mine", "second\n")
    text = path.read_text()
    start, end = markers("mine")
    assert text.startswith("# Benchmarks\n")
    assert "second" in text and "first" not in text and "keep me" in text and text.endswith("after\n")
    assert text.count(start) == 1 and text.count(end) == 1
    assert text.index(start) < text.index("second") < text.index(end) < text.index("keep me")
