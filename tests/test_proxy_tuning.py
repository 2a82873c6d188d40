"""proxy_tuning.py: the combination rule, its identities, the per-model caches, bf16, errors, nothing changes,
on both architectures (a small GPT-2-style expert steers a Llama-style large model)."""
import pytest
import torch

import proxy_tuning
from conftest import snapshot, tiny_batch, tiny_gpt
from kit.options import autocast


@pytest.fixture
def trio():
    large = tiny_gpt(0, arch="llama", n_layer=3, n_embd=24, n_head=6, n_kv_head=2)
    return large, tiny_gpt(1), tiny_gpt(2)  # expert, anti-expert


def test_combined_logits_equal_the_formula_by_hand(trio):
    large, expert, anti = trio
    x, _ = tiny_batch()
    out = proxy_tuning.proxy_logits(large, expert, anti, x, alpha=0.7)
    assert out.shape == (4, 12, 64)
    assert torch.allclose(out, large(x)[0] + 0.7 * (expert(x)[0] - anti(x)[0]))


def test_expert_equal_to_anti_expert_or_alpha_zero_gives_the_large_model(trio):
    large, expert, anti = trio
    x, _ = tiny_batch()
    assert torch.equal(proxy_tuning.proxy_logits(large, anti, anti, x), large(x)[0])
    assert torch.equal(proxy_tuning.proxy_logits(large, expert, anti, x, alpha=0.0), large(x)[0])
    assert torch.equal(proxy_tuning.generate(large, anti, anti, x, 8, temperature=0),
                       large.generate(x, 8, temperature=0))


def test_cached_proxy_generation_equals_uncached_and_runs_under_bf16(trio):
    x, _ = tiny_batch()
    a = proxy_tuning.generate(*trio, x, 10, temperature=0)
    b = proxy_tuning.generate(*trio, x, 10, temperature=0, use_cache=False)
    assert a.shape == (4, 22) and torch.equal(a, b)
    with autocast("cpu", "bfloat16"):
        assert proxy_tuning.generate(*trio, x, 6, alpha=1.5, temperature=0).shape == (4, 18)


def test_greedy_steps_follow_the_combined_logits(trio):
    x, _ = tiny_batch()
    out = proxy_tuning.generate(*trio, x, 3, temperature=0)
    for t in range(12, 15):
        assert torch.equal(out[:, t], proxy_tuning.proxy_logits(*trio, out[:, :t])[:, -1].argmax(-1))


def test_no_parameter_of_any_model_changes(trio):
    before = [snapshot(m) for m in trio]
    x, _ = tiny_batch()
    torch.manual_seed(0)
    proxy_tuning.generate(*trio, x, 8, temperature=1.0, top_k=10)
    for m, b in zip(trio, before):
        assert all(torch.equal(p, b[n]) for n, p in m.named_parameters())


def test_mismatched_vocabularies_and_too_long_sequences_are_clear_errors(trio):
    large, expert, anti = trio
    x, _ = tiny_batch()
    with pytest.raises(ValueError, match="shared vocabulary.*64, 64, 80"):
        proxy_tuning.proxy_logits(large, expert, tiny_gpt(vocab_size=80), x)
    with pytest.raises(ValueError, match="longer than the large model's block_size 32"):
        proxy_tuning.generate(large, expert, anti, x, 30)


def test_top_k_by_hand_on_a_vocabulary_of_four():
    # M's log-probabilities log([.5, .3, .15, .05]); the expert's shift favours token 3 strongly
    s_large = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    shift = torch.tensor([[0.0, 0.0, 1.5, 3.0]])  # s_M+ - s_M-, alpha 1
    full = proxy_tuning.combine(s_large, shift, torch.zeros(1, 4))
    assert full.argmax(-1).item() == 3  # log .05 + 3 = 0.004 beats log .5 = -0.69
    top2 = proxy_tuning.combine(proxy_tuning.top_k_only(s_large, 2), shift, torch.zeros(1, 4))
    assert top2.argmax(-1).item() == 0  # an API's top 2 never shows token 3: it cannot be chosen
    assert torch.isinf(top2[0, 2:]).all() and torch.allclose(top2[0, :2], s_large[0, :2])
    top3 = proxy_tuning.combine(proxy_tuning.top_k_only(s_large, 3), shift, torch.zeros(1, 4))
    assert top3.argmax(-1).item() == 2  # log .15 + 1.5 = -0.397 beats log .5 = -0.693


def test_top_k_of_the_whole_vocabulary_is_the_full_combination(trio):
    large, expert, anti = trio
    x, _ = tiny_batch()
    box = proxy_tuning.TopK(large, large.config.vocab_size)
    out = proxy_tuning.generate(box, expert, anti, x, 8, alpha=1.5, temperature=0)
    assert torch.equal(out, proxy_tuning.generate(large, expert, anti, x, 8, alpha=1.5, temperature=0))
    s = proxy_tuning.proxy_logits(large, expert, anti, x, alpha=1.5)  # the same distribution
    boxed = proxy_tuning.combine(proxy_tuning.top_k_only(large(x)[0], 64), expert(x)[0], anti(x)[0], 1.5)
    assert torch.allclose(torch.softmax(boxed, -1), torch.softmax(s, -1), atol=1e-6)
    # with k = 1 the large model's greedy token is the only choice, whatever the experts say
    one = proxy_tuning.generate(proxy_tuning.TopK(large, 1), expert, anti, x, 8, alpha=5.0, temperature=0)
    assert torch.equal(one, large.generate(x, 8, temperature=0))
    with pytest.raises(ValueError, match="^TopK: k must be a whole number of at least 1, got 0$"):
        proxy_tuning.TopK(large, 0)
