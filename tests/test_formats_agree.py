"""The same weights saved as a torchtitan DCP directory, a reference / nanoGPT .pt and a Hugging Face directory
give the same lambda_max (Lanczos, float64, tol 1e-10) on the same tokens, to 1e-8 relative; and the
transformers model itself, measured through the same engine, agrees (GPT-2 to 1e-8; Llama to 1e-6, its RoPE
angles being computed in float32 where ours are rounded from float64)."""

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import transformers
from checkpoint_checks import perturbed
from reference_llama import reference_state

from hessian_tools.estimators import lanczos
from hessian_tools.operators import ParamHessian
from models.checkpoint import open_model
from models.config import GPTConfig
from models.gpt import build_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB, SEQ = 16, 8


def top(model, batches, loss_fn=None) -> float:
    op = ParamHessian(model, batches, loss_fn=loss_fn, dtype=torch.float64, mode="double-backward")
    return lanczos(op, k=1, which="largest", tol=1e-10, seed=0).value


def hf_loss(model, batch):
    return F.cross_entropy(model(batch[0]).logits.flatten(0, 1), batch[1].flatten())


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "val.npy"
    np.save(path, np.random.default_rng(0).integers(0, VOCAB, 400).astype(np.int32))
    return path


def assert_same_top(values: dict, reference: float, rel: float = 1e-8):
    for name, value in values.items():
        assert abs(value - reference) <= rel * abs(reference), (name, value, reference)


def test_llama2_dcp_pt_and_hf_agree(tmp_path, token_file):
    torch.manual_seed(0)
    hf = perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2 * SEQ, rope_theta=10000.0, rms_norm_eps=1e-5,
        attn_implementation="eager")), scale=0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = open_model(tmp_path / "hf").model  # the same weights in torchtitan's names and RoPE layout
    state = reference_state(model, SEQ)
    torch.save(state, tmp_path / "ref.pt")
    dcp.save({"model": state}, checkpoint_id=tmp_path / "step-1")
    dcp.save({k: v for k, v in state.items() if k != "freqs_cis"}, checkpoint_id=tmp_path / "step-2")
    sources = {"hf": {}, "ref.pt": {}, "step-1": {}, "step-2": dict(n_heads=2, seq_len=2 * SEQ, rope_theta=1e4)}
    ckpts = {name: open_model(tmp_path / name, tokens=token_file, **kw) for name, kw in sources.items()}
    batches = ckpts["hf"].measurement_batches(2, 2, seed=3)
    values = {name: top(c.model, c.measurement_batches(2, 2, seed=3)) for name, c in ckpts.items()}
    assert_same_top(values, values["hf"])
    assert_same_top({"transformers": top(hf, batches, hf_loss)}, values["hf"], rel=1e-6)


def test_gpt2_nanogpt_dcp_and_hf_agree(tmp_path, token_file):
    torch.manual_seed(0)
    hf = perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=8, n_layer=1, n_head=2, activation_function="gelu",
        attn_implementation="eager")), scale=0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = open_model(tmp_path / "hf").model
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=SEQ, bias=True, vocab_size=VOCAB, dropout=0.0)
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 1}, tmp_path / "ckpt.pt")
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "step-1")
    sources = {"hf": {}, "ckpt.pt": {}, "step-1": dict(n_heads=2)}
    ckpts = {name: open_model(tmp_path / name, tokens=token_file, **kw) for name, kw in sources.items()}
    values = {name: top(c.model, c.measurement_batches(2, 2, seed=3)) for name, c in ckpts.items()}
    assert_same_top(values, values["hf"])
    assert_same_top({"transformers": top(hf, ckpts["hf"].measurement_batches(2, 2, seed=3), hf_loss)}, values["hf"])


def test_simplegpt_dcp_and_pt_agree(tmp_path, token_file):
    torch.manual_seed(0)
    model = perturbed(build_model(GPTConfig(arch="simplegpt", vocab_size=VOCAB, dim=8, n_layers=1, n_heads=2,
                                            n_kv_heads=1, seq_len=2 * SEQ, norm_backend="torch")), scale=0.2)
    state = reference_state(model, SEQ)
    torch.save(state, tmp_path / "ref.pt")
    dcp.save({"model": state}, checkpoint_id=tmp_path / "step-1")
    ckpts = {name: open_model(tmp_path / name, tokens=token_file) for name in ("ref.pt", "step-1")}
    values = {name: top(c.model, c.measurement_batches(2, 2, seed=3)) for name, c in ckpts.items()}
    batches = ckpts["ref.pt"].measurement_batches(2, 2, seed=3)
    assert_same_top(values, top(model, batches))
