"""prompt_tuning.py: shapes and positions, initialisations, mixed-task batches (also under bf16), errors."""
import pytest
import torch

import prompt_tuning
from conftest import tiny_batch, tiny_gpt
from kit.options import autocast

Config = prompt_tuning.Config


class Words:
    """The little a task offers prompt tuning: its label words, and a tokenizer for its init text."""
    choices = [" good", " bad"]

    @staticmethod
    def encode(text):
        return [ord(c) % 60 for c in text]


def test_trainable_count_is_n_times_n_embd(model):
    prompt = prompt_tuning.attach(model, Config(prompt_len=5))
    assert model.num_params(trainable_only=True) == sum(p.numel() for p in prompt.parameters()) == 5 * 16


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_is_the_same_as_prepending_embeddings_by_hand(arch):
    model = tiny_gpt(arch=arch)
    prompt_tuning.attach(model, Config(prompt_len=3, prompt_init="text", prompt_text="abc"), Words)
    ids = Words.encode("abc")
    x, _ = tiny_batch(T=5)
    ref = tiny_gpt(arch=arch)
    ref_logits = ref(torch.cat([torch.tensor([ids] * 4), x], dim=1))[0][:, 3:]
    assert torch.allclose(model(x)[0], ref_logits, atol=1e-6)  # 'text' init = embeddings of those very tokens


def test_initialisations(model):
    wte = model.transformer.wte.weight
    torch.manual_seed(0)
    r = prompt_tuning.initial_prompt(model, Config(prompt_len=6, prompt_init="random"))
    assert r.shape == (6, 16) and r.min() >= -0.5 and r.max() <= 0.5
    v = prompt_tuning.initial_prompt(model, Config(prompt_len=6, prompt_init="vocab"))
    assert all(any(torch.equal(row, w) for w in wte) for row in v)
    t = prompt_tuning.initial_prompt(model, Config(prompt_len=5, prompt_init="text"), Words)  # the label words
    assert torch.equal(t, wte[(Words.encode(" good bad") * 5)[:5]])  # repeated or cut to the prompt's length
    with pytest.raises(ValueError, match="--prompt-init must be one of random, vocab, text"):
        Config(prompt_init="zeros")
    with pytest.raises(ValueError, match="needs --prompt-text on a task without label words"):
        prompt_tuning.initial_prompt(model, Config(prompt_init="text"))


def test_mixed_task_batch_equals_each_row_alone_also_under_bf16(model):
    x, _ = tiny_batch(T=8)
    prompts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        prompts.append(prompt_tuning.attach(model, Config(prompt_len=4)))
    task_ids = [0, 1, 1, 0]
    model.soft_prompt = prompt_tuning.MixedPrompts(prompts, task_ids)
    mixed = model(x)[0]
    mixed_gen = model.generate(x, 6, temperature=0)
    with autocast("cpu", "bfloat16"):
        assert model.generate(x, 4, temperature=0).shape == (4, 12)
    for b, t in enumerate(task_ids):
        model.soft_prompt = prompts[t]
        assert torch.allclose(mixed[b], model(x[b:b + 1])[0][0], atol=1e-6)
        assert torch.equal(mixed_gen[b], model.generate(x[b:b + 1], 6, temperature=0)[0])


def test_too_long_prompt_is_a_clear_error(model):
    with pytest.raises(ValueError, match="--prompt-len 40 leaves no room in the context of 32 positions"):
        prompt_tuning.attach(model, Config(prompt_len=40))
    prompt_tuning.attach(model, Config(prompt_len=25))
    with pytest.raises(ValueError, match=r"soft prompt included.*block_size 32"):
        model(torch.zeros(1, 10, dtype=torch.long))
