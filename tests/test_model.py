"""model.py: shapes, loss masking, causality, empty injection points, the KV cache, context errors, on the three
architectures; the Llama switches against explicit computations (RMSNorm, SwiGLU, rotary positions, GQA), and
Qwen2's q/k/v biases."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_batch, tiny_gpt
from model import KVCache, rotary, rotate

ARCH = pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])


def plain_forward(model, idx, targets=None):
    """nanoGPT's forward on the same weights, written out with no injection points: the reference for 'empty
    seams change nothing'."""
    t, C, nh = model.transformer, model.config.n_embd, model.config.n_head
    B, T = idx.size()
    x = t.wte(idx) + t.wpe(torch.arange(T))
    for b in t.h:
        q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in b.attn.c_attn(b.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + b.attn.c_proj(y)
        x = x + b.mlp(b.ln_2(x))
    logits = model.lm_head(t.ln_f(x))
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def llama_forward(model, idx):
    """A Llama-family forward written out the way the hub's code reads: separate q, k, v, gate and up matrices,
    RMSNorm by its formula, rotate-half rotary positions, key/value heads repeated for their query groups, and
    Qwen2's biases on q, k and v where the model has them."""
    c, t = model.config, model.transformer
    B, T = idx.shape
    hs, groups = c.n_embd // c.n_head, c.n_head // c.n_kv_head
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w
    inv = 1.0 / c.rope_theta ** (torch.arange(0, hs, 2).float() / hs)
    ang = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, -1)
    turn = lambda z: z * ang.cos() + torch.cat([-z[..., hs // 2:], z[..., :hs // 2]], -1) * ang.sin()
    x = t.wte(idx)
    for b in t.h:
        h = rms(x, b.ln_1.weight)
        wq, wk, wv = b.attn.c_attn.weight.split([c.n_embd, hs * c.n_kv_head, hs * c.n_kv_head])
        bq, bk, bv = (b.attn.c_attn.bias.split([c.n_embd, hs * c.n_kv_head, hs * c.n_kv_head])
                      if c.qkv_bias else (0, 0, 0))
        q = turn((h @ wq.T + bq).view(B, T, c.n_head, hs).transpose(1, 2))
        k = turn((h @ wk.T + bk).view(B, T, c.n_kv_head, hs).transpose(1, 2)).repeat_interleave(groups, 1)
        v = (h @ wv.T + bv).view(B, T, c.n_kv_head, hs).transpose(1, 2).repeat_interleave(groups, 1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~torch.ones(T, T).tril().bool(), -1e9)
        x = x + (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1) @ b.attn.c_proj.weight.T
        h = rms(x, b.ln_2.weight)
        gate, up = b.mlp.c_fc.weight.chunk(2)
        x = x + (F.silu(h @ gate.T) * (h @ up.T)) @ b.mlp.c_proj.weight.T
    return rms(x, t.ln_f.weight) @ model.lm_head.weight.T


@ARCH
def test_shapes_and_loss(arch):
    model = tiny_gpt(arch=arch)
    x, y = tiny_batch()
    logits, loss = model(x, y)
    assert logits.shape == (4, 12, 64)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1)))
    assert model(x)[1] is None


def test_loss_ignores_minus_one_targets(model):
    x, y = tiny_batch()
    masked = y.clone()
    masked[:, :6] = -1
    logits, loss = model(x, masked)
    assert torch.allclose(loss, F.cross_entropy(logits[:, 6:].reshape(-1, 64), y[:, 6:].reshape(-1)))


@ARCH
def test_causality(arch):
    model = tiny_gpt(arch=arch)
    x, _ = tiny_batch()
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    a, b = model(x)[0], model(changed)[0]
    assert torch.equal(a[:, :7], b[:, :7])      # earlier positions never see a later token
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt2_parameter_names_and_tying(model):
    names = {n for n, _ in model.named_parameters()}
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.ln_2.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight"]:
        assert n in names
    assert model.lm_head.weight is model.transformer.wte.weight


def test_empty_injection_points_are_bit_identical_to_a_plain_gpt(model):
    x, y = tiny_batch()
    logits, loss = model(x, y)
    ref_logits, ref_loss = plain_forward(model, x, y)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)


def test_the_llama_switches_compute_what_the_hub_code_computes():
    model = tiny_gpt(arch="llama")
    for b in model.transformer.h:  # non-trivial norm weights, so that RMSNorm's scale is exercised
        torch.nn.init.normal_(b.ln_1.weight, 1.0, 0.2)
    x, _ = tiny_batch()
    assert torch.allclose(model(x)[0], llama_forward(model, x), atol=1e-5)
    names = {n for n, _ in model.named_parameters()}
    assert "transformer.wpe.weight" not in names and not any(n.endswith(".bias") for n in names)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.shape == (16 + 2 * 2 * 4, 16)  # q + k + v, GQA


def test_qwen2s_switch_adds_biases_to_q_k_v_alone_and_leaves_gpt2_as_it_was():
    model = tiny_gpt(arch="qwen2")
    for b in model.transformer.h:  # biases start at zero: make them matter
        torch.nn.init.normal_(b.attn.c_attn.bias, 0.0, 0.5)
    x, _ = tiny_batch()
    assert torch.allclose(model(x)[0], llama_forward(model, x), atol=1e-5)
    assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} == {
        f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}
    assert not torch.allclose(model(x)[0], tiny_gpt(arch="llama")(x)[0])  # same weights, biases off
    # with GPT-2's bias=True every layer has biases already: the switch changes nothing
    assert torch.equal(tiny_gpt(3, qkv_bias=True)(x)[0], tiny_gpt(3)(x)[0])


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda i, j: (rotate(q, *[t[i:i + 1] for t in rotary(torch.arange(20), 8, 1e4)]) *
                          rotate(k, *[t[j:j + 1] for t in rotary(torch.arange(20), 8, 1e4)])).sum()
    assert torch.allclose(score(3, 1), score(12, 10), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


@ARCH
def test_cache_gives_the_same_logits_as_a_full_pass(arch):
    model = tiny_gpt(arch=arch)
    x, _ = tiny_batch()
    full = model(x)[0]
    cache = KVCache(model.config.n_layer)
    parts = [model(x[:, :5], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    assert cache.pos == 12 and cache.kv[0][0].shape[1] == model.config.n_kv_head
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


@ARCH
def test_cached_greedy_generation_equals_uncached(arch):
    model = tiny_gpt(arch=arch)
    x, _ = tiny_batch()
    a = model.generate(x, 15, temperature=0)
    b = model.generate(x, 15, temperature=0, use_cache=False)
    assert a.shape == (4, 27) and torch.equal(a, b)


def test_sampling_with_top_k_is_seeded_and_in_range(model):
    x, _ = tiny_batch()
    torch.manual_seed(3)
    a = model.generate(x, 8, temperature=0.8, top_k=5)
    torch.manual_seed(3)
    assert torch.equal(a, model.generate(x, 8, temperature=0.8, top_k=5))


@ARCH
def test_too_long_input_is_a_clear_error(arch):
    model = tiny_gpt(arch=arch)
    with pytest.raises(ValueError, match="longer than the model's block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 10, temperature=0)


def test_same_seed_same_model():
    assert torch.equal(tiny_gpt(5).lm_head.weight, tiny_gpt(5).lm_head.weight)


def test_generation_stops_once_every_row_has_the_stop_token(model):
    x, _ = tiny_batch()
    full = model.generate(x, 15, temperature=0)
    for stop in full[:, 12:].unique().tolist():
        out = model.generate(x, 15, temperature=0, stop=stop)
        assert torch.equal(out, full[:, :out.size(1)])  # the same tokens, only fewer
        assert out.size(1) == 27 or (out[:, 12:] == stop).any(1).all()
