"""What every training-time method must guarantee: the base stays frozen, only the new parameters learn, the loss
falls, and the saved trainable tensors reload onto a fresh base to give the same logits."""
import pytest
import torch

import train
from conftest import pretrained_gpt, snapshot, tiny_batch, tiny_gpt
from conftest import train as train_steps

METHODS = {"prompt": dict(n_tokens=4), "prefix": dict(n_prefix=3, hidden=8),
           "prefix-direct": dict(n_prefix=3, reparam=False), "adapter": dict(bottleneck=4)}


def attached(name, seed=0):
    model = pretrained_gpt()
    torch.manual_seed(seed)
    train.METHODS[name.split("-")[0]].attach(model, **METHODS[name])
    return model


def new_names(model):
    base = {n for n, _ in tiny_gpt().named_parameters()}
    return {n for n, _ in model.named_parameters()} - base


@pytest.mark.parametrize("name", METHODS)
def test_frozen_base_is_bit_identical_after_training(name):
    model = attached(name)
    before = {n: p for n, p in snapshot(model).items() if n not in new_names(model)}
    train_steps(model, steps=5)
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before if "ln_" not in n or name != "adapter")


@pytest.mark.parametrize("name", METHODS)
def test_only_the_new_parameters_get_gradients(name):
    model = attached(name)
    x, y = tiny_batch()
    model(x, y)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}  # frozen ones: None
    expected = new_names(model) | ({n for n, _ in model.named_parameters() if "ln_" in n} if name == "adapter" else set())
    assert with_grad == expected and with_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


@pytest.mark.parametrize("name", METHODS)
def test_loss_falls_on_a_tiny_task(name):
    losses = train_steps(attached(name), steps=40, lr=3e-2)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", METHODS)
def test_saved_trainable_tensors_reload_to_the_same_logits(name):
    model = attached(name)
    train_steps(model, steps=5)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fresh = attached(name, seed=99)  # different initial values: the load must overwrite them
    fresh.load_state_dict(state, strict=False)
    x, _ = tiny_batch(1)
    assert torch.equal(model(x)[0], fresh(x)[0])
    assert not torch.equal(attached(name, seed=99)(x)[0], model(x)[0])


@pytest.mark.parametrize("name", METHODS)
def test_cached_generation_equals_uncached_with_the_method_attached(name):
    model = attached(name)
    train_steps(model, steps=5)
    x, _ = tiny_batch()
    assert torch.equal(model.generate(x[:, :6], 10, temperature=0),
                       model.generate(x[:, :6], 10, temperature=0, use_cache=False))
