"""nanoGPT checkpoints: ckpt.pt = {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}.

Its optimizer state dict numbers the parameters by their place in the param groups. nanoGPT's
configure_optimizers (since May 2023) puts named_parameters() with dim >= 2 in the decay group and the rest
in the no-decay group, both in named_parameters() order; before, the decay group was the sorted names of the
Linear weights and the no-decay group the sorted names of the rest (biases, norms, both embeddings). The
named_parameters() order is the model state dict's key order without buffers and without the tied
`lm_head.weight`. The group sizes tell the two layouts apart, and every state tensor's shape is checked.
"""

import torch

from hessian_tools.errors import UserError
from hessian_tools.schema import check
from models.checkpoint.state_dict import clean_name
from models.foreign_names import DROPPED_SUFFIXES, NANOGPT_MODEL_ARGS
from models.schemas import NANOGPT

EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")
ADAM_FIELDS = ("lr", "betas", "eps", "weight_decay")


def is_nanogpt(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("model_args"), dict)


def parameter_names(model_state: dict) -> list[str]:
    """named_parameters() of the nanoGPT model that saved `model_state`, in order (cleaned names)."""
    names, tied = [], model_state.get("transformer.wte.weight", model_state.get("_orig_mod.transformer.wte.weight"))
    for key, value in model_state.items():
        if not torch.is_tensor(value) or key.endswith(DROPPED_SUFFIXES):
            continue
        if clean_name(key) == "lm_head.weight" and tied is not None and value.data_ptr() == tied.data_ptr():
            continue
        names.append(clean_name(key))
    return names


def _layouts(names: list[str], shapes: dict) -> dict:
    two_d = [n for n in names if len(shapes[n]) >= 2]
    rest = [n for n in names if len(shapes[n]) < 2]
    old_decay = sorted(n for n in two_d if n not in EMBEDDINGS)
    return {"since May 2023": [two_d, rest],
            "before May 2023": [old_decay, sorted(set(names) - set(old_decay))]}


def map_optimizer(optimizer: dict, model_state: dict, file):
    """({param name: {"exp_avg", "exp_avg_sq", "step"}}, {param name: {lr, betas, eps, weight_decay}}) from
    nanoGPT's saved AdamW state dict."""
    try:
        groups, state = optimizer["param_groups"], optimizer["state"]
        sizes = [len(g["params"]) for g in groups]
    except (KeyError, TypeError) as exc:
        raise UserError(f"{file}: its 'optimizer' entry is not a torch optimizer state dict ({exc})") from None
    names = parameter_names(model_state)
    shapes = {clean_name(k): tuple(v.shape) for k, v in model_state.items() if torch.is_tensor(v)}
    for layout, order in _layouts(names, shapes).items():
        if [len(o) for o in order] != sizes:
            continue
        index = {i: (name, g) for g, names_g in zip(groups, order) for i, name in zip(g["params"], names_g)}
        moments, settings = {}, {}
        for i, fields in state.items():
            name, group = index.get(i, (None, None))
            if name is None or any(torch.is_tensor(v) and v.dim() and tuple(v.shape) != shapes[name]
                                   for v in fields.values()):
                break
            moments[name] = dict(fields)
            settings[name] = {k: group[k] for k in ADAM_FIELDS if k in group}
        else:
            return moments, settings
    raise UserError(f"{file}: its optimizer state matches neither of nanoGPT's parameter-group layouts "
                    f"(group sizes {sizes} for {len(names)} parameters); it cannot be mapped to parameter names")


def read_nanogpt(obj: dict, file):
    """(raw model state, recorded settings, meta, optimizer state or None, Adam settings or None)."""
    obj = check(obj, NANOGPT, str(file))
    args = obj["model_args"]
    recorded = {NANOGPT_MODEL_ARGS[k]: v for k, v in args.items() if k in NANOGPT_MODEL_ARGS}
    meta = {"format": "nanogpt", "model_args": args}
    if "learning_rate" in obj.get("config", {}):
        meta["learning_rate"] = float(obj["config"]["learning_rate"])  # train.py's peak lr
    if "iter_num" in obj:
        meta["step"] = obj["iter_num"]
    moments = settings = None
    if isinstance(obj.get("optimizer"), dict):
        moments, settings = map_optimizer(obj["optimizer"], obj["model"], file)
    return obj["model"], recorded, meta, moments or None, settings or None
