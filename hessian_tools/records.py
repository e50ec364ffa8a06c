"""The one result type of every estimator: a frozen record that serialises to one JSON line.

A record holds the estimate (`value`), its error and the kind of that error, whether the solver converged,
the cost (HVP count, wall time), the settings that produced it, the provenance filled in by the caller, and
a method-specific `payload` (eigenvalues, residuals, bounds, Ritz nodes and weights, grid and density, ...).
Eigenvectors, when asked for, ride along in `vectors` (a tensor, never serialised).

A failure is a `status` other than "ok" and a null value, never a NaN: non-finite floats become null in
`to_dict()`, and a record built with a non-finite value or error gets status "non-finite".
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

ERROR_KINDS = ("certified", "probabilistic", "measured", "residual-bound", "estimate", "standard-error",
               "jackknife", "none")


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(obj: Any) -> tuple[Any, bool]:
    """JSON-safe copy of `obj` (floats, ints, str, bool, None, lists, dicts); True if a non-finite was nulled."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj, False
    if isinstance(obj, int):
        return obj, False
    if isinstance(obj, float):
        return (obj, False) if math.isfinite(obj) else (None, True)
    if isinstance(obj, dict):
        out, bad = {}, False
        for key, val in obj.items():
            out[str(key)], b = _clean(val)
            bad |= b
        return out, bad
    if isinstance(obj, (list, tuple)):
        items = [_clean(v) for v in obj]
        return [v for v, _ in items], any(b for _, b in items)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _clean(obj.tolist())
    return str(obj), False


@dataclass(frozen=True)
class Estimate:
    """One estimate of one quantity; see the module docstring for the fields' meaning.

    `error_kind` says what `error` is. value +- error (|value| +- error for a magnitude such as lambda_absmax)
    always contains payload["interval"] where one is given:
    "certified"       the quantity lies within it, certain given the arithmetic (rounding floor included):
                      the Krylov recurrence's rounding is bounded by 10 m eps ||T|| (estimators/krylov.py), and
                      a float64 operator's products are taken as exact to that floor (their own rounding is not
                      measured; a float32 operator's is, see "measured");
    "probabilistic"   one side certified (payload["certified_side"]), the other fails with probability at most
                      payload["failure_probability"] over the estimator's random start;
    "measured"        as either of those, but resting on a measured bound of the operator's own rounding
                      (payload["rounding"], e.g. float32 products): not certified;
    "residual-bound"  some eigenvalue (not necessarily the named one) lies within it: certified;
    "estimate"        no guarantee (e.g. Kato-Temple with an estimated gap, unmeasured float32 rounding);
    "standard-error"  Monte-Carlo, one sigma; "jackknife": delete-one-group jackknife standard error of a bias-corrected
                      estimate (payload interval and level, see estimators/data_error.py); "none": no error (failed records).
    """

    quantity: str
    value: float | None
    error: float | None
    error_kind: str
    converged: bool
    hvp_count: int
    wall_time_s: float
    settings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    payload: dict = field(default_factory=dict)
    status: str = "ok"
    vectors: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.error_kind not in ERROR_KINDS:
            raise ValueError(f"error_kind {self.error_kind!r} is not one of {ERROR_KINDS}")
        value, error = _finite_or_none(self.value), _finite_or_none(self.error)
        if (value is None and self.value is not None) or (error is None and self.error is not None):
            if self.status == "ok":
                object.__setattr__(self, "status", "non-finite")
            object.__setattr__(self, "converged", False)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "error", error)

    def with_provenance(self, **provenance) -> "Estimate":
        """A copy with `provenance` updated (run, step, arch, version, batches, ...)."""
        return dataclasses.replace(self, provenance={**self.provenance, **provenance})

    def to_dict(self) -> dict:
        """JSON-safe dict (without `vectors`); a nulled non-finite entry turns status "ok" into "non-finite"."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "vectors"}
        out, bad = _clean(raw)
        if bad and out["status"] == "ok":
            out["status"] = "non-finite"
        return out

    def to_json(self) -> str:
        """One line of JSON (no NaN or Infinity)."""
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "Estimate":
        names = {f.name for f in dataclasses.fields(cls)} - {"vectors"}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, line: str) -> "Estimate":
        return cls.from_dict(json.loads(line))
