"""Measurement sites: the named module inputs and outputs at which activation-space Hessians are taken.

Two vocabularies. `list_sites` names every module input and output (`MODULE:in`, `MODULE:out`), for experts.
`role_sites` names, per block, the four sites that play the same role in every architecture of the family:

  block_in   the residual stream entering block i             `{block}:in`
  attn_in    the attention branch's input after any pre-norm:  `layers.i.attention:in` / `transformer.h.i.attn:in`
             the one tensor every q, k and v map reads (the normalized stream for llama2, llama2_qknorm and
             gpt2; the raw residual stream for simplegpt and simplegpt_gpt2, which have no pre-norm)
  ffn_in     the FFN branch's input after any pre-norm:        `layers.i.feed_forward:in` / `transformer.h.i.mlp:in`
             the tensor the gate and up maps (w1 and w3, sn1 and sn3) or c_fc read
  block_out  the residual stream leaving block i              `{block}:out`

Perturbing a branch site (attn_in, ffn_in) moves that branch's input only, not the residual path beside it.
"""

from torch import nn

from hessian_tools.errors import UserError
from models.config import GPT2_FAMILY
from models.config import SITE_ROLES as ROLES

SKIPPED = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.Dropout)
# arch family -> (blocks container, attention branch, FFN branch)
_LAYOUT = {True: ("transformer.h", "attn", "mlp"), False: ("layers", "attention", "feed_forward")}


def list_sites(model: nn.Module) -> list[str]:
    """`NAME:in` and `NAME:out` for every named submodule, in registration order.

    Left out: the root module, containers (ModuleList/ModuleDict/Sequential), dropout, and the inputs of
    embeddings (integer ids, not differentiable).
    """
    sites = []
    for name, module in model.named_modules():
        if not name or isinstance(module, SKIPPED):
            continue
        if not isinstance(module, nn.Embedding):
            sites.append(f"{name}:in")
        sites.append(f"{name}:out")
    return sites


def _layout(model: nn.Module) -> tuple[str, str, str]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "arch"):
        raise UserError(f"site roles are defined for the GPT family (models.gpt), not for {type(model).__name__}; "
                        "name a site instead")
    return _LAYOUT[config.arch in GPT2_FAMILY]


def blocks(model: nn.Module) -> dict:
    """{module name: block} of the residual blocks, in order."""
    container = _layout(model)[0]
    return {f"{container}.{i}": block for i, block in enumerate(model.get_submodule(container))}


def role_sites(model: nn.Module) -> list[dict[str, str]]:
    """[{role: site} for block 0, 1, ...], roles as in ROLES (see the module docstring)."""
    _, attention, ffn = _layout(model)
    return [{"block_in": f"{name}:in", "attn_in": f"{name}.{attention}:in", "ffn_in": f"{name}.{ffn}:in",
             "block_out": f"{name}:out"} for name in blocks(model)]


def role_site(model: nn.Module, role: str, layer: int) -> str:
    """The site of `role` in block `layer` (0-based); UserError naming the valid roles or layers."""
    if role not in ROLES:
        raise UserError(f"unknown site role {role!r}; choose one of {', '.join(ROLES)}")
    per_block = role_sites(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(per_block):
        raise UserError(f"layer {layer!r} is not a block of this model: choose 0 to {len(per_block) - 1}")
    return per_block[layer][role]
