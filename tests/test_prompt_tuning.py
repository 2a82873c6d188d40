"""prompt_tuning.py: shapes and positions, initialisations, mixed-task batches, errors."""
import pytest
import torch

import prompt_tuning
from conftest import tiny_batch


def test_trainable_count_is_n_times_n_embd(model):
    prompt = prompt_tuning.attach(model, n_tokens=5)
    assert model.num_params(trainable_only=True) == sum(p.numel() for p in prompt.parameters()) == 5 * 16


def test_logits_cover_the_real_tokens_and_the_prompt_changes_them(model):
    x, _ = tiny_batch()
    plain = model(x)[0]
    prompt_tuning.attach(model, n_tokens=5)
    logits = model(x)[0]
    assert logits.shape == plain.shape and not torch.allclose(logits, plain)


def test_prompt_is_the_same_as_prepending_embeddings_by_hand(model):
    prompt_tuning.attach(model, n_tokens=3, init="text", init_ids=[7, 8, 9])
    x, _ = tiny_batch(T=5)
    ref = model.__class__(model.config).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "soft_prompt" not in k})
    ref_logits = ref(torch.cat([torch.tensor([[7, 8, 9]] * 4), x], dim=1))[0][:, 3:]
    assert torch.allclose(model(x)[0], ref_logits, atol=1e-6)  # 'text' init = embeddings of those very tokens


def test_initialisations(model):
    wte = model.transformer.wte.weight
    g = torch.Generator().manual_seed(0)
    r = prompt_tuning.initial_prompt(model, 6, "random", generator=g)
    assert r.shape == (6, 16) and r.min() >= -0.5 and r.max() <= 0.5
    v = prompt_tuning.initial_prompt(model, 6, "vocab", generator=g)
    assert all(any(torch.equal(row, w) for w in wte) for row in v)
    t = prompt_tuning.initial_prompt(model, 5, "text", init_ids=[3, 4])
    assert torch.equal(t, wte[[3, 4, 3, 4, 3]])
    with pytest.raises(ValueError, match="unknown prompt init"):
        prompt_tuning.initial_prompt(model, 2, "zeros")


def test_mixed_task_batch_equals_each_row_alone(model):
    x, _ = tiny_batch(T=8)
    prompts = [prompt_tuning.attach(model, n_tokens=4, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    task_ids = [0, 1, 1, 0]
    model.soft_prompt = prompt_tuning.MixedPrompts(prompts, task_ids)
    mixed = model(x)[0]
    mixed_gen = model.generate(x, 6, temperature=0)
    for b, t in enumerate(task_ids):
        model.soft_prompt = prompts[t]
        assert torch.allclose(mixed[b], model(x[b:b + 1])[0][0], atol=1e-6)
        assert torch.equal(mixed_gen[b], model.generate(x[b:b + 1], 6, temperature=0)[0])


def test_too_long_prompt_is_a_clear_error(model):
    with pytest.raises(ValueError, match="prompt length 40"):
        prompt_tuning.attach(model, n_tokens=40)
    prompt_tuning.attach(model, n_tokens=25)
    with pytest.raises(ValueError, match=r"soft prompt included.*block_size 32"):
        model(torch.zeros(1, 10, dtype=torch.long))
