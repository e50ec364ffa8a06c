"""Curvature operators (Hessian-vector products in parameter and activation space, Gauss-Newton) and their guard."""

from hessian_tools.operators.activation_hessian import ActivationHessian
from hessian_tools.operators.base import CurvatureOperator
from hessian_tools.operators.gauss_newton import GaussNewton
from hessian_tools.operators.hvp import MODES
from hessian_tools.operators.param_hessian import ParamHessian
from hessian_tools.operators.self_check import self_check
from hessian_tools.operators.sites import list_sites

__all__ = ["ActivationHessian", "CurvatureOperator", "GaussNewton", "MODES", "ParamHessian", "list_sites", "self_check"]
