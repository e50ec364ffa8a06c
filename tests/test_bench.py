"""`hessian-tools bench --quick`: every ratio is a positive finite number; the markdown section is replaced alone."""

import json
import math

from hessian_tools.bench import END, START, write_section
from hessian_tools.cli import main


def test_quick_bench_json_has_every_ratio(capsys):
    assert main(["bench", "--quick", "--no-write", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ratios = result["ratios"]
    expected = {f"hvp_over_grad/{a}/{m}" for a in ("simplegpt", "llama2", "gpt2")
                for m in ("rev-rev", "fwd-rev", "double-backward")}
    expected |= {"eigenvalue_speedup_vs_pyhessian", "eigenvalue_hvp_ratio_vs_pyhessian", "trace_speedup_vs_pyhessian",
                 "trace_hutchpp_equivalent_speedup_vs_pyhessian"}
    assert set(ratios) == expected
    assert all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in ratios.values()), ratios
    eig = result["top_eigenvalue"]
    assert eig["reference"]["converged"]
    assert eig["ours"]["converged"] and eig["ours"]["rel_error"] <= 1e-3  # the certified stop keeps its promise
    assert result["trace"]["pyhessian_density"].startswith(("fails", "works"))
    assert "gpt2_small" not in result  # --quick skips the 124M model


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    other = "<!-- other:start -->\nkeep me\n<!-- other:end -->"
    write_section(f"{START}\nfirst\n{END}", path)  # appended to a new file
    path.write_text(path.read_text() + "\n" + other + "\n")
    write_section(f"{START}\nsecond\n{END}", path)
    text = path.read_text()
    assert "second" in text and "first" not in text and "keep me" in text
    assert text.count(START) == 1 and text.count(END) == 1
