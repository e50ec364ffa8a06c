"""Activation sites: `MODULE:out` (a module's output) and `MODULE:in` (its first positional input).

`SiteProbe` hooks the site of a model so that a perturbation `delta` (the activation's shape) is added to
the activation; differentiating the loss w.r.t. delta at 0 differentiates it w.r.t. the activation.
A site is usable when its module runs once per forward pass, the activation there is a float tensor and the
logits depend on it; `list_sites` lists only those (third-party modules also return tuples, e.g. Hugging
Face's attention, or read an input only for its dtype, e.g. its rotary embedding).
"""

import torch
from torch import nn

from hessian_tools.errors import UserError


def _names(model: nn.Module) -> list[str]:
    from models.sites import list_sites as names

    return names(model)


def _example(model: nn.Module):
    """A two-token batch for a model that says its vocabulary (Hugging Face's config.vocab_size), else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device)}


def usable_sites(model: nn.Module, batch, names=None) -> list[str]:
    """The sites among `names` (default: every candidate) that one forward and backward pass on `batch` (a tuple
    whose first entry is the input, or a Hugging Face mapping) finds usable: reached once, a float tensor, and
    the logits depend on it (a zero leaf added there gets a gradient)."""
    from hessian_tools.operators.losses import output_logits
    from hessian_tools.operators.spaces import math_path

    names = _names(model) if names is None else names
    calls: dict = {}
    leaves: dict = {}

    def tap(site, value):
        calls[site] = calls.get(site, 0) + 1
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        leaves[site] = torch.zeros_like(value, requires_grad=True)
        return value + leaves[site]

    handles = []
    for name in {site.rsplit(":", 1)[0] for site in names}:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: (tap(f"{name}:in", args[0]), *args[1:]) if args else None))
        handles.append(module.register_forward_hook(lambda m, args, out, name=name: tap(f"{name}:out", out)))
    try:
        with torch.enable_grad(), math_path():
            logits = output_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    sites = list(leaves)
    grads = torch.autograd.grad(logits.sum(), [leaves[s] for s in sites], allow_unused=True) if sites else ()
    reached = {site for site, g in zip(sites, grads) if g is not None}
    return [site for site in names if calls.get(site) == 1 and site in reached]


def list_sites(model: nn.Module, batch=None) -> list[str]:
    """The usable site names of `model` (see models.sites.list_sites for the candidates and the module
    docstring for "usable"). The toolkit's GPTs: all candidates. Another model: those a forward pass on `batch`
    (default: two tokens, for a model with config.vocab_size such as Hugging Face's) finds usable; without a
    batch it can make, every candidate."""
    from models.gpt import LlamaGPT, NanoGPT

    names = _names(model)
    if isinstance(model, (LlamaGPT, NanoGPT)):
        return names
    batch = batch if batch is not None else _example(model)
    if batch is None:
        return names
    was_training = model.training
    model.eval()
    try:
        return usable_sites(model, batch, names)
    finally:
        model.train(was_training)


def resolve_site(model: nn.Module, site: str) -> tuple[nn.Module, str]:
    """(module, "in" | "out") for a site name; UserError listing the valid names if it is unknown."""
    valid = _names(model)
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
