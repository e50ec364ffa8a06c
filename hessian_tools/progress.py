"""Progress of an estimator, counted in Hessian-vector products: a pass-through operator that ticks a tqdm bar.

Any estimator takes `ProgressOperator(op, bar)` in place of `op`: products, shape, settings and the HVP count
are the wrapped operator's, so the estimators need no hook of their own.
"""

import sys

from tqdm import tqdm


def hvp_bar(desc: str, total: int | None = None, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr counting HVPs (total None: a running count)."""
    return tqdm(total=total, desc=desc, unit="HVP", file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)


class ProgressOperator:
    """Forwards every attribute to `op`; `matvec` advances `bar` by 1, `matmat` by its number of columns."""

    def __init__(self, op, bar: tqdm):
        self._op, self._bar = op, bar

    def __getattr__(self, name):
        return getattr(self._op, name)

    def matvec(self, v):
        out = self._op.matvec(v)
        self._bar.update(1)
        return out

    def matmat(self, V):
        out = self._op.matmat(V)
        self._bar.update(V.shape[1])
        return out
