"""Regenerate every figure by executing the notebooks in notebooks/ with papermill.

The experiment (hessian_tools.demo.Experiment at the chosen scale) is prepared once first, so the notebooks
only read and plot; each executed notebook is written to a temporary directory (or `executed`), and the
figures to `out`. The kernel is "python3" (ipykernel's spec; jupyter_client launches it with the running
interpreter, so the notebooks import this same installation).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from hessian_tools.errors import UserError

KERNEL = "python3"


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


def render(scale: str = "small", out="figures", root=None, jobs: int = 0, archs=None, notebook_path=None,
           executed=None, log=None) -> dict:
    """Prepare the experiment, execute every notebook, return {"figures", "notebooks", "wall_time_s"}."""
    from hessian_tools.demo import Experiment

    log = log or sys.stderr
    start = time.perf_counter()
    found = notebooks(notebook_path)
    exp = Experiment(scale, root, jobs=jobs, archs=archs, log=log)
    exp.prepare()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parameters = {"scale": scale, "root": str(Path(exp.root).resolve()), "out": str(out), "jobs": jobs,
                  "archs": list(exp.archs)}
    with tempfile.TemporaryDirectory(prefix="hessian-tools-notebooks-") as tmp:
        executed = Path(executed) if executed is not None else Path(tmp)
        executed.mkdir(parents=True, exist_ok=True)
        ran = []
        for nb in found:
            t0 = time.perf_counter()
            ran.append(execute(nb, parameters, executed))
            print(f"[{time.strftime('%H:%M:%S')}] executed {nb.name} ({time.perf_counter() - t0:.0f} s)", file=log)
    figures = sorted(p for p in out.iterdir() if p.suffix in (".png", ".pdf"))
    return {"figures": [str(p) for p in figures], "notebooks": [str(p) for p in ran],
            "wall_time_s": time.perf_counter() - start}
