"""Model files written the way other tools write them, from our own tiny models, so that the readers
(pretrained.py, tokenizer.py) are tested offline: safetensors, GPT-2 and Llama-family hub folders (sharded too),
tokenizer.json, and GGUF files with Q8_0 / Q4_0 / Q4_1 blocks packed in numpy."""
import json
import struct

import numpy as np
import torch

from kit import tokenizer
from kit.pretrained import CONV1D

SAFETENSORS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(tensors, path):
    """The documented layout: 8-byte little-endian header length, JSON header, raw little-endian data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=SAFETENSORS[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format allows padding the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_gpt2_folder(model, folder, enc=None, prefix=True, fmt="safetensors", dtype=torch.float32, **config):
    """A GPT-2 folder as the hubs hold one: Conv1D (in, out) weights, tied head left out, the original
    release's mask buffers when there is no "transformer." prefix."""
    folder.mkdir(exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":
            state[k if prefix else k.removeprefix("transformer.")] = (v.t() if k.endswith(CONV1D) else v).to(dtype)
    if not prefix:
        T = model.config.block_size
        for i in range(model.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, T, T)).to(dtype)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4).to(dtype)
    c = model.config
    (folder / "config.json").write_text(json.dumps({**dict(
        model_type="gpt2", n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
        vocab_size=c.vocab_size, activation_function="gelu_new", layer_norm_epsilon=1e-5), **config}))
    if fmt == "safetensors":
        write_safetensors(state, folder / "model.safetensors")
    else:
        torch.save(state, folder / "pytorch_model.bin")
    if enc is not None:
        tokenizer.save_gpt2_folder(enc, folder)
    return str(folder)


def hub_tensors(model):
    """Our Llama-style model's weights under the hub's names: q, k, v and gate, up as separate matrices."""
    c, out = model.config, {}
    hs = c.n_embd // c.n_head
    out["model.embed_tokens.weight"] = model.transformer.wte.weight
    out["model.norm.weight"] = model.transformer.ln_f.weight
    if not c.tie_head:
        out["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.transformer.h):
        q, k, v = b.attn.c_attn.weight.split([c.n_embd, hs * c.n_kv_head, hs * c.n_kv_head])
        gate, up = b.mlp.c_fc.weight.chunk(2)
        p = f"model.layers.{i}."
        if c.qkv_bias:  # Qwen2's biases on q, k and v
            qb, kb, vb = b.attn.c_attn.bias.split([c.n_embd, hs * c.n_kv_head, hs * c.n_kv_head])
            out.update({p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb,
                        p + "self_attn.v_proj.bias": vb})
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": b.attn.c_proj.weight,
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": b.mlp.c_proj.weight, p + "input_layernorm.weight": b.ln_1.weight,
                    p + "post_attention_layernorm.weight": b.ln_2.weight})
    return {k: v.detach().clone() for k, v in out.items()}


def llama_config(model, **extra):
    c = model.config
    return {**dict(model_type="qwen2" if c.qkv_bias else "llama", hidden_size=c.n_embd, intermediate_size=c.n_hidden,
                   num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                   vocab_size=c.vocab_size, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                   rope_theta=c.rope_theta, tie_word_embeddings=c.tie_head, hidden_act="silu"), **extra}


def write_llama_folder(model, folder, enc=None, shards=1, dtype=torch.float32, **config):
    """A Llama-family hub folder: config.json, model.safetensors (or shards with their index), tokenizer.json."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(model, **config)))
    tensors = {k: v.to(dtype) for k, v in hub_tensors(model).items()}
    if shards == 1:
        write_safetensors(tensors, folder / "model.safetensors")
    else:
        names, weight_map = sorted(tensors), {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            write_safetensors({n: tensors[n] for n in part}, folder / file)
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
    if enc is not None:
        write_tokenizer_json(enc, folder / "tokenizer.json")
    return str(folder)


def vocab_and_merges(enc):
    """Our BPE as a model's vocabulary (token strings in GPT-2's byte-to-unicode form -> id) and merges."""
    to_char = tokenizer.bytes_to_unicode()
    text = lambda t: "".join(to_char[b] for b in t)
    ranks = enc._mergeable_ranks
    merges = [[text(p) for p in tokenizer.bpe_split(t, ranks, r)] for t, r in sorted(ranks.items(), key=lambda x: x[1])
              if len(t) > 1]
    return {text(t): r for t, r in ranks.items()}, merges


def write_tokenizer_json(enc, path, digits=True, qwen2=False, added=()):
    """SmolLM2's pre-tokenizer (digits apart, then ByteLevel's regex), GPT-2's (digits=False), or Qwen2's (its Split
    regex, ByteLevel without one, and NFC); added: (content, special) tokens after the end-of-text token."""
    vocab, merges = vocab_and_merges(enc)
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=not qwen2)
    pre = dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True), byte_level]) \
        if digits else byte_level
    if qwen2:
        pre = dict(type="Sequence", pretokenizers=[dict(type="Split", pattern=dict(Regex=tokenizer.QWEN2_PAT),
                                                        behavior="Isolated", invert=False), byte_level])
    path.write_text(json.dumps(dict(
        version="1.0", normalizer=dict(type="NFC") if qwen2 else None, pre_tokenizer=pre,
        decoder=dict(type="ByteLevel"),
        added_tokens=[dict(id=enc.eot_token + i, content=t, special=special)
                      for i, (t, special) in enumerate([(tokenizer.EOT, True), *added])],
        model=dict(type="BPE", vocab={**vocab, tokenizer.EOT: enc.eot_token}, merges=[" ".join(m) for m in merges]))))


# ------------------------------------------------------------------------------------------------------------
# GGUF

GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "BF16": 30, "Q8_1": 9}


def gguf_value(v):
    """(type id, bytes) of a metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        raw = v.encode()
        return 8, struct.pack("<Q", len(raw)) + raw
    kind = gguf_value(v[0])[0] if v else 4
    return 9, struct.pack("<IQ", kind, len(v)) + b"".join(gguf_value(x)[1] for x in v)


def quantize(x, kind):
    """float32 values -> the bytes of ggml blocks of 32 (and the values those bytes stand for)."""
    x = x.astype(np.float32).reshape(-1, 32)
    if kind == "Q8_0":
        d = (np.abs(x).max(1, keepdims=True) / 127).astype(np.float16)
        q = np.round(x / np.where(d == 0, 1, d).astype(np.float32)).clip(-127, 127).astype(np.int8)
        return np.concatenate([d.view(np.uint8), q.view(np.uint8)], 1).tobytes()
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    if kind == "Q4_1":
        d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
        q = np.round((x - m.astype(np.float32)) / np.where(d == 0, 1, d).astype(np.float32)).clip(0, 15)
        head = np.concatenate([d.view(np.uint8), m.view(np.uint8)], 1)
    else:  # Q4_0
        d = (np.maximum(np.abs(lo), np.abs(hi)) / 7).astype(np.float16)
        q = np.round(x / np.where(d == 0, 1, d).astype(np.float32) + 8).clip(0, 15)
        head = d.view(np.uint8)
    q = q.astype(np.uint8)
    return np.concatenate([head, q[:, :16] | (q[:, 16:] << 4)], 1).tobytes()


def dequantized(raw, kind, shape):
    """The values ggml blocks stand for, block by block, written out plainly: the reference for the reader."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    out = []
    for i in range(0, len(raw), size):
        block = raw[i:i + size]
        d = float(np.frombuffer(block[:2], np.float16)[0])
        if kind == "Q8_0":
            out += [d * q for q in np.frombuffer(block[2:], np.int8)]
            continue
        m = float(np.frombuffer(block[2:4], np.float16)[0]) if kind == "Q4_1" else 0.0
        packed = block[4:] if kind == "Q4_1" else block[2:]
        qs = [b & 15 for b in packed] + [b >> 4 for b in packed]  # low nibbles first, then the high ones
        out += [d * q + m if kind == "Q4_1" else d * (q - 8) for q in qs]
    return torch.tensor(out, dtype=torch.float32).view(shape)


def write_gguf(path, meta, tensors, version=3, alignment=32, offsets=None):
    """tensors: {name: (float32 tensor, ggml type)} (or a list of such pairs, to repeat a name). Dimensions are
    written fastest first (reversed). offsets: {name: byte offset} written instead of the true ones (files that lie)."""
    out = bytearray(b"GGUF") + struct.pack("<IQQ", version, len(tensors), len(meta))
    for k, v in meta.items():
        kind, raw = gguf_value(v)
        out += gguf_value(k)[1] + struct.pack("<I", kind) + raw
    blobs, offset = [], 0
    for name, (t, kind) in (tensors.items() if isinstance(tensors, dict) else tensors):
        if kind in ("F32", "F16"):
            raw = t.numpy().astype(np.float32 if kind == "F32" else np.float16).tobytes()
        elif kind in GGML and kind.startswith("Q") and kind != "Q8_1":
            raw = quantize(t.numpy(), kind)
        else:
            raw = b"\0" * (t.numel() * 2)  # a type the reader refuses: the bytes don't matter
        out += gguf_value(name)[1] + struct.pack("<I", t.dim()) + b"".join(struct.pack("<Q", d) for d in t.shape[::-1])
        out += struct.pack("<IQ", GGML[kind], (offsets or {}).get(name, offset))
        blobs.append(raw + b"\0" * (-len(raw) % alignment))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % alignment)
    with open(path, "wb") as f:
        f.write(bytes(out) + b"".join(blobs))
    return str(path)


def permute(w, n_head):
    """llama.cpp's converter: each head's rows i and hs/2 + i side by side, for its interleaved rotation."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(model, matrices="F32", embedding="F32"):
    """Our Llama-style model as llama.cpp names and lays it out, matrices in the given ggml type."""
    c, out = model.config, {}
    for name, t in hub_tensors(model).items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            stem, kind = rest.rsplit(".", 1)  # weight, or bias (Qwen2's q, k, v)
            short = GGUF_NAMES[stem]
            if short in ("attn_q", "attn_k") and not c.qkv_bias:  # qwen2's converter keeps the hub's order
                t = permute(t, c.n_head if short == "attn_q" else c.n_kv_head)
            out[f"blk.{layer}.{short}.{kind}"] = (t, matrices if t.dim() == 2 else "F32")
        else:
            gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
            out[gguf] = (t, embedding if t.dim() == 2 else "F32")
    return out


def gguf_meta(model, enc=None, **extra):
    """The llama architecture's metadata, or qwen2's for a model with qkv_bias (and Qwen2's pre-tokenizer)."""
    c = model.config
    arch = "qwen2" if c.qkv_bias else "llama"
    meta = {"general.architecture": arch, "general.alignment": 32, **{f"{arch}.{k}": v for k, v in {
            "block_count": c.n_layer, "context_length": c.block_size, "embedding_length": c.n_embd,
            "feed_forward_length": c.n_hidden, "attention.head_count": c.n_head,
            "attention.head_count_kv": c.n_kv_head, "rope.freq_base": float(c.rope_theta),
            "attention.layer_norm_rms_epsilon": float(c.norm_eps), "vocab_size": c.vocab_size}.items()}}
    if enc is not None:
        vocab, merges = vocab_and_merges(enc)
        tokens = sorted(vocab, key=vocab.get) + [tokenizer.EOT]
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2" if c.qkv_bias else "smollm",
                     "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
                     "tokenizer.ggml.merges": [" ".join(m) for m in merges],
                     "tokenizer.ggml.eos_token_id": len(tokens) - 1})
    return {**meta, **extra}
