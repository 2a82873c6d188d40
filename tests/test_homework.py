"""Homework 3 (a parallel adapter) and 4 (LoRA), done as the README says: for each, one new file, one line in
train.METHODS (and its import), and a seam in model.py (a row in model.SEAMS and its use where it acts). On a copy of
the project with both done, the tests pass with no edit of theirs: the generic tests of every method, the plain
model's (bit-identical with two more empty seams) and the layout test. The command line trains LoRA and checks its
options before any pretraining; kit.bench and compare.py have its row.

The whole suite on the copy takes as long as the suite itself, so it runs when asked (CI runs the new methods'
generic tests, the model's and the layout's):

    HOMEWORK_WHOLE_SUITE=1 python -m pytest -q tests/test_homework.py
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_THE_COPY = "HOMEWORK_COPY"  # set in the copy's suite, which is not to do the homework again
# (file, the line the homework changes, what it becomes), in the README's words
EDITS = [
    # homework 4: LoRA, a seam where c_attn's output is made ...
    ("model.py", "        q, k, v = self.c_attn(x).split(self.split, dim=2)\n",
     "        qkv = self.c_attn(x)\n"
     "        if self.c_attn_update is not None:  # the LoRA seam: a module added to c_attn's output\n"
     "            qkv = qkv + self.c_attn_update(x)\n"
     "        q, k, v = qkv.split(self.split, dim=2)\n"),
    # homework 3: the parallel adapter, a seam that sees the MLP's input
    ("model.py", "        m = self.mlp(self.ln_2(x))\n",
     "        h = self.ln_2(x)\n"
     "        m = self.mlp(h)\n"
     "        if self.mlp_parallel is not None:  # the parallel adapter's seam: beside the MLP, on its input\n"
     "            m = m + self.mlp_parallel(h)\n"),
    # ... each seam's row in model.SEAMS: all it takes for the stacking check to see it
    ("model.py", '    "prefix": "CausalSelfAttention",',
     '    "prefix": "CausalSelfAttention",\n    "c_attn_update": "CausalSelfAttention",\n'
     '    "mlp_parallel": "Block",'),
    # one line each in train.METHODS, and the imports
    ("train.py", '    "adapter": adapter,\n',
     '    "adapter": adapter,\n    "lora": lora,\n    "parallel": parallel_adapter,\n'),
    ("train.py", "import adapter\n", "import adapter\nimport lora\nimport parallel_adapter\n"),
]
# the tests a new method and its seam reach: its generic tests, the plain model's, the layout's
FILES = ["tests/test_methods.py", "tests/test_model.py", "tests/test_layout.py", "-k",
         "lora or parallel or test_model or test_layout"]
WHOLE = os.environ.get("HOMEWORK_WHOLE_SUITE") == "1"


def homework_copy(folder):
    """A copy of the project in `folder` with homework 3 and 4 done the README's way."""
    copy = os.path.join(folder, "project")
    # what a fresh clone has: the shipped base, the tasks; not the runs or pictures made since; the fetched
    # models (GBs) by a link
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("out", "out-*", ".git", "__pycache__", "models",
                                                              "figures"))
    if os.path.isdir(os.path.join(ROOT, "models")):
        os.symlink(os.path.join(ROOT, "models"), os.path.join(copy, "models"))
    for name in ("lora.py", "parallel_adapter.py"):  # the new files
        shutil.copy(os.path.join(ROOT, "tests", "homework", name), os.path.join(copy, name))
    for file, old, new in EDITS:
        with open(os.path.join(copy, file)) as f:
            text = f.read()
        assert text.count(old) == 1, f"{file} no longer has the line the homework changes: {old!r}"
        with open(os.path.join(copy, file), "w") as f:
            f.write(text.replace(old, new))
    return copy


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    if os.environ.get(IN_THE_COPY):
        pytest.skip("this is the copy: the homework is done here already")
    return homework_copy(tmp_path_factory.mktemp("homework"))


def test_homework_3_and_4_pass_the_tests(copy):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **{IN_THE_COPY: "1"})
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *([] if WHOLE else FILES)],
                           cwd=copy, capture_output=True, text=True, env=env)
    tail = tests.stdout[-4000:]
    # test_methods.py tests both new methods, on every architecture; the plain model's tests hold with two more
    # empty seams; the layout test takes their files once train.METHODS names them
    last = tail.strip().splitlines()[-1]
    assert tests.returncode == 0 and " passed" in last and "failed" not in last and "error" not in last, tail


def test_lora_trains_from_the_command_line_and_has_its_rows(copy, tmp_path):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
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
    assert "lora: test exact_match" in run.stdout
    # in one process: the stacking check, the rows of kit.bench and compare.py, the command line's help
    rows = subprocess.run([sys.executable, "-c", """
import argparse, contextlib, io, compare, lora, prompt_tuning, train
from kit import bench
from model import GPT, GPTConfig
m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=16))
lora.attach(m)
try:
    prompt_tuning.attach(m)
except ValueError as e:
    print(e)
print(sorted(bench.methods()), compare.chosen_methods(argparse.Namespace(methods="all")))
with contextlib.redirect_stdout(io.StringIO()) as helped, contextlib.suppress(SystemExit):
    train.parse(["--help"])
print(helped.getvalue())
"""], cwd=copy, capture_output=True, text=True, env=env)
    # the seam's row in model.SEAMS is all it takes for the stacking check to see LoRA
    assert "already has h.0.attn.c_attn_update attached" in rows.stdout, rows.stderr[-2000:]
    assert "'lora'" in rows.stdout.split("]")[0] and "'lora', 'parallel', 'proxy'" in rows.stdout  # bench, compare
    assert "--lora-rank" in rows.stdout and "--method lora (model: low-rank updates of c_attn)" in rows.stdout
    assert "--parallel-bottleneck" in rows.stdout and "--method parallel (model: beside each MLP)" in rows.stdout
