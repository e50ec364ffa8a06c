"""The variable x the curvature is taken with respect to, batch by batch.

- `ParamSpace`: x = the selected parameters (one tuple, shared by all batches, `named_parameters()` order);
  the operator is the weighted sum of the batch Hessians.
- `ActivationSpace`: x_b = a perturbation of the full activation of batch b at a site (B x T x d for a GPT);
  the blocks of different batches are disjoint, so the operator is block diagonal over batches.
Flat vectors are the concatenation of the flattened tensors of each block.
"""

import re

import torch
from torch import nn

from hessian_tools.errors import UserError
from hessian_tools.operators.batches import check_loss
from hessian_tools.operators.sites import SiteProbe


def math_path():
    """SDPA's math path: fused attention kernels have no second derivatives."""
    from models.gpt import math_attention

    return math_attention()


def flatten(xs) -> torch.Tensor:
    """A tuple of tensors -> one flat vector."""
    return torch.cat([x.reshape(-1) for x in xs])


def flatten_columns(xs) -> torch.Tensor:
    """A tuple of tensors with a leading column axis k -> (size, k)."""
    return torch.cat([x.reshape(x.shape[0], -1) for x in xs], dim=1).T


def unflatten(v: torch.Tensor, shapes) -> tuple:
    """Inverse of `flatten`; v of shape (size,) or (size, k) (columns come out as a leading axis)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if v.ndim == 1:
        return tuple(p.view(s) for p, s in zip(v.split(sizes), shapes))
    return tuple(p.T.reshape(v.shape[1], *s) for p, s in zip(v.split(sizes), shapes))


def select_params(model: nn.Module, params) -> list[str]:
    """Names of the selected parameters in `named_parameters()` order: all (None), a list of names, or a regex."""
    names = [name for name, _ in model.named_parameters()]
    if params is None:
        return names
    if isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as exc:
            raise UserError(f"--params {params!r} is not a regular expression: {exc}") from None
        chosen = [name for name in names if pattern.search(name)]
    else:
        wanted = list(params)
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise UserError(f"unknown parameters {unknown[:5]}; some valid names: {', '.join(names[:8])}")
        chosen = [name for name in names if name in wanted]
    if not chosen:
        raise UserError(f"no parameter matches {params!r}; some valid names: {', '.join(names[:8])}")
    return chosen


class _Call(nn.Module):
    """Wraps the model so `functional_call` can run any fn(model, batch) with substituted parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, batch):
        return fn(self.model, batch)


class ParamSpace:
    kind = "params"

    def __init__(self, model: nn.Module, n_batches: int, params=None):
        self.model, self.selection = model, params
        self.names = select_params(model, params)
        named = dict(model.named_parameters())
        self.x0 = tuple(named[name] for name in self.names)
        self.shapes = [tuple(x.shape) for x in self.x0]
        self.n = sum(x.numel() for x in self.x0)
        self.blocks = [(0, self.n)] * n_batches
        self.scale = max(float(x.abs().max()) for x in self.x0 if x.numel())
        self._call, self._keys = _Call(model), ["model." + name for name in self.names]

    def check(self, fn, batches) -> list[float]:
        """Loss of every batch at the point; UserError naming the first batch whose loss is not finite."""
        with torch.no_grad(), math_path():
            return [check_loss(fn(self.model, batch), b) for b, batch in enumerate(batches)]

    def point(self, b: int) -> tuple:
        return self.x0

    def block_shapes(self, b: int) -> list:
        return self.shapes

    def function(self, fn, batch):
        """x -> fn(model with the selected parameters set to x, batch)."""

        def f(x):
            with math_path():
                return torch.func.functional_call(self._call, dict(zip(self._keys, x)), (fn, batch))

        return f

    def describe(self) -> dict:
        selection = self.selection
        if selection is not None and not isinstance(selection, str):
            selection = list(selection)
        return {"params": selection, "param_names": self.names, "convention": "flat vector = selected parameters "
                "in named_parameters() order; operator = Hessian of the weighted mean loss over the batches"}


class ActivationSpace:
    kind = "activation"

    def __init__(self, model: nn.Module, n_batches: int, site: str):
        self.model, self.site = model, site
        self.probe = SiteProbe(model, site)
        self.shapes, self.blocks, self.n, self.scale, self.mean_square = [], [], 0, 0.0, 0.0

    def check(self, fn, batches) -> list[float]:
        """Loss of every batch; records each batch's activation shape, the block offsets and `mean_square`, the
        mean of a^2 over every entry of the site's activation in all batches."""
        losses = []
        with torch.no_grad(), math_path():
            for b, batch in enumerate(batches):
                losses.append(check_loss(self.probe.run(fn, self.model, batch), b))
                self.shapes.append(self.probe.shape)
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        offsets = [sum(sizes[:b]) for b in range(len(sizes))]
        self.blocks, self.n, self.scale = list(zip(offsets, sizes)), sum(sizes), self.probe.scale
        self.mean_square = self.probe.sum_squares / max(self.n, 1)
        return losses

    def point(self, b: int) -> tuple:
        return (torch.zeros(self.shapes[b], dtype=self.dtype, device=self.device),)

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def device(self):
        return next(self.model.parameters()).device

    def block_shapes(self, b: int) -> list:
        return [self.shapes[b]]

    def function(self, fn, batch):
        """x = (delta,) -> fn(model with delta added to the activation at the site, batch)."""

        def f(x):
            with math_path():
                return self.probe.run(fn, self.model, batch, x[0])

        return f

    def describe(self) -> dict:
        return {"site": self.site, "activation_shapes": [list(s) for s in self.shapes],
                "activation_mean_square": self.mean_square, "convention":
                "flat vector = the full activation tensor of each batch at the site (e.g. B x T x d), batches "
                "concatenated; operator = Hessian of the weighted mean loss w.r.t. those activations, block "
                "diagonal over batches, batch b's block scaled by its weight w_b"}
