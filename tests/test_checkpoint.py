"""Checkpoint format, foreign state dicts (reference implementation, nanoGPT), and every load error."""

import json
import math
import subprocess
import sys

import pytest
import torch
from checkpoint_checks import assert_adam_state_of
from safetensors.torch import save_file

from hessian_tools.cli import main
from hessian_tools.errors import UserError
from models.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from models.config import GPTConfig
from models.gpt import build_model

VOCAB, SEQ, DIM, HEADS = 24, 8, 16, 2
IDX = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def model_of(arch, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(arch=arch, vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=HEADS, seq_len=SEQ, **kw)
    return build_model(cfg).eval()


def freqs_cis(theta: float) -> torch.Tensor:
    """torchtitan's RoPE buffer: complex64 (seq_len, head_dim / 2), polar(1, t * theta^(-2i / head_dim))."""
    head_dim = DIM // HEADS
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).double() / head_dim)
    return torch.polar(torch.ones(SEQ, head_dim // 2).double(), torch.outer(torch.arange(SEQ).double(), freqs)).to(
        torch.complex64)


def same_logits(ckpt, model):
    assert torch.equal(ckpt.model(IDX), model(IDX))


# ---------------------------------------------------------------- toolkit format


def test_list_checkpoints_sorted_complete_only(tmp_path):
    model = model_of("llama2")
    for step in (20, 3, 100):
        save_checkpoint(tmp_path, step, model, None, {})
    (tmp_path / ".tmp_ckpt_0000200_1").mkdir()  # a save killed before its rename
    (tmp_path / "ckpt_0000300").mkdir()  # no meta.json: not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000003", "ckpt_0000020", "ckpt_0000100"]
    ckpt = load_checkpoint(tmp_path)  # a run dir means its latest checkpoint
    assert ckpt.step == 100 and ckpt.run_dir == tmp_path
    meta = json.loads((tmp_path / "ckpt_0000100" / "meta.json").read_text())
    assert meta["model_config"] == model.config.to_dict() and meta["step"] == 100
    with pytest.raises(UserError, match="holds no optimizer state"):
        ckpt.adam_second_moments()
    with pytest.raises(UserError, match="contradicts"):
        load_checkpoint(tmp_path, {"n_heads": 4})
    assert load_checkpoint(tmp_path, {"norm_backend": "torch"}).config.norm_backend == "torch"


# ---------------------------------------------------------------- reference implementation and torchtitan


@pytest.mark.parametrize("arch", ["llama2", "llama2_qknorm", "simplegpt"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_reference_state_dict_loads_with_identical_logits(arch, suffix, tmp_path):
    model = model_of(arch, rope_theta=500000.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["freqs_cis"] = freqs_cis(500000.0)
    path = tmp_path / f"ref{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, path)
    ckpt = load_checkpoint(path)  # heads, context and RoPE base read off freqs_cis
    assert ckpt.config == model.config and ckpt.step is None and ckpt.run_dir is None
    same_logits(ckpt, model)


def test_reference_state_dict_without_rope_table_needs_flags(tmp_path):
    model = model_of("llama2")
    path = tmp_path / "ref.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(UserError, match="how many attention heads it has: pass --heads"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="context length: pass --seq-len"):
        load_checkpoint(path, {"n_heads": HEADS})
    with pytest.raises(UserError, match="RoPE base: pass --rope-theta"):
        load_checkpoint(path, {"n_heads": HEADS, "seq_len": SEQ})
    ckpt = load_checkpoint(path, {"n_heads": HEADS, "seq_len": SEQ, "rope_theta": 10000.0})
    same_logits(ckpt, model)
    with pytest.raises(UserError, match="keys are those of llama2, not of --arch simplegpt"):
        load_checkpoint(path, {"arch": "simplegpt"})


# ---------------------------------------------------------------- nanoGPT


@pytest.mark.parametrize("arch", ["gpt2", "simplegpt_gpt2"])
@pytest.mark.parametrize("compiled", [False, True])
def test_nanogpt_checkpoint_loads_with_identical_logits(arch, compiled, tmp_path):
    model = model_of(arch)
    prefix = "_orig_mod." if compiled else ""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    for i in range(2):  # nanoGPT's causal-mask buffer when flash attention is off
        state[f"{prefix}transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(SEQ, SEQ)).view(1, 1, SEQ, SEQ)
    model_args = dict(n_layer=2, n_head=HEADS, n_embd=DIM, block_size=SEQ, bias=True, vocab_size=VOCAB,
                      dropout=0.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "model_args": model_args, "iter_num": 250, "best_val_loss": 1.5,
                "config": {"dataset": "shakespeare_char"}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.config == model.config and ckpt.step == 250 and ckpt.meta["format"] == "nanogpt"
    same_logits(ckpt, model)


def test_deduplicated_tied_head_is_restored(tmp_path):
    model = model_of("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    same_logits(load_checkpoint(path, {"n_heads": HEADS}), model)


# ---------------------------------------------------------------- errors


@pytest.fixture
def ref_file(tmp_path):
    model = model_of("llama2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["freqs_cis"] = freqs_cis(10000.0)
    return tmp_path, state


def write(tmp_path, state, name="bad.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_bad_checkpoints_raise_one_line_errors(ref_file):
    tmp_path, state = ref_file
    cases = []
    cases.append((tmp_path / "nowhere.pt", "no such checkpoint"))
    good = write(tmp_path, state, "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases.append((truncated, "truncated, corrupt"))
    save_file({k: v for k, v in state.items()}, tmp_path / "full.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "full.safetensors").read_bytes()[:-100])
    cases.append((cut, "truncated or corrupt"))
    wrong = dict(state, **{"layers.0.attention.wq.weight": torch.zeros(DIM, DIM + 1)})
    cases.append((write(tmp_path, wrong, "shape.pt"),
                  r"wrong shape for layers.0.attention.wq.weight: the file has \(16, 17\), .* needs \(16, 16\)"))
    cases.append((write(tmp_path, dict(state, extra=torch.zeros(1)), "unknown.pt"), r"unknown keys \['extra'\]"))
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    cases.append((write(tmp_path, missing, "missing.pt"), r"missing keys \['norm.weight'\]"))
    nan = dict(state, **{"output.weight": state["output.weight"].clone().fill_(math.nan)})
    cases.append((write(tmp_path, nan, "nan.pt"), "tensor output.weight holds NaN"))
    cases.append((write(tmp_path, [1, 2, 3], "list.pt"), "unsupported format"))
    cases.append((write(tmp_path, {"a.b": torch.zeros(2)}, "alien.pt"), "unsupported format"))
    empty_dir = tmp_path / "empty_run"
    empty_dir.mkdir()
    cases.append((empty_dir, "holds no checkpoint"))
    for path, pattern in cases:
        with pytest.raises(UserError, match=pattern) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_toolkit_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path, 1, model_of("simplegpt"), None, {})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(UserError, match="model.safetensors: cannot read it"):
        load_checkpoint(tmp_path)


def test_cli_reports_bad_checkpoint_in_one_line(ref_file, capsys):
    tmp_path, state = ref_file
    nan = write(tmp_path, dict(state, **{"norm.weight": torch.full((DIM,), math.inf)}), "inf.pt")
    assert main(["inspect", str(nan)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "norm.weight holds NaN or inf" in err
    proc = subprocess.run([sys.executable, "-m", "hessian_tools", "inspect", str(tmp_path / "absent.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"hessian-tools inspect: error: {tmp_path / 'absent.pt'}: "
                                                "no such checkpoint file or directory"]


def test_inspect_json_of_reference_file(ref_file, capsys):
    tmp_path, state = ref_file
    path = write(tmp_path, state, "ref.pt")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "llama2" and info["config"]["n_heads"] == HEADS and info["step"] is None
    assert info["n_params"] == sum(v.numel() for k, v in state.items() if k != "freqs_cis")
    assert info["sites"][0] == "tok_embeddings:out" and "layers.1.feed_forward.w2:in" in info["sites"]


def test_foreign_measurement_batches_need_the_texts_own_characters(ref_file, tmp_path):
    _, state = ref_file
    path = write(tmp_path, state, "ref.pt")
    with pytest.raises(UserError, match=r"vocabulary \(24\) is not the 103 characters.*--tokens FILE.*--tokenizer"):
        load_checkpoint(path).measurement_batches(1, 2)
    text = tmp_path / "small.txt"
    text.write_text("abcdefgh" * 50)
    with pytest.raises(UserError, match=r"vocabulary \(24\) is not the 8 characters of .*small.txt"):
        load_checkpoint(path, {"data": str(text)}).measurement_batches(1, 2, seq_len=4)
    own = tmp_path / "own.txt"
    own.write_text("".join(chr(ord("A") + i) for i in range(VOCAB)) * 20)  # exactly 24 characters: its own
    (idx, targets), = load_checkpoint(path, {"data": str(own)}).measurement_batches(1, 2, seq_len=4)
    assert idx.shape == (2, 4) and int(idx.max()) < VOCAB


# ---------------------------------------------------------------- nanoGPT's optimizer state


def nanogpt_groups(model, layout):
    """nanoGPT's configure_optimizers: since May 2023 named_parameters() split by dim; before, the sorted names
    of Linear weights (decay) and of biases, norm and embedding weights (no decay)."""
    params = dict(model.named_parameters())
    if layout == "current":
        decay = [p for p in params.values() if p.dim() >= 2]
        rest = [p for p in params.values() if p.dim() < 2]
    else:
        embeddings = ("transformer.wte.weight", "transformer.wpe.weight")
        decay_names = sorted(n for n, p in params.items() if p.dim() >= 2 and n not in embeddings)
        decay = [params[n] for n in decay_names]
        rest = [params[n] for n in sorted(set(params) - set(decay_names))]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("layout", ["current", "before May 2023"])
def test_nanogpt_optimizer_state_is_mapped_to_parameter_names(layout, tmp_path):
    model = model_of("gpt2")
    opt = torch.optim.AdamW(nanogpt_groups(model, layout), lr=6e-4, betas=(0.9, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(IDX).logsumexp(-1).mean().backward()
        opt.step()
    model_args = dict(n_layer=2, n_head=HEADS, n_embd=DIM, block_size=SEQ, bias=True, vocab_size=VOCAB, dropout=0.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
                "model_args": model_args, "iter_num": 3, "best_val_loss": 2.0,
                "config": {"beta2": 0.95, "learning_rate": 1e-3}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.peak_lr() == 1e-3  # the schedule's peak; the optimizer held 6e-4
    settings = assert_adam_state_of(ckpt, model, opt)
    for name, p in model.named_parameters():
        decayed = p.dim() >= 2 and (layout == "current" or name not in ("transformer.wte.weight",
                                                                         "transformer.wpe.weight"))
        assert settings[name] == {"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1 * decayed}
    state = opt.state_dict()
    state["param_groups"] = [state["param_groups"][0], *([dict(state["param_groups"][1], params=[])] * 2)]
    torch.save({"model": model.state_dict(), "optimizer": state, "model_args": model_args}, path)
    with pytest.raises(UserError, match="matches neither of nanoGPT's parameter-group layouts"):
        load_checkpoint(path)


def test_checkpoints_written_before_the_new_config_fields_still_load(tmp_path):
    """meta.json of earlier versions lacks n_kv_heads, multiple_of, ffn_dim_multiplier, qk_norm_scope,
    tie_embeddings and gelu_approximate: they default to the behaviour of then."""
    for arch in ("llama2_qknorm", "gpt2"):
        model = model_of(arch)
        path = save_checkpoint(tmp_path / arch, 1, model, None, {})
        meta = json.loads((path / "meta.json").read_text())
        new = ("n_kv_heads", "multiple_of", "ffn_dim_multiplier", "qk_norm_scope", "tie_embeddings", "gelu_approximate")
        meta["model_config"] = {k: v for k, v in meta["model_config"].items() if k not in new}
        (path / "meta.json").write_text(json.dumps(meta))
        ckpt = load_checkpoint(path)
        assert ckpt.config == model.config
        same_logits(ckpt, model)
