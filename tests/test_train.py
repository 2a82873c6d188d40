"""train.py and compare.py end to end on a tiny world: the command line, checkpoints that reload to the same
logits and score, a method of its own file added with one table line, released bases (GPT-2 and Llama folders, a
GGUF file) with every method and proxy tuning, the comparison's tables, and bench.py's smoke mode."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import compare
import train
from kit import bases, bench, data, disk, loop, tokenizer, world
from conftest import TINY_ARGS, tiny, tiny_gpt
from files import gguf_meta, gguf_tensors, write_gguf, write_gpt2_folder, write_llama_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import toy_method  # noqa: E402  a method of its own file, as a student writes one


def run(out, *argv):
    return train.main(tiny("--out-dir", out, *argv))


def test_a_fresh_method_run_from_the_command_line_pretrains_then_fine_tunes(tmp_path):
    r = subprocess.run([sys.executable, "train.py", *tiny("--out-dir", str(tmp_path), "--method", "full",
                        "--steps", "20", "--people", "20")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no pretrained tiny base" in r.stdout and "saved the pretrained base" in r.stdout
    losses = [float(x) for x in re.findall(r"pretrain step .* loss (\d+\.\d+)", r.stdout)]
    assert losses[-1] < losses[0] - 1.0
    run_dir = re.search(r"saved (\S+)", r.stdout.splitlines()[-1]).group(1)
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["method"] == "full" and metrics["metric"] == "exact_match" and 0 <= metrics["test"] <= 1
    assert metrics["loss_end"] < metrics["loss_start"] and len(metrics["losses"]) == 20
    assert [s for s, _ in metrics["val_curve"]] == [5, 10, 15, 20]
    assert metrics["trainable_params"] == metrics["base_params"] > 0 and metrics["peak_bytes"] > 0
    assert {"ood", "probe", "heldout_loss"} <= set(metrics) and metrics["heldout_loss"] > 0
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"))
    assert sum(t.numel() for t in ckpt["trainable"].values()) == metrics["trainable_params"]
    assert oct(os.stat(os.path.join(run_dir, "ckpt.pt")).st_mode & 0o777) == oct(0o666 & ~disk.umask())


@pytest.mark.parametrize("argv", [["--method", "prompt", "--prompt-len", "5"],
                                  ["--method", "prompt", "--prompt-len", "5", "--prompt-init", "text"],
                                  ["--method", "prefix"], ["--method", "prefix", "--no-reparam"],
                                  ["--method", "adapter", "--adapter-where", "pfeiffer"]])
def test_checkpoint_holds_only_the_trained_tensors_and_reloads_exactly(tiny_out, reviews, argv):
    metrics = run(tiny_out, "--task", reviews, *argv)
    path = os.path.join(metrics["run_dir"], "ckpt.pt")
    ckpt = torch.load(path)
    assert sum(t.numel() for t in ckpt["trainable"].values()) == metrics["stored_params"]
    model, again = train.load_run(path, "cpu").model, train.load_run(path, "cpu").model
    assert set(ckpt["trainable"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randint(400, (2, 10))
    assert torch.equal(model(x)[0], again(x)[0])
    assert train.main(["--load", path]) == metrics["test"]


def test_on_your_own_text_forgetting_is_measured_on_the_5_percent_pretraining_held_out(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(world.pretrain_corpus(world.make_world(40)))
    argv = tiny("--data", str(corpus), "--out-dir", str(tmp_path), "--method", "full", "--steps", "2")
    args = train.parse(argv)
    bopts = args.base_opts
    base = bases.our_base(bopts, "tiny", args.out_dir, args.task_opts.people)
    enc = bases.tokenizer_of(base, bopts, args.task_opts.people)
    task = train.plan(args, "full", base, enc).task  # pretrains the base first
    seen, held = bases.corpus_split(bopts, args.task_opts.people, enc)
    n = len(seen) + len(held)
    assert torch.equal(torch.cat([seen, held]), tokenizer.encode_corpus(enc, corpus.read_text()))
    assert len(held) == n - n * 19 // 20 > 0
    flat = [t for first, rest in task.heldout_rows for t in first + rest[:-1]]  # windows overlap by one token
    assert task.heldout_rows and flat == held[:len(flat)].tolist()
    assert train.main(argv)["heldout_loss"] > 0


def test_a_method_of_its_own_file_is_one_table_line(tiny_out, monkeypatch, tmp_path):
    """toy_method.py (BitFit: train the biases) added to train.METHODS: the loop, the command line and its
    early checks take it with no other edit."""
    monkeypatch.setitem(train.METHODS, "bitfit", toy_method)
    enc = tokenizer.train(world.pretrain_corpus(world.make_world(40)), 400)
    task = data.encode_task(data.load_task(data.TaskOptions(task="sentiment", people=40)), enc, block_size=64)
    model = tiny_gpt(vocab_size=400, block_size=64)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.endswith("bias")}
    cfg = train.loop.TrainConfig(steps=6, batch_size=4)
    _, _, metrics = train.loop.finetune(model, task, toy_method, toy_method.Config(), cfg, "cpu", "bitfit")
    assert metrics["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert len(metrics["losses"]) == 6 and 0 <= metrics["test"] <= 1 and metrics["ood"] is not None
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert run(tiny_out, "--method", "bitfit", "--steps", "3", "--bitfit-which", "mlp")["where"] == "model: biases"
    with pytest.raises(SystemExit, match="^error: --bitfit-which must be one of all, mlp; got 'x'$"):
        run(str(tmp_path / "fresh"), "--method", "bitfit", "--bitfit-which", "x")
    with pytest.raises(SystemExit, match=r"^error: --bitfit-which: bitfit's options: --method prompt does not"):
        run(tiny_out, "--method", "prompt", "--bitfit-which", "mlp")
    assert not os.path.exists(tmp_path / "fresh" / "base")


def test_compare_writes_tables_with_every_row_the_spread_of_seeds_and_reuses_runs(tiny_out, reviews, capsys,
                                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the pictures are optional: without matplotlib, one line
    real = loop.check_memory

    def no_full_on_small(model, device, what, total=None):  # the large model's full fine-tuning cannot fit:
        if what == "--method full on small":                # proxy tuning's table goes on without it
            raise loop.TooBig(what)
        return real(model, device, what, total)
    monkeypatch.setattr(loop, "check_memory", no_full_on_small)
    fast = tiny("--out-dir", tiny_out, "--size", "small", "--small-size", "tiny", "--steps", "4",
                "--task", reviews, "--prompt-len", "5")
    rows = compare.main(fast + ["--seeds", "2", "--methods", "none,prompt,adapter,proxy"])
    assert [r["method"] for r in rows] == ["none"] + ["prompt"] * 2 + ["adapter"] * 2 + ["proxy"] * 2  # none: once
    out = capsys.readouterr().out
    assert "pictures: pip install matplotlib" in out and "Scores: the mean of 2 seeds, its 95% interval" in out
    assert "(Wilson), the seeds' (min-max) in []." in out
    assert "| test accuracy (commonest label: 0." in out and "| val | out of distribution |" in out
    assert all(f"| {m} |" in out for m in ("none", "prompt", "adapter", "proxy"))
    again = compare.main(fast + ["--seeds", "2", "--methods", "none,prompt,adapter,proxy"])
    assert [(r["method"], r["test"]) for r in again] == [(r["method"], r["test"]) for r in rows]
    assert capsys.readouterr().out.count("reusing the finished") == 9  # proxy's expert and its scores too
    with pytest.raises(SystemExit, match="^error: --methods: unknown ia3; use none, full, prompt"):
        compare.main(fast + ["--methods", "prompt,ia3"])


def test_a_finished_run_is_reused_only_by_the_code_that_made_it(tiny_out, tmp_path, monkeypatch):
    for name in ("model.py", "adapter.py"):
        (tmp_path / name).write_text("x = 1\n")
    before = disk.code_digest(str(tmp_path))
    (tmp_path / "notes.md").write_text("not code")
    assert disk.code_digest(str(tmp_path)) == before
    (tmp_path / "adapter.py").write_text("x = 2\n")  # the homework edits a method file
    assert disk.code_digest(str(tmp_path)) != before
    (tmp_path / "kit").mkdir()
    changed = disk.code_digest(str(tmp_path))
    (tmp_path / "kit" / "loop.py").write_text("x = 3\n")  # the package counts too
    assert disk.code_digest(str(tmp_path)) != changed
    assert disk.code_digest() == disk.code_digest(ROOT)
    args = train.parse([*TINY_ARGS, "--out-dir", tiny_out, "--method", "adapter"])
    bopts = args.base_opts
    base = bases.our_base(bopts, "tiny", args.out_dir, args.task_opts.people)
    folder = lambda: train.plan(args, "adapter", base, bases.tokenizer_of(base)).folder
    first = folder()
    monkeypatch.setattr(disk, "code_digest", lambda: before)
    assert folder() != first


def test_tables_show_the_majority_baseline_and_before_after_columns():
    row = lambda m, test, probe: dict(method=m, where="w", metric="accuracy", majority=0.55, test=test, val=0.5,
                                      ood=0.4, heldout_loss=1.25, probe=probe, trainable_params=10, stored_params=10,
                                      pct_of_base=1.0, seconds=1, tokens_per_s=5, state_bytes=0, ckpt_bytes=1024,
                                      peak_bytes=2 ** 20, test_n=200, val_n=100)
    text = "\n".join(compare.tables([row("none", 0.5, 0.9), row("adapter", 0.75, None),
                                     dict(method="prefix", diverged="diverged at step 3", seed=1)], "cpu"))
    assert "| test accuracy (commonest label: 0.5500) | val |" in text and "probe (before 0.9000)" in text
    assert "| adapter | 0.7500 (0.69-0.80) | 0.5000 (0.40-0.60) | 0.4000 | 1.2500 | n/a |" in text
    assert "| prefix (1 of 1 diverged) | n/a | n/a |" in text


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Released models written as other tools write them, sharing our world's tokenizer: a GPT-2 folder, a
    Llama-family folder, GGUF files (llama, qwen2), and a small GPT-2 folder for proxy tuning."""
    root = tmp_path_factory.mktemp("released")
    enc = tokenizer.train(world.pretrain_corpus(world.make_world(40)), 400)
    llama = tiny_gpt(6, arch="llama", vocab_size=400, block_size=64, tie_head=True, n_layer=3, n_embd=96,
                     n_hidden=128)  # larger than our tiny preset, which steers it in proxy tuning
    qwen2 = tiny_gpt(6, arch="qwen2", vocab_size=400, block_size=64)  # q/k/v biases, untied head, Qwen2's tokenizer
    return dict(gpt2=write_gpt2_folder(tiny_gpt(6, vocab_size=400, block_size=64, n_layer=2, n_embd=32),
                                       root / "gpt2", enc),
                llama=write_llama_folder(llama, root / "llama", enc),
                gguf=write_gguf(root / "tiny.gguf", gguf_meta(llama, enc), gguf_tensors(llama, "Q8_0")),
                qwen2=write_gguf(root / "qwen2.gguf", gguf_meta(qwen2, enc), gguf_tensors(qwen2, "Q8_0")),
                small=write_gpt2_folder(tiny_gpt(7, vocab_size=400, block_size=64), root / "small", enc, prefix=False),
                other=write_gpt2_folder(tiny_gpt(8, vocab_size=400, block_size=64), root / "other",  # same size,
                                        tokenizer.train(open(tokenizer.__file__).read(), 400), fmt="bin"),  # other tokens
                out=str(root / "out"))


FAST = ["--steps", "4", "--batch-size", "4", "--eval-every", "2", "--people", "20"]


@pytest.mark.parametrize("kind,method", [("gguf", m) for m in ("none", "prompt", "prefix", "adapter", "full")]
                         + [("gpt2", "prefix"), ("llama", "prompt"), ("qwen2", "none"), ("qwen2", "full")])
def test_every_method_runs_on_a_released_base_and_reloads(released, reviews, kind, method):
    argv = ["--base", released[kind], "--method", method, "--task", reviews, "--block-size", "48",
            "--out-dir", released["out"]]
    argv += [] if method == "none" else ["--steps", "4", "--batch-size", "4", "--eval-every", "2"]
    argv += ["--prompt-len", "4"] if method == "prompt" else []
    metrics = train.main(argv)
    assert metrics["base"] == os.path.basename(released[kind]).removesuffix(".gguf") and 0 <= metrics["test"] <= 1
    assert train.main(["--load", f"{metrics['run_dir']}/ckpt.pt"]) == metrics["test"]


def test_proxy_tuning_between_released_models_and_with_our_small_model_on_their_tokenizer(released, capsys):
    metrics = train.main(["--base", released["gpt2"], "--small-base", released["small"], "--method", "proxy", *FAST,
                          "--out-dir", released["out"]])
    assert metrics["method"] == "proxy" and metrics["small_base"] == "small"
    # qa is generation: the sweep is scored from kept logits (forced_match), decoding only at --alpha;
    # the two differ only on the answers where they disagree
    sweep, n = metrics["alpha_sweep"], metrics["test_n"]
    assert list(sweep) == ["all", "top 100", "top 20", "top 5"] and "0.5" in sweep["top 5"]
    assert abs(sweep["all"][f"{metrics['alpha']:g}"]["test"] - metrics["test"]) * n <= n - metrics["forced_agrees"] + 1e-9
    assert metrics["s_per_token_proxy"] > 0 and metrics["s_per_token_large"] > 0
    assert set(metrics["forced"]) == {"large", "expert", "anti"} and metrics["small_alone"] is not None
    steered = train.main(["--base", released["gguf"], "--method", "proxy", "--task", "sentiment", *FAST,
                          "--small-size", "tiny", "--pretrain-steps", "30", "--block-size", "48",
                          "--out-dir", released["out"]])
    out = capsys.readouterr().out
    assert "pretraining a tiny GPT" in out and steered["small_base"] == "tiny"  # pretrained here, on its tokenizer
    assert re.search(r"large model alone \(tiny\):\s+\d\.\d{4}", out)
    with pytest.raises(SystemExit, match="^error: proxy tuning needs one vocabulary: .* reads text with another"):
        train.main(["--base", released["gpt2"], "--small-base", released["other"], "--method", "proxy", *FAST])
    with pytest.raises(SystemExit, match="^error: --size: for bases pretrained here; --base .* is a released"):
        train.main(["--base", released["gpt2"], "--size", "tiny", "--method", "prompt", *FAST])
    with pytest.raises(SystemExit, match="^error: .*nowhere' is neither a model folder nor a .gguf file"):
        train.main(["--base", released["out"] + "/nowhere", "--method", "prompt", *FAST])


def test_the_default_base_ships_with_the_repository():
    """The first `python train.py --method prompt` needs no pretraining: its base is in base/."""
    args = train.parse(["--method", "prompt", "--out-dir", os.path.join(ROOT, "out-test-unused")])
    bopts = args.base_opts
    base = bases.named_base(bopts, args.out_dir, args.task_opts.people)
    assert base.path.startswith(bases.SHIPPED) and os.path.exists(base.path), base.path
    model = bases.load(base, bases.tokenizer_of(base), "cpu")
    assert model.num_params() == 949_248
    os.rmdir(args.out_dir)


def test_bench_tiny_mode_runs(capsys):
    bench.main(["--tiny", "--device", "cpu"])
    text = capsys.readouterr().out
    assert all(s in text for s in ("| adapter |", "| prefix --no-reparam |", "faster with the cache",
                                   "proxy decoding"))


def test_the_first_blocks_of_a_model_are_a_smaller_model_on_the_same_vocabulary():
    large = tiny_gpt(3, arch="llama", n_layer=4)
    small = bases.first_blocks(large, 2)
    assert small.config.n_layer == 2 and small.config.vocab_size == large.config.vocab_size
    assert torch.equal(small.lm_head.weight, large.lm_head.weight)
    assert torch.equal(small.transformer.ln_f.weight, large.transformer.ln_f.weight)
    truncated = copy.deepcopy(large)
    truncated.transformer.h = truncated.transformer.h[:2]  # the same function, by hand
    idx = torch.randint(64, (2, 10))
    assert torch.equal(small(idx)[0], truncated(idx)[0]) and not torch.allclose(small(idx)[0], large(idx)[0])
    with pytest.raises(ValueError, match="^--small-layers 4: the model has 4 blocks; keep between 1 and 3$"):
        bases.first_blocks(large, 4)


def test_proxy_tuning_with_a_small_model_cut_from_the_large_one_and_healed(released, reviews, tmp_path, capsys):
    corpus = tmp_path / "english.txt"
    corpus.write_text(world.pretrain_corpus(world.make_world(20))[:20000])
    argv = ["--base", released["llama"], "--small-layers", "1", "--data", str(corpus), "--pretrain-steps", "6",
            "--pretrain-batch-size", "4", "--method", "proxy", "--task", reviews, "--block-size", "48", *FAST[:6],
            "--out-dir", str(tmp_path / "out")]
    metrics = train.main(argv)
    out = capsys.readouterr().out
    before = float(re.search(r"val loss before healing (\d+\.\d+)", out).group(1))
    after = float(re.search(r"pretrain val loss (\d+\.\d+)", out).group(1))
    assert before > after and metrics["small_base"] == "llama-first1"  # healing lowered the loss
    for k, points in metrics["alpha_sweep"].items():  # each strength's own val score, beside its test score
        for a, scores in points.items():
            line = re.search(rf"alpha {a}, M's scores: {k}(?: \(best val\))?:\s+(\d\.\d{{4}}) .* val (\d\.\d{{4}})", out)
            assert (float(line.group(1)), float(line.group(2))) == (round(scores["test"], 4), round(scores["val"], 4))
    # the sweep scores from kept logits: the same as a run at that strength, every model computed afresh
    again = train.main(argv + ["--alpha", "1"])
    assert (again["test"], again["val"]) == tuple(metrics["alpha_sweep"]["all"]["1"][k] for k in ("test", "val"))
    assert again["eval_time_ratio"] > 0
    large, small = train.proxy_bases(train.parse(argv))
    capsys.readouterr()  # compare.py reuses finished scores: those of this expert and alpha, sealed
    kept = train.run_proxy(train.parse(argv), large, small, bases.tokenizer_of(large), reuse=True)
    assert "reusing the finished proxy run" in capsys.readouterr().out and kept["test"] == metrics["test"]
    other = train.run_proxy(train.parse(argv + ["--seed", "7"]), large, small, bases.tokenizer_of(large), reuse=True)
    assert "reusing the finished proxy run" not in capsys.readouterr().out and other["run_dir"] != kept["run_dir"]
    assert small.start == large.path and bases.config_of(small, None).n_layer == 1
    saved = torch.load(small.path, weights_only=False)
    assert saved["tokenizer"] == tokenizer.identity(bases.tokenizer_of(large))  # the large model's own tokenizer
    big = bases.load(large, bases.tokenizer_of(large), "cpu")
    assert saved["model"]["lm_head.weight"].shape == big.lm_head.weight.shape  # its logits line up, token by token
    with pytest.raises(SystemExit, match="^error: --small-layers heals the cut blocks on a text of yours: give"):
        train.main([a for a in argv if a not in ("--data", str(corpus))])
    with pytest.raises(SystemExit, match="^error: --small-layers: it cuts a released --base: give --base too"):
        train.main(["--method", "proxy", "--small-layers", "1", "--data", str(corpus)])
