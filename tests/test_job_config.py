"""torchtitan job configs (TOML) and the SimpleGPT reference's flavor tables: every flavor's shapes on the meta
device (the published Llama parameter counts), and a weights-only DCP export opened with its job config."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hessian_tools.cli import main
from hessian_tools.errors import UserError
from models.checkpoint import open_model
from models.config import GPTConfig
from models.flavors import LLAMA2_FLAVORS, LLAMA3_FLAVORS, REFERENCE_MODELS
from models.gpt import build_model
from models.job_config import read_job_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# Published sizes (Meta's model cards / the Hugging Face releases): vocab, parameters, FFN width.
PUBLISHED = {
    ("llama2", "7B"): (32000, 6_738_415_616, 11008),
    ("llama2", "13B"): (32000, 13_015_864_320, 13824),
    ("llama2", "70B"): (32000, 68_976_648_192, 28672),
    ("llama3", "8B"): (128256, 8_030_261_248, 14336),
    ("llama3", "70B"): (128256, 70_553_706_496, 28672),
}


def job_toml(path, name, flavor, norm_type="rmsnorm", seq_len=2048, extra=""):
    path.write_text(f'[job]\ndump_folder = "./outputs"\n\n[model]\nname = "{name}"\nflavor = "{flavor}"\n'
                    f'norm_type = "{norm_type}"\ntokenizer_path = "./tokenizer.model"\n\n[optimizer]\n'
                    f'name = "AdamW"\nlr = 1e-3\n\n[training]\nseq_len = {seq_len}\nbatch_size = 3\n{extra}')
    return path


def meta_model(name, flavor, vocab, tmp_path):
    settings = read_job_config(job_toml(tmp_path / "job.toml", name, flavor)).settings
    with torch.device("meta"):
        return build_model(GPTConfig(vocab_size=vocab, **settings))


@pytest.mark.parametrize("name", ["llama2_simplegpt", "llama3_preqknorm"])  # plain llama2 / llama3: below
def test_every_flavor_builds_with_the_reference_shapes(name, tmp_path):
    table = LLAMA3_FLAVORS if name.startswith("llama3") else LLAMA2_FLAVORS
    for flavor, args in table.items():
        model = meta_model(name, flavor, 32000, tmp_path)
        cfg, layer = model.config, model.layers[0]
        assert (cfg.dim, cfg.n_layers, cfg.n_heads) == (args["dim"], args["n_layers"], args["n_heads"])
        assert cfg.n_kv_heads == args.get("n_kv_heads", args["n_heads"]) and cfg.seq_len == 4096
        q, k, gate = (("snq", "snk", "sn1") if cfg.arch == "simplegpt" else ("wq", "wk", "w1"))
        assert getattr(layer.attention, q).weight.shape == (cfg.dim, cfg.dim)
        assert getattr(layer.attention, k).weight.shape == (cfg.head_dim * cfg.n_kv_heads, cfg.dim)
        assert getattr(layer.feed_forward, gate).weight.shape == (cfg.ffn_hidden, cfg.dim)
        if name == "llama3_preqknorm":  # normalized over all heads together
            assert layer.attention.k_norm.weight.shape == (cfg.head_dim * cfg.n_kv_heads,)
    assert all(p.is_meta for p in model.parameters())  # no memory: 70B is never instantiated


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_published_parameter_counts(key, tmp_path):
    vocab, n_params, ffn = PUBLISHED[key]
    model = meta_model(key[0], key[1], vocab, tmp_path)
    assert model.config.ffn_hidden == ffn
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_weights_only_export_opens_with_its_job_config(tmp_path, capsys):
    torch.manual_seed(0)
    job = job_toml(tmp_path / "preqknorm.toml", "llama2_preqknorm", "20M", seq_len=8)
    cfg = GPTConfig(vocab_size=64, **read_job_config(job).settings)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden, cfg.seq_len) == (256, 4, 4, 768, 16)
    model = build_model(cfg)
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "step-100")
    ckpt = open_model(tmp_path / "step-100", job_config=job)
    assert ckpt.config == cfg and ckpt.step == 100 and ckpt.config.qk_norm_scope == "all"
    assert ckpt.settings_from["job_config"]["flavor"] == "20M" and ckpt.settings_from["training_seq_len"] == 8
    assert ckpt.peak_lr() == 1e-3 and ckpt.settings_from["job_config"]["tokenizer_path"] == "./tokenizer.model"
    text = tmp_path / "own.txt"
    text.write_text("".join(chr(0x100 + i) for i in range(64)) * 4)
    (idx, _), = open_model(tmp_path / "step-100", job_config=job, data=text).measurement_batches(1, 2)
    assert idx.shape == (2, 8)  # the training length, not the RoPE table's 16
    with torch.no_grad():
        assert torch.equal(ckpt.model(idx), model(idx))
    overridden = open_model(tmp_path / "step-100", job_config=job, rope_theta=20000.0)
    assert overridden.config.rope_theta == 20000.0
    assert overridden.settings_from["overrides"] == {"rope_theta": 20000.0}
    assert main(["inspect", str(tmp_path / "step-100"), "--job-config", str(job), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "weights-only" and info["settings_from"]["job_config"]["model_name"] == "llama2_preqknorm"
    deeper = job_toml(tmp_path / "deeper.toml", "llama2_preqknorm", "22M")  # 6 layers, not 4
    with pytest.raises(UserError, match=r"missing keys .* \(the job config .*deeper.toml says llama2_preqknorm 22M"):
        open_model(tmp_path / "step-100", job_config=deeper)
    with pytest.raises(UserError, match=r"wrong shape for .* \(the job config .*preqknorm.toml says"):
        open_model(tmp_path / "step-100", job_config=job, dim=128)
    simple = job_toml(tmp_path / "simple.toml", "llama2_simplegpt", "20M")
    with pytest.raises(UserError, match="keys are those of llama2_qknorm, not of its job config's"):
        open_model(tmp_path / "step-100", job_config=simple)


def test_bad_job_configs(tmp_path):
    cases = {
        job_toml(tmp_path / "a.toml", "llama4", "8B"): r"\[model\] name 'llama4' is not a model of the SimpleGPT "
                                                      r"reference; known names: llama2, llama2_simplegpt",
        job_toml(tmp_path / "b.toml", "llama3", "1B"): r"\[model\] flavor '1B' is not a flavor of llama3; known "
                                                      r"flavors: debugmodel, 8B, 70B",
        job_toml(tmp_path / "c.toml", "llama2", "20M", norm_type="layernorm"): "norm_type 'layernorm' is not supported",
        job_toml(tmp_path / "d.toml", "llama2", "20M", seq_len='"long"'): r"\[training\] seq_len must be a positive",
    }
    (tmp_path / "e.toml").write_text("[model\nname = 1")
    cases[tmp_path / "e.toml"] = "not a valid TOML job config"
    cases[tmp_path / "f.toml"] = "cannot read the job config"
    for path, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as info:
            read_job_config(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert set(REFERENCE_MODELS) == {"llama2", "llama2_simplegpt", "llama2_preqknorm", "llama3", "llama3_simplegpt",
                                     "llama3_preqknorm"}
