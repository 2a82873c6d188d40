"""train.py end to end on a tiny world: pretrain -> fine-tune from the command line, checkpoints that reload to the
same logits and metric, `--method all`, bench.py's smoke mode, and one-line errors for bad input."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "tiny", "--world-size", "40", "--vocab-size", "400", "--block-size", "64", "--pretrain-steps", "40",
        "--batch-size", "8", "--steps", "10", "--eval-every", "5", "--prompt-len", "5"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    train.main(["--method", "pretrain", "--out-dir", out, *TINY])
    return out


def run(out, *argv):
    return train.main([*TINY, "--out-dir", out, *argv])


def test_pretrain_then_full_from_the_command_line(tmp_path):
    def cli(*a):
        r = subprocess.run([sys.executable, "train.py", *TINY, "--out-dir", str(tmp_path), *a], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout
    losses = [float(x) for x in re.findall(r"pretrain step .* loss (\d+\.\d+)", cli("--method", "pretrain"))]
    assert losses[-1] < losses[0] - 1.0
    stdout = cli("--method", "full", "--steps", "20")
    assert "no pretrained" not in stdout  # the cached base was used
    run_dir = re.search(r"saved (\S+)", stdout.splitlines()[-1]).group(1)
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["method"] == "full" and metrics["metric"] == "exact_match" and 0 <= metrics["test"] <= 1
    assert metrics["loss_end"] < metrics["loss_start"]
    assert metrics["trainable_params"] == metrics["base_params"] > 0
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"))
    assert sum(t.numel() for t in ckpt["trainable"].values()) == metrics["trainable_params"]


@pytest.mark.parametrize("argv", [["--method", "prompt"], ["--method", "prompt", "--prompt-init", "text"],
                                  ["--method", "prefix"], ["--method", "prefix", "--no-reparam"],
                                  ["--method", "adapter", "--adapter-where", "pfeiffer"]])
def test_checkpoint_holds_only_the_new_tensors_and_reloads_exactly(out, argv):
    args = train.get_args([*TINY, "--out-dir", out, "--task", "sentiment", *argv])
    enc = train.tokenizer(args)
    metrics, model = train.finetune(args, args.method, "tiny", enc, "cpu")
    path = os.path.join(metrics["run_dir"], "ckpt.pt")
    ckpt = torch.load(path)
    base = {n for n, _ in train.load_base(args, "tiny", enc, "cpu").named_parameters()}
    assert not set(ckpt["trainable"]) & base - {n for n in base if "ln_" in n and args.method == "adapter"}
    assert sum(t.numel() for t in ckpt["trainable"].values()) == metrics["stored_params"]
    reloaded, _ = train.load_run(path, "cpu")
    x = torch.randint(enc.n_vocab, (2, 10))
    assert torch.equal(model(x)[0], reloaded(x)[0])
    assert train.main(["--load", path]) == metrics["test"]


def test_method_all_writes_a_table_with_every_row(out, capsys):
    rows = run(out, "--method", "all", "--size", "small", "--small-size", "tiny")
    assert [r["method"] for r in rows] == ["none", "full", "prompt", "prefix", "adapter", "proxy"]
    table = open(os.path.join(out, "all-qa-small-10steps-seed1337", "results.md")).read().splitlines()
    assert len(table) == 2 + 6 and all(f"| {m} |" in "\n".join(table) for m in train.WHERE)
    capsys.readouterr()
    again = run(out, "--method", "all", "--size", "small", "--small-size", "tiny")  # finished runs are reused
    assert [(r["method"], r["test"]) for r in again] == [(r["method"], r["test"]) for r in rows]
    assert capsys.readouterr().out.count("reusing the finished") == 6  # five methods, and proxy's expert


def test_bench_tiny_mode_runs(capsys):
    bench.main(["--tiny", "--device", "cpu"])
    text = capsys.readouterr().out
    assert all(s in text for s in ("| adapter |", "faster with the cache", "proxy decoding"))


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_bad_input_gives_one_line_errors(out, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(out, "--method", "lora")
    assert "invalid choice: 'lora'" in capsys.readouterr().err
    good = "\n".join(json.dumps(dict(prompt=f"Q{i}?", completion=f" A{i}")) for i in range(20))
    cases = [
        (["--load", str(tmp_path / "nope.pt")], "checkpoint .* not found"),
        (["--method", "pretrain", "--data", str(tmp_path / "missing.txt")], "data file .* not found"),
        (["--method", "pretrain", "--data", write(tmp_path, "empty.txt", "")], "is empty"),
        (["--method", "full", "--task", write(tmp_path, "bad.jsonl", good + '\n{"prompt": 1}')], "line 21"),
        (["--method", "full", "--task", write(tmp_path, "long.jsonl", good + "\n" + json.dumps(
            dict(prompt="Q?", completion=" A" * 100)))], "line 21 is .* longer than the context of 64"),
        (["--method", "prompt", "--prompt-len", "60"], r"\+60 soft prompt\), longer than the context"),
        (["--method", "prompt", "--prompt-init", "text"], "needs --prompt-text"),
        (["--method", "full", "--tokenizer", "nope"], "could not load the tiktoken encoding 'nope'"),
        (["--method", "full", "--task", "poetry"], "unknown task 'poetry'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match="^error: .*" + message):
            run(out, *argv)


def test_own_text_pretrains_with_a_held_out_validation_loss(tmp_path, capsys):
    text = write(tmp_path, "mine.txt", "\n".join(f"line {i} says {i % 7} and {i % 3}." for i in range(2000)))
    train.main(["--method", "pretrain", "--data", text, *TINY, "--pretrain-steps", "5", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"pretrain val loss \d+\.\d+ on the last 5% of", out)
    assert len(glob.glob(os.path.join(tmp_path, "base", "mine-*-bpe400", "tiny-ctx64.pt"))) == 1  # cached per file
