"""train.py end to end on a tiny world: the command line, checkpoints that reload to the same logits and metric,
a method added with one table row, `--method all` with its tables, and bench.py's smoke mode."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import checkpoints
import compare
import data
import options
import tokenizer
import train
from conftest import TINY_ARGS, pretrained_gpt, tiny_gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out, *argv):
    return train.main([*TINY_ARGS, "--out-dir", out, *argv])


def test_a_fresh_method_run_from_the_command_line_pretrains_then_fine_tunes(tmp_path):
    r = subprocess.run([sys.executable, "train.py", *TINY_ARGS, "--out-dir", str(tmp_path), "--method", "full",
                        "--steps", "20", "--world-size", "20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no pretrained tiny base" in r.stdout and "saved the pretrained base" in r.stdout
    losses = [float(x) for x in re.findall(r"pretrain step .* loss (\d+\.\d+)", r.stdout)]
    assert losses[-1] < losses[0] - 1.0
    run_dir = re.search(r"saved (\S+)", r.stdout.splitlines()[-1]).group(1)
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["method"] == "full" and metrics["metric"] == "exact_match" and 0 <= metrics["test"] <= 1
    assert metrics["loss_end"] < metrics["loss_start"] and len(metrics["losses"]) == 20
    assert [s for s, _ in metrics["val_curve"]] == [5, 10, 15, 20]
    assert metrics["trainable_params"] == metrics["base_params"] > 0
    assert {"ood", "probe", "heldout_loss"} <= set(metrics) and metrics["heldout_loss"] > 0
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"))
    assert sum(t.numel() for t in ckpt["trainable"].values()) == metrics["trainable_params"]


@pytest.mark.parametrize("argv", [["--method", "prompt"], ["--method", "prompt", "--prompt-init", "text"],
                                  ["--method", "prefix"], ["--method", "prefix", "--no-reparam"],
                                  ["--method", "adapter", "--adapter-where", "pfeiffer"]])
def test_checkpoint_holds_only_the_new_tensors_and_reloads_exactly(tiny_out, reviews, argv):
    metrics = run(tiny_out, "--task", reviews, *argv)
    path = os.path.join(metrics["run_dir"], "ckpt.pt")
    ckpt = torch.load(path)
    base = {n for n, _ in pretrained_gpt().named_parameters()}
    assert not set(ckpt["trainable"]) & base - {n for n in base if "ln_" in n and argv[1] == "adapter"}
    assert sum(t.numel() for t in ckpt["trainable"].values()) == metrics["stored_params"]
    model, _, _, _ = train.load_run(path, "cpu")
    again, _, _, _ = train.load_run(path, "cpu")
    x = torch.randint(400, (2, 10))
    assert torch.equal(model(x)[0], again(x)[0])
    assert train.main(["--load", path]) == metrics["test"]


def test_on_your_own_text_forgetting_is_measured_on_the_5_percent_pretraining_held_out(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(data.pretrain_corpus(data.make_world(40)))
    argv = [*TINY_ARGS, "--data", str(corpus), "--out-dir", str(tmp_path), "--method", "none"]
    args = options.parse(argv, train.METHODS)
    base = checkpoints.own_base(args, "tiny")
    enc = checkpoints.load_tokenizer(base.tokenizer, args)
    task, *_ = train.plan(args, "none", base, enc)  # pretrains the base first
    seen, held = checkpoints.corpus_split(args, enc)
    n = len(seen) + len(held)
    assert torch.equal(torch.cat([seen, held]), tokenizer.encode_corpus(enc, corpus.read_text()))
    assert len(held) == n - n * 19 // 20 > 0
    flat = [t for first, rest in task.heldout_rows for t in first + rest[:-1]]  # windows overlap by one token
    assert task.heldout_rows and flat == held[:len(flat)].tolist()
    assert train.main(argv)["heldout_loss"] > 0


def test_a_method_added_as_one_row_trains_through_the_plain_loop(tiny_out, monkeypatch):
    """The LoRA homework's shape: a file with attach(), one METHODS row; the loop runs without any command line."""
    def attach(model, which="bias"):  # a toy method: train the biases only (BitFit, Ben Zaken et al. 2022)
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(which))
    monkeypatch.setitem(train.METHODS, "bitfit", train.Method("model: every bias", attach, lambda o: 1e-2))
    enc = tokenizer.train(data.pretrain_corpus(data.make_world(40)), 400)
    task = data.encode_task(data.make_task("sentiment", data.make_world(40)), enc, block_size=64)
    model = tiny_gpt(vocab_size=400, block_size=64)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.endswith("bias")}
    opts, clf, metrics = train.finetune(model, task, "bitfit", {}, train.TrainConfig(steps=6, batch_size=4), "cpu")
    assert metrics["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert len(metrics["losses"]) == 6 and 0 <= metrics["test"] <= 1 and metrics["ood"] is not None
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert run(tiny_out, "--method", "bitfit", "--steps", "3")["where"] == "model: every bias"  # on the command line


def test_method_all_writes_tables_with_every_row_and_reuses_runs(tiny_out, reviews, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the pictures are optional: without matplotlib, one line
    fast = ["--method", "all", "--size", "small", "--small-size", "tiny", "--steps", "4", "--task", reviews]
    rows = run(tiny_out, *fast)
    assert [r["method"] for r in rows] == [*train.METHODS, "proxy"]
    assert "pictures: pip install matplotlib" in capsys.readouterr().out
    table = open(os.path.join(tiny_out, "all-reviews.jsonl-small-4steps-seed1337", "results.md")).read()
    assert "| test accuracy (commonest label: 0." in table and "| val | reworded test (ood) |" in table
    assert all(f"| {m} |" in table for m in [*train.METHODS, "proxy"])
    again = run(tiny_out, *fast)
    assert [(r["method"], r["test"]) for r in again] == [(r["method"], r["test"]) for r in rows]
    assert capsys.readouterr().out.count("reusing the finished") == len(train.METHODS) + 1  # and proxy's expert


def test_a_finished_run_is_reused_only_by_the_code_that_made_it(tiny_out, tmp_path, monkeypatch):
    for name in ("model.py", "adapter.py"):
        (tmp_path / name).write_text("x = 1\n")
    before = checkpoints.code_digest(str(tmp_path))
    (tmp_path / "notes.md").write_text("not code")
    assert checkpoints.code_digest(str(tmp_path)) == before
    (tmp_path / "adapter.py").write_text("x = 2\n")  # the homework edits a method file
    assert checkpoints.code_digest(str(tmp_path)) != before
    assert checkpoints.code_digest() == checkpoints.code_digest(ROOT)
    args = options.parse([*TINY_ARGS, "--out-dir", tiny_out, "--method", "adapter"], train.METHODS)
    base = checkpoints.own_base(args, "tiny")
    folder = lambda: train.plan(args, "adapter", base, checkpoints.load_tokenizer(base.tokenizer))[-1]
    first = folder()
    monkeypatch.setattr(checkpoints, "code_digest", lambda: before)
    assert folder() != first


def test_tables_show_the_majority_baseline_and_before_after_columns():
    row = lambda m, test, probe: dict(method=m, where="w", metric="accuracy", majority=0.55, test=test, val=0.5,
                                      ood=0.4, heldout_loss=1.25, probe=probe, trainable_params=10, stored_params=10,
                                      pct_of_base=1.0, seconds=1, tokens_per_s=5, state_bytes=0, ckpt_bytes=1024)
    text = "\n".join(compare.tables([row("none", 0.5, 0.9), row("adapter", 0.75, None)], "cpu"))
    assert "| test accuracy (commonest label: 0.5500) | val |" in text and "probe (before 0.9000)" in text
    assert "| adapter | 0.7500 | 0.5000 | 0.4000 | 1.2500 | n/a |" in text


def test_bench_tiny_mode_runs(capsys):
    bench.main(["--tiny", "--device", "cpu"])
    text = capsys.readouterr().out
    assert all(s in text for s in ("| adapter |", "faster with the cache", "proxy decoding"))
