"""Hostile and careless inputs to the commands that read checkpoints and measure them (issue 13).

Classes: 1 recorded metadata of the wrong type or range (toolkit meta.json, nanoGPT, Hugging Face config.json,
torchtitan job config and DCP, weights of the wrong dtype), 2 sizes that cannot fit, 3 the filesystem (FIFOs,
directories, files in the way, names too long, read-only and full disks, unreadable inputs), 6 flags.
Every case runs `hessian-tools` in-process and asserts one error line naming the problem, exit status 2 and no
traceback, or success. Checkpoints are tiny and written here by the real writers (save_checkpoint, torch.save
of nanoGPT's layout, transformers' save_pretrained, torch.distributed.checkpoint).
"""

import argparse
import json
import os
import random
import re
import shutil
import signal

import pytest
import torch

from hessian_tools.cli import main
from hessian_tools.errors import UserError
from models.checkpoint import save_checkpoint
from models.config import GPTConfig
from models.data import CharTokenizer, DataSpec
from models.gpt import build_model
from models.train_config import TrainConfig

FAST = ["--batch-size", "1", "--mode", "double-backward", "--params", r"^norm\.weight$"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toolkit checkpoint (simplegpt, dim 16, context 8, own corpus), a nanoGPT ckpt.pt, a Hugging Face GPT-2
    directory, a DCP directory and a torchtitan job config."""
    root = tmp_path_factory.mktemp("world")
    text = "".join(random.Random(0).choice("abcdef ") for _ in range(3000))
    (root / "corpus.txt").write_text(text)
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    cfg = GPTConfig(arch="simplegpt", vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, seq_len=8,
                    ffn_hidden=16, norm_backend="torch")
    train = TrainConfig(dim=16, n_layers=1, n_heads=2, seq_len=8, ffn_hidden=16, steps=5).to_dict()
    meta = {"data": DataSpec(path=str(root / "corpus.txt")).to_dict(), "tokenizer": tok.to_dict(),
            "train_config": train, "initial_loss": 2.0}
    ckpt = save_checkpoint(root / "run", 5, build_model(cfg), None, meta)
    gpt2 = build_model(GPTConfig(arch="gpt2", vocab_size=16, dim=16, n_layers=1, n_heads=2, seq_len=8))
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True, vocab_size=16, dropout=0.0)
    torch.save({"model": gpt2.state_dict(), "model_args": args, "iter_num": 7, "config": {"learning_rate": 1e-3}},
               root / "ckpt.pt")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                        bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(root / "hf")
    (root / "job.toml").write_text('[model]\nname = "llama2"\nflavor = "20M"\n[training]\nseq_len = 64\n'
                                   '[optimizer]\nlr = 3e-4\n')
    return {"root": root, "ckpt": ckpt, "nanogpt": root / "ckpt.pt", "hf": root / "hf", "job": root / "job.toml",
            "corpus": root / "corpus.txt"}


def run(argv, capsys):
    """(exit status, stdout, the hessian-tools lines of stderr); asserts no traceback."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Error:" not in err.replace("error:", ""), err
    return rc, out, [line for line in err.splitlines() if line.startswith("hessian-tools")]


def assert_one_line(result, message):
    rc, out, lines = result
    if message is None:
        assert rc == 0, lines
        return
    assert rc == 2 and len(lines) == 1 and message in lines[0], (rc, lines)


@pytest.fixture
def no_hang():
    """Fail instead of blocking forever (a FIFO opened for reading blocks until a writer comes)."""

    def alarm(*_):
        raise TimeoutError("the command blocked")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------ class 1: recorded metadata


def nested(record, path, value):
    *heads, last = path.split(".")
    for key in heads:
        record = record[key]
    if value is DELETE:
        del record[last]
    else:
        record[last] = value


DELETE = object()


def edited(directory, tmp, name, field, value):
    """A copy of checkpoint `directory` in tmp whose JSON file `name` has `field` (dotted) set to value."""
    copy = shutil.copytree(directory, tmp / directory.name)
    record = json.loads((copy / name).read_text())
    nested(record, field, value)
    (copy / name).write_text(json.dumps(record))
    return copy
META = {  # field of meta.json -> (value, message)
    "model_config.dim (string)": ("model_config.dim", "32", "model_config.dim must be a positive integer, got '32'"),
    "model_config.dim (null)": ("model_config.dim", None, "model_config.dim must be a positive integer, got null"),
    "model_config.dim (float)": ("model_config.dim", 16.0, "model_config.dim must be a positive integer, got 16.0"),
    "negative ffn_hidden": ("model_config.ffn_hidden", -5, "model_config.ffn_hidden must be a non-negative integer"),
    "norm_eps < 0": ("model_config.norm_eps", -1e-5, "model_config.norm_eps must be a non-negative finite number"),
    "norm_eps NaN": ("model_config.norm_eps", float("nan"), "model_config.norm_eps must be a non-negative finite "
                                                            "number, got NaN"),
    "rope_theta = 0": ("model_config.rope_theta", 0, "model_config.rope_theta must be a positive finite number, got 0"),
    "rope_theta inf": ("model_config.rope_theta", float("inf"),
                       "model_config.rope_theta must be a positive finite number, got inf"),
    "bias = yes": ("model_config.bias", "yes", "model_config.bias must be true or false, got 'yes'"),
    "vocab_size null": ("model_config.vocab_size", None, "model_config.vocab_size must be a positive integer"),
    "unknown model setting": ("model_config.width", 3, "model_config must be an object with keys among"),
    "arch unknown": ("model_config.arch", "gpt5", "model_config.arch must be one of 'llama2'"),
    "step = inf": ("step", float("inf"), "step must be a non-negative integer, got inf"),
    "step string": ("step", "5", "step must be a non-negative integer, got '5'"),
    "step missing": ("step", DELETE, "step is missing"),
    "data a string": ("data", "corpus.txt", "data must be an object"),
    "data extra key": ("data.shuffle", True, "data must be an object with keys among path, heldout_fraction, seed"),
    "heldout fraction 1": ("data.heldout_fraction", 1.0, "data.heldout_fraction must be a finite number in (0, 1)"),
    "missing tokenizer": ("tokenizer", DELETE, "tokenizer is missing"),
    "tokenizer chars a number": ("tokenizer.chars", 5, "tokenizer.chars must be a non-empty string, got 5"),
    "train_config.lr string": ("train_config.lr", "0.1", "train_config.lr must be a positive finite number"),
    "train_config.steps 0": ("train_config.steps", 0, "train_config.steps must be a positive integer, got 0"),
    "train_config.seed huge": ("train_config.seed", 10**20, "train_config.seed must be an integer in [0, "),
    "initial_loss NaN": ("initial_loss", float("nan"), "initial_loss must be a finite number, got NaN"),
    "format": ("format", "other", "format must be one of 'hessian-tools-checkpoint'"),
}


@pytest.mark.parametrize("case", META)
def test_recorded_metadata_of_the_wrong_type_or_range(world, tmp_path, capsys, case):
    field, value, message = META[case]
    ckpt = edited(world["ckpt"], tmp_path, "meta.json", field, value)
    assert_one_line(run(["inspect", ckpt], capsys), f"meta.json: {message}")


RAW_META = {"not JSON": (b"{", "is not JSON"), "non-UTF-8": (b'{"step": "\xff"}', "is not UTF-8"),
            "a JSON list": (b"[1, 2]", "the file must hold an object"), "empty": (b"", "is not JSON")}


@pytest.mark.parametrize("case", RAW_META)
def test_unreadable_meta_json(world, tmp_path, capsys, case):
    ckpt = shutil.copytree(world["ckpt"], tmp_path / "ckpt")
    (ckpt / "meta.json").write_bytes(RAW_META[case][0])
    assert_one_line(run(["inspect", ckpt], capsys), RAW_META[case][1])


NANOGPT = {
    "bias = yes": (("model_args", "bias"), "yes", "model_args.bias must be true or false, got 'yes'"),
    "vocab_size None": (("model_args", "vocab_size"), None, "model_args.vocab_size must be a positive integer, "
                                                            "got null"),
    "iter_num abc": (("iter_num",), "abc", "iter_num must be a non-negative integer, got 'abc'"),
    "n_layer 0": (("model_args", "n_layer"), 0, "model_args.n_layer must be a positive integer, got 0"),
    "dropout 2": (("model_args", "dropout"), 2.0, "model_args.dropout must be a finite number in [0, 1)"),
    "learning rate string": (("config", "learning_rate"), "6e-4", "config.learning_rate must be a positive finite"),
    "valid": ((), None, None),
}


@pytest.mark.parametrize("case", NANOGPT)
def test_nanogpt_records(world, tmp_path, capsys, case):
    keys, value, message = NANOGPT[case]
    obj = torch.load(world["nanogpt"], weights_only=True)
    if keys:
        target = obj
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    torch.save(obj, tmp_path / "ckpt.pt")
    assert_one_line(run(["inspect", tmp_path / "ckpt.pt", "--heads", "2"], capsys), message)


HF = {
    "hidden size string": ("n_embd", "16", "config.json: n_embd must be a positive integer, got '16'"),
    "vocab_size null": ("vocab_size", None, "vocab_size must be a positive integer, got null"),
    "epsilon < 0": ("layer_norm_epsilon", -1.0, "layer_norm_epsilon must be a non-negative finite number"),
    "n_layer missing": ("n_layer", DELETE, "n_layer is missing"),
    "tied as a string": ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
    "model_type a number": ("model_type", 2, "model_type must be a string, got 2"),
}


@pytest.mark.parametrize("case", HF)
def test_hugging_face_configs(world, tmp_path, capsys, case):
    field, value, message = HF[case]
    assert_one_line(run(["inspect", edited(world["hf"], tmp_path, "config.json", field, value)], capsys), message)


JOB = {
    "seq_len 0": ('[model]\nname = "llama2"\nflavor = "20M"\n[training]\nseq_len = 0\n',
                  "[training] seq_len must be a positive integer, got 0"),
    "lr negative": ('[model]\nname = "llama2"\nflavor = "20M"\n[optimizer]\nlr = -1.0\n',
                    "[optimizer] lr must be a positive finite number, got -1.0"),
    "lr nan": ('[model]\nname = "llama2"\nflavor = "20M"\n[optimizer]\nlr = nan\n',
               "[optimizer] lr must be a positive"),
    "name a number": ('[model]\nname = 5\nflavor = "20M"\n', "[model] name must be a string, got 5"),
    "no model table": ('[training]\nseq_len = 8\n', "[model] is missing"),
    "model not a table": ('model = 3\n', "[model] must be an object"),
}


@pytest.mark.parametrize("case", JOB)
def test_job_configs(world, tmp_path, capsys, case):
    text, message = JOB[case]
    (tmp_path / "job.toml").write_text(text)
    assert_one_line(run(["inspect", world["nanogpt"], "--job-config", tmp_path / "job.toml"], capsys), message)


def llama_state():
    torch.manual_seed(0)
    return build_model(GPTConfig(arch="llama2", vocab_size=16, dim=16, n_layers=1, n_heads=2, seq_len=8)).state_dict()


@pytest.mark.parametrize("step, message", [(float("inf"), "train_state.step must be a non-negative integer, got inf"),
                                           (-3, "train_state.step must be a non-negative integer, got -3"),
                                           (4, None)])
def test_dcp_train_state_step(tmp_path, capsys, step, message):
    import torch.distributed.checkpoint as dcp

    state = {"model": llama_state(), "train_state": {"step": torch.tensor(step)}}
    dcp.save(state, checkpoint_id=tmp_path / "step-4")
    assert_one_line(run(["inspect", tmp_path / "step-4", "--seq-len", "8", "--heads", "2",
                         "--rope-theta", "10000"], capsys), message)


@pytest.mark.parametrize("dtype, message", [(torch.int64, "holds int64 values; weights must be real floating point"),
                                            (torch.complex64, "holds complex64 values"),
                                            (torch.bool, "holds bool values"), (torch.bfloat16, None)])
def test_weights_of_the_wrong_dtype(tmp_path, capsys, dtype, message):
    state = llama_state()
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"].to(dtype)
    torch.save(state, tmp_path / "model.pt")
    assert_one_line(run(["inspect", tmp_path / "model.pt", "--seq-len", "8", "--heads", "2", "--rope-theta", "1e4"],
                        capsys), message)


# ------------------------------------------------------------------------------ class 2: sizes that cannot fit


SIZES = {
    "vocab 1e12": ("model_config.vocab_size", 10**12, "needs at least"),
    "dim 4e6": ("model_config.dim", 4_000_000, "needs at least"),
    "1e9 layers": ("model_config.n_layers", 10**9, "needs at least"),
    "context 1e12": ("model_config.seq_len", 10**12, "needs at least"),
}


@pytest.mark.parametrize("case", SIZES)
def test_recorded_sizes_that_cannot_fit(world, tmp_path, capsys, case):
    field, value, message = SIZES[case]
    rc, out, lines = run(["inspect", edited(world["ckpt"], tmp_path, "meta.json", field, value)], capsys)
    assert rc == 2 and len(lines) == 1 and message in lines[0] and "is available on cpu" in lines[0], lines


def test_a_hugging_face_config_larger_than_its_weights(world, tmp_path, capsys):
    hf = edited(world["hf"], tmp_path, "config.json", "vocab_size", 10**12)
    assert_one_line(run(["inspect", hf], capsys), "needs at least")


FLAG_SIZES = {
    "batches 1e9": (["spectrum", "{ckpt}", "--batches", "1000000000"],
                    "on 1000000000 batches of 1 x 8 tokens (operator size 1,952) needs at least"),
    "batch size 1e10": (["spectrum", "{ckpt}", "--batch-size", "10000000000"], "batches of 10000000000 x 8 tokens"),
    "density grid 1e12": (["density", "{ckpt}", "--out", "{tmp}/d.png", "--grid", "0", "1", "1e12"],
                          "--grid with 1,000,000,000,000 points needs at least"),
    "kept graphs of 1e6 batches": (["trace", "{ckpt}", "--batches", "3000000", "--batch-size", "8", "--seq-len",
                                    "8"], "needs at least"),
}


@pytest.mark.parametrize("case", FLAG_SIZES)
def test_flag_sizes_that_cannot_fit(world, tmp_path, capsys, case):
    argv, message = FLAG_SIZES[case]
    argv = [a.format(ckpt=world["ckpt"], tmp=tmp_path) for a in argv]
    argv += [] if "--batch-size" in argv else ["--batch-size", "1"]
    assert_one_line(run(argv, capsys), message)


# ------------------------------------------------------------------------------ class 3: the filesystem


def fifo(path):
    os.mkfifo(path)
    return path


FILES = {  # name -> (build(world, tmp) -> argv, message)
    "checkpoint is a FIFO": (lambda w, t: ["inspect", fifo(t / "ckpt.pt")], "is a FIFO (named pipe)"),
    "data is a FIFO": (lambda w, t: ["inspect", w["nanogpt"], "--heads", "2", "--data", fifo(t / "text")], None),
    "tokens is a FIFO": (lambda w, t: ["trace", w["nanogpt"], "--samples", "3", "--tokens", fifo(t / "v.bin")],
                         "v.bin: is a FIFO"),
    "tokenizer is a FIFO": (lambda w, t: ["trace", w["nanogpt"], "--tokenizer", fifo(t / "tok.json")],
                            "tok.json: is a FIFO"),
    "job config is a FIFO": (lambda w, t: ["inspect", w["nanogpt"], "--job-config", fifo(t / "j.toml")],
                             "j.toml: is a FIFO"),
    "weights file is a FIFO": (lambda w, t: ["inspect", _with(w["ckpt"], t, "model.safetensors", fifo)],
                               "model.safetensors: is a FIFO"),
    "data file a FIFO in measurement": (lambda w, t: ["trace", w["ckpt"], "--samples", "3", "--data",
                                                      fifo(t / "text")], "text: is a FIFO"),
    "data is a directory": (lambda w, t: ["trace", w["ckpt"], "--samples", "3", "--data", t],
                            "is a directory; the data file must be a file"),
    "checkpoint missing": (lambda w, t: ["inspect", t / "nothing"], "no such checkpoint"),
    "checkpoint name too long": (lambda w, t: ["inspect", t / ("x" * 300)], "no such checkpoint"),
    "density --out a directory": (lambda w, t: ["density", w["ckpt"], "--out", _dir(t / "d.png")], "is a directory"),
    "density --out under a file": (lambda w, t: ["density", w["ckpt"], "--out", _file(t / "f") / "d.png"],
                                   "is a file, not a directory"),
    "density --out name too long": (lambda w, t: ["density", w["ckpt"], "--out", t / ("x" * 300 + ".png")],
                                    "the name is too long"),
    "density --out missing directory": (lambda w, t: ["density", w["ckpt"], "--out", t / "no" / "d.png"],
                                        "does not exist"),
    "density --out json beside is a FIFO": (lambda w, t: ["density", w["ckpt"], "--out", _fifo_json(t)],
                                            "d.json: is not a regular file"),
    "bench --out a directory": (lambda w, t: ["bench", "--out", t, "--results", t / "r"], "is a directory"),
    "bench --results under a file": (lambda w, t: ["bench", "--out", t / "B.md", "--results", _file(t / "f") / "r"],
                                     "is a file, not a directory"),
}


def _with(ckpt, tmp, name, make):
    copy = shutil.copytree(ckpt, tmp / "ckpt")
    os.remove(copy / name)
    make(copy / name)
    return copy


def _dir(path):
    path.mkdir()
    return path


def _file(path):
    path.write_text("notes")
    return path


def _fifo_json(tmp):
    fifo(tmp / "d.json")
    return tmp / "d.png"


@pytest.mark.parametrize("case", FILES)
def test_the_filesystem(world, tmp_path, capsys, no_hang, case):
    build, message = FILES[case]
    argv = build(world, tmp_path)
    if case == "data is a FIFO":  # inspect does not read the data: accepted, nothing opened
        assert_one_line(run(argv, capsys), None)
        return
    assert_one_line(run([*argv, *(FAST[:2] if argv[0] in ("trace", "density") else [])], capsys), message)


def test_an_unreadable_data_file(world, tmp_path, capsys, monkeypatch):
    """Permission denied, simulated (the tests may run as root, who reads everything)."""
    import hessian_tools.paths as paths

    secret = tmp_path / "secret.txt"
    secret.write_text("abc abc")
    real = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if str(p) == str(secret) else real(p, mode))
    assert_one_line(run(["trace", world["ckpt"], "--data", secret, *FAST[:2]], capsys),
                    "secret.txt: cannot read the data file: permission denied")
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if str(p) == str(world["ckpt"]) else real(p, mode))
    assert_one_line(run(["inspect", world["ckpt"]], capsys), "cannot open the checkpoint directory: permission denied")


def test_density_to_a_read_only_disk_is_refused_before_computing(world, mounted, capsys):
    disk = mounted("size=64k,ro")
    rc, out, lines = run(["density", world["ckpt"], "--out", disk / "d.png", *FAST], capsys)
    assert rc == 2 and len(lines) == 1 and "the file system is read-only" in lines[0] and out == ""


def test_density_to_a_full_disk_keeps_the_record(world, mounted, fill_disk, capsys):
    disk = mounted("size=64k")
    fill_disk(disk)
    rc, out, lines = run(["density", world["ckpt"], "--out", disk / "d.png", "--probes", "2", "--iter", "4", *FAST],
                         capsys)
    assert rc == 2 and len(lines) == 1 and "the disk is full" in lines[0] and "printed on stdout" in lines[0]
    assert json.loads(out)["quantity"] == "spectral_density"  # what was computed is kept
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no half-written file left behind


# ------------------------------------------------------------------------------ class 6: flags


FLAGS = {
    "tol nan": (["spectrum", "--tol", "nan"], "--tol must be a positive finite number, got nan"),
    "tol inf": (["spectrum", "--tol", "inf"], "--tol must be a positive finite number, got inf"),
    "tol 0": (["spectrum", "--tol", "0"], "--tol must be a positive finite number, got 0"),
    "failure probability 1.5": (["spectrum", "--failure-probability", "1.5"], "--failure-probability must be a "
                                                                              "finite number in (0, 1), got 1.5"),
    "seed 1e20": (["spectrum", "--seed", "1e20"], "--seed must be an integer in [0, 9223372036854775807], got 1e20"),
    "seed 10^20": (["spectrum", "--seed", str(10**20)], "--seed must be an integer in [0, 9223372036854775807]"),
    "seed -1": (["trace", "--seed", "-1"], "--seed must be an integer in [0,"),
    "k 0": (["spectrum", "--k", "0"], "--k must be a positive integer, got 0"),
    "max-iter -1": (["spectrum", "--max-iter", "-1"], "--max-iter must be a positive integer, got -1"),
    "seq-len 0": (["spectrum", "--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    "batches 0": (["trace", "--batches", "0"], "--batches must be a positive integer, got 0"),
    "batch-size -1": (["trace", "--batch-size", "-1"], "--batch-size must be a positive integer, got -1"),
    "memory budget abc": (["spectrum", "--memory-budget", "abc"],
                          "--memory-budget must be a positive integer, got abc"),
    "layer -1": (["spectrum", "--role", "attn_in", "--layer", "-1"], "--layer must be a non-negative integer"),
    "data spread 4": (["spectrum", "--data-spread", "4"], "--data-spread must be an integer >= 8, got 4"),
    "rope theta nan": (["spectrum", "--rope-theta", "nan"], "--rope-theta must be a positive finite number, got nan"),
    "norm eps -1": (["inspect", "--norm-eps", "-1"], "--norm-eps must be a non-negative finite number, got -1"),
    "ffn multiplier inf": (["inspect", "--ffn-multiplier", "inf"], "--ffn-multiplier must be a positive finite"),
    "dim 0": (["inspect", "--dim", "0"], "--dim must be a positive integer, got 0"),
    "heads 1.5": (["inspect", "--heads", "1.5"], "--heads must be a positive integer, got 1.5"),
    "context-len 0": (["spectrum", "--context-len", "0"], "--context-len must be a positive integer, got 0"),
    "samples 0": (["trace", "--samples", "0"], "--samples must be a positive integer, got 0"),
    "target std error nan": (["trace", "--target-std-error", "nan"], "--target-std-error must be a positive finite"),
    "grid lo > hi": (["density", "--out", "d.png", "--grid", "1", "0", "10"], "--grid must be finite LO < HI"),
    "grid nan": (["density", "--out", "d.png", "--grid", "nan", "1", "10"], "--grid must be finite LO < HI"),
    "grid inf": (["density", "--out", "d.png", "--grid", "0", "inf", "10"], "--grid must be finite LO < HI"),
    "grid N 2.5": (["density", "--out", "d.png", "--grid", "0", "1", "2.5"], "--grid must end in an integer N >= 2"),
    "grid N words": (["density", "--out", "d.png", "--grid", "0", "1", "many"], "--grid must be three numbers"),
    "width nan": (["density", "--out", "d.png", "--width", "nan"], "--width must be a positive finite number"),
    "probes 1": (["density", "--out", "d.png", "--probes", "1"], "--probes must be an integer >= 2, got 1"),
    "iter 0": (["density", "--out", "d.png", "--iter", "0"], "--iter must be a positive integer, got 0"),
    "scale nan": (["verify-bound", "--scale", "nan"], "--scale must be a positive finite number, got nan"),
    "scale 0": (["verify-bound", "--scale", "0"], "--scale must be a positive finite number, got 0"),
    "verify tol inf": (["verify-bound", "--tol", "inf"], "--tol must be a positive finite number, got inf"),
    "threads -1": (["bench", "--threads", "-1"], "--threads must be a positive integer, got -1"),
    "space unknown": (["spectrum", "--space", "weights"], "argument --space: invalid choice: 'weights'"),
}


@pytest.mark.parametrize("case", FLAGS)
def test_flags_are_checked_when_parsed(world, capsys, case):
    argv, message = FLAGS[case]
    argv = [argv[0], *([] if argv[0] == "bench" else [world["ckpt"]]), *argv[1:]]
    rc, out, lines = run(argv, capsys)
    assert rc == 2 and out == "" and len(lines) == 1, lines
    assert lines[0].startswith(f"hessian-tools {argv[0]}: error: ") and message in lines[0], lines


SHARED_VALUES = {  # class 6 across the measuring commands: every command that takes the flag refuses the value
    "--batch-size": ["0", "-1", "1.5", "abc"], "--batches": ["0", "-2", "nan"], "--seq-len": ["0", "-8"],
    "--context-len": ["0"], "--seed": ["-1", "1e20", "abc"], "--dim": ["0", "-16"], "--heads": ["0", "1.5"],
    "--kv-heads": ["-1"], "--layers": ["0"], "--ffn-hidden": ["-1"],  # 0 = the family default for those two "--ffn-multiplier": ["0", "nan", "inf"],
    "--multiple-of": ["0"], "--norm-eps": ["-1", "nan"], "--rope-theta": ["0", "nan", "-1"],
    "--memory-budget": ["0", "-1"], "--max-iter": ["0"], "--tol": ["nan", "-1", "0"],
}
SHARED_CHOICES = {"--dtype": "float16", "--mode": "fastest", "--norm-backend": "cuda", "--arch": "bert",
                  "--space": "weights", "--scaled": "diag", "--role": "head"}
MEASURING = ("spectrum", "trace", "density", "verify-bound", "inspect", "sweep")


def _options(command: str) -> set:
    from hessian_tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[command]._actions for o in a.option_strings}


SHARED_CASES = {f"{cmd} {flag} {value}": (cmd, flag, value, f"{flag} must be")
                for cmd in MEASURING for flag, values in SHARED_VALUES.items() if flag in _options(cmd)
                and (cmd, flag) != ("verify-bound", "--layers")  # there a regular expression of layer names
                for value in values}
SHARED_CASES.update({f"{cmd} {flag} {value}": (cmd, flag, value, f"argument {flag}: invalid choice: '{value}'")
                     for cmd in MEASURING for flag, value in SHARED_CHOICES.items() if flag in _options(cmd)})


@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_flags_are_checked_by_every_command(world, tmp_path, capsys, case):
    command, flag, value, message = SHARED_CASES[case]
    where = {"density": ["--out", str(tmp_path / "d.png")], "sweep": ["--out", str(tmp_path / "r.jsonl")]}
    rc, out, lines = run([command, world["ckpt"], *where.get(command, []), f"{flag}={value}"], capsys)
    assert rc == 2 and out == "" and len(lines) == 1, lines
    assert lines[0].startswith(f"hessian-tools {command}: error: ") and message in lines[0], lines
    if "must be" in message:
        assert lines[0].endswith(f"got {value}") or f"got {value} " in lines[0] or f"got {value}(" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == []  # refused when parsed: nothing written


def test_distributed_outside_torchrun(world, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert_one_line(run(["spectrum", world["ckpt"], "--distributed", *FAST], capsys),
                    "--distributed runs under torchrun")


@pytest.mark.parametrize("argv", [["spectrum", "--seed", str(2**63 - 1), "--tol", "1e-3"],
                                  ["trace", "--samples", "3", "--seq-len", "8"],
                                  ["density", "--out", "{tmp}/d.png", "--grid", "-1", "1", "11", "--probes", "2",
                                   "--iter", "3"]])
def test_valid_edges_run(world, tmp_path, capsys, argv):
    argv = [argv[0], world["ckpt"], *[a.format(tmp=tmp_path) for a in argv[1:]], *FAST]
    assert_one_line(run(argv, capsys), None)


def test_device_and_count_types():
    import argparse

    from hessian_tools.cli.common import device, nonneg_int, positive_int

    assert device("cpu") == "cpu" and device("cuda:1") == "cuda:1" and device("auto") == "auto"
    for bad, why in (("meta", "meta tensors hold no data"), ("mps", "not supported"), ("tpu", "unknown device"),
                     ("cuda:x", "unknown device")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            device(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer, got -1"):
        positive_int("-1")  # --jobs -1
    assert nonneg_int("0") == 0


# ------------------------------------------------------------------------------ train, lr-sweep, demo, figures, bench

TINY = ["--dim", "8", "--layers", "1", "--heads", "2", "--seq-len", "8", "--batch-size", "2", "--steps", "2",
        "--device", "cpu"]
COMMANDS = {  # command -> (argv before the case's flags, with {tmp}) ; every case fails before any work
    "train": ["train", "--out", "{tmp}/run", *TINY, "--quiet"],
    "lr-sweep": ["lr-sweep", "--arch", "gpt2", "--lrs", "1e-3", "--out", "{tmp}/sweep", *TINY],
    "demo": ["demo", "--scale", "tiny", "--out", "{tmp}/demo"],
    "figures": ["figures", "--scale", "tiny", "--runs", "{tmp}/runs", "--out", "{tmp}/figs"],
    "bench": ["bench", "--out", "{tmp}/B.md", "--results", "{tmp}/results"],
    "sweep": ["sweep", "{tmp}/run", "--out", "{tmp}/results.jsonl", "--quiet"],
}
TRAINING_FLAGS = {  # class 6, for train and lr-sweep alike
    "lr nan": (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    "lr inf": (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    "lr 0": (["--lr", "0"], "--lr must be a positive finite number, got 0"),
    "grad clip nan": (["--grad-clip", "nan"], "--grad-clip must be a non-negative finite number, got nan"),
    "grad clip inf": (["--grad-clip", "inf"], "--grad-clip must be a non-negative finite number, got inf"),
    "weight decay -1": (["--weight-decay", "-1"], "--weight-decay must be a non-negative finite number, got -1"),
    "weight decay inf": (["--weight-decay", "inf"], "--weight-decay must be a non-negative finite number, got inf"),
    "norm eps nan": (["--norm-eps", "nan"], "--norm-eps must be a non-negative finite number, got nan"),
    "rope theta inf": (["--rope-theta", "inf"], "--rope-theta must be a positive finite number, got inf"),
    "rope theta 0": (["--rope-theta", "0"], "--rope-theta must be a positive finite number, got 0"),
    "seed 1e20": (["--seed", "1e20"], "--seed must be an integer in [0, 9223372036854775807], got 1e20"),
    "seed 10^20": (["--seed", str(10**20)], "--seed must be an integer in [0, 9223372036854775807]"),
    "device meta": (["--device", "meta"], "--device must be cpu, cuda, cuda:N or auto, got meta (meta tensors"),
    "device mps": (["--device", "mps"], "--device must be cpu, cuda, cuda:N or auto, got mps (the Apple GPU"),
    "steps 0": (["--steps", "0"], "--steps must be a positive integer, got 0"),
    "batch size 1.5": (["--batch-size", "1.5"], "--batch-size must be a positive integer, got 1.5"),
    "warmup -1": (["--warmup", "-1"], "--warmup must be a non-negative integer, got -1"),
    "save every -1": (["--save-every", "-1"], "--save-every must be a non-negative integer, got -1"),
    "train subset -1": (["--train-subset", "-1"], "--train-subset must be a non-negative integer, got -1"),
    "track sharpness -1": (["--track-sharpness", "-1"], "--track-sharpness must be a non-negative integer, got -1"),
    "track batches 0": (["--track-batches", "0"], "--track-batches must be a positive integer, got 0"),
    "track batch size 0": (["--track-batch-size", "0"], "--track-batch-size must be a positive integer, got 0"),
    "track tol nan": (["--track-tol", "nan"], "--track-tol must be a finite number in (0, 1), got nan"),
    "track tol 1": (["--track-tol", "1"], "--track-tol must be a finite number in (0, 1), got 1"),
    "track hvps 1": (["--track-hvps", "1"], "--track-hvps must be an integer >= 2, got 1"),
    "track dtype": (["--track-dtype", "float16"], "argument --track-dtype: invalid choice: 'float16'"),
}
OTHER_FLAGS = {
    "lr-sweep lrs nan": ("lr-sweep", ["--lrs", "1e-3", "nan"], "--lrs must be a positive finite number, got nan"),
    "lr-sweep lrs -1": ("lr-sweep", ["--lrs", "-1"], "--lrs must be a positive finite number, got -1"),
    "demo jobs -1": ("demo", ["--jobs", "-1"], "--jobs must be a non-negative integer, got -1"),
    "demo steps 2": ("demo", ["--steps", "2"], "--steps must be an integer >= 3, got 2"),
    "demo steps nan": ("demo", ["--steps", "nan"], "--steps must be an integer >= 3, got nan"),
    "figures jobs -1": ("figures", ["--jobs", "-1"], "--jobs must be a non-negative integer, got -1"),
    "bench threads 0": ("bench", ["--threads", "0"], "--threads must be a positive integer, got 0"),
    "demo seeds 0": ("demo", ["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    "figures seeds 1.5": ("figures", ["--seeds", "1.5"], "--seeds must be a positive integer, got 1.5"),
    "lr-sweep seeds 0": ("lr-sweep", ["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    "sweep tol nan": ("sweep", ["--tol", "nan"], "--tol must be a finite number in (0, 1), got nan"),
    "sweep tol 0": ("sweep", ["--tol", "0"], "--tol must be a finite number in (0, 1), got 0"),
    "sweep seed 1e20": ("sweep", ["--seed", "100000000000000000000"], "--seed must be"),
    "sweep batches 0": ("sweep", ["--batches", "0"], "--batches must be a positive integer, got 0"),
    "sweep batch size -1": ("sweep", ["--batch-size", "-1"], "--batch-size must be a positive integer, got -1"),
    "sweep seq len 0": ("sweep", ["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    "sweep max iter 0": ("sweep", ["--max-iter", "0"], "--max-iter must be a positive integer, got 0"),
    "sweep groups -1": ("sweep", ["--groups", "-1"], "--groups must be a non-negative integer, got -1"),
    "sweep steps -2": ("sweep", ["--steps", "-2"], "--steps must be an integer >= -1, got -2"),
    "sweep density grid inf": ("sweep", ["--density-grid", "0", "inf", "11"], "--density-grid must be finite LO < HI"),
    "sweep density grid N 1.5": ("sweep", ["--density-grid", "0", "1", "1.5"],
                                       "--density-grid must end in an integer N >= 2"),
    "sweep density grid 1e12 points": ("sweep", ["--what", "params.density", "--density-grid", "0", "1", "1e12"],
                                       "--density-grid needs at least"),
    "sweep density width nan": ("sweep", ["--density-width", "nan"],
                                "--density-width must be a positive finite number, got nan"),
}
FLAG_CASES = {**{f"{cmd} {name}": (cmd, *case) for cmd in ("train", "lr-sweep")
                 for name, case in TRAINING_FLAGS.items() if not (cmd == "lr-sweep" and name.startswith("lr "))},
              **OTHER_FLAGS}  # lr-sweep has --lrs instead of --lr


def command(name, tmp, *extra):
    return [a.format(tmp=tmp) for a in COMMANDS[name]] + [str(a) for a in extra]


@pytest.mark.parametrize("case", FLAG_CASES)
def test_training_and_experiment_flags(tmp_path, capsys, case):
    name, flags, message = FLAG_CASES[case]
    rc, out, lines = run(command(name, tmp_path, *flags), capsys)
    assert rc == 2 and out == "" and len(lines) == 1, lines
    assert lines[0].startswith(f"hessian-tools {name}: error: ") and message in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == []  # refused when parsed: nothing made


def test_flags_are_never_abbreviated(tmp_path, capsys):
    """`lr-sweep --lr` is an unknown flag, not a silent `--lrs`."""
    rc, out, lines = run(command("lr-sweep", tmp_path, "--lr", "0.1"), capsys)
    assert rc == 2 and out == "" and lines == ["hessian-tools: error: unrecognized arguments: --lr 0.1"], lines
    assert sorted(os.listdir(tmp_path)) == []


OUTPUTS = {  # command -> its output flag; each case refuses before any training or measuring
    "train": "--out", "lr-sweep": "--out", "demo": "--out", "figures": "--out", "bench": "--results",
}
PLACES = {  # name -> (build(tmp) -> the output path, message)
    "under a file": (lambda t: _file(t / "notes") / "x", "notes is a file, not a directory"),
    "is a file": (lambda t: _file(t / "notes"), "notes is a file, not a directory"),
    "name too long": (lambda t: t / ("x" * 300), "the name is too long"),
}
OUTPUT_CASES = {f"{cmd} {where}": (cmd, where) for cmd in OUTPUTS for where in PLACES}
OUTPUT_CASES.update({"demo --figures under a file": ("demo", "--figures"),
                     "figures --runs under a file": ("figures", "--runs"),
                     "figures --executed under a file": ("figures", "--executed"),
                     "bench --out a directory": ("bench", "--out")})


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_training_and_experiment_outputs(tmp_path, capsys, case):
    name, where = OUTPUT_CASES[case]
    if where in PLACES:
        build, message = PLACES[where]
        flag = OUTPUTS[name]
    else:
        flag, build, message = where, (lambda t: _file(t / "notes") / "x"), "notes is a file, not a directory"
        if case == "bench --out a directory":
            build, message = (lambda t: _dir(t / "B.md")), "is a directory; name a file"
    rc, out, lines = run(command(name, tmp_path, flag, build(tmp_path)), capsys)
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines
    assert (tmp_path / "notes").read_text() == "notes" if (tmp_path / "notes").exists() else True


@pytest.mark.parametrize("name", ["train", "lr-sweep", "demo", "figures"])
def test_training_and_experiments_to_a_read_only_disk(mounted, capsys, name):
    disk = mounted("size=64k,ro")
    flag = {"figures": "--runs"}.get(name, "--out")
    rc, out, lines = run(command(name, disk, flag, disk / "out"), capsys)
    assert rc == 2 and len(lines) == 1 and "the file system is read-only" in lines[0], lines


def test_train_reads_no_fifo_as_its_data(tmp_path, capsys, no_hang):
    rc, out, lines = run(command("train", tmp_path, "--data", fifo(tmp_path / "text")), capsys)
    assert rc == 2 and len(lines) == 1 and "text: is a FIFO (named pipe); the data file must be a regular file" \
        in lines[0], lines


TRAIN_SIZES = {  # class 2: refused with the estimate before anything is allocated
    "dim 4e6": (["--dim", "4000000"], "training simplegpt (1 layers, dim 4000000, vocab"),
    "1e9 layers": (["--layers", "1000000000"], "training simplegpt (1000000000 layers"),
    "batch 1e9": (["--batch-size", "1000000000"], "on batches of 1000000000 x 8 tokens needs at least"),
    "context 1e9": (["--seq-len", "1000000000"], "on batches of 2 x 1000000000 tokens needs at least"),
}


@pytest.mark.parametrize("case", TRAIN_SIZES)
def test_training_sizes_that_cannot_fit(tmp_path, capsys, case):
    flags, message = TRAIN_SIZES[case]
    rc, out, lines = run(command("train", tmp_path, *flags), capsys)
    assert rc == 2 and len(lines) == 1 and message in lines[0] and "is available on cpu" in lines[0], lines
    assert not list((tmp_path / "run").glob("ckpt_*"))


def _weights(ckpt):
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run (TINY) with checkpoints at steps 2 and 4: copy it before changing anything."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(command("train", out.parent, "--steps", "4", "--save-every", "2")) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted(trained):
    """The final weights of the 4-step run the disk-full tests interrupt at its second checkpoint."""
    return _weights(trained / "ckpt_0000004")


def _resumes_to(run_dir, whole, capsys, lines):
    from models.train import resume_point

    assert len(lines) == 1 and "the run stopped and resumes from step 2" in lines[0], lines
    assert resume_point(run_dir) == 2  # the earlier checkpoint reads back whole
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".tmp")) == []
    assert main(command("train", run_dir.parent, "--steps", "4", "--save-every", "2")) == 0
    capsys.readouterr()
    resumed = _weights(run_dir / "ckpt_0000004")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_train_on_a_disk_that_fills_keeps_its_last_checkpoint(mounted, fill_disk, capsys, monkeypatch, uninterrupted):
    """A real full disk (tmpfs) at the second checkpoint: one line, status 2, step 2 intact, the rerun exact."""
    import models.train as train_mod

    disk = mounted("size=1m")
    real = train_mod.save_checkpoint

    def save(run_dir, step, *rest):
        if step == 4:
            fill_disk(disk)
        return real(run_dir, step, *rest)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    rc, out, lines = run(command("train", disk, "--steps", "4", "--save-every", "2"), capsys)
    assert rc == 2 and lines and "ckpt_0000004: cannot write the checkpoint: the disk is full" in lines[0], lines
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    os.remove(disk / "filler")
    _resumes_to(disk / "run", uninterrupted, capsys, lines)


def test_train_on_an_injected_full_disk_keeps_its_last_checkpoint(tmp_path, capsys, monkeypatch, uninterrupted):
    """ENOSPC as safetensors reports it (where no tmpfs can be mounted, this is the disk-full test)."""
    import models.checkpoint.native as native
    from safetensors import SafetensorError

    real, calls = native.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if "ckpt_0000004" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path)

    monkeypatch.setattr(native, "save_file", save_file)
    rc, out, lines = run(command("train", tmp_path, "--steps", "4", "--save-every", "2"), capsys)
    assert rc == 2 and lines and "ckpt_0000004: cannot write the checkpoint: the disk is full" in lines[0], lines
    assert any("ckpt_0000004" in str(p) for p in calls)
    monkeypatch.setattr(native, "save_file", real)
    _resumes_to(tmp_path / "run", uninterrupted, capsys, lines)


def test_train_whose_metrics_meet_a_full_disk_loses_no_line(capsys, monkeypatch, uninterrupted, tmp_path):
    """ENOSPC on the metrics line of step 3 (after the checkpoint at step 2; injected, since a tmpfs still has
    room in the file's last page): one line, status 2; the rerun's metrics are the uninterrupted run's."""
    import errno
    import io

    import models.train as train_mod

    class FillsAtStep3(io.TextIOWrapper):
        def write(self, text):
            if '"step": 3,' in text:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

    def open_(path, mode="r", **kw):
        handle = open(path, mode, **kw)
        return FillsAtStep3(handle.detach()) if str(path).endswith("metrics.jsonl") and mode == "a" else handle

    monkeypatch.setattr(train_mod, "open", open_, raising=False)
    rc, out, lines = run(command("train", tmp_path / "a", "--steps", "4", "--save-every", "2"), capsys)
    assert rc == 2 and lines and "run: cannot write the run: the disk is full" in lines[0], lines
    monkeypatch.delattr(train_mod, "open")
    _resumes_to(tmp_path / "a" / "run", uninterrupted, capsys, lines)
    assert main(command("train", tmp_path / "b", "--steps", "4", "--save-every", "2")) == 0
    metrics = [[{k: v for k, v in m.items() if k != "tokens_per_s"}
                for m in train_mod.read_metrics(tmp_path / d / "run" / "metrics.jsonl")] for d in "ab"]
    assert len(metrics[0]) == 4 and metrics[0] == metrics[1]


# ------------------------------------------------------------------------------ a run directory's own files


def _copy_run(trained, tmp, unfinished=False):
    """A copy of the trained run in tmp/run; unfinished: as a run killed after its step-2 checkpoint."""
    run_dir = shutil.copytree(trained, tmp / "run")
    if unfinished:
        shutil.rmtree(run_dir / "ckpt_0000004")
        os.remove(run_dir / "status.json")
    return run_dir


STATUS = {  # RUN_DIR/status.json (bytes) -> message of the rerun `train`
    "not JSON": (b'{"status": "completed", ', "status.json: the run status is not JSON"),
    "a list": (b'["completed", 4]', "status.json: the file must hold an object with status, step"),
    "missing step": (b'{"status": "completed"}', "status.json: step is missing; it must be a non-negative integer"),
    "step a string": (b'{"status": "completed", "step": "4"}', "status.json: step must be a non-negative integer, "
                                                               "got '4' (a string)"),
    "status unknown": (b'{"status": "done", "step": 4}', "status.json: status must be one of 'completed'"),
    "not UTF-8": (b'{"status": "\xff", "step": 4}', "status.json: the run status is not UTF-8"),
}


@pytest.mark.parametrize("case", STATUS)
def test_a_run_status_that_is_not_a_status(trained, tmp_path, capsys, case):
    from hessian_tools.demo import _finished

    data, message = STATUS[case]
    run_dir = _copy_run(trained, tmp_path)
    (run_dir / "status.json").write_bytes(data)
    assert_one_line(run(command("train", tmp_path, "--steps", "4", "--save-every", "2"), capsys), message)
    with pytest.raises(UserError, match=re.escape(message)):
        _finished(run_dir)  # the demo's and eos's readers share it


TRAIN_CONFIG = {  # RUN_DIR/train_config.json edit -> message of the rerun `train`
    "a list": (lambda c: [c], "train_config.json: the file must hold an object with arch, dim"),
    "lr a string": (lambda c: {**c, "lr": "0.003"}, "train_config.json: lr must be a positive finite number, got "
                                                     "'0.003'"),
    "steps null": (lambda c: {**c, "steps": None}, "train_config.json: steps must be a positive integer, got null"),
    "unknown field": (lambda c: {**c, "width": 3}, "train_config.json: the file must hold an object with keys among"),
    "missing field": (lambda c: {k: v for k, v in c.items() if k != "dim"},  # the default (64) is what it recorded
                      "holds a run with different settings (dim: 64 there, 8 now)"),
}


@pytest.mark.parametrize("case", TRAIN_CONFIG)
def test_a_recorded_training_config_that_is_not_one(trained, tmp_path, capsys, case):
    edit, message = TRAIN_CONFIG[case]
    run_dir = _copy_run(trained, tmp_path, unfinished=True)
    config = json.loads((run_dir / "train_config.json").read_text())
    (run_dir / "train_config.json").write_text(json.dumps(edit(config)))
    rc, out, lines = run(command("train", tmp_path, "--steps", "4", "--save-every", "2"), capsys)
    assert_one_line((rc, out, lines), message)
    assert "choose another --out" in lines[0] and not (run_dir / "ckpt_0000004").exists()


BAD_METRICS = {  # a line put between the first two lines of metrics.jsonl -> what the report says it is
    "not JSON": (b'{"kind": "loss", "step": 1', "is not JSON"),
    "non-UTF-8 bytes": (b'{"kind": "loss", "step": 2, "loss": "\xff\xfe"}', "is not UTF-8 (byte 37)"),
    "a JSON scalar": (b"17", "is a JSON int, not a metrics line object"),
    "a JSON list": (b"[1, 2]", "is a JSON list, not a metrics line object"),
    "step a string": (b'{"kind": "loss", "step": "2", "loss": 1.0}', "is not a valid metrics line: step must be a positive integer, got '2'"),
    "loss NaN": (b'{"kind": "loss", "step": 2, "loss": NaN}', "is not a valid metrics line: loss must be a finite number, got NaN"),
    "unknown kind": (b'{"kind": "grad", "step": 2}', "is not a valid metrics line: kind must be one of 'loss', 'sharpness'"),
}


def _without_timing(lines):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


@pytest.mark.parametrize("case", BAD_METRICS)
def test_a_broken_metrics_line_loses_no_valid_line_and_is_quarantined(trained, tmp_path, capsys, case):
    """Read: every valid line, one report line. Resume from step 2: lines 1 and 2 kept (the old reader stopped at
    the broken line, and the resume kept only line 1), the broken line moved to the quarantine file, then the
    run ends with the uninterrupted run's lines."""
    import base64

    from models.train import read_metrics

    bad, why = BAD_METRICS[case]
    run_dir = _copy_run(trained, tmp_path, unfinished=True)
    log = run_dir / "metrics.jsonl"
    first, rest = log.read_bytes().split(b"\n", 1)
    log.write_bytes(first + b"\n" + bad + b"\n" + rest)
    reports = []
    assert read_metrics(log, report=reports.append) == read_metrics(trained / "metrics.jsonl")
    assert len(reports) == 1 and f"metrics.jsonl: 1 invalid line skipped (line 2 {why}" in reports[0], reports
    rc, out, lines = run(command("train", tmp_path, "--steps", "4", "--save-every", "2"), capsys)
    assert rc == 0 and len(lines) == 1 and f"1 invalid line moved to {log}.quarantine.jsonl (line 2 {why}" \
        in lines[0], lines
    assert _without_timing(read_metrics(log, kind=None, report=None)) == \
        _without_timing(read_metrics(trained / "metrics.jsonl", kind=None))
    assert b"\xff" not in log.read_bytes() and log.read_bytes().count(b"\n") == 4
    kept = [json.loads(line) for line in (run_dir / "metrics.jsonl.quarantine.jsonl").read_text().splitlines()]
    assert [(e["line"], base64.b64decode(e["base64"])) for e in kept] == [(2, bad)]


def test_a_timing_record_that_is_not_one(tmp_path):
    from hessian_tools.demo import TIMING_FILE, Experiment

    exp = Experiment("tiny", root=tmp_path)
    exp.record_timing({"train": {"wall_time_s": 1.5}})
    assert exp.timing() == {"train": {"wall_time_s": 1.5}}
    (tmp_path / TIMING_FILE).write_text('{"train": {"wall_time_s": "slow"}}')
    with pytest.raises(UserError, match=r"timing.json: train.wall_time_s must be a non-negative finite number"):
        exp.record_timing({"sweep": {"wall_time_s": 2.0}})
    assert json.loads((tmp_path / TIMING_FILE).read_text()) == {"train": {"wall_time_s": "slow"}}  # left as it was


def test_a_sweep_on_a_disk_that_fills_keeps_its_earlier_records(trained, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the second record's write (injected, as results_io's Disk does): one line, exit 2,
    the file holds exactly the first record, whole; the rerun on a disk with room measures the rest."""
    import errno

    import hessian_tools.results_io as results_io
    from hessian_tools.results_io import read_records

    real, writes = results_io.write_all, []

    def write_all(fd, data):
        writes.append(data)
        if len(writes) == 2:
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(results_io, "write_all", write_all)
    out = tmp_path / "results.jsonl"
    argv = ["sweep", trained, "--out", out, "--batches", "1", "--batch-size", "2", "--seq-len", "8", "--groups", "0",
            "--quiet"]
    rc, stdout, lines = run(argv, capsys)
    assert rc == 2 and len(lines) == 1 and "results.jsonl: cannot append a record (the file is as it was): the disk " \
        "is full" in lines[0] and stdout == "", lines
    assert out.read_bytes() == writes[0] and len(read_records(out)) == 1
    monkeypatch.setattr(results_io, "write_all", real)
    rc, stdout, lines = run(argv, capsys)
    records = read_records(out)
    assert rc == 0 and ", 1 already in " in stdout and records[0] == json.loads(writes[0])
    assert len(records) == 1 + int(stdout.split()[0]) > 2  # both checkpoints measured, each unit once
