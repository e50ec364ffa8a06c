"""The numbers of figures/README.md: written by hessian_tools.findings from the committed results bundle, and the
rules that turn seed spreads and data intervals into verdicts on the paper's claims."""

from pathlib import Path

import pytest

from hessian_tools.findings import claims, measure_summary, readme_section, sections, verdict
from hessian_tools.results_bundle import Results, compact

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def test_the_committed_readme_numbers_are_those_of_the_committed_results():
    """Fails when figures/README.md and figures/results/ disagree (rewrite with
    `python -m hessian_tools.findings figures/results figures/README.md`)."""
    results = Results.load(FIGURES / "results")
    computed = sections(results)
    assert sorted(computed) == ["eos", "numbers"]  # the committed bundle holds the edge-of-stability runs
    for name, text in computed.items():
        assert readme_section(FIGURES / "README.md", name) == text, name
    assert results.experiment["scale"] == "full" and len(results.experiment["seeds"]) >= 3
    assert sum(p.stat().st_size for p in (FIGURES / "results").iterdir()) < 1_500_000


@pytest.mark.parametrize("simple, base, lower, expected", [
    ([1.0, 2.0], [3.0, 4.0], True, "supports"),
    ([3.0, 4.0], [1.0, 2.0], True, "contradicts"),
    ([1.0, 3.0], [2.0, 4.0], True, "cannot settle"),
    ([0.4, 0.7], [0.1, 0.2], False, "supports"),
    ([0.1, 0.4], [0.4, 0.7], False, "cannot settle"),  # a tie at the boundary settles nothing
    (None, [1.0, 2.0], True, "not measured"),
])
def test_verdict(simple, base, lower, expected):
    assert verdict(simple, base, lower_is_claimed=lower) == expected


def record(arch, seed, value, interval, data=None, measure="layer.lambda_max", step=300):
    data_error = None if data is None else {"method": "jackknife", "status": "ok", "value": sum(data) / 2,
                                            "interval": data}
    return {"status": "ok", "value": value, "error": max(value - interval[0], interval[1] - value),
            "error_kind": "probabilistic", "provenance": {"arch": arch, "run_dir": f"runs/{arch}/seed_{seed}",
                                                          "train_seed": seed, "step": step, "measure": measure},
            "payload": {"interval": interval, "data_error": data_error}}


def test_the_range_is_the_hull_of_the_data_intervals_over_seeds():
    records = [record("simplegpt", s, v, [v - 0.01, v + 0.02], [v - 1, v + 0.5]) for s, v in enumerate((3, 5, 4))]
    records.append(record("simplegpt", 0, 99.0, [98.0, 100.0], step=100))  # an earlier checkpoint: left out
    s = measure_summary(records, "layer.lambda_max", "simplegpt")
    assert s["range"] == [2.0, 5.5] and s["range_from"] == "data"
    assert s["value"] == {"mean": 4.0, "min": 3.0, "max": 5.0, "n": 3}
    without = [record("llama2", s, v, [v - 0.01, v + 0.02]) for s, v in enumerate((3, 5))]
    assert measure_summary(without, "layer.lambda_max", "llama2")["range"] == [2.99, 5.02]


def entry(loss, lr_per_seed, layer_range, c_over_gn=()):
    return {"final_loss": {"mean": sum(loss) / len(loss), "min": min(loss), "max": max(loss), "n": len(loss)},
            "stable_lr": {"all_seeds": min(lr_per_seed), "at_edge": False,
                          "per_seed": {str(i): v for i, v in enumerate(lr_per_seed)}},
            "layer.lambda_max": {"range": layer_range}, "elementwise.lambda_max": None, "adam.sharpness": None,
            "activation": {"activation.scale_free": {}},
            "bound": {"simplenorm_layers": len(c_over_gn), "gn_dominant": sum(c < 1 for c in c_over_gn)}
            if c_over_gn else None}


def test_claims_per_pair():
    found = claims({"simplegpt": entry([1.7, 1.8], [1.0, 0.7], [0.1, 0.2], (0.2, 0.5, 0.9)),
                    "llama2": entry([2.1, 2.2], [0.4, 0.4], [0.15, 0.3]),
                    "llama2_qknorm": entry([1.75, 2.0], [0.7, 1.0], [0.3, 0.4]),
                    "simplegpt_gpt2": entry([2.5, 2.6], [0.4, 0.4], [0.1, 0.2], (0.5, 1.2)),
                    "gpt2": entry([2.4, 2.45], [0.4, 0.7], [0.3, 0.5])})
    assert found["lower loss"] == {"simplegpt vs llama2": "supports", "simplegpt vs llama2_qknorm": "cannot settle",
                                   "simplegpt_gpt2 vs gpt2": "contradicts"}
    assert found["larger stable lr"] == {"simplegpt vs llama2": "supports",
                                         "simplegpt vs llama2_qknorm": "cannot settle",
                                         "simplegpt_gpt2 vs gpt2": "cannot settle"}
    assert found["lower layer-scaled lambda_max"]["simplegpt vs llama2_qknorm"] == "supports"
    assert found["lower layer-scaled lambda_max"]["simplegpt vs llama2"] == "cannot settle"
    assert found["GN dominance"] == {"simplegpt": "supports", "simplegpt_gpt2": "cannot settle"}


def test_compact_keeps_what_the_figures_read():
    full = record("gpt2", 1, 2.0, [1.9, 2.1], [1.5, 2.5])
    full["provenance"].update(run_dir="/somewhere/exp/runs/gpt2/seed_1", checkpoint="/x", model={"dim": 16})
    full["payload"].update(ritz_values=[1.0] * 50, interval=[1.9000000001, 2.1])
    small = compact(full, root=Path("/somewhere/exp"))
    assert small["provenance"]["run_dir"] == "runs/gpt2/seed_1" and "model" not in small["provenance"]
    assert "ritz_values" not in small["payload"] and small["payload"]["interval"] == [1.9, 2.1]
    assert compact(small) == small
