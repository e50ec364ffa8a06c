"""Spectral estimators on any symmetric operator with shape, matvec, matmat, hvp_count, device and settings.

Each returns a hessian_tools.records.Estimate. Krylov vectors and tridiagonal matrices are float64.
Data error bars (`jackknife`, `sample_size_curve`) repeat any of them on groups of batches.
"""

from hessian_tools.estimators.data_error import jackknife, sample_size_curve
from hessian_tools.estimators.lanczos import lanczos, spectral_norm
from hessian_tools.estimators.power import power_iteration
from hessian_tools.estimators.slq import slq_density
from hessian_tools.estimators.trace import hutchinson_trace, hutchpp_trace, xtrace_trace

__all__ = ["hutchinson_trace", "hutchpp_trace", "jackknife", "lanczos", "power_iteration",
           "sample_size_curve", "slq_density", "spectral_norm", "xtrace_trace"]
