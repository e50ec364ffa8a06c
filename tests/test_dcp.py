"""torchtitan DCP checkpoints written here with torch.distributed.checkpoint.save (single process, and sharded
over 2 gloo processes), both layouts, every model name of the SimpleGPT reference; the restricted metadata
unpickler refuses a malicious pickle without running it."""

import io
import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from checkpoint_checks import assert_adam_state_of
from reference_llama import KINDS, reference_logits, reference_state
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from hessian_tools.cli import main
from hessian_tools.errors import UserError
from models.checkpoint import open_model
from models.config import GPTConfig
from models.flavors import REFERENCE_MODELS
from models.gpt import build_model, next_token_loss

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB, DIM, LAYERS, TRAIN_SEQ = 24, 16, 2, 8
TOKENS = torch.randint(0, VOCAB, (2, TRAIN_SEQ + 1), generator=torch.Generator().manual_seed(0))
# llama2 names: multi-head, RoPE base 10^4; llama3 names: grouped-query attention, FFN multiplier, base 5 x 10^5
FAMILY = {"llama2": dict(n_heads=4, n_kv_heads=4, rope_theta=10000.0),
          "llama3": dict(n_heads=4, n_kv_heads=2, rope_theta=500000.0, ffn_dim_multiplier=1.3, multiple_of=16)}
DEFINING = ("arch", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "seq_len", "rope_theta",
            "qk_norm_scope")


def reference_model(name: str):
    """A tiny model of reference name `name`, two AdamW steps into training, as the reference trains it."""
    torch.manual_seed(0)
    arch = REFERENCE_MODELS[name]
    cfg = GPTConfig(vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, seq_len=2 * TRAIN_SEQ, norm_backend="torch",
                    **arch, **FAMILY[name.split("_")[0]])
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    for _ in range(2):
        opt.zero_grad()
        next_token_loss(model, (TOKENS[:, :-1], TOKENS[:, 1:])).backward()
        opt.step()
        sched.step()
    return model.eval(), opt, sched


def save_full(model, opt, sched, path, step=2, flatten=True):
    """torchtitan's CheckpointManager state: model, flattened optimizer, lr scheduler, dataloader, train state."""
    losses = io.BytesIO()
    torch.save([3.2, 3.1], losses)
    states = {
        "model": reference_state(model, TRAIN_SEQ),
        "optimizer": get_optimizer_state_dict(model, opt,
                                              options=StateDictOptions(flatten_optimizer_state_dict=flatten)),
        "lr_scheduler": sched.state_dict(),
        "dataloader": {"dp_rank_0": pickle.dumps({"buffer": [1, 2, 3]})},
        "train_state": {"step": torch.tensor(step, dtype=torch.int32), "global_avg_losses": losses},
    }
    dcp.save(states, checkpoint_id=path)
    return path


def save_weights_only(model, path, prefix=""):
    """torchtitan's last-step export (`model_weights_only`): the model's keys alone, RoPE table dropped."""
    state = {prefix + k: v for k, v in reference_state(model, TRAIN_SEQ).items() if k != "freqs_cis"}
    dcp.save(state, checkpoint_id=path)
    return path


def assert_same_model(ckpt, model):
    for field in DEFINING:
        assert getattr(ckpt.config, field) == getattr(model.config, field), field
    idx = TOKENS[:, :-1]
    kind = KINDS[model.config.arch]
    ref = reference_logits(reference_state(model, TRAIN_SEQ), idx, kind, model.config.n_heads,
                           model.config.n_kv_heads)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(idx), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_full_training_state_of_every_reference_model(name, tmp_path):
    model, opt, sched = reference_model(name)
    path = save_full(model, opt, sched, tmp_path / "step-2")
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp"]
    ckpt = open_model(path)  # heads, context and RoPE base from freqs_cis, kv heads from wk's rows
    assert ckpt.meta["layout"] == "full" and ckpt.step == 2
    assert_same_model(ckpt, model)
    settings = assert_adam_state_of(ckpt, model, opt)
    for name_ in settings:
        assert settings[name_] == {"lr": pytest.approx(sched.get_last_lr()[0]), "betas": (0.9, 0.95), "eps": 1e-8,
                                   "weight_decay": 0.05}
    assert ckpt.adam_second_moments()["output.weight"].shape == (VOCAB, DIM)


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_weights_only_export_of_every_reference_model(name, tmp_path):
    model, _, _ = reference_model(name)
    path = save_weights_only(model, tmp_path / "step-9")
    with pytest.raises(UserError, match="how many attention heads.*pass --heads or --job-config"):
        open_model(path)
    cfg = model.config
    ckpt = open_model(path, n_heads=cfg.n_heads, seq_len=cfg.seq_len, rope_theta=cfg.rope_theta)
    assert ckpt.meta["layout"] == "weights-only" and ckpt.step == 9
    assert ckpt.settings_from["overrides"] == {"n_heads": 4, "seq_len": 16, "rope_theta": cfg.rope_theta}
    assert_same_model(ckpt, model)
    with pytest.raises(UserError, match="holds no optimizer state"):
        ckpt.optimizer_state()


def test_earlier_torchtitan_layouts(tmp_path):
    """Weights-only under `model.` (torchtitan before June 2024) and an optimizer state dict that is not
    flattened (param_groups by index, naming their parameters)."""
    model, opt, sched = reference_model("llama3_preqknorm")
    cfg = model.config
    ckpt = open_model(save_weights_only(model, tmp_path / "old", prefix="model."), n_heads=4, seq_len=16,
                      rope_theta=cfg.rope_theta)
    assert ckpt.meta["layout"] == "weights-only"
    assert_same_model(ckpt, model)
    ckpt = open_model(save_full(model, opt, sched, tmp_path / "nested", flatten=False))
    assert ckpt.adam_settings()["layers.1.attention.k_norm.weight"]["betas"] == (0.9, 0.95)
    p = dict(model.named_parameters())["layers.0.feed_forward.w2.weight"]
    assert torch.equal(ckpt.adam_second_moments()["layers.0.feed_forward.w2.weight"], opt.state[p]["exp_avg_sq"])


def test_run_folder_opens_its_latest_complete_step(tmp_path):
    model, opt, sched = reference_model("llama2_simplegpt")
    save_full(model, opt, sched, tmp_path / "run" / "step-5", step=5)
    save_full(model, opt, sched, tmp_path / "run" / "step-10", step=10)
    (tmp_path / "run" / "step-20").mkdir()  # a save that never wrote its .metadata
    assert open_model(tmp_path / "run").path.name == "step-10"


def test_bfloat16_export_loads_into_a_float32_model(tmp_path):
    model, _, _ = reference_model("llama2")
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    dcp.save(state, checkpoint_id=tmp_path / "bf16")
    ckpt = open_model(tmp_path / "bf16", n_heads=4, seq_len=16, rope_theta=10000.0)
    assert ckpt.meta["stored_dtype"] == "bfloat16"
    assert ckpt.model.output.weight.dtype == torch.float32
    assert torch.equal(ckpt.model.output.weight, state["output.weight"].float())


# ---------------------------------------------------------------- hostile and broken directories


class Payload:
    """Pickles as a call of os.system: what an attacker puts in a .metadata file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Getattr:
    """Pickles as builtins.getattr on an allowed class: attribute access must be refused too."""

    def __reduce__(self):
        return getattr, (GPTConfig, "from_dict")


def test_malicious_metadata_is_refused_and_never_runs(tmp_path, capsys):
    model, _, _ = reference_model("llama2")
    good = save_weights_only(model, tmp_path / "good")
    marker = tmp_path / "pwned"
    for i, payload in enumerate([Payload(marker), {"x": Payload(marker)}, Getattr(), torch.save]):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / "__0_0.distcp").write_bytes((good / "__0_0.distcp").read_bytes())
        (bad / ".metadata").write_bytes(pickle.dumps(payload))
        with pytest.raises(UserError, match="not a DCP metadata file .*refused global.*nothing from it was executed") \
                as info:
            open_model(bad)
        assert "\n" not in str(info.value)
        assert main(["inspect", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refused global" in err and "Traceback" not in err
    assert not marker.exists()
    # the payload is live: torch's own reader unpickles it unrestricted and runs it
    with pytest.raises(Exception):
        FileSystemReader(tmp_path / "bad0").read_metadata()
    assert marker.exists()


def test_broken_directories_give_one_line_errors(tmp_path):
    model, _, _ = reference_model("llama2")
    good = save_weights_only(model, tmp_path / "good")
    data = (good / "__0_0.distcp").read_bytes()
    cases = {}
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / ".metadata").write_bytes((good / ".metadata").read_bytes()[:200])
    (cut / "__0_0.distcp").write_bytes(data)
    cases[cut] = "cannot read the DCP metadata"
    short = tmp_path / "short"
    short.mkdir()
    (short / ".metadata").write_bytes((good / ".metadata").read_bytes())
    (short / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    cases[short] = "lies outside the file .* truncated"
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / ".metadata").write_bytes((good / ".metadata").read_bytes())
    cases[lonely] = "__0_0.distcp: missing"
    other = tmp_path / "other"
    other.mkdir()
    (other / ".metadata").write_bytes(pickle.dumps({"a": [1, 2.0, "x"]}))
    cases[other] = "not the metadata of a torch.distributed.checkpoint"
    for path, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as info:
            open_model(path, n_heads=4, seq_len=16, rope_theta=1e4)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- a sharded save (FSDP-style, 2 ranks)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank, port, path):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, _, _ = reference_model("llama3_simplegpt")
        mesh = init_device_mesh("cpu", (2,))
        state = {k: distribute_tensor(v.detach(), mesh, [Shard(0)]) for k, v in model.state_dict().items()}
        dcp.save({"model": state}, checkpoint_id=path)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_chunks_of_a_two_rank_save_are_assembled(tmp_path):
    path = tmp_path / "step-2"
    mp.spawn(_shard_worker, args=(_free_port(), str(path)), nprocs=2, join=True)
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(path))
    model, _, _ = reference_model("llama3_simplegpt")
    ckpt = open_model(path, n_heads=4, seq_len=16, rope_theta=500000.0)
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[key], value), key
    assert_same_model(ckpt, model)


def test_adam_interface_of_a_toolkit_run_and_of_its_dcp_save_agree(tmp_path):
    """What preconditioned sharpness reads (second moments, steps, betas, eps, weight decay) is the same from a
    toolkit run's checkpoint and from the same model and AdamW state saved as a torchtitan DCP checkpoint."""
    from models.checkpoint import load_checkpoint
    from models.train import TrainConfig, make_optimizer, train

    cfg = TrainConfig(arch="llama2", dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=2, steps=3, save_every=0,
                      warmup=1, norm_backend="torch", device="cpu")
    train(cfg, tmp_path / "run", progress=False)
    native = load_checkpoint(tmp_path / "run")
    opt = make_optimizer(native.model, cfg)
    native.restore_optimizer(opt)
    state = {"model": reference_state(native.model, 4),
             "optimizer": get_optimizer_state_dict(native.model, opt,
                                                   options=StateDictOptions(flatten_optimizer_state_dict=True))}
    dcp.save(state, checkpoint_id=tmp_path / "step-3")
    foreign = open_model(tmp_path / "step-3")
    assert_adam_state_of(foreign, native.model, opt)
    ours, theirs = native.adam_settings(), foreign.adam_settings()
    for name in ours:
        assert {k: ours[name][k] for k in ("betas", "eps", "weight_decay")} == \
               {k: theirs[name][k] for k in ("betas", "eps", "weight_decay")}
    assert {s["weight_decay"] for s in ours.values()} == {0.0, cfg.weight_decay}
    assert native.peak_lr() == cfg.lr and foreign.peak_lr() is None  # a DCP save alone does not record it
    from hessian_tools.estimators import lanczos
    from hessian_tools.operators import AdamPreconditioned, AdamState, ParamHessian

    batches = native.measurement_batches(1, 2, 8)
    values = []
    for ckpt in (native, foreign):
        state = AdamState.from_checkpoint(ckpt)
        assert (state.beta1, state.beta2, state.eps) == (0.9, 0.95, 1e-8)
        op = AdamPreconditioned(ParamHessian(ckpt.model, batches, dtype=torch.float64), state)
        values.append(lanczos(op, tol=1e-10).value)
    assert values[1] == pytest.approx(values[0], rel=1e-10)  # Adam sharpness of a reference checkpoint works
