"""Nothing lost, nothing silently wrong: every bad input is one line that says what to change, options are checked
before any work, a saved run only ever evaluates on its own base, and no file is ever left half-written."""
import json
import os
import shutil

import pytest
import torch

import bench
import checkpoints
import train
from conftest import TINY_ARGS


def run(out, *argv):
    return train.main([*TINY_ARGS, "--out-dir", out, *argv])


def refused(out, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv) if argv[0] == "--load" else run(out, *argv)
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    assert __import__("re").search(message, text), text


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    (path.write_bytes if mode == "wb" else path.write_text)(text)
    return str(path)


GOOD = "\n".join(json.dumps(dict(prompt=f"Q{i}?", completion=f" A{i}")) for i in range(20))


def test_bad_options_are_refused_in_one_line(tiny_out, tmp_path):
    cases = [
        (["--lr", "0"], r"--lr must be a positive number, got 0.0"),
        (["--lr", "nan"], r"--lr must be a positive number"),
        (["--alpha", "nan", "--method", "proxy"], r"--alpha must be a finite number"),
        (["--steps", "-1"], r"--steps must be at least 0, got -1"),
        (["--pretrain-steps", "0"], r"--pretrain-steps must be at least 1"),
        (["--batch-size", "-4"], r"--batch-size must be at least 1"),
        (["--eval-every", "0"], r"--eval-every must be at least 1"),
        (["--prompt-len", "0"], r"--prompt-len must be at least 1"),
        (["--bottleneck", "0", "--method", "adapter"], r"--bottleneck must be at least 1"),
        (["--world-size", "3"], r"--world-size must be at least 10"),
        (["--prompt-len", "63"], r"--prompt-len 63 leaves no room in the context of 64"),
        (["--method", "proxy", "--size", "tiny", "--small-size", "small"], r"--small-size small is not smaller"),
        (["--method", "proxy", "--size", "tiny"], r"proxy tuning needs a model smaller than the tiny base"),
        (["--device", "gpu"], r"--device 'gpu' is not a device"),
        (["--device", "cuda"], r"--device cuda: this torch has no cuda device"),
        (["--template", "no placeholder"], r"--template must contain \{text\}"),
        (["--head"], r"--head trains a classification layer, and qa is not a classification task"),
        (["--metric", "exact_match", "--task", "sentiment"], r"--metric exact_match does not fit the sentiment task"),
        (["--load", "x.pt", "--task", "sentiment", "--steps", "3"],
         r"--load evaluates a run on its own base and task: leave out --steps, --task"),
        (["--out-dir", write(tmp_path, "afile", "x")], r"--out-dir .* is a file, not a folder"),
        (["--small-base", str(tmp_path)], r"--small-base names proxy tuning's small model beside a --base"),
    ]
    for argv, message in cases:
        refused(tiny_out, argv, message)


def test_bad_files_are_refused_in_one_line(tiny_out, tmp_path):
    base = checkpoints.own_base(train.options.parse([*TINY_ARGS, "--out-dir", tiny_out]), "tiny").path
    cases = [
        (["--load", str(tmp_path / "nope.pt")], "checkpoint .* not found"),
        (["--load", str(tmp_path)], "is a folder: give the ckpt.pt inside it"),
        (["--load", write(tmp_path, "junk.pt", "not a checkpoint")], "is not a file written by train.py"),
        (["--load", write(tmp_path, "cut.pt", open(base, "rb").read()[:500], "wb")], "is not a file written by train"),
        (["--method", "pretrain", "--data", str(tmp_path / "missing.txt")], "data file .* not found"),
        (["--method", "pretrain", "--data", write(tmp_path, "empty.txt", "")], "is empty"),
        (["--method", "full", "--task", write(tmp_path, "bad.jsonl", GOOD + '\n{"prompt": 1}')], "line 21"),
        (["--method", "full", "--task", write(tmp_path, "empty-prompt.jsonl", GOOD + '\n{"prompt": "", '
                                                                                     '"completion": " x"}')],
         "line 21: the prompt is empty"),
        (["--method", "full", "--task", write(tmp_path, "long.jsonl", GOOD + "\n" + json.dumps(
            dict(prompt="Q?", completion=" A" * 100)))], r"line 21: its completion is \d+ tokens .* no room"),
        (["--method", "full", "--task", write(tmp_path, "latin.jsonl", "\n".join(
            ['{"prompt": "caf\xe9", "completion": " x"}'] * 12).encode("latin-1"), "wb")],
         "is not UTF-8 text: line 1"),
        (["--method", "prompt", "--prompt-init", "text"], "needs --prompt-text"),
        (["--method", "full", "--tokenizer", "nope"], "could not load the tiktoken encoding 'nope'"),
        (["--method", "full", "--task", "poetry"], "unknown task 'poetry'"),
        (["--method", "pretrain"], "a base with these options exists at .*: delete it to pretrain it again"),
    ]
    for argv, message in cases:
        refused(tiny_out, argv, message)


def test_options_are_checked_before_any_pretraining(tmp_path):
    for argv in (["--method", "adapter", "--bottleneck", "0"], ["--method", "all", "--prefix-len", "0"],
                 ["--method", "prompt", "--task", str(tmp_path / "missing.jsonl")]):
        refused(str(tmp_path / "fresh"), argv, ".")
    assert not os.path.exists(tmp_path / "fresh" / "base")  # nothing was pretrained


def test_a_run_only_loads_onto_the_base_it_was_trained_on(tiny_out, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    shutil.copytree(tiny_out, out)
    metrics = run(out, "--method", "adapter", "--steps", "3")
    ckpt = os.path.join(metrics["run_dir"], "ckpt.pt")
    moved = str(tmp_path / "moved")
    shutil.copytree(out, moved)  # the whole out-dir moves; the run finds its base beside it, from any folder
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(out)
    loaded = os.path.join(moved, os.path.relpath(ckpt, out))
    assert train.main(["--load", loaded]) == metrics["test"]
    base = checkpoints.read_run(loaded)[1].path
    saved = torch.load(base)
    saved["model"]["transformer.ln_f.bias"] += 0.1  # "retrained": another base at the same path
    torch.save(saved, base)
    with pytest.raises(SystemExit, match="^error: .* was trained on another base than the one now at"):
        train.main(["--load", loaded])
    with open(base, "wb") as f:
        f.write(b"broken")
    with pytest.raises(SystemExit, match="^error: .* was trained on another base"):
        train.main(["--load", loaded])
    with pytest.raises(SystemExit, match="^error: the cached base .* is not a file written by train.py, or it is "
                                         "damaged .*: delete it to pretrain it again"):
        run(moved, "--method", "prompt", "--steps", "2")


def test_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = str(tmp_path / "run" / "ckpt.pt")
    checkpoints.save_file({"a": torch.ones(2)}, path)
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_file({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"] and torch.load(path)["a"].sum() == 2  # old file, no .tmp
    assert not checkpoints.save_file({"a": torch.zeros(2)}, path, replace=False)  # a base is never replaced
    assert torch.load(path)["a"].sum() == 2
    checkpoints.save_file({"loss": float("nan"), "curve": [1.0, float("inf")]}, str(tmp_path / "m.json"))
    assert json.load(open(tmp_path / "m.json")) == {"loss": None, "curve": [1.0, None]}  # valid JSON


def test_interrupting_a_run_prints_one_line(tiny_out, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "run", interrupted)
    with pytest.raises(SystemExit) as e:
        run(tiny_out, "--method", "prompt")
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted: nothing half-written was kept\n"


def test_bench_refuses_bad_input_in_one_line():
    for argv, message in ((["--device", "gpu"], "--device 'gpu' is not a device"),
                          (["--size", "huge"], None)):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert message is None or str(e.value.code) == f"error: {message}: use auto, cpu, cuda, cuda:N or mps"


def test_bases_of_other_pretraining_options_are_written_beside_each_other(tmp_path):
    paths = {checkpoints.own_base(train.options.parse([*TINY_ARGS, "--out-dir", str(tmp_path), *extra]), "tiny").path
             for extra in ([], ["--pretrain-steps", "41"], ["--pretrain-seed", "7"], ["--block-size", "48"])}
    assert len(paths) == 4 and all(os.path.isabs(p) for p in paths)
