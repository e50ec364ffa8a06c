"""The figure notebooks: committed clean with one papermill parameters cell, and executed end to end at the tiny
scale through `hessian-tools figures`' own code path, writing every figure as a non-empty PNG and PDF, the compact
results bundle they plot, and the README's numbers section from it."""

import json

import nbformat
import pytest

from hessian_tools.cli import build_parser
from hessian_tools.figures import notebook_dir, notebooks, render

FIGURES = ("top_eigenvalue", "activation_norms", "bound_tightness", "lr_sweep", "density", "activation_rms", "eos")
ARCHS = ("simplegpt", "llama2", "gpt2")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    out, executed = root / "figures", root / "executed"
    out.mkdir()
    (out / "README.md").write_text("# Figures\n\nWritten by hand.\n")
    # the figures command's code path: prepare the experiment once, write its bundle, plot the bundle
    result = render("tiny", out, root, jobs=1, archs=ARCHS, executed=executed)
    assert sorted(p.name for p in (root / "runs").iterdir()) == sorted(ARCHS)
    assert result["readme"] == str(out / "README.md")
    return out, executed, result


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_is_committed_clean_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert "hessian_tools" in "".join(c.source for c in nb.cells)


def test_every_notebook_ran_and_every_figure_was_written(rendered):
    out, executed, result = rendered
    assert len(result["notebooks"]) == len(notebooks()) == len(FIGURES)
    for name in FIGURES:
        for suffix in (".png", ".pdf"):
            path = out / f"{name}{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, path
    for nb_path in result["notebooks"]:
        nb = json.loads(open(nb_path).read())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"]
        assert any("image/png" in o.get("data", {}) for o in outputs)  # the figure shown inline


def test_the_bundle_is_compact_and_the_readme_numbers_come_from_it(rendered, tmp_path):
    from hessian_tools import eos
    from hessian_tools.findings import markdown, readme_section, summarize
    from hessian_tools.results_bundle import FILES, Results

    out, _, result = rendered
    bundle = out / "results"
    assert sorted(p.name for p in bundle.iterdir()) == sorted(FILES) and result["bundle"] == str(bundle)
    results = Results.load(bundle)
    assert {r["provenance"]["run_dir"] for r in results.records} == {f"runs/{a}/seed_0" for a in ARCHS}
    assert sum(p.stat().st_size for p in bundle.iterdir()) < 200_000
    text = (out / "README.md").read_text()
    assert text.startswith("# Figures\n\nWritten by hand.\n")
    assert readme_section(out / "README.md") == markdown(summarize(results))
    # the edge-of-stability runs are part of the bundle, and their section of the README is computed from it
    assert {(r["arch"], r["lr"]) for r in results.eos["runs"]} == {(a, lr) for a in ARCHS for lr in (0.3, 1.0)}
    assert readme_section(out / "README.md", eos.SECTION) == eos.findings(results.eos)
    assert "figures/results/eos.json" in text
    assert "simplegpt vs llama2" in text and "gpt2" in text
    for nb_path in result["notebooks"]:  # every notebook plotted the bundle, not the experiment directory
        assert f"results = \"{bundle}\"" in open(nb_path).read().replace("\\\"", "\"")


def test_notebooks_plot_a_given_results_file(rendered, tmp_path):
    from hessian_tools.figures import execute

    out, executed, _ = rendered
    experiment_root = out.parent
    lines = (experiment_root / "results.jsonl").read_text().splitlines()
    subset = tmp_path / "subset.jsonl"
    subset.write_text("\n".join(line for line in lines if '"params.lambda_max"' in line) + "\n")
    params = {"scale": "tiny", "root": str(tmp_path / "unused"), "results": str(subset), "out": str(tmp_path)}
    execute(notebook_dir() / "01_top_eigenvalue.ipynb", params, tmp_path)
    assert (tmp_path / "top_eigenvalue.png").stat().st_size > 1000
    assert not (tmp_path / "unused").exists()  # nothing trained: the given results were plotted


def test_figures_command_flags():
    args = build_parser().parse_args(["figures", "--scale", "tiny", "--out", "x", "--runs", "r", "--arch", "gpt2"])
    assert (args.scale, args.out, args.runs, args.archs) == ("tiny", "x", "r", ["gpt2"])
