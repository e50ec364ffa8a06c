"""Name tables for foreign checkpoints, kept as data.

The model's module names already equal those of the SimpleGPT reference / torchtitan Llama and of nanoGPT,
so loading a foreign state dict only strips wrapper prefixes, drops non-parameter buffers and reads the
architecture off the key names. Hugging Face names are mapped by the tables at the end.
"""

# Wrapper prefixes: DistributedDataParallel (`module.`), and wrappers that torch.compile and activation
# checkpointing insert anywhere in a name (`_orig_mod.`, `_checkpoint_wrapped_module.`).
STRIPPED_PREFIXES = ("module.",)
STRIPPED_INFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")

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

# The first block's maps whose shapes give the widths: (query map, key map, FFN gate map) per family.
LLAMA_SHAPE_KEYS = {
    "q": ("layers.0.attention.wq.weight", "layers.0.attention.snq.lin.weight"),
    "k": ("layers.0.attention.wk.weight", "layers.0.attention.snk.lin.weight"),
    "gate": ("layers.0.feed_forward.w1.weight", "layers.0.feed_forward.sn1.lin.weight"),
    "q_norm": ("layers.0.attention.q_norm.weight",),
}

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

# Hugging Face LlamaForCausalLM -> torchtitan names ({i} = layer); q and k are also re-ordered (see hf.py).
HF_LLAMA_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}

# Hugging Face GPT2LMHeadModel: nanoGPT's names (GPT2Model checkpoints lack the `transformer.` prefix); its
# Conv1D maps store weights as (in, out), transposed here.
HF_GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

# config.json -> GPTConfig fields
HF_LLAMA_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "ffn_hidden",
    "max_position_embeddings": "seq_len",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
HF_GPT2_CONFIG = {
    "vocab_size": "vocab_size",
    "n_embd": "dim",
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "n_positions": "seq_len",
    "layer_norm_epsilon": "norm_eps",
}
