"""hessian-tools: Hessian-vector products and certified spectral estimates for GPT models.

Importing this package is cheap; the operators and estimators are imported on first use.
"""

__version__ = "0.1.0"

from hessian_tools.errors import UserError

__all__ = ["UserError", "__version__"]
