"""`hessian-tools bench --quick`: every ratio is a positive finite number."""

import json
import math

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
