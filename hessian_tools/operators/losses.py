"""The default loss and outputs of the operators, for the toolkit's GPTs and third-party models alike.

Batches come in two conventions:
  tuple    (inputs, ..., targets): model(inputs) gives logits (..., V) aligned with targets (...);
  mapping  Hugging Face's {"input_ids", "labels", "attention_mask", ...}: the model is called with every entry
           but "labels" as keyword arguments, and logits[:, :-1] predict labels[:, 1:] (the shift Hugging Face's
           own loss makes); without "labels" the labels are input_ids, ignored where attention_mask is 0.
Targets equal to IGNORE_INDEX (-100: the cross-entropy default and Hugging Face's label for padding) are not
loss terms. The default loss is the mean cross-entropy over the loss terms of a batch, and a batch weighs its
number of loss terms (`count_loss_terms`; all of a float target's entries), so several batches give the mean
over the loss terms of their union. Model outputs may be a tensor, an object with `.logits` (Hugging Face's
ModelOutput) or a tuple whose first entry is the logits.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from hessian_tools.errors import UserError

IGNORE_INDEX = -100
LABELS = "labels"


def is_mapping(batch) -> bool:
    return isinstance(batch, Mapping)


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: the tensor itself, `.logits`, or the first entry of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UserError(f"the model returned {type(output).__name__}, which holds no logits tensor (a tensor, an object "
                    "with .logits or a tuple starting with the logits); pass loss_fn= (or output_fn=) for this model")


def targets_of(batch) -> torch.Tensor:
    """The targets the logits of `output_logits` are scored against (see the module docstring)."""
    if not is_mapping(batch):
        return batch[-1]
    if LABELS in batch:
        return batch[LABELS][:, 1:]
    if "input_ids" not in batch:
        raise UserError("a mapping batch needs input_ids (and labels, or attention_mask), as Hugging Face's are")
    labels = batch["input_ids"][:, 1:]
    mask = batch.get("attention_mask")
    return labels if mask is None else labels.masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)


def output_logits(model, batch) -> torch.Tensor:
    """Logits aligned with `targets_of(batch)`: model(batch[0]), or model(**inputs) shifted for a mapping."""
    if not is_mapping(batch):
        return logits_of(model(batch[0]))
    inputs = {k: v for k, v in batch.items() if k != LABELS}
    return logits_of(model(**inputs))[:, :-1]


def cross_entropy(logits: torch.Tensor, batch) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against the batch's targets (...), ignoring IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, -2), targets_of(batch).flatten(), ignore_index=IGNORE_INDEX)


def mean_cross_entropy(model, batch) -> torch.Tensor:
    """The default loss: mean next-token cross-entropy over the batch's loss terms."""
    return cross_entropy(output_logits(model, batch), batch)


def count_loss_terms(batch) -> int:
    """Loss terms of a batch: integer targets other than IGNORE_INDEX, or every entry of float targets."""
    targets = targets_of(batch)
    if not isinstance(targets, torch.Tensor):
        raise UserError(f"the batch's targets are a {type(targets).__name__}, not a tensor")
    if targets.is_floating_point() or targets.is_complex():
        return targets.numel()
    return int((targets != IGNORE_INDEX).sum())
