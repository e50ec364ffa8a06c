"""BENCHMARKS.md is written by several scripts, each owning one section between its own markers."""

from pathlib import Path

from hessian_tools.paths import write_atomic


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path, name: str, body: str) -> None:
    """Replace section `name` of the markdown file `path` with `body` (appended, or the file created, when
    missing); every other section stays as it is. Written through a temporary file: a failed write changes
    nothing."""
    path = Path(path)
    start, end = markers(name)
    section = f"{start}\n{body.strip(chr(10))}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_atomic(path, text, str(path))
