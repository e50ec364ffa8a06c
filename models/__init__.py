"""The GPT family studied by hessian-tools: configs, variants, norms, data, training and checkpoints."""

from models.config import ARCHS, GPTConfig
from models.gpt import build_model, math_attention, next_token_loss

__all__ = ["ARCHS", "GPTConfig", "build_model", "math_attention", "next_token_loss"]
