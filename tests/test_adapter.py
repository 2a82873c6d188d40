"""adapter.py: step-0 identity, parameter counts, placements, the layer norms (RMSNorm on Llama), errors."""
import pytest
import torch

import adapter
from conftest import tiny_batch, tiny_gpt

Config = adapter.Config


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapted_model_at_step_zero_is_bit_identical(arch):
    model = tiny_gpt(arch=arch)
    x, _ = tiny_batch()
    plain = model(x)[0]
    adapter.attach(model, Config(bottleneck=4))
    assert torch.equal(model(x)[0], plain)


@pytest.mark.parametrize("where,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_trainable_count_matches_the_formula(model, where, per_layer):
    d, r, L = 16, 4, 2
    adapter.attach(model, Config(bottleneck=r, adapter_where=where, train_layernorm=False))
    assert model.num_params(trainable_only=True) == L * per_layer * (2 * d * r + d + r)
    layernorms = (2 * L + 1) * 2 * d  # ln_1, ln_2 per block and ln_f, each weight + bias
    with_ln = tiny_gpt()
    trained = adapter.attach(with_ln, Config(bottleneck=r, adapter_where=where))
    assert with_ln.num_params(trainable_only=True) == L * per_layer * (2 * d * r + d + r) + layernorms
    assert sum(p.numel() for p in trained.parameters()) == with_ln.num_params(trainable_only=True)


def test_on_llama_the_rmsnorm_weights_train_and_nothing_else_of_the_base():
    model = tiny_gpt(arch="llama")
    adapter.attach(model, Config(bottleneck=4))
    base = {n for n, p in model.named_parameters() if p.requires_grad and "adapter" not in n}
    assert base == {f"transformer.h.{i}.ln_{j}.weight" for i in range(2) for j in (1, 2)} | {"transformer.ln_f.weight"}


def test_pfeiffer_leaves_the_attention_slot_empty(model):
    adapter.attach(model, Config(adapter_where="pfeiffer"))
    assert all(b.adapter_attn is None for b in model.transformer.h)
    assert all(isinstance(b.adapter_mlp, adapter.Adapter) for b in model.transformer.h)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="--adapter-where must be one of houlsby, pfeiffer"):
        Config(adapter_where="middle")
    with pytest.raises(ValueError, match="--adapter-act must be one of gelu, relu, tanh"):
        Config(adapter_act="swish")
    with pytest.raises(ValueError, match="--bottleneck must be at least 1, got 0"):
        Config(bottleneck=0)
    with pytest.raises(ValueError, match="--bottleneck must be an integer, got '4'"):
        Config(bottleneck="4")
