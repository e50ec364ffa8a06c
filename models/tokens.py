"""Token sources for measurement batches: a model is measured on tokens of its own tokenization.

Sources (TokenOptions says which the user picked):
  char       a text (the embedded corpus, or --data TEXT) through a character tokenizer: the run's own, or
             for a foreign checkpoint one built from the text; its held-out split (models.data).
  tokens     --tokens FILE: nanoGPT's uint16 `.bin` memmap (train.bin / val.bin) or a `.npy` integer array,
             a 1-D stream of token ids used whole (pass the held-out file, e.g. val.bin).
  tokenizer  --tokenizer FILE on --data TEXT (default: the embedded corpus): a Hugging Face `tokenizer.json`
             (the `tokenizers` library) or a SentencePiece `.model` (`sentencepiece`). The text is one
             document (the tokenizer's BOS, if it has one, starts it); the held-out split of its ids is used.
A stream is checked against the model's vocabulary (the first id outside [0, vocab) is named with its
position) and described for provenance by its files and their SHA-256.
"""

import functools
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hessian_tools.errors import UserError
from hessian_tools.paths import input_file
from models.data import EMBEDDED, DataSpec, fixed_windows, load_corpus

TOKEN_FLAG, TOKENIZER_FLAG = "--tokens", "--tokenizer"
SCAN_CHUNK = 1 << 24  # tokens per block when hashing / range-checking a token file


@dataclass(frozen=True)
class TokenOptions:
    """The user's token choices: a token file, or a tokenizer file (with `data`, a text file; None = the
    embedded corpus); all None = the character tokenizer."""

    tokens: str | None = None
    tokenizer: str | None = None
    data: str | None = None

    def __post_init__(self):
        if self.tokens is not None and (self.tokenizer is not None or self.data is not None):
            raise UserError(f"{TOKEN_FLAG} FILE already holds token ids: drop {TOKENIZER_FLAG} and --data")


@dataclass(frozen=True, eq=False)
class TokenStream:
    """A 1-D stream of token ids (numpy, possibly a read-only memmap) and what it is made of."""

    ids: np.ndarray
    provenance: dict
    name: str  # the file messages name
    what: str  # which part of the source the windows come from

    @functools.cached_property
    def id_range(self) -> tuple[int, int]:
        """(smallest, largest) id, read block by block ((0, -1) for an empty stream)."""
        if not len(self.ids):
            return 0, -1
        blocks = [np.asarray(self.ids[i:i + SCAN_CHUNK]) for i in range(0, len(self.ids), SCAN_CHUNK)]
        return min(int(b.min()) for b in blocks), max(int(b.max()) for b in blocks)

    def check_vocab(self, vocab_size: int, model: str):
        """UserError naming the first id outside [0, vocab_size) and its position in the stream."""
        lo, hi = self.id_range
        if lo < 0 or hi >= vocab_size:
            first = first_out_of_range(self.ids, vocab_size)
            raise UserError(f"{self.name}: token id {int(self.ids[first])} at position {first} is outside the "
                            f"vocabulary of {model} (size {vocab_size}): these tokens are not the model's; pass "
                            f"the tokens (or {TOKENIZER_FLAG}) it was trained with")

    def batches(self, n_batches: int, batch_size: int, seq_len: int, seed: int) -> list:
        return fixed_windows(self.ids, n_batches, batch_size, seq_len, seed, self.what, self.name)


def first_out_of_range(ids: np.ndarray, vocab_size: int) -> int:
    """Position of the first id < 0 or >= vocab_size (one must exist); reads the stream block by block."""
    for start in range(0, len(ids), SCAN_CHUNK):
        block = np.asarray(ids[start:start + SCAN_CHUNK])
        bad = block >= vocab_size
        if block.dtype.kind == "i":
            bad |= block < 0
        if bad.any():
            return start + int(np.argmax(bad))
    raise AssertionError("no id out of range")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_token_file(path: Path) -> np.ndarray:
    if path.suffix == ".bin":
        size = path.stat().st_size
        if size == 0 or size % 2:
            raise UserError(f"{path}: {size} bytes is not a non-empty whole number of uint16 tokens (nanoGPT's "
                            ".bin format)")
        return np.memmap(path, dtype=np.uint16, mode="r")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise UserError(f"{path}: not a plain .npy array ({str(exc).splitlines()[0][:120]}); save the token ids "
                        "with numpy.save as an integer array") from None
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise UserError(f"{path}: holds {getattr(ids, 'dtype', type(ids).__name__)} values; {TOKEN_FLAG} needs an "
                        "integer array of token ids")
    if ids.ndim != 1 or len(ids) == 0:
        raise UserError(f"{path}: holds an array of shape {ids.shape}; {TOKEN_FLAG} needs a non-empty 1-D stream "
                        "of token ids (save ids.ravel())")
    return ids


@functools.lru_cache(maxsize=4)
def _token_file(path: str, mtime_ns: int, size: int) -> TokenStream:
    file = Path(path)
    try:
        ids = _open_token_file(file)
    except OSError as exc:
        raise UserError(f"{file}: cannot read the token file ({exc.strerror or exc})") from None
    provenance = {"source": "tokens", "path": path, "format": "uint16 .bin" if file.suffix == ".bin"
                  else f"{ids.dtype} .npy", "n_tokens": len(ids), "sha256": sha256_of(file), "split": "whole file"}
    return TokenStream(ids, provenance, path, "token file")


def token_file_stream(path) -> TokenStream:
    """The ids of a nanoGPT `.bin` (uint16) or `.npy` token file, whole."""
    file = Path(path).resolve()
    if file.suffix not in (".bin", ".npy"):
        raise UserError(f"{path}: {TOKEN_FLAG} reads nanoGPT's uint16 .bin files or .npy arrays of token ids, not "
                        f"{file.suffix or 'a file without suffix'} (for a text pass {TOKENIZER_FLAG} FILE --data TEXT)")
    if not file.exists():
        raise UserError(f"{path}: no such token file; pass {TOKEN_FLAG} an existing .bin or .npy file")
    stat = input_file(file, "token file").stat()
    return _token_file(str(file), stat.st_mtime_ns, stat.st_size)


def _library(name: str, path: Path, what: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{path}: reading {what} needs the `{name}` package: pip install {name} (or pip install "
                        "'hessian-tools[tokenizers]')") from None


class _HFTokenizer:
    kind = "huggingface tokenizer.json"

    def __init__(self, path: Path):
        tokenizers = _library("tokenizers", path, "a tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception for malformed files
            raise UserError(f"{path}: not a Hugging Face tokenizer.json ({str(exc).splitlines()[0][:120]})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids


class _SentencePiece:
    kind = "sentencepiece"

    def __init__(self, path: Path):
        self._sp = _library("sentencepiece", path, "a SentencePiece .model").SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0][:100]}); a Llama 3 "
                            "tokenizer.model is a tiktoken file: pass its Hugging Face tokenizer.json") from None

    def encode(self, text: str) -> list[int]:
        bos = self._sp.bos_id()
        return ([bos] if bos >= 0 else []) + self._sp.EncodeAsIds(text)


TOKENIZERS = {".json": _HFTokenizer, ".model": _SentencePiece}


@functools.lru_cache(maxsize=4)
def _tokenized(tokenizer: str, tok_mtime_ns: int, text: str | None, text_mtime_ns: int, heldout: float) -> TokenStream:
    file = Path(tokenizer)
    tok = TOKENIZERS[file.suffix](file)
    corpus = load_corpus(text)
    ids = np.asarray(tok.encode(corpus), dtype=np.int64)
    n_heldout = max(1, round(len(ids) * heldout))
    provenance = {"source": "tokenizer", "tokenizer": tokenizer, "tokenizer_kind": tok.kind,
                  "tokenizer_sha256": sha256_of(file), "text": text or EMBEDDED,
                  "text_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(), "n_tokens": len(ids),
                  "split": f"held-out last {heldout:g}"}
    return TokenStream(ids[len(ids) - n_heldout:], provenance, f"{tokenizer} on {text or EMBEDDED}", "held-out split")


def tokenizer_stream(tokenizer, spec: DataSpec) -> TokenStream:
    """The held-out ids of spec's text (None = the embedded corpus) under a tokenizer file."""
    file = Path(tokenizer).resolve()
    if file.suffix not in TOKENIZERS:
        raise UserError(f"{tokenizer}: {TOKENIZER_FLAG} reads a Hugging Face tokenizer.json or a SentencePiece "
                        f".model, not {file.suffix or 'a file without suffix'}")
    if not file.exists():
        raise UserError(f"{tokenizer}: no such tokenizer file; pass {TOKENIZER_FLAG} an existing file")
    input_file(file, "tokenizer file")
    text = None if spec.path is None else str(Path(spec.path).resolve())
    text_mtime = Path(text).stat().st_mtime_ns if text is not None and Path(text).is_file() else 0
    return _tokenized(str(file), file.stat().st_mtime_ns, text, text_mtime, spec.heldout_fraction)


def char_stream(spec: DataSpec, heldout, vocab: int) -> TokenStream:
    """The held-out split (an int64 torch tensor) of a character-tokenized text, with its provenance."""
    corpus = load_corpus(spec.path)
    provenance = {"source": "char", "text": spec.name,
                  "text_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
                  "vocab": vocab, "n_tokens": len(heldout), "split": f"held-out last {spec.heldout_fraction:g}"}
    return TokenStream(heldout.numpy(), provenance, spec.name, "held-out split")
