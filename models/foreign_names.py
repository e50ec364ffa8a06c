"""Name tables for foreign checkpoints, kept as data.

The model's module names already equal those of the SimpleGPT reference / torchtitan Llama and of nanoGPT,
so loading a foreign state dict only strips wrapper prefixes, drops non-parameter buffers and reads the
architecture off the key names.
"""

# Wrapper prefixes: torch.compile (`_orig_mod.`) and DistributedDataParallel (`module.`).
STRIPPED_PREFIXES = ("_orig_mod.", "module.")

# Buffers that foreign code saves but that are not parameters here (RoPE table, nanoGPT's causal mask).
DROPPED_SUFFIXES = ("freqs_cis", ".attn.bias", ".attn.masked_bias")

# (architecture, substrings that must all occur in some key), most specific first.
ARCH_SIGNATURES = (
    ("simplegpt", (".attention.snq.",)),
    ("llama2_qknorm", (".attention.q_norm.",)),
    ("llama2", (".attention.wq.",)),
    ("simplegpt_gpt2", ("transformer.h.", ".attn.c_q.")),
    ("gpt2", ("transformer.h.", ".attn.c_attn.")),
)

# nanoGPT `model_args` -> GPTConfig fields.
NANOGPT_MODEL_ARGS = {
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "n_embd": "dim",
    "block_size": "seq_len",
    "bias": "bias",
    "vocab_size": "vocab_size",
    "dropout": "dropout",
}
