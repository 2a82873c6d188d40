"""pretrained.py: released models as other tools write them load to the same logits and greedy output: GPT-2
folders (both key layouts, safetensors and .bin, float32/16/bf16), Llama-family folders (grouped and plain
attention, tied and untied head, sharded, bf16), GGUF files (F32, and Q8_0/Q4_0/Q4_1 blocks, against an
independent dequantization; q/k rows permuted as llama.cpp's converter does). Files that lie are one line."""
import json
import re
import shutil
import struct

import pytest
import torch

from kit import pretrained
from conftest import tiny_batch, tiny_gpt
from files import (dequantized, gguf_meta, gguf_tensors, hub_tensors, llama_config, quantize, write_gguf,
                   write_gpt2_folder, write_llama_folder, write_safetensors)
from model import GPT


def same_output(loaded, reference, atol=1e-6):
    x = torch.randint(64, (3, 20), generator=torch.Generator().manual_seed(0))
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in loaded.parameters())
    assert torch.allclose(loaded(x)[0], reference(x)[0], atol=atol)
    assert torch.equal(loaded.generate(x[:, :5], 10, temperature=0), reference.generate(x[:, :5], 10, temperature=0))


def rounded(model, dtype):
    """The same weights, rounded to a file's precision."""
    ref = tiny_gpt(arch="llama" if model.config.rope_theta else "gpt2", **{
        k: getattr(model.config, k) for k in ("n_head", "n_kv_head", "tie_head")})
    ref.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    return ref


@pytest.mark.parametrize("prefix,fmt,dtype", [(True, "safetensors", torch.float32), (False, "bin", torch.float16),
                                              (False, "safetensors", torch.float16), (True, "bin", torch.float32),
                                              (True, "safetensors", torch.bfloat16)])
def test_gpt2_folder_loads_to_the_same_logits_and_greedy_output(tmp_path, prefix, fmt, dtype):
    model = tiny_gpt(3)
    loaded = GPT.from_pretrained(write_gpt2_folder(model, tmp_path / "m", prefix=prefix, fmt=fmt, dtype=dtype))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    same_output(loaded, rounded(model, dtype), atol=1e-4)


@pytest.mark.parametrize("n_kv_head,tie_head,shards,dtype", [(2, False, 1, torch.float32), (4, True, 3, torch.float32),
                                                             (1, True, 1, torch.bfloat16), (4, False, 2, torch.float16)])
def test_llama_folder_loads_to_the_same_logits(tmp_path, n_kv_head, tie_head, shards, dtype):
    model = tiny_gpt(4, arch="llama", n_kv_head=n_kv_head, tie_head=tie_head)
    loaded = GPT.from_pretrained(write_llama_folder(model, tmp_path / "m", shards=shards, dtype=dtype))
    assert loaded.config.n_kv_head == n_kv_head and loaded.config.tie_head == tie_head
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie_head
    same_output(loaded, rounded(model, dtype), atol=1e-5)


def test_block_size_crops_the_context(tmp_path):
    model = tiny_gpt(4)
    folder = write_gpt2_folder(model, tmp_path / "m")
    cropped = GPT.from_pretrained(folder, block_size=12)
    x = torch.randint(64, (2, 12))
    assert cropped.transformer.wpe.weight.shape[0] == 12 and torch.allclose(cropped(x)[0], model(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="longer than the model's block_size 12"):
        cropped(torch.randint(64, (1, 13)))
    with pytest.raises(ValueError, match="must be between 1 and .* 32 positions"):
        GPT.from_pretrained(folder, block_size=33)


def test_gguf_in_float32_loads_exactly_with_q_and_k_unpermuted(tmp_path):
    model = tiny_gpt(5, arch="llama", tie_head=True)
    path = write_gguf(tmp_path / "m.gguf", gguf_meta(model), gguf_tensors(model))
    loaded = GPT.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    same_output(loaded, model, atol=0)


def test_gguf_blocks_dequantize_as_their_formulas_say(tmp_path):
    model = tiny_gpt(6, arch="llama", tie_head=False)
    tensors = gguf_tensors(model, matrices="Q4_1", embedding="Q8_0")
    tensors["output.weight"] = (tensors["output.weight"][0], "Q4_0")
    loaded = GPT.from_pretrained(write_gguf(tmp_path / "q.gguf", gguf_meta(model), tensors))
    reference = hub_tensors(model)
    for name, (t, kind) in [("model.embed_tokens.weight", (reference["model.embed_tokens.weight"], "Q8_0")),
                            ("lm_head.weight", (reference["lm_head.weight"], "Q4_0")),
                            ("model.layers.1.mlp.down_proj.weight",
                             (reference["model.layers.1.mlp.down_proj.weight"], "Q4_1"))]:
        ours = {"model.embed_tokens.weight": loaded.transformer.wte.weight, "lm_head.weight": loaded.lm_head.weight,
                "model.layers.1.mlp.down_proj.weight": loaded.transformer.h[1].mlp.c_proj.weight}[name]
        expected = dequantized(quantize(t.numpy(), kind), kind, t.shape)
        assert torch.equal(ours, expected), name
        assert (ours - t).abs().max() < 0.02  # and close to the weights they stand for


def test_released_files_that_lie_are_refused_in_one_line(tmp_path):
    model = tiny_gpt(7, arch="llama")
    good = json.loads(json.dumps(llama_config(model)))
    cases = [
        (dict(num_hidden_layers="2"), r"config.json: num_hidden_layers is '2', not an integer"),
        (dict(hidden_size=17), r"the width 17 is not divisible by the 4 attention heads"),
        (dict(num_attention_heads=0), r"num_attention_heads is 0; it must be between 1 and"),
        (dict(num_key_value_heads=3), r"4 query heads can't be shared by 3 key/value heads"),
        (dict(num_hidden_layers=10 ** 9), r"num_hidden_layers is 1000000000; it must be between 1 and 1024"),
        (dict(max_position_embeddings=None), r"max_position_embeddings is None, not an integer"),
        (dict(rms_norm_eps=float("nan")), r"rms_norm_eps is nan, not a finite number"),
        (dict(hidden_act="gelu"), r"can't represent: activation 'gelu', not silu"),
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), r"can't represent: scaled rotary positions"),
        (dict(model_type="gemma"), r"model_type is 'gemma'; model.py's GPT represents gpt2, llama and qwen2"),
        (dict(num_hidden_layers=3), r"missing \['transformer.h.2.attn.c_attn.weight'"),
    ]
    for i, (change, message) in enumerate(cases):
        folder = tmp_path / f"m{i}"
        write_llama_folder(model, folder)
        (folder / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=message):
            GPT.from_pretrained(str(folder))
    folder = tmp_path / "list"
    write_llama_folder(model, folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json holds a list, not a JSON object"):
        GPT.from_pretrained(str(folder))
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        GPT.from_pretrained(str(folder))


def test_weights_files_that_lie_are_refused_in_one_line(tmp_path):
    model = tiny_gpt(8, arch="llama")
    folder = tmp_path / "m"
    write_llama_folder(model, folder)
    weights = folder / "model.safetensors"
    tensors = hub_tensors(model)
    for bad, message in [(b"", "is empty or truncated"), (b"\x10\0\0\0\0\0\0\0[1, 2, 3]       ",
                                                              "its header is not a JSON object"),
                         (weights.read_bytes()[:300], "truncated")]:
        weights.write_bytes(bad)
        with pytest.raises(ValueError, match=message):
            GPT.from_pretrained(str(folder))
    tensors["model.norm.weight"][3] = float("nan")
    write_safetensors(tensors, weights)
    with pytest.raises(ValueError, match="tensor model.norm.weight holds NaN or infinite values"):
        GPT.from_pretrained(str(folder))
    tensors["model.norm.weight"] = torch.ones(5)
    write_safetensors(tensors, weights)
    with pytest.raises(ValueError, match=r"transformer.ln_f.weight \(5,\) \(expected \(16,\)\)"):
        GPT.from_pretrained(str(folder))


def test_gguf_files_that_lie_are_refused_in_one_line(tmp_path):
    model = tiny_gpt(9, arch="llama", tie_head=True)
    path = write_gguf(tmp_path / "m.gguf", gguf_meta(model), gguf_tensors(model, matrices="Q8_0"))
    raw = open(path, "rb").read()
    for cut in (10, 200, len(raw) - 100):
        open(tmp_path / "cut.gguf", "wb").write(raw[:cut])
        with pytest.raises(ValueError, match="is truncated"):
            GPT.from_pretrained(str(tmp_path / "cut.gguf"))
    tensors = gguf_tensors(model)
    tensors["blk.0.ffn_up.weight"] = (tensors["blk.0.ffn_up.weight"][0], "Q8_1")
    with pytest.raises(ValueError, match=r"tensor blk.0.ffn_up.weight is Q8_1; only F32, F16, BF16, Q8_0, Q4_0, "
                                         r"Q4_1, Q5_0, .*, Q6_K, Q8_K are read"):
        GPT.from_pretrained(write_gguf(tmp_path / "q8_1.gguf", gguf_meta(model), tensors))
    with pytest.raises(ValueError, match="its architecture is 'gemma'"):
        GPT.from_pretrained(write_gguf(tmp_path / "a.gguf", gguf_meta(model, **{"general.architecture": "gemma"}),
                                       gguf_tensors(model)))
    with pytest.raises(ValueError, match="is GGUF version 1"):
        GPT.from_pretrained(write_gguf(tmp_path / "v1.gguf", gguf_meta(model), gguf_tensors(model), version=1))
    open(tmp_path / "x.gguf", "wb").write(b"GGML" + raw[4:])
    with pytest.raises(ValueError, match="does not start with 'GGUF'"):
        GPT.from_pretrained(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="neither a model folder nor a .gguf file .it does not exist"):
        pretrained.read(str(tmp_path / "nowhere"))


def test_gguf_layouts_that_lie_are_refused_in_one_line(tmp_path):
    model = tiny_gpt(9, arch="llama", tie_head=True)
    meta, tensors = gguf_meta(model), gguf_tensors(model)
    names = list(tensors)
    for kwargs, message in [
            (dict(tensors=list(tensors.items()) + [(names[0], tensors[names[0]])]), f"the tensor {names[0]} is listed "
                                                                                   "twice"),
            (dict(offsets={names[1]: 4}), f"tensor {names[1]}'s data starts at offset 4, which is not a multiple of "
                                          "the alignment 32"),
            (dict(offsets={names[1]: 0}), f"the data of tensors {min(names[:2])} and {max(names[:2])} overlap"),
            (dict(meta={**meta, "general.alignment": 0}), "general.alignment is 0; GGUF needs a power of two"),
            (dict(meta={**meta, "general.alignment": "32"}), "general.alignment is '32'; GGUF needs a power of two")]:
        path = write_gguf(tmp_path / "lie.gguf", **{"meta": meta, "tensors": tensors, **kwargs})
        with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {message}")):
            GPT.from_pretrained(path)


def test_safetensors_and_folders_that_lie_are_refused_or_read_as_transformers_does(tmp_path):
    model, other = tiny_gpt(8, arch="llama"), tiny_gpt(5, arch="llama")
    folder = tmp_path / "m"
    write_llama_folder(model, folder)
    header = json.dumps({"a": dict(dtype="F32", shape=[4], data_offsets=[0, 16]),
                         "b": dict(dtype="F32", shape=[4], data_offsets=[8, 24])}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    with pytest.raises(ValueError, match="the bytes of tensors a and b overlap: the file is damaged"):
        pretrained.read_safetensors(str(tmp_path / "x.safetensors"))
    both = tmp_path / "both"
    write_llama_folder(other, both, shards=2)
    shutil.copy(folder / "model.safetensors", both / "model.safetensors")  # beside the shards and their index
    idx = torch.randint(64, (1, 8))
    assert torch.equal(GPT.from_pretrained(str(both))(idx)[0], model(idx)[0])  # model.safetensors, as transformers
    for key, value in (("rope_scaling", "linear"), ("rope_parameters", [1])):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=f"config.json: {key} is {re.escape(repr(value))}, not an object"):
            GPT.from_pretrained(str(folder))
        (folder / "config.json").write_text(json.dumps(config))


def qwen2_model(seed, **kw):
    """A tiny Qwen2-shaped model with biases that matter (they start at zero)."""
    model = tiny_gpt(seed, arch="qwen2", **kw)
    with torch.no_grad():
        for b in model.transformer.h:
            b.attn.c_attn.bias.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("tie_head", [False, True])
def test_qwen2_folder_and_gguf_load_with_their_q_k_v_biases(tmp_path, tie_head):
    model = qwen2_model(10, tie_head=tie_head, norm_eps=1e-6, rope_theta=1e6)  # Qwen2.5's
    folder = write_llama_folder(model, tmp_path / "m", shards=2)  # model_type qwen2, biases under the hub's names
    gguf = write_gguf(tmp_path / "m.gguf", gguf_meta(model), gguf_tensors(model))  # qwen2: q, k rows as the hub's
    for path in (folder, gguf):
        config, _ = pretrained.read(path)
        assert config["qkv_bias"] and not config["bias"] and config["tie_head"] == tie_head
        assert (config["n_kv_head"], config["rope_theta"]) == (2, 1e6) and config["norm_eps"] == pytest.approx(1e-6)
        loaded = GPT.from_pretrained(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        same_output(loaded, model, atol=0)
    quantized = GPT.from_pretrained(write_gguf(tmp_path / "q.gguf", gguf_meta(model), gguf_tensors(model, "Q8_0")))
    assert torch.equal(quantized.transformer.h[1].attn.c_attn.bias, model.transformer.h[1].attn.c_attn.bias)  # F32
    same_output(quantized, model, atol=0.05)


def test_qwen2_sliding_windows_are_refused_only_where_they_act(tmp_path):
    model = qwen2_model(11)
    good = llama_config(model)
    assert good["model_type"] == "qwen2"
    for i, (change, refused) in enumerate([
            (dict(use_sliding_window=False, sliding_window=4, max_window_layers=0), False),  # Qwen2.5's config.json
            (dict(use_sliding_window=True, sliding_window=64, max_window_layers=0), False),  # longer than the context
            (dict(use_sliding_window=True, sliding_window=4, max_window_layers=2), False),  # no layer from 2 on
            (dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), True),
            (dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
             True),  # transformers 5 names the layers
            (dict(attention_bias=True), True)]):  # Llama's switch: a bias on the output projection too
        folder = tmp_path / f"m{i}"
        write_llama_folder(model, folder)
        (folder / "config.json").write_text(json.dumps({**good, **change}))
        if refused:
            with pytest.raises(ValueError, match="can't represent: (sliding-window attention|biases in the Linear)"):
                GPT.from_pretrained(str(folder))
        else:
            same_output(GPT.from_pretrained(str(folder)), model, atol=0)
    folder = tmp_path / "llama"  # a Llama folder with Qwen2's biases: weights its config doesn't describe
    write_llama_folder(model, folder)
    (folder / "config.json").write_text(json.dumps({**good, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"unexpected \['transformer.h.0.attn.c_attn.bias'"):
        GPT.from_pretrained(str(folder))
