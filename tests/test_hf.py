"""Hugging Face directories written here by transformers (tiny random models, no download): our logits equal
transformers' to 1e-5 in float32, and a Hessian-vector product through the converted model equals one through
the transformers model itself (float64), for GPT2LMHeadModel and LlamaForCausalLM (GQA, and tied)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from checkpoint_checks import perturbed
from safetensors.torch import load_file, save_file

from hessian_tools.errors import UserError
from hessian_tools.operators import ParamHessian
from models.checkpoint import open_model
from models.checkpoint.hf import to_toolkit

VOCAB, SEQ = 32, 12
IDX = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
BATCHES = [(IDX[:, :-1], IDX[:, 1:])]


def gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  attn_implementation="eager", **kw)
    return perturbed(transformers.GPT2LMHeadModel(cfg))


def llama(**kw):
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=16, rope_theta=500000.0, rms_norm_eps=1e-5,
                    attn_implementation="eager")
    return perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **kw})))


MODELS = {"gpt2": gpt2, "llama_gqa": llama,
          "llama_tied": lambda: llama(tie_word_embeddings=True, num_key_value_heads=4)}


def hf_loss(model, batch):
    return F.cross_entropy(model(batch[0]).logits.flatten(0, 1), batch[1].flatten())


def saved(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_transformers(name, tmp_path):
    hf = MODELS[name]()
    ckpt = open_model(saved(hf, tmp_path / name))
    assert ckpt.meta["format"] == "huggingface"
    assert sum(p.numel() for p in ckpt.model.parameters()) == sum(p.numel() for p in hf.parameters())
    with torch.no_grad():
        ours, theirs = ckpt.model(IDX), hf(IDX).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


@pytest.mark.parametrize("name", list(MODELS))
def test_hvp_through_the_converted_model_equals_transformers(name, tmp_path):
    hf = MODELS[name]()
    ckpt = open_model(saved(hf, tmp_path / name))
    ours = ParamHessian(ckpt.model, BATCHES, dtype=torch.float64, mode="double-backward")
    theirs = ParamHessian(hf, BATCHES, loss_fn=hf_loss, dtype=torch.float64, mode="double-backward")
    names_hf = dict(hf.named_parameters())
    names_ours = dict(ckpt.model.named_parameters())
    assert ours.shape == theirs.shape
    v_hf = torch.randn(theirs.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def as_dict(flat, params):
        sizes = [p.numel() for p in params.values()]
        return {k: t.view(p.shape) for (k, p), t in zip(params.items(), flat.split(sizes))}

    def to_ours(flat_hf):
        converted = to_toolkit(as_dict(flat_hf, names_hf), {**ckpt.config.to_dict(), "arch": ckpt.config.arch})
        return torch.cat([converted[k].reshape(-1) for k in names_ours])

    hv_ours, hv_hf = ours.matvec(to_ours(v_hf)), to_ours(theirs.matvec(v_hf))
    assert hv_hf.norm() > 1e-2
    assert (hv_ours - hv_hf).norm() <= 1e-5 * hv_hf.norm()


def test_other_hf_files(tmp_path):
    """pytorch_model.bin (weights_only), a sharded safetensors index, and GPT2Model's unprefixed keys (as the
    hub's gpt2 stores them): each is first confirmed loadable by transformers itself."""
    hf = gpt2()
    want = hf(IDX).logits.detach()
    binary = saved(hf, tmp_path / "bin")
    os.remove(binary / "model.safetensors")
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    sharded = saved(hf, tmp_path / "sharded", max_shard_size="10KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 3
    bare = saved(hf, tmp_path / "bare")
    state = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"},
              bare / "model.safetensors", metadata={"format": "pt"})
    for path in (binary, sharded, bare):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        torch.testing.assert_close(theirs(IDX).logits, want)
        with torch.no_grad():
            torch.testing.assert_close(open_model(path).model(IDX), want, atol=1e-5, rtol=1e-5)


def test_unsupported_hf_directories(tmp_path):
    cases = {}
    scaled = saved(llama(rope_scaling={"rope_type": "linear", "factor": 2.0}), tmp_path / "scaled")
    cases[scaled] = "rope type = 'linear', but only plain RoPE"
    other = saved(llama(), tmp_path / "mistral")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    cases[other] = "model_type 'mistral' is not supported"
    empty = saved(gpt2(), tmp_path / "empty")
    os.remove(empty / "model.safetensors")
    cases[empty] = "has a config.json but no weights"
    broken = saved(gpt2(), tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    cases[broken] = "the Hugging Face config is not JSON"
    act = saved(gpt2(activation_function="relu"), tmp_path / "relu")
    cases[act] = "activation_function = 'relu'"
    for path, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as info:
            open_model(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
