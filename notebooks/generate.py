"""Writes the figure notebooks (run `python notebooks/generate.py`; commit the .ipynb files it writes).

Each notebook has one cell tagged "parameters" (papermill) and calls the package: hessian_tools.demo for the
experiment (run at `scale` in `root` when no `results` file is given, reusing whatever is done) and
hessian_tools.plotting for the figure, written to `out` as PNG and PDF.
"""

from pathlib import Path

import nbformat

PARAMETERS = '''# scale: experiment size when no results are given, one of tiny, small, full (hessian_tools.demo.SCALES)
scale = "small"
# root: experiment directory holding runs, lr sweep and results; None means demo_runs/SCALE
root = None
# results: a sweep results file (hessian-tools sweep --out) to plot instead of the experiment's own
results = None
# out: where the PNG and PDF files go
out = "figures"
# jobs: worker processes for training and sweeping; 0 means up to 2
jobs = 0
# archs: the architectures to compare; None means all five
archs = None'''

SETUP = '''from IPython.display import Image

from hessian_tools import plotting
from hessian_tools.demo import Experiment, thresholds
from hessian_tools.results_io import read_records

exp = Experiment(scale, root, jobs=jobs, archs=archs)
if results is None:
    exp.prepare(lr_sweep={lr_sweep})
    records = exp.records()
else:
    records = read_records(results)'''

NOTEBOOKS = {
    "01_top_eigenvalue": (
        "# Top Hessian eigenvalue over training\n\nThe largest eigenvalue and the spectral norm of the parameter-"
        "space Hessian of the held-out loss at every checkpoint, SimpleGPT against `llama2`, `llama2_qknorm`, "
        "`gpt2` (and `simplegpt_gpt2` against `gpt2`). Error bars: Lanczos residual bound and the standard error "
        "over disjoint batch groups.",
        "paths = plotting.top_eigenvalue(records, out)",
        False,
    ),
    "02_activation_norms": (
        "# Activation-space Hessian norms per layer and site\n\nThe spectral norm of the Hessian with respect to "
        "the attention input, the FFN input and the block output of every layer, over training.",
        "paths = plotting.activation_norms(records, out)",
        False,
    ),
    "03_bound_tightness": (
        "# The SimpleNorm bound against the measured ||H_xx||\n\nFor every SimpleNorm layer (and every block "
        "linear map of the baselines, with the plain bound ||W||^2 ||H_yy||) at the last checkpoint: measured "
        "against bound, the tightness bound / measured, and ||C|| / ||GN|| (theory/verify.py).",
        "paths = plotting.bound_tightness(records, out)",
        False,
    ),
    "04_lr_sweep": (
        "# Learning-rate sweep\n\nLoss curves of short runs over learning rates, and the largest stable rate per "
        "architecture beside 2 / lambda_max and Adam's threshold 38 / (preconditioned sharpness) at the end of "
        "the main runs.",
        "lr_record = exp.lr_sweep()\n"
        "paths = plotting.lr_sweep(lr_record, exp.lr_curves(lr_record), thresholds(records), out)",
        True,
    ),
    "05_density": (
        "# Hessian eigenvalue densities\n\nStochastic Lanczos quadrature densities of the parameter-space "
        "Hessian at the end of training, on the same grid and Gaussian width for every architecture.",
        "paths = plotting.densities(records, out)",
        False,
    ),
    "06_activation_rms": (
        "# Activation RMS over training\n\nThe RMS of the residual stream after each block, from the training "
        "metrics (metrics.jsonl) of the main runs.",
        "paths = plotting.activation_rms(exp.metrics(), out)",
        False,
    ),
    "07_eos": (
        "# Edge of stability\n\nFull-batch gradient descent at constant learning rates on a fixed training subset: "
        "the sharpness lambda_max of the full-batch loss, tracked during training, against 2 / lr (dashed), and "
        "the loss beneath (Cohen et al. 2021, Figure 1), per architecture and seed. Writes eos.json and the eos "
        "section of README.md beside the figure (hessian_tools.eos).",
        "from hessian_tools import eos\n\n"
        "paths = eos.write_outputs(eos.EosExperiment(scale, root, archs, jobs).prepare().summary(), out)",
        False,
    ),
}


def notebook(title: str, figure: str, lr_sweep: bool) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(title), params,
                nbformat.v4.new_code_cell(SETUP.format(lr_sweep=lr_sweep)),
                nbformat.v4.new_code_cell(f"{figure}\nImage(paths[0])")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def main():
    here = Path(__file__).parent
    for name, (title, figure, lr_sweep) in NOTEBOOKS.items():
        nbformat.write(notebook(title, figure, lr_sweep), here / f"{name}.ipynb")


if __name__ == "__main__":
    main()
