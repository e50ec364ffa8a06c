"""The GPT family studied by hessian-tools: configs, variants, norms, data, training and checkpoints.

Importing `models` (or `models.config`) does not import torch; the model classes load on first use.
"""

from models.config import ARCHS, GPTConfig

_LAZY = {"build_model": "models.gpt", "math_attention": "models.gpt", "next_token_loss": "models.gpt"}

__all__ = ["ARCHS", "GPTConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
