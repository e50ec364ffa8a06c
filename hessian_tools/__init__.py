"""hessian-tools: Hessian-vector products and certified spectral estimates for GPT models.

Importing this package is cheap; the operators and estimators are imported on first use.
"""

__version__ = "0.1.0"

from hessian_tools.errors import UserError

__all__ = ["UserError", "__version__", "open_model", "sites"]


def __getattr__(name):
    """Lazy exports: `hessian_tools.sites(model)` lists a model's activation sites; `hessian_tools.open_model(
    source, tokens=None, tokenizer=None, data=None, job_config=None, device="cpu", **overrides)` opens any
    supported checkpoint (models.checkpoint.open_model)."""
    if name == "sites":
        from hessian_tools.operators.sites import list_sites

        return list_sites
    if name == "open_model":
        from models.checkpoint import open_model

        return open_model
    raise AttributeError(f"module 'hessian_tools' has no attribute {name!r}")
