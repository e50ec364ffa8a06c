"""The SimpleGPT reference's model names and flavor tables (torchtitan's Llama model args), kept as data.

The reference (github.com/Ocram7/SimpleGPT, src/torchtitan/models) registers six model names over two
flavor tables. Its ModelArgs defaults: n_kv_heads None (= n_heads), multiple_of 256, ffn_dim_multiplier None,
norm_eps 1e-5, rope_theta 10000; max_seq_len is set from [training] seq_len and the RoPE table (`freqs_cis`)
holds 2 * max_seq_len positions. Its preqknorm model normalizes q and k over all heads together.
"""

# reference model name -> our settings (arch, and how the reference's block maps onto it)
REFERENCE_MODELS = {
    "llama2": {"arch": "llama2"},
    "llama2_simplegpt": {"arch": "simplegpt"},
    "llama2_preqknorm": {"arch": "llama2_qknorm", "qk_norm_scope": "all"},
    "llama3": {"arch": "llama2"},
    "llama3_simplegpt": {"arch": "simplegpt"},
    "llama3_preqknorm": {"arch": "llama2_qknorm", "qk_norm_scope": "all"},
}

MODEL_ARGS_DEFAULTS = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
                       "rope_theta": 10000.0}

LLAMA2_FLAVORS = {
    "debugmodel": {"dim": 256, "n_layers": 8, "n_heads": 16},
    "20M": {"dim": 256, "n_layers": 4, "n_heads": 4},
    "22M": {"dim": 256, "n_layers": 6, "n_heads": 4},
    "35M": {"dim": 384, "n_layers": 6, "n_heads": 6},
    "39M": {"dim": 384, "n_layers": 8, "n_heads": 6},
    "60M": {"dim": 512, "n_layers": 8, "n_heads": 8},
    "67M": {"dim": 512, "n_layers": 10, "n_heads": 8},
    "102M": {"dim": 640, "n_layers": 12, "n_heads": 10},
    "134M": {"dim": 768, "n_layers": 12, "n_heads": 12},
    "162M": {"dim": 768, "n_layers": 16, "n_heads": 12},
    "271M": {"dim": 1024, "n_layers": 16, "n_heads": 16},
    "297M": {"dim": 1024, "n_layers": 18, "n_heads": 16},
    "360M": {"dim": 1152, "n_layers": 18, "n_heads": 16},
    "1B": {"dim": 2048, "n_layers": 18, "n_heads": 16},
    "7B": {"dim": 4096, "n_layers": 32, "n_heads": 32},
    "13B": {"dim": 5120, "n_layers": 40, "n_heads": 40},
    "26B": {"dim": 5120, "n_layers": 80, "n_heads": 40},
    "70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3,
            "multiple_of": 4096},
}

LLAMA3_FLAVORS = {
    "debugmodel": {"dim": 1024, "n_layers": 16, "n_heads": 16, "rope_theta": 500000.0},
    "8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3,
           "multiple_of": 1024, "rope_theta": 500000.0},
    "70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3,
            "multiple_of": 4096, "rope_theta": 500000.0},
}


def flavor_table(model_name: str) -> dict:
    """The flavor table a reference model name draws from."""
    return LLAMA3_FLAVORS if model_name.startswith("llama3") else LLAMA2_FLAVORS
