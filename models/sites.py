"""Measurement sites: the named module inputs and outputs at which activation-space Hessians are taken."""

from torch import nn

SKIPPED = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.Dropout)


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
