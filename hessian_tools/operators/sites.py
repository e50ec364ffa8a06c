"""Activation sites: `MODULE:out` (a module's output) and `MODULE:in` (its first positional input).

`SiteProbe` hooks the site of a model so that a perturbation `delta` (the activation's shape) is added to
the activation; differentiating the loss w.r.t. delta at 0 differentiates it w.r.t. the activation.
"""

import torch
from torch import nn

from hessian_tools.errors import UserError


def list_sites(model: nn.Module) -> list[str]:
    """The valid site names of `model` (see models.sites.list_sites)."""
    from models.sites import list_sites as names

    return names(model)


def resolve_site(model: nn.Module, site: str) -> tuple[nn.Module, str]:
    """(module, "in" | "out") for a site name; UserError listing the valid names if it is unknown."""
    valid = list_sites(model)
    if not isinstance(site, str) or site not in valid:
        shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
        raise UserError(f"unknown site {site!r}; valid sites: {shown}")
    name, end = site.rsplit(":", 1)
    return model.get_submodule(name), end


class SiteProbe:
    """Adds `delta` to the activation at `site` during `run`; on plain passes (no delta) records the activation's
    shape and accumulates its max |entry| (`scale`) and its sum of squares (`sum_squares`, in float64)."""

    def __init__(self, model: nn.Module, site: str):
        self.site = site
        self.module, self.end = resolve_site(model, site)
        self.delta, self.calls, self.shape, self.scale, self.sum_squares = None, 0, None, 0.0, 0.0

    def _perturb(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise UserError(f"site {self.site} carries {type(x).__name__}, not a float tensor; choose another site")
        self.calls += 1
        if self.calls > 1:
            raise UserError(f"the module of site {self.site} runs more than once per forward pass; choose another site")
        if self.delta is not None:
            return x + self.delta
        self.shape = tuple(x.shape)  # recorded on plain forward passes only (not under a transform)
        self.scale = max(self.scale, float(x.detach().abs().max())) if x.numel() else self.scale
        self.sum_squares += float(x.detach().to(torch.float64).pow(2).sum())
        return x

    def _out(self, module, args, output):
        return self._perturb(output)

    def _in(self, module, args):
        if not args:
            raise UserError(f"the module of site {self.site} takes no positional input; use its :out site")
        return (self._perturb(args[0]),) + tuple(args[1:])

    def run(self, fn, model, batch, delta=None):
        """fn(model, batch) with `delta` added at the site; checks the site is reached exactly once.

        The hook lives only for the duration of the call, so the model never keeps it.
        """
        if self.end == "out":
            handle = self.module.register_forward_hook(self._out)
        else:
            handle = self.module.register_forward_pre_hook(self._in)
        self.delta, self.calls = delta, 0
        try:
            value = fn(model, batch)
        finally:
            self.delta = None
            handle.remove()
        if self.calls == 0:
            raise UserError(f"site {self.site} is not reached by the forward pass; choose another site")
        return value
