"""Writes the figure notebooks (run `python notebooks/generate.py`; commit the .ipynb files it writes).

Each notebook has one cell tagged "parameters" (papermill) and calls the package: it plots `results` (a results
bundle directory written by `hessian-tools figures`, or a sweep results file) or, when none is given, the
experiment of hessian_tools.demo at `scale` in `root` (reusing whatever is done); the figure comes from
hessian_tools.plotting (the edge-of-stability figure from hessian_tools.eos) and goes to `out` as PNG and PDF.
"""

from pathlib import Path

import nbformat

PARAMETERS = '''# results: a results bundle (hessian-tools figures writes OUT/results/) or a sweep results file to plot;
# None means the experiment below
results = None
# scale: experiment size when no results are given, one of tiny, small, full, study (hessian_tools.demo.SCALES)
scale = "small"
# root: experiment directory holding runs, lr sweep and results; None means demo_runs/SCALE
root = None
# out: where the PNG and PDF files go
out = "figures"
# jobs: worker processes for training and sweeping; 0 means up to 2
jobs = 0
# archs: the architectures to compare; None means all five
archs = None
# seeds: training seeds per architecture; None means the scale's
seeds = None'''

SETUP = '''from IPython.display import Image

from hessian_tools import plotting
from hessian_tools.demo import Experiment, results_of
from hessian_tools.results_bundle import read_results

if results is None:
    res = results_of(Experiment(scale, root, jobs=jobs, archs=archs, seeds=seeds), eos={eos})
else:
    res = read_results(results)'''

BARS = ("Bars: the solver interval (thick, around the estimate on all batches) and the data interval (thin, capped: "
        "the jackknife's bias-corrected value and 68 % interval for parameter-space measures, the per-batch 68 % t "
        "interval for activation sites); every training seed drawn, the mean over seeds bold.")

NOTEBOOKS = {
    "01_top_eigenvalue": (
        "# Top Hessian eigenvalue: raw and in comparable coordinates\n\nThe largest eigenvalue of the parameter-"
        "space Hessian of the held-out loss over training, raw (which a function-preserving rescaling of "
        "SimpleNorm weights moves as 1 / c^2) and layer-scaled (S H S, S = rms of each tensor); the sample-size "
        "curve (its drift with the number of batches is the bias); at the last checkpoint the raw value and the "
        "three comparable measures: layer-scaled, elementwise-scaled (diag|w| H diag|w|) and Adam's "
        "preconditioned sharpness lambda_max(P^-1 H) beside 38 / lr. " + BARS,
        "paths = plotting.top_eigenvalue(res, out)",
    ),
    "02_activation_norms": (
        "# Activation-space Hessian norms at equivalent sites\n\nAt the last checkpoint, the spectral norm of "
        "the Hessian with respect to the sites that play the same role in every architecture (block input, "
        "attention input after any pre-norm, FFN input, block output), raw and scale-free (times the site's mean "
        "squared activation), as the mean over batches of each batch's own Hessian. " + BARS,
        "paths = plotting.activation_norms(res, out)",
    ),
    "03_bound_tightness": (
        "# The SimpleNorm bound against the measured ||H_xx||\n\nFor every SimpleNorm layer (and every block "
        "linear map of the baselines, with the plain bound ||W||^2 ||H_yy||) the experiment measured, at the last "
        "checkpoint of each seed measured (the first seed and the query maps at the demo's full scale; every seed "
        "and layer at --scale study): measured against bound, the tightness bound / measured, and ||C|| / ||GN|| (theory/verify.py).",
        "paths = plotting.bound_tightness(res, out)",
    ),
    "04_lr_sweep": (
        "# Learning-rate sweep over seeds\n\nLoss curves of short runs over learning rates, every seed drawn, "
        "and per architecture each seed's largest stable rate and the largest rate stable for every seed, beside "
        "2 / lambda_max and Adam's edge 38 / (preconditioned sharpness) of each seed's main run.",
        "paths = plotting.lr_sweep(res, out)",
    ),
    "05_density": (
        "# Hessian eigenvalue densities\n\nStochastic Lanczos quadrature densities of the parameter-space "
        "Hessian at the end of training, each seed measured (the first at the demo's full scale, every seed at "
        "--scale study), on the same grid and Gaussian width for every architecture.",
        "paths = plotting.densities(res, out)",
    ),
    "06_activation_rms": (
        "# Activation RMS over training\n\nThe RMS of the residual stream after each block, from the training "
        "metrics (metrics.jsonl) of the main runs: the mean over seeds and the band from their min to max.",
        "paths = plotting.activation_rms(res, out)",
    ),
    "07_eos": (
        "# Edge of stability\n\nFull-batch gradient descent at constant learning rates on a fixed training subset: "
        "the sharpness lambda_max of the full-batch loss, tracked during training, against 2 / lr (dashed), and "
        "the loss beneath (Cohen et al. 2021, Figure 1), per architecture and seed (hessian_tools.eos).",
        "from hessian_tools import eos\n\npaths = eos.figure(res.eos, out)",
        True,
    ),
}


def notebook(title: str, figure: str, eos: bool = False) -> nbformat.NotebookNode:
    """The notebook: title, parameters, SETUP (with the edge-of-stability runs when `eos`), the figure cell."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(title), params, nbformat.v4.new_code_cell(SETUP.format(eos=eos)),
                nbformat.v4.new_code_cell(f"{figure}\nImage(paths[0])")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def main():
    here = Path(__file__).parent
    for name, (title, figure, *eos) in NOTEBOOKS.items():
        nbformat.write(notebook(title, figure, *eos), here / f"{name}.ipynb")


if __name__ == "__main__":
    main()
