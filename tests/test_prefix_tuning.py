"""prefix_tuning.py: attention against an explicit computation (GPT-2 and grouped-query attention), the cache,
finishing (the merge), parameter counts, the real-word initialisation, zero prefixes."""
import math

import pytest
import torch

import prefix_tuning
from conftest import tiny_batch, tiny_gpt
from conftest import train as train_steps
from model import KVCache, rotary, rotate


def explicit_attention(attn, x, pk, pv, rope=None):
    """Concatenate the prefix to the layer's keys/values, repeat key/value heads for their query groups, and
    apply a bottom-right causal mask by hand."""
    B, T, C = x.shape
    nh, nkv, hs = attn.n_head, attn.n_kv_head, C // attn.n_head
    q, k, v = attn.c_attn(x).split(attn.split, dim=2)
    q, k, v = (z.view(B, T, -1, hs).transpose(1, 2) for z in (q, k, v))
    if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
    k, v = torch.cat([pk, k], 2).repeat_interleave(nh // nkv, 1), torch.cat([pv, v], 2).repeat_interleave(nh // nkv, 1)
    P = pk.size(2)
    att = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, P + T)
    allowed = torch.tensor([[j < P + i + 1 for j in range(P + T)] for i in range(T)])  # all prefix + causal past
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    return attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_attention_equals_explicit_computation(arch, reparam):
    model = tiny_gpt(arch=arch)
    prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=3, reparam=reparam, prefix_hidden=8))
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 7, 16)
    pk, pv = attn.prefix(2)
    assert pk.shape == (2, model.config.n_kv_head, 3, 16 // model.config.n_head)  # as many heads as the keys
    rope = rotary(torch.arange(7), 16 // model.config.n_head, 1e4) if arch == "llama" else None
    assert torch.allclose(attn(x, rope=rope)[0], explicit_attention(attn, x, pk, pv, rope), atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cache_after_a_prefix_keeps_the_same_rule(arch):
    model = tiny_gpt(arch=arch)
    prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=3, reparam=False))
    x, _ = tiny_batch()
    cache = KVCache(model.config.n_layer)
    parts = [model(x[:, :4], cache=cache)[0]] + [model(x[:, t:t + 2], cache=cache)[0] for t in (4, 6, 8, 10)]
    assert cache.kv[0][0].size(2) == 3 + 12  # prefix, then every token seen
    assert torch.allclose(torch.cat(parts, 1), model(x)[0], atol=1e-5)


def test_finish_merges_the_mlp_output_to_the_same_logits(model):
    cfg = prefix_tuning.Config(prefix_len=4, prefix_hidden=8)
    prefix_tuning.attach(model, cfg)
    train_steps(model, steps=5)
    x, _ = tiny_batch(2)
    before = model(x)[0]
    assert prefix_tuning.finish(model, cfg) == prefix_tuning.Config(prefix_len=4, prefix_hidden=8, reparam=False)
    assert all(isinstance(b.attn.prefix, prefix_tuning.Prefix) for b in model.transformer.h)
    assert torch.allclose(model(x)[0], before, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_parameter_counts_match_the_formulas(arch):
    model = tiny_gpt(arch=arch)
    L, C, P, H = 2, 16, 4, 8
    kv = C // model.config.n_head * model.config.n_kv_head  # 16 for GPT-2, 8 with 2 of 4 key/value heads
    prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=P, prefix_hidden=H))
    training = P * C + (C * H + H) + (H * L * 2 * kv + L * 2 * kv)  # P' table + the MLP's two layers
    assert model.num_params(trainable_only=True) == training
    prefix_tuning.finish(model)
    assert model.num_params(trainable_only=True) == L * 2 * P * kv
    direct = tiny_gpt(arch=arch)
    prefix_tuning.attach(direct, prefix_tuning.Config(prefix_len=P, reparam=False))
    assert direct.num_params(trainable_only=True) == L * 2 * P * kv


def test_each_layer_slices_the_shared_mlp_output(model):
    prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=3, prefix_hidden=8))
    shared = model.transformer.h[0].attn.prefix.shared
    full = shared.out(torch.tanh(shared.hidden(shared.table))).view(3, 2, 2, 16)  # (P, n_layer, k/v, C)
    assert all(torch.allclose(shared(i), full[:, i], atol=1e-6) for i in range(2))


def test_direct_prefix_starts_at_real_word_activations(model):
    torch.manual_seed(5)
    prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=3, reparam=False))
    torch.manual_seed(5)
    ids = torch.randint(63, (3,))  # the same draw attach made
    cache = KVCache(model.config.n_layer)
    tiny_gpt()(ids.view(1, -1), cache=cache)
    for block, (k, v) in zip(model.transformer.h, cache.kv):
        pk, pv = block.attn.prefix(1)
        assert torch.allclose(pk, k) and torch.allclose(pv, v)


def test_zero_prefix_is_not_an_identity(model):
    x, _ = tiny_batch()
    plain = model(x)[0]
    prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=3, reparam=False))
    for b in model.transformer.h:
        torch.nn.init.zeros_(b.attn.prefix.k)
        torch.nn.init.zeros_(b.attn.prefix.v)
    assert not torch.allclose(model(x)[0], plain, atol=1e-4)
