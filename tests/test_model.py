"""model.py: shapes, loss masking, causality, empty injection points, the KV cache, context errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_batch, tiny_gpt
from model import KVCache


def plain_forward(model, idx, targets=None):
    """nanoGPT's forward on the same weights, written out with no injection points: the reference for 'empty seams
    change nothing'."""
    t, C, nh = model.transformer, model.config.n_embd, model.config.n_head
    B, T = idx.size()
    x = t.wte(idx) + t.wpe(torch.arange(T))
    for b in t.h:
        q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in b.attn.c_attn(b.ln_1(x)).split(C, dim=2))
        x = x + b.attn.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        x = x + b.mlp(b.ln_2(x))
    logits = model.lm_head(t.ln_f(x))
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def test_shapes_and_loss(model):
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


def test_causality(model):
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


def test_cache_gives_the_same_logits_as_a_full_pass(model):
    x, _ = tiny_batch()
    full = model(x)[0]
    cache = KVCache(model.config.n_layer)
    parts = [model(x[:, :5], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    assert cache.pos == 12
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_cached_greedy_generation_equals_uncached(model):
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


def test_too_long_input_is_a_clear_error(model):
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
