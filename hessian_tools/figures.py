"""Regenerate every figure by executing the notebooks in notebooks/ with papermill, and the numbers of the
figures' README from the same results.

`render`: the experiment (hessian_tools.demo.Experiment at the chosen scale, with the edge-of-stability runs of
hessian_tools.eos) is prepared once, its compact results (hessian_tools.results_bundle) written to OUT/results/,
then every notebook plots that bundle and,
where OUT/README.md exists, its numbers section is rewritten from it (hessian_tools.findings). `render_from`
does the last two steps from a bundle already there (the committed figures/results/). Each executed notebook
is written to a temporary directory (or `executed`). The kernel is "python3" (ipykernel's spec; jupyter_client
launches it with the running interpreter, so the notebooks import this same installation).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from hessian_tools.errors import UserError

KERNEL = "python3"
README = "README.md"
BUNDLE = "results"


def notebook_dir() -> Path:
    """notebooks/ of the source tree this package is installed from (an editable install or a clone)."""
    return Path(__file__).resolve().parents[1] / "notebooks"


def notebooks(directory=None) -> list[Path]:
    directory = Path(directory) if directory is not None else notebook_dir()
    found = sorted(directory.glob("*.ipynb"))
    if not found:
        raise UserError(f"{directory}: no notebooks there; run from a clone of the repository or pass --notebooks DIR")
    return found


def execute(notebook: Path, parameters: dict, executed: Path, kernel: str = KERNEL) -> Path:
    """Run one notebook with papermill (parameters injected after its "parameters" cell); the executed copy
    goes to `executed`. A failing cell raises UserError naming the notebook and the error."""
    try:
        import papermill
    except ImportError:
        raise UserError("figures need papermill and ipykernel: pip install -e '.[notebooks]'") from None

    target = executed / notebook.name
    try:
        papermill.execute_notebook(str(notebook), str(target), parameters=parameters, kernel_name=kernel,
                                   cwd=str(executed), progress_bar=False, log_output=False)
    except papermill.PapermillExecutionError as exc:
        raise UserError(f"{notebook.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                        f"(executed copy: {target})") from None
    return target


def render_from(bundle, out="figures", notebook_path=None, executed=None, log=None) -> dict:
    """Execute every notebook on the results bundle `bundle`, and rewrite OUT/README.md's numbers where it
    exists; returns {"figures", "notebooks", "readme", "wall_time_s"}."""
    from hessian_tools.findings import write_readme

    log = log or sys.stderr
    start = time.perf_counter()
    found = notebooks(notebook_path)
    bundle, out = Path(bundle).resolve(), Path(out).resolve()
    if not (bundle / "records.jsonl").is_file():
        raise UserError(f"{bundle}: not a results bundle (no records.jsonl); `hessian-tools figures` writes one")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hessian-tools-notebooks-") as tmp:
        executed = Path(executed) if executed is not None else Path(tmp)
        executed.mkdir(parents=True, exist_ok=True)
        ran = []
        for nb in found:
            t0 = time.perf_counter()
            ran.append(execute(nb, {"results": str(bundle), "out": str(out)}, executed))
            print(f"[{time.strftime('%H:%M:%S')}] executed {nb.name} ({time.perf_counter() - t0:.0f} s)", file=log)
    readme = out / README
    if readme.is_file():
        write_readme(bundle, readme)
    figures = sorted(p for p in out.iterdir() if p.suffix in (".png", ".pdf"))
    return {"figures": [str(p) for p in figures], "notebooks": [str(p) for p in ran],
            "readme": str(readme) if readme.is_file() else None, "wall_time_s": time.perf_counter() - start}


def render(scale: str = "small", out="figures", root=None, jobs: int = 0, archs=None, notebook_path=None,
           executed=None, log=None, seeds=None) -> dict:
    """Prepare the experiment, write its bundle to OUT/results/, then `render_from` it."""
    from hessian_tools.demo import Experiment, results_of

    start = time.perf_counter()
    notebooks(notebook_path)  # no notebooks: fail before the experiment
    exp = Experiment(scale, root, jobs=jobs, archs=archs, seeds=seeds, log=log)
    bundle = Path(out) / BUNDLE
    results_of(exp, eos=True).write(bundle)
    result = render_from(bundle, out, notebook_path, executed, log)
    return {**result, "bundle": str(bundle), "wall_time_s": time.perf_counter() - start}
