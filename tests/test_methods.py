"""What every row of train.METHODS must guarantee, on the three architectures (GPT-2, Llama, Qwen2; bf16 on the
first two), with its default options: the base stays frozen, exactly what attach() returns gets gradients, the
loss falls, the trained tensors reload onto a fresh base to the same logits, cached generation equals uncached,
and it trains under bf16 autocast. A method added to the table (the LoRA homework, tests/homework) is tested here
with no edit of this file."""
from dataclasses import replace

import pytest
import torch

import train
from conftest import pretrained_gpt, tiny_batch
from conftest import train as train_steps
from kit.options import autocast

VARIANTS = {"prefix --no-reparam": ("prefix", dict(reparam=False)),
            "adapter pfeiffer": ("adapter", dict(adapter_where="pfeiffer"))}
ROWS = {**{name: (name, {}) for name in train.METHODS if name != "none"}, **VARIANTS}  # none trains nothing
CASES = [pytest.param(row, arch, id=f"{row}-{arch}") for row in ROWS for arch in ("gpt2", "llama", "qwen2")]
TWO = [case for case in CASES if case.values[1] != "qwen2"]  # bf16: Qwen2's blocks add nothing there to Llama's


def attached(row, arch, seed=0):
    """A tiny pretrained base of `arch` with the method attached; returns (model, what trains)."""
    name, options = ROWS[row]
    model = pretrained_gpt(arch, block_size=64)  # room for the default 20-vector soft prompt
    torch.manual_seed(seed)
    method = train.METHODS[name]
    trained = method.attach(model, replace(method.Config(), **options))
    return model, trained


def new_or_trained(model, trained):
    ids = {id(p) for p in trained.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("row,arch", CASES)
def test_only_what_attach_returns_learns_and_the_loss_falls(row, arch):
    model, trained = attached(row, arch)
    expected = new_or_trained(model, trained)
    x, y = tiny_batch()
    model(x, y)[1].backward()
    assert expected and {n for n, p in model.named_parameters() if p.grad is not None} == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    model.zero_grad(set_to_none=True)
    frozen = {n: p for n, p in pretrained_gpt(arch, 64).named_parameters() if n not in expected}
    losses = train_steps(model, steps=40, lr=3e-2)
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("row,arch", CASES)
def test_trained_tensors_reload_exactly_and_cached_generation_equals_uncached(row, arch):
    model, _ = attached(row, arch)
    train_steps(model, steps=5)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fresh, _ = attached(row, arch, seed=99)  # other initial values: the load must overwrite them
    x, _ = tiny_batch(1)
    assert not torch.equal(fresh(x)[0], model(x)[0])
    fresh.load_state_dict(state, strict=False)
    assert torch.equal(model(x)[0], fresh(x)[0])
    assert torch.equal(model.generate(x[:, :6], 10, temperature=0),
                       model.generate(x[:, :6], 10, temperature=0, use_cache=False))


@pytest.mark.parametrize("row,arch", TWO)
def test_trains_and_generates_under_bf16_autocast_with_float32_weights(row, arch):
    model, trained = attached(row, arch)
    params = list(trained.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = tiny_batch()
    losses = []
    for _ in range(8):
        with autocast("cpu", "bfloat16"):
            logits, loss = model(x, y)
        assert logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(p.dtype == torch.float32 for p in params)
    with autocast("cpu", "bfloat16"):
        assert model.generate(x[:, :5], 8, temperature=0).shape == (4, 13)
