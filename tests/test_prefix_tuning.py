"""prefix_tuning.py: attention against an explicit computation, the cache, merging, parameter counts."""
import math

import pytest
import torch

import prefix_tuning
from conftest import tiny_batch, tiny_gpt
from conftest import train as train_steps
from model import KVCache


def explicit_attention(attn, x, pk, pv):
    """Concatenate the prefix to the layer's keys/values and apply a bottom-right causal mask by hand."""
    B, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (z.view(B, T, nh, hs).transpose(1, 2) for z in (q, k, v))
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    P = pk.size(2)
    att = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, P + T)
    allowed = torch.tensor([[j < P + i + 1 for j in range(P + T)] for i in range(T)])  # all prefix + causal past
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    return attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_attention_equals_explicit_computation(model, reparam):
    prefix_tuning.attach(model, n_prefix=3, reparam=reparam, hidden=8)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 7, 16)
    pk, pv = attn.prefix(2)
    assert pk.shape == (2, 2, 3, 8)
    assert torch.allclose(attn(x)[0], explicit_attention(attn, x, pk, pv), atol=1e-6)


def test_cache_after_a_prefix_keeps_the_same_rule(model):
    prefix_tuning.attach(model, n_prefix=3, reparam=False)
    x, _ = tiny_batch()
    cache = KVCache(model.config.n_layer)
    parts = [model(x[:, :4], cache=cache)[0]] + [model(x[:, t:t + 2], cache=cache)[0] for t in (4, 6, 8, 10)]
    assert cache.kv[0][0].size(2) == 3 + 12  # prefix, then every token seen
    assert torch.allclose(torch.cat(parts, 1), model(x)[0], atol=1e-5)


def test_merged_prefix_gives_the_same_logits(model):
    prefix_tuning.attach(model, n_prefix=4, hidden=8)
    train_steps(model, steps=5)
    x, _ = tiny_batch(2)
    before = model(x)[0]
    prefix_tuning.merge(model)
    assert all(isinstance(b.attn.prefix, prefix_tuning.Prefix) for b in model.transformer.h)
    assert torch.allclose(model(x)[0], before, atol=1e-6)


def test_parameter_counts_match_the_formulas(model):
    L, C, P, H = 2, 16, 4, 8
    prefix_tuning.attach(model, n_prefix=P, hidden=H)
    training = P * C + (C * H + H) + (H * L * 2 * C + L * 2 * C)  # P' table + the MLP's two layers
    assert model.num_params(trainable_only=True) == training
    prefix_tuning.merge(model)
    assert prefix_tuning.stored_params(model) == L * 2 * P * C == model.num_params(trainable_only=True)
    direct = tiny_gpt()
    prefix_tuning.attach(direct, n_prefix=P, reparam=False)
    assert direct.num_params(trainable_only=True) == L * 2 * P * C


def test_direct_prefix_starts_at_real_word_activations(model):
    ids = [5, 6, 7]
    prefix_tuning.attach(model, n_prefix=3, reparam=False, init_ids=ids)
    cache = KVCache(model.config.n_layer)
    plain = tiny_gpt()
    plain(torch.tensor([ids]), cache=cache)
    for block, (k, v) in zip(model.transformer.h, cache.kv):
        pk, pv = block.attn.prefix(1)
        assert torch.allclose(pk, k) and torch.allclose(pv, v)


def test_zero_prefix_is_not_an_identity(model):
    x, _ = tiny_batch()
    plain = model(x)[0]
    prefix_tuning.attach(model, n_prefix=3, reparam=False)
    for b in model.transformer.h:
        torch.nn.init.zeros_(b.attn.prefix.k)
        torch.nn.init.zeros_(b.attn.prefix.v)
    assert not torch.allclose(model(x)[0], plain, atol=1e-4)
