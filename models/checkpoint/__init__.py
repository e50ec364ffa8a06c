"""Checkpoints: the toolkit's own format and every foreign one it opens, behind one loader.

  native.py      the toolkit's format: save, list, read
  files.py       safe readers: safetensors, torch.load(weights_only=True)
  state_dict.py  foreign state dicts: key clean-up, config from shapes and records, the fit check
  nanogpt.py     nanoGPT ckpt.pt: model_args, and the optimizer state mapped to parameter names
  dcp.py         torch.distributed.checkpoint (torchtitan) directories: restricted metadata unpickler
  hf.py          Hugging Face directories: GPT2LMHeadModel, LlamaForCausalLM
  load.py        Checkpoint, open_model, load_checkpoint
"""

from models.checkpoint.load import Checkpoint, load_checkpoint, open_model
from models.checkpoint.native import CKPT_RE, list_checkpoints, save_checkpoint

__all__ = ["CKPT_RE", "Checkpoint", "list_checkpoints", "load_checkpoint", "open_model", "save_checkpoint"]
