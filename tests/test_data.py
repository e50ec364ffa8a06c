"""Tokenizer, corpora, splits and the two batch samplers."""

import json

import pytest
import torch

from hessian_tools.errors import UserError
from models.data import (CharTokenizer, DataSpec, load_corpus, load_splits, measurement_batches,
                         training_batch)


def test_embedded_corpus_is_the_pydoc_topics_text():
    text = load_corpus()
    assert 450_000 < len(text) < 480_000
    assert len(set(text)) == 103
    assert text == load_corpus()  # deterministic join


def test_tokenizer_round_trip_and_json():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    ids = tok.encode("world hello")
    assert ids.dtype == torch.int64 and tok.decode(ids) == "world hello"
    again = CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok
    with pytest.raises(UserError, match="'z' is not in the tokenizer"):
        tok.encode("z")
    with pytest.raises(UserError, match="unsupported tokenizer"):
        CharTokenizer.from_dict({"kind": "bpe"})


def test_load_corpus_errors(tmp_path):
    with pytest.raises(UserError, match="no such data file"):
        load_corpus(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        load_corpus(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_corpus(empty)
    with pytest.raises(UserError, match="heldout_fraction must be a finite number in"):
        DataSpec(heldout_fraction=1.0)


@pytest.fixture
def two_part_file(tmp_path):
    """900 chars of 'ab' then 100 of 'cd': with held-out fraction 0.1 the held-out split is exactly 'cd'."""
    path = tmp_path / "text.txt"
    path.write_text("ab" * 450 + "cd" * 50)
    return DataSpec(str(path), heldout_fraction=0.1, seed=3)


def test_split_is_contiguous(two_part_file):
    splits = load_splits(two_part_file)
    assert splits.tokenizer.chars == "abcd"
    assert len(splits.train) == 900 and len(splits.heldout) == 100
    assert set(splits.train.tolist()) == {0, 1} and set(splits.heldout.tolist()) == {2, 3}


def test_training_batches_depend_on_seed_and_step_only(two_part_file):
    splits = load_splits(two_part_file)
    idx, targets = training_batch(splits, two_part_file, 5, 4, 8)
    assert idx.shape == targets.shape == (4, 8) and idx.dtype == torch.int64
    assert torch.equal(idx[:, 1:], targets[:, :-1])  # targets are the next tokens
    again = training_batch(splits, two_part_file, 5, 4, 8)
    assert torch.equal(idx, again[0]) and torch.equal(targets, again[1])
    other = training_batch(splits, two_part_file, 6, 4, 8)
    assert not torch.equal(torch.cat([idx, targets]), torch.cat(other))
    assert set(idx.unique().tolist()) <= {0, 1}  # train split only


def test_measurement_batches_are_fixed_and_held_out(two_part_file):
    batches = measurement_batches(two_part_file, 3, 2, 8, seed=1)
    assert len(batches) == 3
    for idx, targets in batches:
        assert idx.shape == targets.shape == (2, 8)
        assert set(torch.cat([idx, targets]).unique().tolist()) <= {2, 3}  # held-out split only
        assert torch.equal(idx[:, 1:], targets[:, :-1])
    again = measurement_batches(two_part_file, 3, 2, 8, seed=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    shifted = measurement_batches(two_part_file, 3, 2, 8, seed=2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, shifted))
    with pytest.raises(UserError, match="held-out split has 100 tokens"):
        measurement_batches(two_part_file, 1, 1, 200)
