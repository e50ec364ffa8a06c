"""Measurement tokens in the model's own tokenization: nanoGPT .bin and .npy token files, a Hugging Face
tokenizer.json and a SentencePiece model (both trained here on a small text), the refusal of a foreign
checkpoint without them, out-of-range ids, and the token source in every record's provenance."""

import hashlib
import json

import numpy as np
import pytest
import torch

from hessian_tools.cli import main
from hessian_tools.errors import UserError
from models.checkpoint import open_model
from models.config import GPTConfig
from models.data import load_corpus
from models.gpt import build_model

VOCAB, SEQ = 50, 8


@pytest.fixture(scope="module")
def nanogpt_ckpt(tmp_path_factory):
    """A nanoGPT ckpt.pt (gpt2, vocab 50): not the embedded corpus's 103 characters."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(arch="gpt2", vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, seq_len=SEQ))
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=SEQ, bias=True, vocab_size=VOCAB, dropout=0.0)
    path = tmp_path_factory.mktemp("nano") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 10}, path)
    return path


def write_bin(path, ids):
    """nanoGPT's prepare.py: a uint16 memmap written in place."""
    arr = np.memmap(path, dtype=np.uint16, mode="w+", shape=(len(ids),))
    arr[:] = ids
    arr.flush()
    return path


def random_ids(n, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)


def assert_windows_of(batches, stream):
    """Every row is a contiguous window of the stream, and targets are the next tokens."""
    stream = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    windows = stream.unfold(0, SEQ + 1, 1)
    for idx, targets in batches:
        assert idx.dtype == torch.int64 and idx.shape == (2, SEQ)
        for row, target in zip(idx, targets):
            assert (windows == torch.cat([row, target[-1:]])).all(dim=1).any()
            assert torch.equal(row[1:], target[:-1])


def test_bin_and_npy_token_files(nanogpt_ckpt, tmp_path):
    ids = random_ids(500)
    files = [write_bin(tmp_path / "val.bin", ids), tmp_path / "val.npy"]
    np.save(files[1], ids.astype(np.int32))
    for file in files:
        ckpt = open_model(nanogpt_ckpt, tokens=file)
        batches = ckpt.measurement_batches(3, 2, seed=4)
        assert_windows_of(batches, ids)
        again = open_model(nanogpt_ckpt, tokens=file).measurement_batches(3, 2, seed=4)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
        prov = ckpt.token_provenance()
        assert prov["source"] == "tokens" and prov["n_tokens"] == 500 and prov["split"] == "whole file"
        assert prov["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    bin_batches = open_model(nanogpt_ckpt, tokens=files[0]).measurement_batches(2, 2, seed=1)
    npy_batches = open_model(nanogpt_ckpt, tokens=files[1]).measurement_batches(2, 2, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(bin_batches, npy_batches))  # same ids, same windows


def test_foreign_vocabulary_without_tokens_is_refused(nanogpt_ckpt, capsys):
    with pytest.raises(UserError, match=r"vocabulary \(50\) is not the 103 characters of embedded .*--tokens FILE"
                                        r".*--tokenizer FILE \[--data TEXT\]"):
        open_model(nanogpt_ckpt).measurement_batches(1, 2)
    assert main(["spectrum", str(nanogpt_ckpt), "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokens FILE" in err[0]


def test_out_of_range_ids_name_the_first_position(nanogpt_ckpt, tmp_path):
    ids = random_ids(300)
    ids[[37, 120]] = [VOCAB, VOCAB + 3]
    write_bin(tmp_path / "bad.bin", ids)
    with pytest.raises(UserError, match=r"bad.bin: token id 50 at position 37 is outside the vocabulary .*size 50"):
        open_model(nanogpt_ckpt, tokens=tmp_path / "bad.bin").measurement_batches(1, 2)
    negative = random_ids(300)
    negative[5] = -1
    np.save(tmp_path / "neg.npy", negative)
    with pytest.raises(UserError, match="token id -1 at position 5"):
        open_model(nanogpt_ckpt, tokens=tmp_path / "neg.npy").measurement_batches(1, 2)


def test_bad_token_files(nanogpt_ckpt, tmp_path):
    cases = {}
    (tmp_path / "t.txt").write_text("hello")
    cases[tmp_path / "t.txt"] = "reads nanoGPT's uint16 .bin files or .npy arrays"
    cases[tmp_path / "nowhere.bin"] = "no such token file"
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    cases[tmp_path / "odd.bin"] = "3 bytes is not a non-empty whole number of uint16 tokens"
    np.save(tmp_path / "float.npy", np.ones(20))
    cases[tmp_path / "float.npy"] = "holds float64 values"
    np.save(tmp_path / "grid.npy", np.ones((4, 20), dtype=np.int64))
    cases[tmp_path / "grid.npy"] = r"shape \(4, 20\); --tokens needs a non-empty 1-D stream"
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases[tmp_path / "objects.npy"] = "not a plain .npy array"
    write_bin(tmp_path / "short.bin", random_ids(5))
    cases[tmp_path / "short.bin"] = "the token file has 5 tokens, fewer than seq_len"
    for path, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as info:
            open_model(nanogpt_ckpt, tokens=path).measurement_batches(1, 2)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="already holds token ids"):
        open_model(nanogpt_ckpt, tokens=tmp_path / "short.bin", tokenizer=tmp_path / "t.json")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(load_corpus()[:20000])
    return path


def model_with_vocab(tmp_path, vocab):
    torch.manual_seed(0)
    model = build_model(GPTConfig(arch="llama2", vocab_size=vocab, dim=16, n_layers=1, n_heads=2, seq_len=SEQ))
    path = tmp_path / "ref.pt"
    torch.save(model.state_dict(), path)
    return path


def test_huggingface_tokenizer_json(text_file, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(text_file)], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    ckpt = open_model(model_with_vocab(tmp_path, vocab), tokenizer=tmp_path / "tokenizer.json", data=text_file,
                      n_heads=2, seq_len=SEQ, rope_theta=1e4)
    ids = tok.encode(text_file.read_text()).ids
    heldout = ids[len(ids) - round(0.1 * len(ids)):]
    assert_windows_of(ckpt.measurement_batches(2, 2), heldout)
    prov = ckpt.token_provenance()
    assert prov["source"] == "tokenizer" and prov["n_tokens"] == len(ids) and prov["text"] == str(text_file)
    assert prov["tokenizer_sha256"] == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    assert prov["text_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(UserError, match="broken.json: not a Hugging Face tokenizer.json"):
        open_model(model_with_vocab(tmp_path, vocab), tokenizer=tmp_path / "broken.json", n_heads=2, seq_len=SEQ,
                   rope_theta=1e4).measurement_batches(1, 2)


def test_sentencepiece_model(text_file, tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=120, model_type="bpe", character_coverage=1.0)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ckpt = open_model(model_with_vocab(tmp_path, sp.get_piece_size()), tokenizer=tmp_path / "sp.model",
                      data=text_file, n_heads=2, seq_len=SEQ, rope_theta=1e4)
    ids = [sp.bos_id()] + sp.encode(text_file.read_text())
    assert_windows_of(ckpt.measurement_batches(2, 2), ids[len(ids) - round(0.1 * len(ids)):])
    assert ckpt.token_provenance()["tokenizer_kind"] == "sentencepiece"
    small = model_with_vocab(tmp_path, 60)  # the tokenizer's ids run past this model's vocabulary
    with pytest.raises(UserError, match=r"token id \d+ at position \d+ is outside the vocabulary .*size 60"):
        open_model(small, tokenizer=tmp_path / "sp.model", data=text_file, n_heads=2, seq_len=SEQ,
                   rope_theta=1e4).measurement_batches(1, 2)
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nIg== 1\n")  # Llama 3's tokenizer.model format
    with pytest.raises(UserError, match="not a SentencePiece model.*tiktoken"):
        open_model(small, tokenizer=tmp_path / "tiktoken.model", n_heads=2, seq_len=SEQ,
                   rope_theta=1e4).measurement_batches(1, 2)


def test_cli_records_the_token_source(nanogpt_ckpt, tmp_path, capsys):
    file = write_bin(tmp_path / "val.bin", random_ids(400))
    args = ["--tokens", str(file), "--batch-size", "2", "--dtype", "float64", "--mode", "double-backward",
            "--params", r"ln_f", "--json"]
    assert main(["spectrum", str(nanogpt_ckpt), *args]) == 0
    record = json.loads(capsys.readouterr().out)
    prov = record["provenance"]
    assert prov["tokens"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert prov["tokens"]["path"] == str(file.resolve()) and prov["settings_from"]["overrides"] == {}


def test_verify_bound_takes_the_token_flags(nanogpt_ckpt, tmp_path, capsys):
    file = write_bin(tmp_path / "val.bin", random_ids(400))
    argv = ["verify-bound", str(nanogpt_ckpt), "--tokens", str(file), "--batch-size", "2", "--layers", r"c_fc$",
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert [r["layer"] for r in out["layers"]] == ["transformer.h.0.mlp.c_fc"]
