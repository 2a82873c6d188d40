"""
Released models' configs as GPTConfig's fields: a hub folder's config.json (GPT-2, Llama, Mistral,
Qwen2) or a GGUF file's metadata (llama, qwen2), every field checked for its type and range before
any tensor is made. A model the switches of model.py can't represent is refused in one line that
names every reason. pretrained.py reads the files and their tensors.

    config = llama_config(json.load(open("Qwen2.5-0.5B/config.json")), "config.json")
    config = gguf_config(meta, tensors, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    model = GPT(GPTConfig(**config))

Qwen2 is Llama with biases on q, k and v (qkv_bias) and an optional sliding window (refused where it
would act). Its GGUF files keep q and k rows as the hub does: llama.cpp's converter permutes them
for the llama architecture only (pretrained.py undoes that there).
"""
import math

MISSING = object()
# the switches every Llama-family model sets; Qwen2 adds qkv_bias
LLAMA = dict(bias=False, norm="rmsnorm", mlp="swiglu")


def number(c, key, file, kind=int, least=1, most=1 << 24, default=MISSING):
    """c[key], checked: an int (or, for kind=float, any finite number) between least and most."""
    v = c.get(key, default)
    if v is MISSING:
        raise ValueError(f"{file} has no {key!r}")
    ok = isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)
    if not ok or not math.isfinite(v):
        raise ValueError(f"{file}: {key} is {v!r}, "
                         f"not {'an integer' if kind is int else 'a finite number'}")
    if not least <= v <= most:
        raise ValueError(f"{file}: {key} is {v}; it must be between {least} and {most}")
    return v


def refuse(file, reasons):
    """The model the file describes, if the switches of GPTConfig can't represent it: one line,
    every reason."""
    reasons = [why for bad, why in reasons if bad]
    if reasons:
        raise ValueError(f"{file} describes a model that model.py's GPT can't represent: "
                         f"{'; '.join(reasons)}")


def shape_checks(config, file):
    n_embd, n_head, n_kv = (config["n_embd"], config["n_head"],
                            config.get("n_kv_head") or config["n_head"])
    if n_embd % n_head:
        raise ValueError(f"{file}: the width {n_embd} is not divisible by the {n_head} "
                         f"attention heads")
    if n_head % n_kv:
        raise ValueError(f"{file}: {n_head} query heads can't be shared by {n_kv} key/value heads")
    return config


def gpt2_config(c, file):
    refuse(file, [(c.get("activation_function", "gelu_new") != "gelu_new",
                   f"activation {c.get('activation_function')!r}, not gelu_new"),
                  (c.get("n_inner") not in (None, 4 * c.get("n_embd", 0)),
                   f"n_inner {c.get('n_inner')}"),
                  (c.get("scale_attn_by_inverse_layer_idx", False),
                   "attention scaled by layer index"),
                  (not c.get("tie_word_embeddings", True),
                   "an LM head not tied to the token embeddings")])
    positions = "n_positions" if "n_positions" in c else "n_ctx"
    return shape_checks(dict(
        block_size=number(c, positions, file, most=1 << 20),
        vocab_size=number(c, "vocab_size", file),
        n_layer=number(c, "n_layer", file, most=1024), n_head=number(c, "n_head", file, most=1024),
        n_embd=number(c, "n_embd", file, most=1 << 16),
        norm_eps=number(c, "layer_norm_epsilon", file, float, 1e-12, 1.0, 1e-5)), file)


def sliding_window(c, file):
    """Whether a sliding window limits attention in some layer, below the model's context. Llama and
    Mistral: any window given. Qwen2 (as transformers reads it): a window only with
    use_sliding_window, and only in the layers from max_window_layers on, or those layer_types
    names."""
    window = c.get("sliding_window")
    if c.get("model_type") != "qwen2":
        return window is not None
    if not c.get("use_sliding_window", False) or window is None:
        return False
    n_layer = number(c, "num_hidden_layers", file, most=1024)
    first = number(c, "max_window_layers", file, least=0, most=1 << 20, default=28)
    layers = c.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                      for i in range(n_layer)]
    longest = number(c, "max_position_embeddings", file, most=1 << 20)
    return "sliding_attention" in layers and not (isinstance(window, int) and window >= longest)


def llama_config(c, file):
    """model_type llama, mistral or qwen2 (Llama's blocks with biases on q, k and v)."""
    rope = c.get("rope_parameters") or {}  # transformers 5 writes rope_theta here
    scaling = c.get("rope_scaling") or {}
    for key, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{file}: {key} is {value!r}, not an object of rotary settings")
    refuse(file, [(c.get("hidden_act", "silu") != "silu",
                   f"activation {c.get('hidden_act')!r}, not silu"),
                  (c.get("attention_bias", False) or c.get("mlp_bias", False),
                   "biases in the Linear layers"),
                  (scaling.get("rope_type", scaling.get("type", "default")) != "default" or
                   rope.get("rope_type", "default") != "default", "scaled rotary positions"),
                  (sliding_window(c, file), "sliding-window attention"),
                  (c.get("head_dim") not in (None, c.get("hidden_size", 0)
                                             // max(1, c.get("num_attention_heads", 1))),
                   f"head_dim {c.get('head_dim')} is not hidden_size / num_attention_heads")])
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    return shape_checks(dict(
        block_size=number(c, "max_position_embeddings", file, most=1 << 20),
        vocab_size=number(c, "vocab_size", file),
        n_layer=number(c, "num_hidden_layers", file, most=1024),
        n_head=number(c, "num_attention_heads", file, most=1024),
        n_embd=number(c, "hidden_size", file, most=1 << 16),
        n_kv_head=number(c, "num_key_value_heads", file, most=1024,
                         default=c.get("num_attention_heads")),
        n_hidden=number(c, "intermediate_size", file, most=1 << 20),
        norm_eps=number(c, "rms_norm_eps", file, float, 1e-12, 1.0, 1e-6),
        rope_theta=number(dict(rope_theta=theta), "rope_theta", file, float, 1.0, 1e12),
        tie_head=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=c.get("model_type") == "qwen2", **LLAMA), file)


GGUF_ARCHITECTURES = ("llama", "qwen2")


def gguf_config(meta, tensors, file):
    """GPTConfig's fields from a GGUF file's metadata ({key: value}) and tensor names: the keys of
    the llama architecture (qwen2's are the same under its own prefix)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{file}: its architecture is {arch!r}; model.py's GPT reads GGUF files "
                         f"of {', '.join(map(repr, GGUF_ARCHITECTURES))}")
    c = {k.removeprefix(arch + "."): v for k, v in meta.items() if k.startswith(arch + ".")}
    refuse(file, [(c.get("rope.scaling.type", "none") not in ("none", "linear") or
                   c.get("rope.scaling.factor", 1.0) != 1.0, "scaled rotary positions")])
    vocab = c.get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))
    config = shape_checks(dict(
        block_size=number(c, "context_length", file, most=1 << 20),
        vocab_size=number(dict(v=vocab), "v", file),
        n_layer=number(c, "block_count", file, most=1024),
        n_head=number(c, "attention.head_count", file, most=1024),
        n_embd=number(c, "embedding_length", file, most=1 << 16),
        n_kv_head=number(c, "attention.head_count_kv", file, most=1024,
                         default=c.get("attention.head_count")),
        n_hidden=number(c, "feed_forward_length", file, most=1 << 20),
        norm_eps=number(c, "attention.layer_norm_rms_epsilon", file, float, 1e-12, 1.0),
        rope_theta=number(c, "rope.freq_base", file, float, 1.0, 1e12, 10000.0),
        tie_head="output.weight" not in tensors, qkv_bias=arch == "qwen2", **LLAMA), file)
    hs = config["n_embd"] // config["n_head"]
    if c.get("rope.dimension_count", hs) != hs:
        raise ValueError(f"{file}: rotary positions on {c['rope.dimension_count']} of {hs} "
                         f"dimensions per head")
    return arch, config
