"""Text data: a char-level tokenizer, the embedded corpus, train/held-out splits, batch samplers.

Conventions: a corpus is one UTF-8 string; the tokenizer's vocabulary is its sorted distinct characters
(id = position in that string). The token stream is split contiguously: the first (1 - heldout_fraction) of
it trains, the rest is held out. A batch is (idx, targets), both int64 (B, T), targets = idx shifted by one.
Training batches are drawn from a generator seeded by (seed, step), so a resumed run draws the same batches;
measurement batches come from the held-out split, fixed by their own seed.
"""

import dataclasses
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

from hessian_tools.errors import UserError
from hessian_tools.footprint import batch_bytes, require_memory
from hessian_tools.paths import input_file, os_error
from hessian_tools.schema import MAX_SEED, Float, Int, Nullable, Str, check_fields

EMBEDDED = "embedded pydoc_data.topics corpus"


@dataclass(frozen=True)
class CharTokenizer:
    """Characters <-> ids; `chars` is the sorted vocabulary. JSON form: {"kind": "char", "chars": ...}."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def _index(self) -> dict:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        """int64 tensor of ids, shape (len(text),)."""
        index = self._index
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.int64)
        except KeyError as exc:
            raise UserError(f"character {exc.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        if data.get("kind") != "char" or not isinstance(data.get("chars"), str):
            raise UserError(f"unsupported tokenizer record {str(data)[:80]!r}; expected a char tokenizer")
        return cls(data["chars"])


def load_corpus(path=None) -> str:
    """The text of a UTF-8 file, or (path None) CPython's pydoc topics joined in sorted-key order (~465 KB)."""
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if not os.path.lexists(path):
        raise UserError(f"{path}: no such data file; pass --data with an existing UTF-8 text file")
    try:
        text = input_file(path, "data file").read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); pass a UTF-8 file") from None
    except OSError as exc:
        raise os_error(exc, path, "read the data file") from None
    if not text:
        raise UserError(f"{path}: the data file is empty; pass a file with text in it")
    return text


@dataclass(frozen=True)
class DataSpec:
    """Which text and how it is split; recorded in checkpoints. path None = the embedded corpus.

    seed seeds the training batch sampler (measurement batches take their own seed).
    """

    path: str | None = None
    heldout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        check_fields(self, DATA_FIELDS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        return EMBEDDED if self.path is None else self.path


DATA_FIELDS = {"path": Nullable(Str(nonempty=True)), "seed": Int(low=0, high=MAX_SEED),
               "heldout_fraction": Float(low=0, high=1, low_open=True, high_open=True)}


@dataclass(frozen=True)
class Splits:
    tokenizer: CharTokenizer
    train: torch.Tensor  # int64 (N_train,)
    heldout: torch.Tensor  # int64 (N_heldout,)


@functools.lru_cache(maxsize=4)
def _splits(spec: DataSpec, chars: str | None) -> Splits:
    text = load_corpus(spec.path)
    tokenizer = CharTokenizer(chars) if chars is not None else CharTokenizer.from_text(text)
    try:
        tokens = tokenizer.encode(text)
    except UserError as exc:
        raise UserError(f"{spec.name}: {exc}; the data differs from the text the tokenizer was built on") from None
    n_heldout = max(1, round(len(tokens) * spec.heldout_fraction))
    return Splits(tokenizer, tokens[: len(tokens) - n_heldout], tokens[len(tokens) - n_heldout :])


def load_splits(spec: DataSpec, tokenizer: CharTokenizer | None = None) -> Splits:
    """Tokenize the spec's text (with `tokenizer`, or one built from the text) and split it contiguously."""
    return _splits(spec, None if tokenizer is None else tokenizer.chars)


def _windows(tokens, starts: torch.Tensor, seq_len: int):
    """(idx, targets) int64 (len(starts), seq_len) windows of a 1-D torch tensor or numpy array (e.g. a memmap)."""
    offsets = starts[:, None] + torch.arange(seq_len + 1)
    if isinstance(tokens, np.ndarray):
        chunk = torch.from_numpy(np.asarray(tokens[offsets.numpy()], dtype=np.int64))
    else:
        chunk = tokens[offsets]
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def check_length(tokens, seq_len: int, what: str, name: str):
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"{name}: the {what} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a longer text or a smaller --seq-len"
        )


def step_seed(seed: int, step: int) -> int:
    """A generator seed derived from (seed, step) alone, so any step's draws can be reproduced."""
    return (seed * 1_000_003 + step) % (2**63)


def training_batch(splits: Splits, spec: DataSpec, step: int, batch_size: int, seq_len: int):
    """The batch of training step `step` (0-based): uniform random windows of the train split."""
    check_length(splits.train, seq_len, "training split", spec.name)
    gen = torch.Generator().manual_seed(step_seed(spec.seed, step))
    starts = torch.randint(0, len(splits.train) - seq_len, (batch_size,), generator=gen)
    return _windows(splits.train, starts, seq_len)


def fixed_windows(tokens, n_batches: int, batch_size: int, seq_len: int, seed: int, what: str, name: str) -> list:
    """n_batches batches [(idx, targets)] of int64 (batch_size, seq_len) windows of the 1-D token stream `tokens`
    (torch tensor or numpy array), their starts uniform and fixed by `seed`."""
    for field, value in (("n_batches", n_batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{field} must be a positive integer, got {value!r}")
    check_length(tokens, seq_len, what, name)
    require_memory({"batches": batch_bytes(n_batches, batch_size, seq_len)},
                   f"{n_batches} batches of {batch_size} x {seq_len} tokens")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n_batches, batch_size), generator=gen)
    return [_windows(tokens, row, seq_len) for row in starts]


def measurement_batches(spec: DataSpec, n_batches: int, batch_size: int, seq_len: int, seed: int = 0,
                        tokenizer: CharTokenizer | None = None) -> list:
    """n_batches fixed batches [(idx, targets)] of int64 (batch_size, seq_len) from the held-out split.

    The windows depend only on (spec, n_batches, batch_size, seq_len, seed), so every checkpoint of a run is
    measured on the same tokens.
    """
    heldout = load_splits(spec, tokenizer).heldout
    return fixed_windows(heldout, n_batches, batch_size, seq_len, seed, "held-out split", spec.name)
