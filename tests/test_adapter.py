"""adapter.py: step-0 identity, parameter counts, placements, errors."""
import pytest
import torch

import adapter
from conftest import tiny_batch, tiny_gpt


def test_adapted_model_at_step_zero_is_bit_identical(model):
    x, _ = tiny_batch()
    plain = model(x)[0]
    adapter.attach(model, bottleneck=4)
    assert torch.equal(model(x)[0], plain)


@pytest.mark.parametrize("where,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_trainable_count_matches_the_formula(model, where, per_layer):
    d, r, L = 16, 4, 2
    adapters = adapter.attach(model, bottleneck=r, where=where, train_layernorm=False)
    assert len(adapters) == L * per_layer
    assert model.num_params(trainable_only=True) == L * per_layer * (2 * d * r + d + r)
    layernorms = (2 * L + 1) * 2 * d  # ln_1, ln_2 per block and ln_f, each weight + bias
    with_ln = tiny_gpt()
    adapter.attach(with_ln, bottleneck=r, where=where)
    assert with_ln.num_params(trainable_only=True) == L * per_layer * (2 * d * r + d + r) + layernorms


def test_pfeiffer_leaves_the_attention_slot_empty(model):
    adapter.attach(model, where="pfeiffer")
    assert all(isinstance(b.adapter_attn, torch.nn.Identity) for b in model.transformer.h)
    assert all(isinstance(b.adapter_mlp, adapter.Adapter) for b in model.transformer.h)


def test_bad_options_are_clear_errors(model):
    with pytest.raises(ValueError, match="houlsby or pfeiffer"):
        adapter.attach(model, where="middle")
    with pytest.raises(ValueError, match="activation"):
        adapter.attach(model, act="swish")
