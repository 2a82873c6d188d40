"""
Reading released models, offline, with torch and numpy only: what model.py's GPT needs to load them
(GPTConfig's fields and a tensor for each of its parameter names), from three kinds of files.

    config, tensors = pretrained.read("models/gpt2")          # a GPT-2 folder from a hub
    config, tensors = pretrained.read("models/SmolLM2-135M")  # a Llama-family or Qwen2 folder
    config, tensors = pretrained.read("SmolLM2-135M-Instruct.Q4_1.gguf")  # llama.cpp's format
    model = GPT.from_pretrained(path)  # what you normally call: model.py uses read()

- GPT-2 folders: config.json, model.safetensors or pytorch_model.bin. GPT-2's Conv1D layers store
  weights as (in, out) and are transposed; the original release's keys have no "transformer."
  prefix.
- Llama-family folders (model_type llama, mistral, or qwen2, each without a sliding window that
  would act): config.json and model.safetensors (read first, as transformers does), or shards
  listed in model.safetensors.index.json. q, k, v (and Qwen2's q, k, v biases) and the MLP's gate
  and up are fused (c_attn, c_fc).
- .gguf files (GGUF v2/v3) of the llama or qwen2 architecture, tensors in any block type
  gguf_quants.py reads, dequantized to float32. For llama, llama.cpp's converter permutes the rows
  of q and k within each head for its interleaved rotary layout; gguf_model undoes it, which gives
  back the hub's layout exactly (qwen2's are written unpermuted).
The configs are read by released_config.py. Every field and tensor is checked before anything
large is allocated; a file that lies (a field's type, overlapping bytes, NaN weights) is one
ValueError naming the file and the field.
"""
import itertools
import json
import math
import mmap
import os

import numpy as np
import torch

from kit import task_files
from kit.gguf_reader import dequantize, read_gguf, unpermute
from kit.released_config import gguf_config, gpt2_config, llama_config


def read_json(file, what="a JSON object"):
    try:
        with open(file, "rb") as f:
            obj = task_files.loads(f.read(), file)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): download it again") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file} holds a {type(obj).__name__}, not {what}")
    return obj


# --------------------------------------------------------------------------------------------------
# Tensors: {name: a function that reads it as float32}. Nothing is read until it is asked for, one
# at a time.

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checked(name, file, t):
    # a piece at a time: isfinite of a whole 151,936 x 1,536 head holds twice its size in temporaries
    if not all(torch.isfinite(part).all() for part in t.reshape(-1).split(1 << 20)):
        raise ValueError(f"{file}: tensor {name} holds NaN or infinite values: the file is damaged")
    return t


def read_safetensors(file):
    """safetensors' documented layout: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets}} (offsets counted from the end of the header), then the raw
    data. The file is memory-mapped, so only the float32 copies take memory. Returns
    {name: (shape, reader)}."""
    size = os.path.getsize(file)
    if size < 8:
        raise ValueError(f"{file} is empty or truncated ({size} bytes): download it again")
    with open(file, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: torch may view it
    n = int.from_bytes(buf[:8], "little")
    if 8 + n > size:
        raise ValueError(f"{file} is truncated: its header alone is said to be {n:,} bytes: "
                         f"download it again")
    try:
        header = task_files.loads(buf[8:8 + n], f"{file}'s header")
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a readable safetensors file (its header is not a JSON "
                         f"object): download it again")
    out, spans = {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(t, dict) and isinstance(t.get("shape"), list)
              and isinstance(t.get("data_offsets"), list)
              and all(isinstance(d, int) and d >= 0 for d in t["shape"] + t["data_offsets"])
              and len(t["data_offsets"]) == 2)
        if not ok:
            raise ValueError(f"{file}: the header entry of tensor {name} is not "
                             f"{{dtype, shape, data_offsets}}")
        if t.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} is {t.get('dtype')}; "
                             f"only F32, F16 and BF16 are read")
        dtype, (start, end) = SAFETENSORS_DTYPES[t["dtype"]], t["data_offsets"]
        count = math.prod(t["shape"])
        if end - start != count * dtype.itemsize or 8 + n + end > size:
            raise ValueError(f"{file}: tensor {name}'s bytes don't match its shape, or the file "
                             f"is truncated: download it again")

        def reader(name=name, dtype=dtype, count=count, offset=8 + n + start, shape=t["shape"]):
            flat = (torch.frombuffer(buf, dtype=dtype, count=count, offset=offset) if count
                    else torch.zeros(0))
            # our own memory
            return checked(name, file, flat.view(shape).to(torch.float32, copy=True))
        out[name] = (tuple(t["shape"]), reader)
        spans.append((start, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:  # two tensors would read the same bytes
            raise ValueError(f"{file}: the bytes of tensors {a} and {b} overlap: the file is "
                             f"damaged")
    return out


def read_weights(path):
    """{name: (shape, reader)} of a folder: model.safetensors, its shards, or pytorch_model.bin."""
    index, single = (os.path.join(path, f) for f in ("model.safetensors.index.json",
                                                      "model.safetensors"))
    # both: transformers' from_pretrained reads model.safetensors, and so do we
    if os.path.isfile(index) and not os.path.isfile(single):
        shards = read_json(index).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(f, str) for f in shards.values()):
            raise ValueError(f"{index} has no weight_map of tensor names to shard files")
        out = {}
        for shard in sorted(set(shards.values())):
            file = os.path.join(path, os.path.basename(shard))
            if not os.path.isfile(file):
                raise ValueError(f"{path}: the shard {shard} that {index} lists is missing")
            out.update(read_safetensors(file))
        return out
    file = os.path.join(path, "model.safetensors")
    if os.path.isfile(file):
        return read_safetensors(file)
    file = os.path.join(path, "pytorch_model.bin")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has no model.safetensors, model.safetensors.index.json or "
                         f"pytorch_model.bin")
    try:
        # tensors only: no code runs
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {file} ({type(e).__name__}): "
                         f"is it a complete PyTorch checkpoint?") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{file} is not a dict of tensors")
    return {k: (tuple(t.shape), lambda k=k, t=t: checked(k, file, t.float()))
            for k, t in state.items()}


def fused(*readers):
    """Matrices our GPT keeps as one (q, k, v in c_attn; gate and up in c_fc), stacked along the
    outputs."""
    return lambda: torch.cat([r() for r in readers])


# --------------------------------------------------------------------------------------------------
# Names: the file's tensors as our GPT's parameters. Both architectures use GPT-2's (nanoGPT's)
# names.

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def gpt2_tensors(raw, block_size):
    out = {}
    for k, (shape, reader) in raw.items():
        # causal-mask buffers of old files, not weights
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        name = k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k
        if name.endswith(CONV1D):  # Conv1D is (in, out); nn.Linear is (out, in)
            shape, reader = shape[::-1], (lambda r=reader: r().t().contiguous())
        # a shorter context keeps the first rows
        if name == "transformer.wpe.weight" and block_size:
            shape, reader = (block_size, *shape[1:]), (lambda r=reader: r()[:block_size].clone())
        out[name] = (shape, reader)
    out.pop("lm_head.weight", None)  # GPT-2 ties its head to the token embedding
    return out


LLAMA_NAMES = {"self_attn.o_proj": "attn.c_proj", "mlp.down_proj": "mlp.c_proj",
               "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}


def llama_tensors(raw, n_layer):
    """The hub's names as ours; q/k/v and gate/up are fused. Tensors the file has and we don't
    know are kept under their own name, so that the shape check names them."""
    out, raw = {}, dict(raw)
    rename = {"model.embed_tokens.weight": "transformer.wte.weight",
              "model.norm.weight": "transformer.ln_f.weight",
              "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        hub, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        rename.update({hub + a + ".weight": ours + b + ".weight" for a, b in LLAMA_NAMES.items()})
        groups = {"attn.c_attn": [f"self_attn.{p}_proj" for p in "qkv"],
                  "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"]}
        for (name, parts), kind in itertools.product(groups.items(), ("weight", "bias")):
            parts = [f"{hub}{p}.{kind}" for p in parts]  # biases: Qwen2's q, k, v
            if all(p in raw for p in parts):
                shapes = [raw[p][0] for p in parts]
                shape = ((sum(s[0] for s in shapes), *shapes[0][1:])
                         if len({s[1:] for s in shapes}) == 1 else None)
                out[f"{ours}{name}.{kind}"] = (shape or "mismatched parts",
                                               fused(*(raw.pop(p)[1] for p in parts)))
    for k, v in raw.items():
        out[rename.get(k, k)] = v
    return out


def check_shapes(path, tensors, expected):
    """The file's tensors against the model its config describes: same names, same shapes."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights don't match the model its config describes: missing "
                         f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}")
    wrong = [f"{k} {tuple(tensors[k][0]) if isinstance(tensors[k][0], tuple) else tensors[k][0]} "
             f"(expected {tuple(s)})" for k, s in expected.items() if tensors[k][0] != tuple(s)]
    if wrong:
        raise ValueError(f"{path}: tensors of the wrong shape for its config: "
                         f"{', '.join(wrong[:3])}")


def fill(model, path, tensors):
    """Put the file's tensors into a model built on the meta device (GPT.from_pretrained), each checked
    against its shape, one tensor at a time: memory holds the model, not several copies of it."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_head:
        del expected["lm_head.weight"]  # the same tensor as the token embedding
    check_shapes(path, tensors, expected)
    for name in expected:
        module, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(module, attr, torch.nn.Parameter(tensors.pop(name)[1]()))
    if model.config.tie_head:
        model.lm_head.weight = model.transformer.wte.weight


def read(path, block_size=None):
    """(GPTConfig's fields, {our parameter name: reader}) of a model folder or .gguf file."""
    path = task_files.path_of(path, "a released model")
    if os.path.isfile(path) and path.endswith(".gguf"):
        config, raw = gguf_model(path)
        tensors = llama_tensors(raw, config["n_layer"])
    elif os.path.isdir(path):
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ValueError(f"{path} is not a model folder: it has no config.json")
        c = read_json(file)
        kind = c.get("model_type")
        if kind == "gpt2":
            config = gpt2_config(c, file)
        elif kind in ("llama", "mistral", "qwen2"):
            config = llama_config(c, file)
        else:
            raise ValueError(f"{file}: model_type is {kind!r}; model.py's GPT represents gpt2, "
                             f"llama and qwen2 (and mistral without a sliding window)")
        raw = read_weights(path)
        tensors = (gpt2_tensors(raw, block_size) if kind == "gpt2"
                   else llama_tensors(raw, config["n_layer"]))
    else:
        raise ValueError(f"{path!r} is neither a model folder nor a .gguf file" +
                         ("" if os.path.exists(path) else " (it does not exist)"))
    if block_size is not None:
        if not 1 <= block_size <= config["block_size"]:
            raise ValueError(f"--block-size {block_size} must be between 1 and {path}'s "
                             f"{config['block_size']} positions")
        config["block_size"] = block_size
    return config, {k: (shape, r) for k, (shape, r) in tensors.items()}


# --------------------------------------------------------------------------------------------------
# GGUF files (gguf_reader.py reads the format; released_config.py their metadata)

GGUF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_model(file):
    """GPTConfig's fields and {hub name: (shape, reader)} from a .gguf file of the llama or qwen2
    architecture."""
    meta, tensors, buf = read_gguf(file)
    arch, config = gguf_config(meta, tensors, file)

    def reader(name, shape, kind, offset, size):
        def read_one():
            raw = np.frombuffer(buf, dtype=np.uint8, count=size, offset=offset)
            t = torch.from_numpy(dequantize(raw, kind, math.prod(shape)).reshape(shape))
            # llama's converter permutes q and k for its interleaved rotation; qwen2's does not
            if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                t = unpermute(t, config["n_head"] if "attn_q" in name else config["n_kv_head"])
            return checked(name, file, t.contiguous())
        return read_one
    hub = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    out = {}
    for name, info in tensors.items():
        layer, _, rest = name.removeprefix("blk.").partition(".")
        stem, _, kind = rest.rpartition(".")  # blk.3.attn_q.bias: (attn_q, bias)
        inner = name.startswith("blk.") and stem in GGUF_NAMES
        key = (f"model.layers.{layer}.{GGUF_NAMES[stem]}.{kind}" if inner
               else hub.get(name, name))
        out[key] = (info[0], reader(name, *info))
    return config, out
