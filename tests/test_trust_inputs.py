"""Trust, round 5, continued: options that would be ignored are refused naming them; the notebook API answers a
wrong call in one line, or works (a pathlib.Path, a task's name); odd tokenizers, bench lengths, a dangling link where
a base is saved, labels alike once Unicode-normalised."""
import json
import os
import shutil

import pytest
import torch

import compare
import train
from conftest import BASE_ARGS, one_line, tiny


def compare_argv(out, *argv):
    return [*tiny("--steps", "2", "--methods", "prompt", "--prompt-len", "3", "--out-dir", out), *argv]


# 6. An option that would be ignored is refused, naming it

def test_options_that_would_be_ignored_are_refused_naming_them(tmp_path):
    import proxy_tuning
    from conftest import tiny_gpt
    out = str(tmp_path / "out")
    none = [*BASE_ARGS, "--out-dir", out, "--methods", "none"]
    for argv, message in (([*none, "--lr", "0.1"], r"^error: --lr: --methods none trains nothing of its own"),
                          ([*none, "--steps", "3"], r"^error: --steps: --methods none trains nothing"),
                          ([*none, "--seeds", "2"], r"^error: --seeds: --methods none trains nothing"),
                          ([*none, "--eval-every", "3"], r"^error: --eval-every: --methods none trains nothing"),
                          (compare_argv(out, "--lrs", "prompt=0.1", "--lr", "0.2"),
                           r"^error: --lr: --lrs gives every method run its own learning rate"),
                          (compare_argv(out, "--steps", "4"), r"^error: --steps is given 2 times: give it once"),
                          ([*BASE_ARGS, "--out-dir", ""], r"^error: --out-dir is empty: give a path")):
        one_line(compare.main, argv, message)
    base = [*BASE_ARGS, "--out-dir", out]
    for argv, message in ((["--load", ""], r"^error: --load is empty: give a path or leave the option out$"),
                          ([*base, "--out-dir", ""], r"^error: --out-dir is given 2 times"),
                          (["--out-dir", "", "--method", "none"], r"^error: --out-dir is empty"),
                          ([*base, "--steps", "3", "--steps=4"], r"^error: --steps is given 2 times: give it once"),
                          ([*base, "--device", "cpu:1"], r"^error: --device cpu:1: there is one cpu device: give "
                                                         r"--device cpu$"),
                          (["--out-dir", out, "--method", "proxy", "--base", "m.gguf", "--small-layers", "2",
                            "--small-base", "s.gguf"], r"^error: --small-layers: --small-base is the small model "
                                                       r"already"),
                          (["--out-dir", out, "--method", "proxy", "--base", "m.gguf", "--small-layers", "2"],
                           r"^error: --small-layers heals the cut blocks on a text of yours: give --data")):
        one_line(train.main, argv, message)
    assert os.listdir(out) == [".lock"]  # refused before any work: nothing trained, no tokenizer
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"^proxy_tuning.generate: max_new_tokens must be a whole number of at "
                                         r"least 0, got -3$"):
        proxy_tuning.generate(model, model, model, torch.zeros(1, 3, dtype=torch.long), -3)


# 5. The notebook API: each wrong call is one line, or works

def test_the_notebook_api_answers_in_one_line_or_works(tmp_path):
    import pathlib
    import adapter
    import prompt_tuning
    from model import GPT
    from kit import data, evaluate, loop, tokenizer
    from kit.classifier import Classifier
    from conftest import tiny_gpt
    enc = tokenizer.train("the cat sat on the mat " * 50, 300)
    small = data.TaskOptions(task="sentiment", people=10)
    assert data.load_task("sentiment").name == "sentiment"  # a task's name where TaskOptions belongs: works
    lines = "\n".join(json.dumps(dict(prompt=f"Q{i}?", completion=f" A{i}")) for i in range(20))
    (tmp_path / "t.jsonl").write_text(lines)
    assert len(data.load_task(data.TaskOptions(task=tmp_path / "t.jsonl")).train) == 16  # a pathlib.Path: works
    task = data.encode_task(data.load_task(small), enc, 64)
    qa = data.encode_task(data.load_task(data.TaskOptions(task="qa", people=10)), enc, 64)
    cfg = loop.TrainConfig(steps=1, batch_size=2)
    model = tiny_gpt(vocab_size=300, block_size=64)
    meta = GPT(model.config).to("meta")
    for call, message in (
            (lambda: data.load_task(3), r"^load_task\(\): opts must be a TaskOptions \(or a task's name\), got int$"),
            (lambda: data.encode_task(data.load_task(small), enc, block_size="64"),
             r"^encode_task\(\): block_size must be a whole number of at least 2, got '64'$"),
            (lambda: loop.finetune(meta, task, adapter, adapter.Config(), cfg, "cpu"),
             r"^finetune\(\): the model is on the meta device \(it has no weights\)"),
            (lambda: loop.finetune(tiny_gpt(vocab_size=300, block_size=64).to(torch.bfloat16), task, adapter,
                                   adapter.Config(), cfg, "cpu"), r"weights are torch.bfloat16, not float32"),
            (lambda: evaluate.evaluate(tiny_gpt(vocab_size=300, block_size=64).double(), task, "cpu"),
             r"^evaluate\(\): the model's weights are torch.float64, not float32 .*call model.float\(\)"),
            (lambda: evaluate.evaluate(tiny_gpt(vocab_size=64, block_size=64), task, "cpu"),
             r"^evaluate\(\): the task holds token id \d+, past the model's vocabulary of 64: it was encoded with "
             r"another tokenizer"),
            (lambda: loop.finetune(model, qa, adapter, adapter.Config(), loop.TrainConfig(classifier=True), "cpu"),
             r"^finetune\(\): a classification layer needs a classification task, and qa's answers are free text"),
            (lambda: prompt_tuning.MixedPrompts([prompt_tuning.SoftPrompt(torch.zeros(2, 16))], [0, 1]),
             r"^MixedPrompts: task_ids must index the 1 prompts \(0 to 0\), got \[0, 1\]$"),
            (lambda: Classifier(model, [5, 300]), r"^Classifier: label_ids must be token ids of the model's "
                                                  r"vocabulary \(0 to 299\)"),
            (lambda: evaluate.evaluate(model, data.load_task(small), "cpu"), r"^the task has no token ids yet"),
            (lambda: GPT.from_pretrained(None), r"^a released model must be a path \(a string or a pathlib.Path\), "
                                                r"got None$")):
        with pytest.raises(ValueError, match=message):
            call()
    empty = data.encode_task(data.load_task(small), enc, 64)
    empty.test = []
    with pytest.raises(ValueError, match=r"^evaluate\(\): the task sentiment has no test examples: give it some$"):
        evaluate.evaluate(model, empty, "cpu")
    folder = pathlib.Path(tmp_path / "tok")
    tokenizer.save_gpt2_folder(enc, folder)  # a pathlib.Path where a path string is taken: works
    assert tokenizer.load(folder).encode_ordinary("the cat sat") == enc.encode_ordinary("the cat sat")


# 7. Also

def test_odd_tokenizers_bench_lengths_dangling_links_and_lookalike_labels(tiny_out, tmp_path, capsys, monkeypatch):
    import pathlib
    from kit import bench, data, tokenizer
    from files import write_tokenizer_json
    enc = tokenizer.train("the cat sat on the mat " * 50, 300)
    folder = pathlib.Path(tmp_path / "tok")
    folder.mkdir()
    write_tokenizer_json(enc, folder / "tokenizer.json")
    t = json.load(open(folder / "tokenizer.json"))
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": []}
    (folder / "tokenizer.json").write_text(json.dumps(t))
    with pytest.raises(ValueError, match=r"tokenizer.json describes a model that model.py's GPT can't represent: "
                                         r"the pre-tokenizer"):
        tokenizer.load(str(folder))
    class Measured(Exception):
        pass

    def training(cfg, device, dtype, B, T, *a, **k):  # where the timing would start
        raise Measured(cfg.block_size, T)
    monkeypatch.setattr(bench, "training", training)
    with pytest.raises(Measured) as e:  # rows longer than the tiny run's own context: it makes room for them
        bench.main(["--tiny", "--length", "100"])
    assert e.value.args == (120, 100)  # 100 tokens beside a soft prompt's 20
    monkeypatch.undo()
    one_line(bench.main, ["--shape", "gpt2", "--length", "2000"], r"^error: --length 2000: gpt2's context \(1,024\) "
                                                                  r"holds rows of at most 1,004 beside a soft prompt$")
    out = tmp_path / "out"
    shutil.copytree(tiny_out, out, ignore=shutil.ignore_patterns("runs", "*.pt"))  # its tokenizer: no BPE to train
    argv = tiny("--out-dir", str(out), "--method", "pretrain", "--pretrain-steps", "3", base=BASE_ARGS)
    base = train.parse(argv)
    from kit import bases
    path = bases.our_base(base.base_opts, "tiny", base.out_dir, base.task_opts.people, write=True).path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(tmp_path / "gone.pt", path)  # a dangling link where the base is saved
    one_line(train.main, argv, r"tiny-ctx64-3steps-batch8.pt is a link, where the project writes a file of that name")
    assert "pretrain step" not in capsys.readouterr().out  # refused before pretraining
    assert os.path.islink(path) and not os.path.exists(tmp_path / "gone.pt")
    nfc, nfd = "caf\u00e9", "cafe\u0301"  # "café" as one character, and as "e" + a combining accent
    lines = [dict(text=f"text {i}", label=[nfc, "tea", nfd][i % 3]) for i in range(30)]
    (tmp_path / "labels.jsonl").write_text("\n".join(map(json.dumps, lines)))
    with pytest.raises(ValueError, match=r"has the label ' caf\\xe9' and .* has ' cafe\\u0301': labels that differ "
                                         r"only in spaces, or in how accents are encoded \(Unicode NFC and NFD\)"):
        data.load_task(data.TaskOptions(task=str(tmp_path / "labels.jsonl")))
