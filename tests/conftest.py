"""Shared helpers: tiny GPTs of both architectures, a tiny task, a few training steps. Seeded, CPU-only."""
import functools
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

from model import GPT, GPTConfig  # noqa: E402

TINY = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
# Llama's five switches on the same tiny shape: 4 query heads share 2 key/value heads, no biases, untied head
LLAMA = dict(TINY, n_head=4, n_kv_head=2, bias=False, norm="rmsnorm", mlp="swiglu", n_hidden=24,
             rope_theta=10000.0, tie_head=False)
# Qwen2's blocks: Llama's with biases on q, k and v alone
QWEN2 = dict(LLAMA, qkv_bias=True)
ARCHS = {"gpt2": TINY, "llama": LLAMA, "qwen2": QWEN2}


def tiny_gpt(seed=0, arch="gpt2", **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**ARCHS[arch], **kw})).eval()


def tiny_batch(seed=0, B=4, T=12, vocab=64, strides=(3,)):
    """Counting sequences: start anywhere, step by a stride (mod vocab); targets are the next tokens."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(vocab, (B, 1), generator=g)
    stride = torch.tensor(strides)[torch.randint(len(strides), (B, 1), generator=g)]
    seq = (start + stride * torch.arange(T + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


@functools.lru_cache(maxsize=4)
def _pretrained_state(arch, block_size):
    model = tiny_gpt(arch=arch, block_size=block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(150):  # counting with strides 1..5: the stride is only known once a sequence shows it
        _, loss = model(*tiny_batch(1000 + step, B=32, strides=(1, 2, 3, 4, 5)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_gpt(arch="gpt2", block_size=32):
    """A tiny base that has learned to count; tuning to stride 3 alone (tiny_batch) can then lower the loss."""
    model = tiny_gpt(arch=arch, block_size=block_size)
    model.load_state_dict(_pretrained_state(arch, block_size))
    return model.eval()


def train(model, steps=30, lr=1e-2, seed=0, params=None):
    """A few AdamW steps on what requires grad, on one batch of tiny_batch; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x, y = tiny_batch(seed)
    losses = []
    model.train()
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def model():
    return tiny_gpt()


# The command line on a tiny world: seconds, not minutes. One base is pretrained per test session and shared.
BASE_ARGS = ["--size", "tiny", "--people", "40", "--vocab-size", "400", "--block-size", "64",
             "--pretrain-steps", "40", "--pretrain-batch-size", "8"]
TINY_ARGS = [*BASE_ARGS, "--steps", "10", "--eval-every", "5", "--batch-size", "8"]


def tiny(*argv, base=TINY_ARGS):
    """base's options (TINY_ARGS), less those that argv gives again, then argv: the command line
    refuses an option given twice."""
    again, out, skip = {a.split("=")[0] for a in argv if a.startswith("--")}, [], False
    for a in base:
        if a.startswith("--"):
            skip = a.split("=")[0] in again
        if not skip:
            out.append(a)
    return [*out, *argv]


def one_line(call, argv, message):
    """call(argv) must stop with one line `error: ...` matching message."""
    with pytest.raises(SystemExit) as e:
        call(argv)
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    assert re.search(message, text), text


@pytest.fixture(scope="session")
def tiny_out(tmp_path_factory):
    import train as train_py
    out = str(tmp_path_factory.mktemp("out"))
    train_py.main(["--method", "pretrain", "--out-dir", out, *BASE_ARGS])
    return out


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    """A small classification file of text/label lines: fast to train and score."""
    from kit import world
    path = tmp_path_factory.mktemp("task") / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(dict(text=f"The {w} is {a}.", label="good" if a in world.GOOD else "bad"))
                              for w in world.ITEMS for a in world.GOOD[:2] + world.BAD[:2]))
    return str(path)
