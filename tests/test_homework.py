"""The LoRA homework, done as the README says: one new file (lora.py), one line in train.METHODS, and a seam in
model.py. Applied to a copy of the project, the generic tests of every method (tests/test_methods.py) pass for
it, with no edit of theirs; the command line trains it, and checks its options before any pretraining; kit.bench
and compare.py have a LoRA row."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEAM = ("        q, k, v = self.c_attn(x).split(self.split, dim=2)\n",
        "        qkv = self.c_attn(x)\n"
        "        if self.c_attn_update is not None:  # the LoRA seam: a module added to c_attn's output\n"
        "            qkv = qkv + self.c_attn_update(x)\n"
        "        q, k, v = qkv.split(self.split, dim=2)\n")
SLOT = ('    "prefix": "CausalSelfAttention",',  # the seam's row in model.SEAMS
        '    "prefix": "CausalSelfAttention",\n    "c_attn_update": "CausalSelfAttention",')
ROW = ('    "adapter": adapter,\n', '    "adapter": adapter,\n    "lora": lora,\n')


def edit(path, old, new):
    with open(path) as f:
        text = f.read()
    assert text.count(old) == 1, f"{path} no longer has the line the homework changes: {old!r}"
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def test_lora_is_one_file_one_table_line_and_a_seam(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("out", ".git", "__pycache__", "*.pt", "figures"))
    shutil.copy(os.path.join(ROOT, "tests", "homework", "lora.py"), copy / "lora.py")  # 1. the file
    edit(copy / "train.py", *ROW)                                                     # 2. the line ...
    edit(copy / "train.py", "import adapter\n", "import adapter\nimport lora\n")      #    ... and its import
    edit(copy / "model.py", *SEAM)                                                    # 3. the seam
    edit(copy / "model.py", *SLOT)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_methods.py",
                            "tests/test_layout.py", "-k", "lora or layout"], cwd=copy,
                           capture_output=True, text=True, env=env)
    # the generic tests on every architecture, and the layout tests: the first takes lora.py once train.METHODS
    # names it
    assert tests.returncode == 0 and " passed" in tests.stdout and "failed" not in tests.stdout, tests.stdout[-3000:]
    stacked = subprocess.run([sys.executable, "-c", "import lora, prompt_tuning; from model import GPT, GPTConfig; "
                              "m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=16)); lora.attach(m); "
                              "prompt_tuning.attach(m)"], cwd=copy, capture_output=True, text=True, env=env)
    # the seam's row in model.SEAMS is all it takes for the stacking check to see LoRA
    assert "already has h.0.attn.c_attn_update attached" in stacked.stderr, stacked.stderr[-2000:]
    args = ["--size", "tiny", "--people", "20", "--vocab-size", "300", "--block-size", "48", "--pretrain-steps",
            "20", "--pretrain-batch-size", "4", "--batch-size", "4", "--steps", "6", "--eval-every", "3",
            "--out-dir", str(tmp_path / "out")]
    refused = subprocess.run([sys.executable, "train.py", "--method", "lora", "--lora-rank", "0", *args], cwd=copy,
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and refused.stderr.strip() == "error: --lora-rank must be at least 1, got 0"
    assert not os.path.exists(tmp_path / "out" / "base")  # refused before any pretraining
    run = subprocess.run([sys.executable, "train.py", "--method", "lora", "--lora-rank", "2", *args], cwd=copy,
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "lora: test exact_match" in run.stdout and "model: low-rank updates of c_attn" in open(
        copy / "lora.py").read()
    rows = subprocess.run([sys.executable, "-c", "import argparse, compare; from kit import bench; print(sorted(bench.methods()), "
                           "compare.chosen_methods(argparse.Namespace(methods='all')))"], cwd=copy,
                          capture_output=True, text=True, env=env)
    assert "'lora'" in rows.stdout.split("]")[0] and "'lora', 'proxy'" in rows.stdout, rows  # bench and compare
    helped = subprocess.run([sys.executable, "train.py", "--help"], cwd=copy, capture_output=True, text=True)
    assert "--lora-rank" in helped.stdout and "--method lora (model: low-rank updates of c_attn)" in helped.stdout
