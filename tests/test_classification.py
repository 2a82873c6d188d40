"""Classification: scoring by label words batched across prompt lengths, the classification layer (head.py) equal to
label-word scoring at step 0, trained, saved and reloaded; a 1,000-line text/label file end to end."""
import json
import os
import random

import torch

import data
import evaluate
import train
from conftest import TINY_ARGS, pretrained_gpt
from head import ClassificationHead


def toy_task(n=24, seed=0):
    """Prompts of different lengths over the tiny model's 64 tokens; labels are the single tokens 7 and 9."""
    rng = random.Random(seed)
    exs = [data.Example(f"p{i}", str(label), prompt_ids=[rng.randrange(1, 60) for _ in range(rng.randrange(2, 12))],
                        completion_ids=[label, 63]) for i, label in enumerate(rng.choice([7, 9]) for _ in range(n))]
    task = data.Task("toy", exs[:8], exs[8:12], exs[12:], choices=["7", "9"], choice_ids=[[7], [9]], eot=63)
    return task


def test_label_scores_of_a_padded_batch_equal_each_prompt_alone():
    model, task = pretrained_gpt(), toy_task()
    logits_fn = lambda idx: model(idx)[0]
    batched = evaluate.label_scores(logits_fn, task, task.test, "cpu", batch=64)
    alone = torch.cat([evaluate.label_scores(logits_fn, task, [ex], "cpu", batch=1) for ex in task.test])
    assert torch.allclose(batched, alone, atol=1e-5)
    for ex, row in zip(task.test, alone):  # the log-probability of each label token after the prompt
        logp = torch.log_softmax(model(torch.tensor([ex.prompt_ids]))[0][0, -1], -1)
        assert torch.allclose(row, logp[[7, 9]], atol=1e-5)
    task.choice_ids = [[7, 8], [9]]  # a two-token label word: the sum of its tokens' log-probabilities
    ex = task.test[0]
    logp = torch.log_softmax(model(torch.tensor([ex.prompt_ids + [7]]))[0][0], -1)
    two = evaluate.label_scores(logits_fn, task, [ex], "cpu", batch=4)[0]
    assert torch.allclose(two, torch.stack([logp[-2, 7] + logp[-1, 8], logp[-2, 9]]), atol=1e-5)


def test_head_at_step_zero_scores_exactly_as_the_label_words():
    model, task = pretrained_gpt(), toy_task()
    clf = ClassificationHead(model, [7, 9])
    assert sum(p.numel() for p in clf.parameters()) == 2 * 16 + 2
    head = evaluate.head_scores(model, clf, task, task.test, "cpu", batch=5)
    words = evaluate.label_scores(lambda idx: model(idx)[0], task, task.test, "cpu", batch=5)
    assert torch.equal(head.argmax(1), words.argmax(1))
    offset = head - words  # a log-softmax only subtracts each row's log-sum-exp
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-5)


def test_head_trains_with_the_method_and_the_base_stays_frozen():
    model, task = pretrained_gpt(), toy_task(64)
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = train.TrainConfig(steps=30, batch_size=16, lr=3e-3, head_lr=3e-2)
    opts, clf, metrics = train.finetune(model, task, "adapter", dict(bottleneck=4), cfg, "cpu", head=True)
    adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert metrics["trainable_params"] == adapters + 2 * 16 + 2 and metrics["head"]
    assert metrics["loss_end"] < metrics["loss_start"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before and "ln_" not in n)


def test_a_thousand_line_text_label_file_end_to_end(tiny_out, tmp_path):
    """Real data's shape: text/label lines, some too long for the context, trained with a classification layer,
    saved, and reloaded to the same score."""
    rng = random.Random(0)
    lines = []
    for i in range(1000):
        text, label = data.review(rng, templates=data.REVIEW)
        lines.append(json.dumps(dict(text=text * (30 if i % 50 == 0 else 1), label=label)))
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(lines))
    metrics = train.main([*TINY_ARGS, "--out-dir", tiny_out, "--task", str(path), "--method", "adapter", "--head",
                          "--template", "Review: {text}\\nSentiment:", "--steps", "20"])
    assert metrics["metric"] == "accuracy" and metrics["head"] and 0.3 < metrics["majority"] < 0.7
    assert metrics["truncated"] == sum(i % 50 == 0 for i in range(1000))  # cut to fit, counted, not dropped
    ckpt = torch.load(os.path.join(metrics["run_dir"], "ckpt.pt"))
    assert ckpt["head"]["proj.weight"].shape == (2, 64)
    assert train.main(["--load", os.path.join(metrics["run_dir"], "ckpt.pt")]) == metrics["test"]
