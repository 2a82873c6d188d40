"""The bf16 path (--dtype bfloat16, the default on CUDA) exercised on the CPU with torch.autocast: every method trains
and generates, proxy decoding and mixed-task prompts run, the classification layer trains, without dtype errors, and
the weights and optimizer state stay float32."""
import pytest
import torch

import proxy_tuning
import prompt_tuning
import train
from conftest import pretrained_gpt, tiny_batch, tiny_gpt
from head import ClassificationHead
from model import autocast
from test_methods import METHODS, attached


@pytest.mark.parametrize("name", [*METHODS, "full"])
def test_every_method_trains_and_generates_under_bf16_autocast(name):
    model = attached(name) if name != "full" else pretrained_gpt().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = tiny_batch()
    losses = []
    for _ in range(8):
        with autocast("cpu", "bfloat16"):
            logits, loss = model(x, y)
        assert logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(p.dtype == torch.float32 for p in params)
    with autocast("cpu", "bfloat16"):
        assert model.generate(x[:, :5], 8, temperature=0).shape == (4, 13)


def test_proxy_decoding_and_mixed_prompts_under_bf16_autocast():
    base, expert, anti = tiny_gpt(0, n_layer=3, n_embd=24, n_head=3), tiny_gpt(1), tiny_gpt(2)
    x, _ = tiny_batch()
    with autocast("cpu", "bfloat16"):
        assert proxy_tuning.generate(base, expert, anti, x, 6, alpha=1.5, temperature=0).shape == (4, 18)
        assert proxy_tuning.proxy_logits(base, expert, anti, x).shape == (4, 12, 64)
    model = tiny_gpt()
    prompts = [prompt_tuning.attach(model, n_tokens=3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    model.soft_prompt = prompt_tuning.MixedPrompts(prompts, [0, 1, 1, 0])
    with autocast("cpu", "bfloat16"):
        assert model.generate(x, 4, temperature=0).shape == (4, 16)


def test_classification_layer_trains_under_bf16_autocast():
    model = pretrained_gpt()
    train.METHODS["adapter"].attach(model, bottleneck=4)
    clf = ClassificationHead(model, [3, 9])
    x, _ = tiny_batch()
    batch = (x, torch.tensor([11, 5, 7, 2]), torch.tensor([0, 1, 1, 0]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(clf.parameters()), lr=1e-2)
    with autocast("cpu", "bfloat16"):
        loss = train.loss_of(model, clf, batch)
    loss.backward()
    opt.step()
    assert clf.proj.weight.dtype == torch.float32 and clf.proj.weight.grad is not None
