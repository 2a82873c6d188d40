"""Nothing lost, nothing silently wrong: every bad input is one line that says what to change, options are used
as given or refused before any work, a diverged run has no score, a reload refuses whenever anything its score
depends on changed, and a full disk or a kill leaves each file and run folder complete or absent."""
import copy
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import adapter
import compare
import prefix_tuning
import prompt_tuning
import train
from kit import bench, checkpoints, data, disk, evaluate, gpu_bench, loop, tokenizer
from conftest import BASE_ARGS, TINY_ARGS, one_line, tiny, tiny_gpt
from files import write_gpt2_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out, *argv):
    return train.main(tiny("--out-dir", out, *argv))


def refused(out, argv, message, base=TINY_ARGS):
    with pytest.raises(SystemExit) as e:
        train.main(argv) if argv[0] == "--load" else train.main(tiny(*argv, base=[*base, "--out-dir", out]))
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
        (["--lr", "0"], r"--lr must be greater than 0, got 0.0"),
        (["--lr", "nan"], r"--lr must be a number \(finite\), got nan"),
        (["--alpha", "nan", "--method", "proxy"], r"--alpha must be a number \(finite\)"),
        (["--steps", "-1"], r"--steps must be at least 0, got -1"),
        (["--pretrain-steps", "0"], r"--pretrain-steps must be at least 1"),
        (["--batch-size", "-4"], r"--batch-size must be at least 1"),
        (["--eval-every", "0"], r"--eval-every must be at least 1"),
        (["--method", "prompt", "--prompt-len", "0"], r"--prompt-len must be at least 1"),
        (["--method", "adapter", "--bottleneck", "0"], r"--bottleneck must be at least 1"),
        (["--people", "3"], r"--people must be at least 10"),
        (["--seed", str(2 ** 64)], r"--seed must be at most 4294967295"),
        (["--method", "prompt", "--prompt-len", "63"], r"\(\+63 soft prompt\), which leaves no room for the input"),
        (["--method", "proxy", "--size", "tiny", "--small-size", "small"], r"small model \(small\) is not smaller than its large one \(tiny\): give a smaller"),
        (["--method", "proxy", "--size", "tiny"], r"proxy tuning needs a model smaller than the tiny base"),
        (["--device", "gpu"], r"--device 'gpu' is not a device"),
        (["--device", "cuda"], r"--device cuda: this torch has no cuda device"),
        (["--template", "no placeholder"], r"--template must contain \{text\}"),
        (["--task", "qa", "--template", "Q: {text}"], r"--template shapes text/label lines, and qa has none"),
        (["--classifier"], r"--classifier trains a classification layer, and qa is not a classification task"),
        (["--metric", "exact_match", "--task", "sentiment"], r"--metric exact_match does not fit the sentiment"),
        (["--load", "x.pt", "--task", "sentiment", "--steps", "3"],
         r"--steps, --task: --load evaluates a run on its own base and task"),
        (["--out-dir", write(tmp_path, "afile", "x")], r"--out-dir .* is a file, not a folder"),
        (["--method", "proxy", "--small-base", str(tmp_path)], r"--small-base: proxy tuning.s small model beside a"),
        (["--method", "prompt", "--bottleneck", "8"], r"--bottleneck: adapter's options: --method prompt does not"),
        (["--method", "proxy", "--classifier", "--task", "sentiment"], r"--method proxy trains no classification"),
        (["--method", "none", "--steps", "5"], r"--method none trains nothing \(add --classifier"),
        (["--method", "adapter", "--classifier-lr", "0.1"], r"--classifier-lr: the classification layer's"),
        (["--method", "pretrain", "--steps", "5"], r"--steps: --method pretrain trains a base"),
        (["--task", "sentiment", "--val", "v.jsonl"], r"the sentiment task comes split"),
        (["--method", "prompt", "--prompt-text", "hi"], r"--prompt-text: prompt does not use it with these"),
        (["--method", "prefix", "--no-reparam", "--prefix-hidden", "8"], r"--prefix-hidden: prefix does not"),
        (["--method", "full", "--tokenizer", "gpt2", "--vocab-size", "500"], r"--vocab-size: our BPE's size"),
        (["--method", "none", "--classifier", "--task", "sentiment", "--lr", "0.1"], r"--lr: --method none"),
        (["--method", "prefix", "--no-reparam", "--prefix-len", "64"], r"--prefix-len 64 is not shorter than"),
        (["--method", "full", "--heldout", str(tmp_path / "nope.txt")], r"text file .*nope.txt' not found"),
        (["--method", "full", "--heldout", write(tmp_path, "short.txt", "a few words")],
         r"--heldout .* is \d+ tokens long: it needs at least 33"),
    ]
    for argv, message in cases:
        refused(tiny_out, argv, message, base=BASE_ARGS if "--steps" in argv or "none" in argv else TINY_ARGS)


def test_bad_files_are_refused_in_one_line(tiny_out, tmp_path):
    cases = [
        (["--load", str(tmp_path / "nope.pt")], "checkpoint .* not found"),
        (["--load", str(tmp_path)], "is a folder: give the ckpt.pt inside it"),
        (["--load", write(tmp_path, "junk.pt", "not a checkpoint")], "is not a file written by train.py"),
        (["--method", "pretrain", "--data", str(tmp_path / "missing.txt")], "text file .* not found"),
        (["--method", "pretrain", "--data", write(tmp_path, "empty.txt", "")], "is empty"),
        (["--method", "pretrain", "--data", "/dev/null"], "'/dev/null' is not a regular file"),
        (["--method", "pretrain", "--data", write(tmp_path, "a.txt", "a" * 20000), "--pretrain-steps", "2"],
         r"the pretraining text is \d+ tokens long once tokenized: it needs more than --block-size 64 \+ 1"),
        (["--method", "full", "--task", write(tmp_path, "bad.jsonl", GOOD + '\n{"prompt": 1}')], "line 21"),
        (["--method", "full", "--task", write(tmp_path, "empty-prompt.jsonl", GOOD + '\n{"prompt": "", '
                                                                                     '"completion": " x"}')],
         "line 21: the prompt is empty"),
        (["--method", "full", "--task", write(tmp_path, "long.jsonl", GOOD + "\n" + json.dumps(
            dict(prompt="Q?", completion=" A" * 100)))], r"line 21: its answer is \d+ tokens .* no room"),
        (["--method", "full", "--task", write(tmp_path, "latin.jsonl", "\n".join(
            ['{"prompt": "caf\xe9", "completion": " x"}'] * 12).encode("latin-1"), "wb")],
         "is not UTF-8 text: line 1"),
        (["--method", "prompt", "--prompt-init", "text"], "needs --prompt-text on a task without label words"),
        (["--method", "full", "--tokenizer", "nope", "--steps", "1"], "could not load the tiktoken encoding"),
        (["--method", "full", "--task", "poetry"], "unknown task 'poetry'"),
        (["--method", "pretrain"], "a base with these options exists at .*: to pretrain another beside it"),
    ]
    no_bpe = [a for a in BASE_ARGS if a not in ("--vocab-size", "400")]  # --tokenizer names another
    for argv, message in cases:
        base = BASE_ARGS if argv[:2] == ["--method", "pretrain"] else TINY_ARGS
        refused(tiny_out, argv, message, base=no_bpe if "--tokenizer" in argv else base)


def test_options_are_checked_before_any_pretraining(tmp_path):
    for argv in (["--method", "adapter", "--bottleneck", "0"], ["--method", "prefix", "--prefix-len", "0"],
                 ["--method", "prompt", "--task", str(tmp_path / "missing.jsonl")],
                 ["--method", "prompt", "--prompt-init", "text"], ["--seed", str(2 ** 64)]):
        refused(str(tmp_path / "fresh"), argv, ".")
    made = [f for _, _, fs in os.walk(tmp_path / "fresh") for f in fs]
    assert not [f for f in made if f.endswith(".pt")]  # nothing was pretrained (a tokenizer may have been)


def test_a_diverged_run_has_no_score(tiny_out, capsys):
    with pytest.raises(SystemExit, match=r"^error: full diverged at step \d+: the loss is (nan|inf).*nothing was "
                                         r"saved: lower --lr$"):
        run(tiny_out, "--method", "full", "--lr", "1e30", "--task", "sentiment")
    assert "test accuracy" not in capsys.readouterr().out
    runs = os.path.join(tiny_out, "runs")
    saved = [json.load(open(os.path.join(runs, f, "metrics.json"))) for f in os.listdir(runs)] \
        if os.path.exists(runs) else []
    assert not [m for m in saved if m["lr"] == 1e30]  # nothing was saved


def test_a_base_with_non_finite_weights_is_refused(tiny_out, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(tiny_out, out, ignore=shutil.ignore_patterns("runs"))
    base = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f == "tiny-ctx64-40steps-batch8.pt"][0]
    saved = torch.load(base)
    saved["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("inf")
    torch.save(saved, base)
    refused(out, ["--method", "prompt", "--prompt-len", "4"], r"the cached base .* holds NaN or infinite weights: "
                                                               r"delete that file \(tiny-ctx64-40steps-batch8.pt\)")


def test_a_reload_refuses_whatever_its_score_depends_on_changed(tiny_out, tmp_path, reviews):
    task = str(tmp_path / "reviews.jsonl")
    shutil.copy(reviews, task)
    folder = write_gpt2_folder(tiny_gpt(3, vocab_size=400, block_size=64),
                               tmp_path / "gpt2", tokenizer.train(open(reviews).read() * 20, 400))
    metrics = train.main(["--base", folder, "--method", "prompt", "--prompt-len", "4", "--task", task, "--steps",
                          "3", "--batch-size", "4", "--eval-every", "3", "--out-dir", tiny_out])
    ckpt = os.path.join(metrics["run_dir"], "ckpt.pt")
    assert train.main(["--load", ckpt]) == metrics["test"]
    originals = {p: open(p, "rb").read() for p in (task, ckpt, f"{folder}/config.json", f"{folder}/vocab.json")}

    def changed(path, new, message):
        with open(path, "wb") as f:
            f.write(new)
        refused(tiny_out, ["--load", ckpt], message)
        with open(path, "wb") as f:
            f.write(originals[path])
    lines = originals[task].decode().split("\n")
    changed(task, "\n".join([lines[0].replace("The", "A"), *lines[1:]]).encode(), r"the task's data .* changed")
    config = json.loads(originals[f"{folder}/config.json"])
    changed(f"{folder}/config.json", json.dumps({**config, "layer_norm_epsilon": 1e-6}).encode(),
            r"trained on another base than the one now at .* \(its config changed\)")
    vocab = json.loads(originals[f"{folder}/vocab.json"])
    a, b = list(vocab)[300:302]
    changed(f"{folder}/vocab.json", json.dumps({**vocab, a: vocab[b], b: vocab[a]}).encode(),
            r"(the base's tokenizer .* changed|merges and the vocabulary disagree)")
    saved = torch.load(ckpt)
    raw = bytearray(originals[ckpt])
    prompt = saved["trainable"]["soft_prompt.prompt"].numpy().tobytes()
    at = raw.find(prompt) + len(prompt) // 2
    raw[at] ^= 0xFF  # a byte flipped in the middle of the soft prompt's values
    changed(ckpt, bytes(raw), r"is damaged: its tensors are not the ones it was saved with")
    for edit, message in ((lambda s: s["trainable"].update({"transformer.ln_f.bias": torch.zeros(32)}),
                           r"does not hold exactly the tensors prompt trains: extra \['transformer.ln_f.bias'\]"),
                          (lambda s: s["trainable"].clear(), r"lacking \['soft_prompt.prompt'\]")):
        s = torch.load(ckpt)
        edit(s)
        s["tensors"] = checkpoints.tensors_digest(s["trainable"])  # a consistent file, with the wrong tensors
        torch.save(s, ckpt)
        refused(tiny_out, ["--load", ckpt], message)
    torch.save(saved, ckpt)
    assert train.main(["--load", ckpt]) == metrics["test"]  # all restored: the same score again


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
    base = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(moved, "base")) for f in fs
            if f == "tiny-ctx64-40steps-batch8.pt"][0]
    saved = torch.load(base)
    saved["model"]["transformer.ln_f.bias"] += 0.1  # "retrained": another base at the same path
    torch.save(saved, base)
    refused(moved, ["--load", loaded], r"was trained on another base than the one now at .* \(its weights changed\)")
    with open(base, "wb") as f:
        f.write(b"broken")
    refused(moved, ["--method", "prompt", "--prompt-len", "4"], r"the cached base .* is not a file written by "
                                                                r"train.py, or it is damaged .*: delete that file")


def test_files_and_run_folders_are_written_whole_or_not_at_all(tmp_path, monkeypatch, tiny_out):
    path = str(tmp_path / "run" / "ckpt.pt")
    disk.save_file({"a": torch.ones(2)}, path)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~disk.umask())  # the user's umask

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        disk.save_file({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"] and torch.load(path)["a"].sum() == 2  # old file, no .tmp
    assert not disk.save_file({"a": torch.zeros(2)}, path, replace=False)  # a base is never replaced
    disk.save_file({"loss": float("nan"), "curve": [1.0, float("inf")]}, str(tmp_path / "m.json"))
    assert json.load(open(tmp_path / "m.json")) == {"loss": None, "curve": [1.0, None]}  # valid JSON

    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    runs = os.path.join(tiny_out, "runs")
    before = set(os.listdir(runs)) if os.path.exists(runs) else set()
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"^error: could not write .*/runs/qa-tiny-prompt-\w+/ckpt.pt: the disk "
                                         r"is full; nothing half-written was kept$"):
        run(tiny_out, "--method", "prompt", "--prompt-len", "3", "--seed", "77")
    monkeypatch.undo()
    assert set(os.listdir(runs)) == before  # no half folder, no temporary file


def test_what_a_killed_run_left_behind_is_cleaned_and_nothing_else(tiny_out):
    mark = disk.MARK
    stale = os.path.join(tiny_out, "runs", f".qa-tiny-prompt-0.999999999.abc{mark}")  # a process that is gone
    os.makedirs(stale)
    stale_file = os.path.join(tiny_out, f".results.md.999999999.x{mark}")
    open(stale_file, "w").close()
    live = os.path.join(tiny_out, f".keep.{os.getpid()}.x{mark}")  # this process's own: kept
    open(live, "w").close()
    yours = os.path.join(tiny_out, ".notes.999999999.draft.tmp")  # looks alike, but not ours: kept
    open(yours, "w").close()
    with disk.writer(tiny_out):  # what every run of train.py does first: it cleans as it takes the lock
        pass
    assert not os.path.exists(stale) and not os.path.exists(stale_file) and os.path.exists(live)
    assert os.path.exists(yours)
    os.remove(live)
    os.remove(yours)


def test_every_file_is_written_aside_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """Tokenizer folders and pictures go through the same writer as checkpoints: never half a file."""
    enc = tokenizer.train("a b c abc abd " * 50, 270)
    real_fdopen = os.fdopen

    def full(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        f.write = lambda b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f
    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(ValueError, match=r"^could not write .*/tok/vocab.json: the disk is full; nothing half"):
        tokenizer.save_gpt2_folder(enc, str(tmp_path / "tok"))
    fig = type("Fig", (), dict(tight_layout=lambda self: None,
                               savefig=lambda self, f, **k: f.write(b"\x89PNG")))()
    with pytest.raises(ValueError, match=r"^could not write .*/pic.png: the disk is full"):
        compare.save(fig, str(tmp_path / "pic.png"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["tok"] and os.listdir(tmp_path / "tok") == []  # nothing aside left
    compare.save(fig, str(tmp_path / "pic.png"))
    assert open(tmp_path / "pic.png", "rb").read() == b"\x89PNG"


def test_interrupting_a_run_prints_one_line(tiny_out, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "run", interrupted)
    with pytest.raises(SystemExit) as e:
        run(tiny_out, "--method", "prompt")
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted: nothing half-written was kept\n"


def test_the_library_refuses_what_it_cannot_do_in_one_valueerror(tiny_out):
    enc = tokenizer.train("the cat sat on the mat " * 50, 300)
    task = data.load_task(data.TaskOptions(task="sentiment", people=10))
    model = tiny_gpt(vocab_size=300, block_size=64)
    for kwargs, message in ((dict(steps=-1), "--steps must be at least 0"), (dict(lr=float("inf")), "--lr must"),
                            (dict(dtype="float16"), "--dtype must be one of float32, bfloat16"),
                            (dict(batch_size=0), "--batch-size must be at least 1")):
        with pytest.raises(ValueError, match=message):
            loop.TrainConfig(**kwargs)
    with pytest.raises(ValueError, match="the task has no token ids yet: call data.encode_task"):
        loop.finetune(model, task, train.Full, train.Full.Config(), loop.TrainConfig(steps=1), "cpu")
    data.encode_task(task, enc, 64)
    with pytest.raises(ValueError, match="--device cuda:7: this torch has no cuda device"):
        loop.finetune(model, task, train.Full, train.Full.Config(), loop.TrainConfig(steps=1), "cuda:7")
    with pytest.raises(ValueError, match="a byte-level BPE needs at least 257 tokens .*, got 10"):
        tokenizer.train("some text", 10)
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        loop.autocast("cpu", "float16")
    # the README's notebook call with a wrong argument: one line, not an AttributeError deep inside
    for args, message in (((model, "sentiment", train.Full, train.Full.Config(), loop.TrainConfig()),
                           "^finetune\\(\\): task must be a Task, got str$"),
                          ((model, task, train.Full, train.Full.Config(), dict(steps=3)),
                           "^finetune\\(\\): train_cfg must be a TrainConfig, got dict$"),
                          ((model, task, adapter, prompt_tuning.Config(), loop.TrainConfig()),
                           "method_cfg its Config, got Config")):
        with pytest.raises(ValueError, match=message):
            loop.finetune(*args, "cpu")


def test_a_second_method_on_one_model_is_refused(reviews):
    enc = tokenizer.train("the cat sat on the mat " * 50, 300)
    task = data.load_task(data.TaskOptions(task="sentiment", people=10))
    data.encode_task(task, enc, 64)
    model = tiny_gpt(vocab_size=300, block_size=64)
    loop.finetune(model, task, adapter, adapter.Config(), loop.TrainConfig(steps=1, batch_size=2), "cpu")
    with pytest.raises(ValueError, match="^adapter: this model already has h.0.adapter_attn attached .* attach to a "
                                         "fresh copy of the base$"):  # its trained norms would be kept
        loop.finetune(model, task, adapter, adapter.Config(), loop.TrainConfig(steps=1, batch_size=2), "cpu")
    with pytest.raises(ValueError, match="^prompt tuning: this model already has h.0.adapter_attn attached"):
        prompt_tuning.attach(model, prompt_tuning.Config(prompt_len=2))
    fresh = tiny_gpt(vocab_size=300, block_size=64)
    prompt_tuning.attach(fresh, prompt_tuning.Config(prompt_len=2))
    prompt_tuning.attach(fresh, prompt_tuning.Config(prompt_len=3))  # its own point again: replaced, nothing kept
    assert fresh.attached() == ["soft_prompt"] and fresh.soft_prompt.prompt.shape[0] == 3
    with pytest.raises(ValueError, match="^prefix tuning: this model already has soft_prompt attached"):
        prefix_tuning.attach(fresh, prefix_tuning.Config())


def test_bench_refuses_bad_input_in_one_line():
    for argv, message in ((["--device", "gpu"], "error: --device 'gpu' is not a device: use auto, cpu, cuda, "
                                                "cuda:N or mps"), (["--size", "huge"], None)):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert message is None or str(e.value.code) == message
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="^error: python -m kit.gpu_bench measures on a CUDA device, and this machine"):
            gpu_bench.main([])
    with pytest.raises(SystemExit, match="^error: --shapes: unknown gpt5; use gpt2"):
        gpu_bench.main(["--device", "cpu", "--shapes", "gpt5"])


def test_bases_of_other_pretraining_options_are_written_beside_each_other(tmp_path):
    from kit import bases, options
    paths = set()
    for extra in ([], ["--pretrain-steps", "41"], ["--pretrain-seed", "7"], ["--block-size", "48"]):
        args = train.parse(tiny("--out-dir", str(tmp_path), *extra))
        paths.add(bases.our_base(args.base_opts, "tiny", args.out_dir, args.task_opts.people).path)
    assert len(paths) == 4 and all(os.path.isabs(p) for p in paths)


def test_a_tokenizer_that_does_not_match_the_weights_is_refused(tmp_path):
    enc = tokenizer.train(open(tokenizer.__file__).read() * 3, 400)
    folder = write_gpt2_folder(tiny_gpt(3, vocab_size=300, block_size=64), tmp_path / "m", enc)  # 400 > 300
    refused(str(tmp_path / "out"), ["--base", folder, "--method", "none", "--task", "sentiment", "--people",
                                    "20", "--out-dir", str(tmp_path / "out")],
            r"its tokenizer has 400 tokens but the model's embedding has 300 rows: the tokenizer does not "
            r"match the weights", base=[])


def test_odd_paths_are_named_as_what_they_are(tiny_out, tmp_path):
    fifo = str(tmp_path / "pipe.jsonl")
    os.mkfifo(fifo)
    refused(tiny_out, ["--method", "full", "--task", fifo], r"task file .*pipe.jsonl' is not a regular file")
    link = tmp_path / "linked-out"
    os.symlink(tiny_out, link)  # an out-dir that is a link to a folder is that folder
    assert train.main([*BASE_ARGS, "--out-dir", str(link), "--method", "none"])["test"] is not None


def test_compare_refuses_what_the_methods_it_runs_would_not_use(tiny_out, tmp_path):
    import compare
    fast = tiny("--out-dir", tiny_out, "--steps", "2")
    for argv, message in ((["--methods", "prompt", "--bottleneck", "4"], "--bottleneck: adapter's options: "
                                                                         "--methods prompt does not use them"),
                          (["--methods", "prompt", "--alpha", "1"], "--alpha: proxy's options"),
                          (["--methods", "proxy"], "proxy tuning needs a model smaller than the tiny base"),
                          (["--load", "x.pt"], "--load evaluates one run"),
                          (["--prompt-grid", "--prompt-len", "5"], "--prompt-len: --prompt-grid sets them")):
        with pytest.raises(SystemExit) as e:
            compare.main([*fast, *argv])
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code


def test_configs_and_checkpoints_of_another_version_are_one_line(tiny_out, tmp_path):
    from model import GPTConfig
    with pytest.raises(ValueError, match="GPTConfig.norm must be one of layernorm, rmsnorm, got 'RMSNorm'"):
        GPTConfig(norm="RMSNorm")
    metrics = run(tiny_out, "--method", "prompt", "--prompt-len", "3", "--steps", "2")
    ckpt = os.path.join(metrics["run_dir"], "ckpt.pt")
    saved = torch.load(ckpt)
    saved["config"]["prompt_depth"] = 2  # a field this version's Config does not have
    path = str(tmp_path / "old.pt")
    torch.save(saved, path)
    shutil.copy(os.path.join(metrics["run_dir"], "metrics.json"), tmp_path)
    refused(tiny_out, ["--load", path], r"(the option 'prompt_depth' is no longer one of prompt's|another base)")


def test_every_key_load_reads_is_checked_in_one_line(tiny_out):
    metrics = run(tiny_out, "--method", "prompt", "--prompt-len", "3", "--steps", "2")
    ckpt = os.path.join(metrics["run_dir"], "ckpt.pt")
    original, raw = torch.load(ckpt), open(ckpt, "rb").read()
    for edit, message in [
            (lambda s: s["config"].update(prompt_depth=2), r"the option 'prompt_depth' is no longer one of prompt's"),
            (lambda s: s["config"].pop("prompt_len"), r"the option 'prompt_len' has since been added to prompt's"),
            (lambda s: s["task"]["options"].pop("template"), r"'template' has since been added to the task's options"),
            (lambda s: s["config"].update(prompt_len=0), r"its prompt's options are refused now \(--prompt-len must be at least 1, got 0\)"),
            (lambda s: s.pop("base"), r"is damaged: it has no 'base'; train it again"),
            (lambda s: s["base"].update(spec=[1]), r"is damaged: its 'base.spec' is a list"),
            (lambda s: s["base"].pop("identity"), r"is damaged: it has no 'base.identity'"),
            (lambda s: s.update(task="qa"), r"is damaged: its 'task' is a str, not a dict"),
            (lambda s: s["train"].update(seed="1"), r"is damaged: its 'train.seed' is a str"),
            (lambda s: s.update(classifier_labels="x"), r"is damaged: its 'classifier_labels' is a str")]:
        saved = copy.deepcopy(original)
        edit(saved)
        torch.save(saved, ckpt)
        refused(tiny_out, ["--load", ckpt], message)
    open(ckpt, "wb").write(raw)  # the very bytes its metrics.json was written with
    assert train.main(["--load", ckpt]) == metrics["test"]


def test_compare_refuses_options_it_would_drop_or_read_twice(tiny_out):
    fast = tiny("--out-dir", tiny_out, "--steps", "2")
    for argv, message in ((["--methods", "prompt,adapter,prompt"], "--methods names prompt twice"),
                          (["--methods", "prompt", "--lrs", "prompt=0.1,prompt=0.2"], "--lrs gives prompt two"),
                          (["--methods", "none,prompt", "--lrs", "none=0.1"], "--lrs: none trains nothing"),
                          (["--prompt-grid", "--methods", "adapter"], "--methods: --prompt-grid runs prompt tuning's"),
                          (["--prompt-grid", "--lrs", "prompt=0.1"], "--lrs: --prompt-grid runs prompt tuning's")):
        with pytest.raises(SystemExit, match="^error: " + __import__("re").escape(message)):
            compare.main(fast + argv)


def test_a_reused_run_is_checked_against_what_it_wrote(tiny_out, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(tiny_out, out)
    argv = tiny("--out-dir", out, "--steps", "2", "--methods", "prompt", "--prompt-len", "3")
    first = compare.main(argv)[0]
    metrics = os.path.join(first["run_dir"], "metrics.json")
    saved = json.load(open(metrics))
    json.dump(dict(saved, test=0.99), open(metrics, "w"))  # a score edited by hand
    with pytest.raises(SystemExit, match=r"^error: .*metrics.json was edited or damaged since its run wrote it: "
                                         r"delete the folder"):
        compare.main(argv)
    open(metrics, "w").write("{")
    with pytest.raises(SystemExit, match=r"metrics.json cannot be read \(JSONDecodeError\)"):
        compare.main(argv)
    json.dump(saved, open(metrics, "w"))
    with open(os.path.join(first["run_dir"], "ckpt.pt"), "ab") as f:
        f.write(b"x")  # another checkpoint beside the metrics
    with pytest.raises(SystemExit, match=r"ckpt.pt is missing or is not the checkpoint written with"):
        compare.main(argv)


def test_two_writers_on_one_out_dir_are_refused(tiny_out, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kit import disk\n"
                               "with disk.writer(sys.argv[1]):\n print('held', flush=True); time.sleep(30)",
                               out], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        refused(out, ["--method", "prompt"], rf"^error: another train.py or compare.py \(pid {holder.pid}\) is "
                                              rf"writing to {out}: wait for it to finish, or give another --out-dir$")
    finally:
        holder.kill()
        holder.wait()
    with disk.writer(out):  # a killed writer leaves no lock behind
        with disk.writer(out):  # and one process may nest (compare.py runs train.py's runs)
            pass


def test_helper_scripts_refuse_options_they_would_ignore(capsys):
    from kit import get_data
    for argv, message in ((["--memory", "--size", "tiny"], "--size: --memory sets it already"),
                          (["--tiny", "--shape", "gpt2"], "--shape: --tiny sets it already"),
                          (["--shape", "gpt2", "--size", "tiny"], "--size: --shape sets it already")):
        with pytest.raises(SystemExit, match="^error: " + message):
            bench.main(argv)
    get_data.main(["--help"])  # help, and no download
    assert "python -m kit.get_data" in capsys.readouterr().out and not os.path.exists(get_data.OUT + "/.fetch")
    with pytest.raises(SystemExit, match="^error: python -m kit.get_data takes no options, got --out x; see --help"):
        get_data.main(["--out", "x"])


def test_non_finite_logits_stop_scoring_in_one_line():
    enc = tokenizer.train("the cat sat on the mat " * 50, 300)
    model = tiny_gpt(vocab_size=300, block_size=64)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    for name in ("sentiment", "qa"):  # label words, then greedy answers
        task = data.encode_task(data.load_task(data.TaskOptions(task=name, people=10)), enc, 64)
        with pytest.raises(ValueError, match="^the (model's )?logits are NaN or infinite while (scoring|decoding)"):
            evaluate.evaluate(model, task, "cpu")


def test_a_run_that_cannot_fit_in_memory_is_refused_before_any_work(tiny_out, monkeypatch, capsys):
    # the tiny base needs 16 bytes a weight for full fine-tuning, 4 a weight frozen: give it room for
    # the frozen model and an adding method only
    import compare
    from kit import loop
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=400, block_size=64))
    n = model.num_params()
    with pytest.raises(loop.TooBig, match=rf"^x needs {16 * n / 1e9:.1f} GB for its weights, .* and "
                                          rf"the cpu has 0.0 GB: tune it by an adding method"):
        loop.check_memory(model, "cpu", "x", total=8 * n)
    model.requires_grad_(False)
    loop.check_memory(model, "cpu", "x", total=8 * n)  # frozen: 4 bytes a weight, fits
    big = 1_500_000  # bytes: more than the tiny base (~120k weights) frozen, less than fully trained
    monkeypatch.setattr(loop, "device_memory", lambda device: big)
    one_line(train.main, tiny("--method", "full", "--out-dir", tiny_out),
             r"^error: --method full on tiny needs .* GB .* tune it by an adding method")
    # compare.py leaves it out of --methods all, and refuses it asked for by name
    argv = tiny("--methods", "none,full", "--out-dir", tiny_out)
    one_line(compare.main, argv, r"^error: --method full on tiny needs")
