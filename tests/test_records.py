"""The result record: one JSON line, no NaN, round trip."""

import json
import math

import pytest

from hessian_tools.records import Estimate


def make(**kw):
    base = dict(quantity="lambda_max", value=1.5, error=1e-3, error_kind="residual-bound", converged=True,
                hvp_count=12, wall_time_s=0.1, settings={"seed": 0}, payload={"eigenvalues": [1.5]})
    return Estimate(**{**base, **kw})


def test_round_trip_through_one_json_line():
    est = make().with_provenance(run="a", step=10, arch="gpt2", version="0.1.0")
    line = est.to_json()
    assert "\n" not in line
    assert Estimate.from_json(line) == est


def test_non_finite_value_becomes_null_with_status():
    est = make(value=math.nan)
    assert est.value is None and est.status == "non-finite" and not est.converged
    assert json.loads(est.to_json())["value"] is None


def test_non_finite_in_payload_is_nulled_and_flagged():
    d = make(payload={"residuals": [1.0, math.inf]}).to_dict()
    assert d["payload"]["residuals"] == [1.0, None] and d["status"] == "non-finite"


def test_unknown_error_kind_and_fields_are_rejected():
    with pytest.raises(ValueError, match="error_kind"):
        make(error_kind="guess")
    with pytest.raises(ValueError, match="unknown record fields"):
        Estimate.from_dict({**make().to_dict(), "extra": 1})


def test_error_kinds_say_what_they_are():
    """The kinds the estimators emit are accepted; the old unflagged "kato-temple" kind is gone (it is an estimate)."""
    for kind in ("certified", "probabilistic", "measured", "residual-bound", "estimate"):
        est = make(error_kind=kind, payload={"interval": [1.4, 1.6], "failure_probability": 1e-3})
        assert Estimate.from_json(est.to_json()) == est
    with pytest.raises(ValueError, match="error_kind"):
        make(error_kind="kato-temple")
