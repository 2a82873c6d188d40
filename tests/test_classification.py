"""Classification: scoring by label words batched across input lengths (at the last position only), the
classification layer (classifier.py) equal to label-word scoring at step 0, trained, saved and reloaded; a
1,000-line text/label file end to end."""
import json
import os
import random

import torch

import adapter
import train
from kit import data, evaluate, loop, world
from kit.classifier import Classifier
from conftest import pretrained_gpt, tiny


def toy_task(n=24, seed=0):
    """Inputs of different lengths over the tiny model's 64 tokens; labels are the single tokens 7 and 9."""
    rng = random.Random(seed)
    exs = [data.Example(f"p{i}", str(label), input_ids=[rng.randrange(1, 60) for _ in range(rng.randrange(2, 12))],
                        answer_ids=[label]) for i, label in enumerate(rng.choice([7, 9]) for _ in range(n))]
    return data.Task("toy", exs[:8], exs[8:12], exs[12:], choices=["7", "9"], choice_ids=[[7], [9]], eot=63)


def test_label_scores_of_a_padded_batch_equal_each_input_alone():
    model, task = pretrained_gpt(), toy_task()
    logits_fn = lambda idx, last=None: evaluate.logits_at(model, idx, last)
    batched = evaluate.label_scores(logits_fn, task, task.test, "cpu", batch=64)
    alone = torch.cat([evaluate.label_scores(logits_fn, task, [ex], "cpu", batch=1) for ex in task.test])
    assert torch.allclose(batched, alone, atol=1e-5)
    for ex, row in zip(task.test, alone):  # the log-probability of each label token after the input
        logp = torch.log_softmax(model(torch.tensor([ex.input_ids]))[0][0, -1], -1)
        assert torch.allclose(row, logp[[7, 9]], atol=1e-5)
    task.choice_ids = [[7, 8], [9]]  # a two-token label word: the sum of its tokens' log-probabilities
    ex = task.test[0]
    logp = torch.log_softmax(model(torch.tensor([ex.input_ids + [7]]))[0][0], -1)
    two = evaluate.label_scores(logits_fn, task, [ex], "cpu", batch=4)[0]
    assert torch.allclose(two, torch.stack([logp[-2, 7] + logp[-1, 8], logp[-2, 9]]), atol=1e-5)


def test_the_layer_at_step_zero_scores_exactly_as_the_label_words():
    model, task = pretrained_gpt(), toy_task()
    clf = Classifier(model, [7, 9])
    assert sum(p.numel() for p in clf.parameters()) == 2 * 16 + 2
    layer = evaluate.classifier_scores(model, clf, task, task.test, "cpu", batch=5)
    words = evaluate.label_scores(lambda idx, last=None: evaluate.logits_at(model, idx, last), task, task.test,
                                  "cpu", batch=5)
    assert torch.equal(layer.argmax(1), words.argmax(1))
    offset = layer - words  # a log-softmax only subtracts each row's log-sum-exp
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-5)


def test_the_layer_trains_with_the_method_and_the_base_stays_frozen():
    model, task = pretrained_gpt(), toy_task(64)
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = loop.TrainConfig(steps=30, batch_size=16, lr=3e-3, classifier=True, classifier_lr=3e-2)
    _, clf, metrics = loop.finetune(model, task, adapter, adapter.Config(bottleneck=4), cfg, "cpu")
    trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert metrics["trainable_params"] == trained + 2 * 16 + 2 and metrics["classifier"]
    assert metrics["loss_end"] < metrics["loss_start"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_a_thousand_line_text_label_file_end_to_end(tiny_out, tmp_path):
    """Real data's shape: text/label lines, some too long for the context, trained with a classification
    layer, saved, and reloaded to the same score."""
    rng = random.Random(0)
    lines = []
    for i in range(1000):
        text, label = world.review(rng, templates=world.REVIEW)
        lines.append(json.dumps(dict(text=text * (30 if i % 50 == 0 else 1), label=label)))
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(lines))
    metrics = train.main(tiny("--out-dir", tiny_out, "--task", str(path), "--method", "adapter",
                              "--classifier", "--template", "Review: {text}\\nSentiment:", "--steps", "20"))
    assert metrics["metric"] == "accuracy" and metrics["classifier"] and 0.3 < metrics["majority"] < 0.7
    assert metrics["truncated"] == sum(i % 50 == 0 for i in range(1000))  # cut to fit, counted, not dropped
    ckpt = torch.load(os.path.join(metrics["run_dir"], "ckpt.pt"))
    assert ckpt["classifier"]["proj.weight"].shape == (2, 64)
    assert train.main(["--load", os.path.join(metrics["run_dir"], "ckpt.pt")]) == metrics["test"]
