"""Spectral estimators on any symmetric operator with shape, matvec, matmat, hvp_count, device and settings.

Each returns a hessian_tools.records.Estimate. Krylov vectors and tridiagonal matrices are float64.
"""

from hessian_tools.estimators.bootstrap import data_spread
from hessian_tools.estimators.lanczos import lanczos, spectral_norm
from hessian_tools.estimators.power import power_iteration
from hessian_tools.estimators.slq import slq_density
from hessian_tools.estimators.trace import hutchinson_trace, hutchpp_trace

__all__ = ["data_spread", "hutchinson_trace", "hutchpp_trace", "lanczos", "power_iteration", "slq_density",
           "spectral_norm"]
