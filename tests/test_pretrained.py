"""GPT-2 folders as the base: weights written the way other tools write them (both key layouts, safetensors and .bin,
float32/float16/bfloat16) load to the same logits and greedy output; what the model can't represent is refused with
one line; `train.py --base DIR` runs a method, reloads it, and runs proxy tuning between two folders."""
import json
import struct

import pytest
import torch

import data
import tokenizer
import train
from conftest import tiny_gpt
from model import CONV1D, GPT

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
    """A GPT-2 folder as the hubs hold one: Conv1D (in, out) weights, tied head left out, the original release's mask
    buffers when there is no "transformer." prefix."""
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


@pytest.mark.parametrize("prefix,fmt,dtype", [(True, "safetensors", torch.float32), (False, "bin", torch.float16),
                                              (False, "safetensors", torch.float16), (True, "bin", torch.float32),
                                              (True, "safetensors", torch.bfloat16)])
def test_folder_loads_to_the_same_logits_and_greedy_output(tmp_path, prefix, fmt, dtype):
    model = tiny_gpt(3)
    loaded = GPT.from_pretrained(write_gpt2_folder(model, tmp_path / "m", prefix=prefix, fmt=fmt, dtype=dtype)).eval()
    reference = tiny_gpt(3)  # the same weights, rounded to the file's precision
    reference.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in loaded.parameters())
    x = torch.randint(64, (3, 20), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loaded(x)[0], reference(x)[0], atol=1e-4)
    assert torch.equal(loaded.generate(x[:, :5], 10, temperature=0), reference.generate(x[:, :5], 10, temperature=0))


def test_block_size_crops_the_position_table(tmp_path):
    model = tiny_gpt(4)
    folder = write_gpt2_folder(model, tmp_path / "m")
    cropped = GPT.from_pretrained(folder, block_size=12).eval()
    x = torch.randint(64, (2, 12))
    assert cropped.transformer.wpe.weight.shape[0] == 12 and torch.allclose(cropped(x)[0], model(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="longer than the model's block_size 12"):
        cropped(torch.randint(64, (1, 13)))
    with pytest.raises(ValueError, match="must be between 1 and .* 32 positions"):
        GPT.from_pretrained(folder, block_size=33)


def test_what_the_model_cannot_represent_is_refused_in_one_line(tmp_path):
    model = tiny_gpt(5)
    with pytest.raises(ValueError, match="has no config.json"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        GPT.from_pretrained(write_gpt2_folder(model, tmp_path / "a", model_type="llama"))
    with pytest.raises(ValueError, match="activation 'relu'"):
        GPT.from_pretrained(write_gpt2_folder(model, tmp_path / "b", activation_function="relu"))
    folder = write_gpt2_folder(model, tmp_path / "c", fmt="bin")
    state = torch.load(f"{folder}/pytorch_model.bin")
    del state["transformer.h.1.mlp.c_fc.weight"]
    state["transformer.h.0.attn.extra"] = torch.zeros(3)
    torch.save(state, f"{folder}/pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.weight'\], unexpected "
                                         r"\['transformer.h.0.attn.extra'\]"):
        GPT.from_pretrained(folder)
    folder = write_gpt2_folder(model, tmp_path / "d")
    with open(f"{folder}/model.safetensors", "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GPT.from_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two GPT-2 folders sharing our world's tokenizer: a 'large' and a 'small' one, random weights."""
    root = tmp_path_factory.mktemp("gpt2")
    enc = tokenizer.train(data.pretrain_corpus(data.make_world(40)), 400)
    large = write_gpt2_folder(tiny_gpt(6, vocab_size=400, block_size=64, n_layer=2, n_embd=32), root / "large", enc)
    small = write_gpt2_folder(tiny_gpt(7, vocab_size=400, block_size=64), root / "small", enc, prefix=False)
    other = write_gpt2_folder(tiny_gpt(8, vocab_size=300, block_size=64), root / "other", fmt="bin")
    return dict(large=large, small=small, other=other, out=str(root / "out"))


FAST = ["--world-size", "20", "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--prompt-len", "4"]


def test_base_folder_runs_a_method_and_reloads_it(folders):
    metrics = train.main(["--base", folders["large"], "--method", "prompt", "--task", "sentiment", *FAST,
                          "--block-size", "48", "--out-dir", folders["out"]])
    assert metrics["base"] == "large" and metrics["trainable_params"] == 4 * 32 and 0 <= metrics["test"] <= 1
    assert train.main(["--load", f"{metrics['run_dir']}/ckpt.pt"]) == metrics["test"]


def test_proxy_between_two_folders_and_vocabulary_mismatch(folders, capsys):
    metrics = train.main(["--base", folders["large"], "--small-base", folders["small"], "--method", "proxy", *FAST,
                          "--out-dir", folders["out"]])
    assert metrics["method"] == "proxy" and metrics["small_base"] == "small"
    with pytest.raises(SystemExit, match="^error: proxy tuning needs one vocabulary: .* has 300 tokens"):
        train.main(["--base", folders["large"], "--small-base", folders["other"], "--method", "proxy", *FAST])
    with pytest.raises(SystemExit, match="^error: --size is for bases pretrained here"):
        train.main(["--base", folders["large"], "--size", "tiny", "--method", "prompt", *FAST])
    with pytest.raises(SystemExit, match="^error: GPT-2 folder .* not found"):
        train.main(["--base", folders["out"] + "/nowhere", "--method", "prompt", *FAST])
