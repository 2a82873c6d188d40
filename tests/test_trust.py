"""Trust, round 5: nothing the user wrote is overwritten, moved or deleted (a .lock, a file in a run's folder or at
its name); every record is bound to its run (options, checkpoint content, every tensor scoring uses, the code);
every writer and reader answers in one line; JSON and GGUF nested past a stated depth are refused. The notebook
API, options that would be ignored and the rest: test_trust_inputs.py."""
import errno
import json
import os
import re
import shutil

import pytest
import torch

import compare
import train
from kit import checkpoints, disk
from conftest import TINY_ARGS, one_line, tiny

FAST = tiny("--steps", "2", "--method", "prompt", "--prompt-len", "3")


@pytest.fixture
def fast(reviews):
    """A run of seconds: two steps on a small classification file (scored by label words, not generated)."""
    return [*FAST, "--task", reviews]


@pytest.fixture
def steady_code(monkeypatch):
    """The code's digest held still: runs are found again even while the source files are being edited."""
    monkeypatch.setattr(disk, "code_digest", lambda folder=None: "5eadfa57c0de0000")


def compare_argv(out, *argv):
    return [*tiny("--steps", "2", "--methods", "prompt", "--prompt-len", "3", "--out-dir", out), *argv]


def compare_fast(out, reviews, *argv):
    return compare_argv(out, "--task", reviews, *argv)


# 1. A user's file is never overwritten or deleted

def test_the_lock_never_follows_a_link_nor_overwrites_a_file_it_did_not_make(tmp_path, monkeypatch):
    yours = tmp_path / "yours.txt"
    yours.write_text("keep me")
    for name, make, message in (("link", lambda p: os.symlink(yours, p), r"/link/\.lock is a link: "),
                                ("folder", os.mkdir, r"/folder/\.lock is a folder: "),
                                ("other", lambda p: p.write_text("another tool's"), r"/other/\.lock is not the lock")):
        out = tmp_path / name
        out.mkdir()
        make(out / ".lock")
        one_line(train.main, [*FAST, "--out-dir", str(out)], message)
        one_line(compare.main, compare_argv(str(out)), message)
        assert os.listdir(out) == [".lock"]  # nothing was written
    assert yours.read_text() == "keep me" and (tmp_path / "other" / ".lock").read_text() == "another tool's"
    real_open, real_pwrite = os.open, os.pwrite

    def refused(path, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", refused)
    one_line(compare.main, compare_argv(str(tmp_path / "ro")), r"/ro/\.lock is a file that cannot be written "
                                                                r"\(Permission denied\)")
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    one_line(train.main, [*FAST, "--out-dir", str(tmp_path / "full")], r"^error: could not write .*/full/\.lock: "
                                                                          r"the disk is full")
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ".lock").write_text("12345")  # an older train.py's lock: still ours
    with disk.writer(str(tmp_path / "old")):
        assert (tmp_path / "old" / ".lock").read_text() == f"{disk.LOCKED_BY}{os.getpid()}\n"


def test_a_run_folder_keeps_your_files_and_what_is_in_its_way_is_refused(tiny_out, tmp_path, steady_code, fast,
                                                                       reviews):
    out = str(tmp_path / "out")
    shutil.copytree(tiny_out, out, ignore=shutil.ignore_patterns("runs"))
    first = compare.main(compare_fast(out, reviews))[0]
    folder = first["run_dir"]
    notes = os.path.join(folder, "notes.md")
    open(notes, "w").write("mine")
    again = train.main([*fast, "--out-dir", out])  # the same run again: replaced, beside your notes
    assert again["run_dir"] == folder and open(notes).read() == "mine"
    os.remove(os.path.join(folder, "metrics.json"))  # an unfinished run: compare trains it again
    assert compare.main(compare_fast(out, reviews))[0]["run_dir"] == folder and open(notes).read() == "mine"
    assert sorted(os.listdir(folder)) == ["ckpt.pt", "metrics.json", "notes.md"]
    os.rename(os.path.join(folder, "ckpt.pt"), os.path.join(tmp_path, "ckpt.pt"))
    os.mkdir(os.path.join(folder, "ckpt.pt"))  # a folder where the run writes its checkpoint
    one_line(train.main, [*fast, "--out-dir", out], r"/ckpt.pt is a folder, where the project writes a file of "
                                                    r"that name: move it away")
    shutil.rmtree(folder)
    open(folder, "w").write("your file at the run's name")
    for _ in range(2):  # a run, then the next run's cleaning: never renamed aside, never deleted
        one_line(train.main, [*fast, "--out-dir", out], r"is a file, where the project writes a folder")
    assert open(folder).read() == "your file at the run's name"
    os.remove(folder)
    os.symlink(tmp_path, folder)
    one_line(train.main, [*fast, "--out-dir", out], r"is a link, where the project writes a folder")
    assert os.path.islink(folder) and os.path.exists(tmp_path / "ckpt.pt")
    assert not [f for f in os.listdir(os.path.dirname(folder)) if f.endswith(disk.MARK)]


# 2. Every record is bound to its run

def test_a_record_or_checkpoint_of_another_run_is_refused(tiny_out, tmp_path, steady_code, fast, reviews):
    out = str(tmp_path / "out")
    shutil.copytree(tiny_out, out, ignore=shutil.ignore_patterns("runs"))
    a = train.main([*fast, "--out-dir", out, "--lr", "0.1", "--seed", "1"])["run_dir"]
    b = train.main([*fast, "--out-dir", out, "--lr", "0.3", "--seed", "2"])["run_dir"]
    saved = {f: open(os.path.join(b, f), "rb").read() for f in ("ckpt.pt", "metrics.json")}
    reuse_b = compare_fast(out, reviews, "--lrs", "prompt=0.3", "--seed", "2")
    shutil.copy(os.path.join(a, "metrics.json"), b)  # sealed, but another run's: lr 0.1 under --lrs prompt=0.3
    one_line(compare.main, reuse_b, r"/metrics.json was written by another run \(its train.lr differs from this "
                                    r"run's\): delete the folder")
    open(os.path.join(b, "metrics.json"), "wb").write(saved["metrics.json"])
    shutil.copy(os.path.join(a, "ckpt.pt"), b)  # another seed's checkpoint, of the very same size
    assert len(saved["ckpt.pt"]) == os.path.getsize(os.path.join(b, "ckpt.pt"))
    one_line(compare.main, reuse_b, r"ckpt.pt is missing or is not the checkpoint written with")
    one_line(train.main, ["--load", os.path.join(b, "ckpt.pt")], r"is not the checkpoint that .*metrics.json was "
                                                                 r"written with \(its tensors differs: another seed")
    open(os.path.join(b, "ckpt.pt"), "wb").write(saved["ckpt.pt"])
    assert compare.main(reuse_b)[0]["run_dir"] == b  # its own: reused
    ckpt = torch.load(os.path.join(b, "ckpt.pt"))
    ckpt["train"]["seed"] = 1  # its seed (or any training option) edited: the hash of tensors does not see it
    torch.save(ckpt, os.path.join(b, "ckpt.pt"))
    one_line(train.main, ["--load", os.path.join(b, "ckpt.pt")], r"\(its train.seed differs")


def test_the_classification_layer_is_under_the_hash_and_other_code_is_noted(tiny_out, reviews, capsys,
                                                                             monkeypatch):
    metrics = train.main(tiny("--out-dir", tiny_out, "--method", "none", "--classifier", "--task", reviews,
                              "--steps", "2", "--seed", "5"))
    path = os.path.join(metrics["run_dir"], "ckpt.pt")
    original = open(path, "rb").read()
    for edit in (lambda s: s.update(classifier=None, classifier_labels=None),  # would score by label words
                 lambda s: s["classifier"]["proj.bias"].add_(1.0),
                 lambda s: s["classifier_labels"].reverse()):
        saved = torch.load(path)
        edit(saved)
        torch.save(saved, path)
        one_line(train.main, ["--load", path], r"is damaged: its tensors are not the ones it was saved with")
        open(path, "wb").write(original)
    capsys.readouterr()
    assert train.main(["--load", path]) == metrics["test"]
    assert "note" not in capsys.readouterr().out
    monkeypatch.setattr(disk, "code_digest", lambda folder=None: "0123456789abcdef")
    assert train.main(["--load", path]) == metrics["test"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"test accuracy .* 95% interval \(note: the project's code is not the run's, \w{16} then and "
                     r"0123456789abcdef now: the score may differ", line), line
    assert json.load(open(os.path.join(metrics["run_dir"], "metrics.json")))["ckpt_sha256"] == \
        disk.sha256_of(path)


# 3. Every writer and reader answers in one line

def test_a_failed_write_is_one_line_naming_the_file(tiny_out, tmp_path, monkeypatch, fast):
    out = tmp_path / "out"
    out.mkdir()
    (out / "base").write_text("a file where the bases go")
    one_line(compare.main, compare_argv(str(out)), r"^error: .*/out/base.*: .*a file is in the way")

    def torch_full(*a, **k):  # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 320 vs 256")
    monkeypatch.setattr(torch, "save", torch_full)
    one_line(train.main, [*fast, "--out-dir", tiny_out, "--seed", "31"],
             r"^error: could not write .*/runs/reviews.jsonl-tiny-prompt-\w+/ckpt.pt: torch.save failed "
             r"\(\[enforce fail at inline_container.cc:626\] . unexpected pos 320 vs 256\): is the disk full\?; "
             r"nothing half-written")
    base = str(tmp_path / "bases" / "tiny.pt")
    with pytest.raises(ValueError, match=r"^could not write .*/bases/tiny.pt: torch.save failed"):
        disk.save_file({"model": {}}, base, replace=False)  # as loop.pretrain keeps a base
    assert os.listdir(tmp_path / "bases") == []
    monkeypatch.undo()


def sentiment_archive():
    """A stand-in for the npm package sentiment@5.0.2: what kit.get_data's uci() reads of it."""
    import io
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for source in ("amazon", "yelp", "imdb"):
            body = json.dumps([dict(text=f"{source} {i}", **{"class": i % 2}) for i in range(4)]).encode()
            info = tarfile.TarInfo(f"package/test/fixtures/{source}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return raw.getvalue()


def test_get_data_answers_every_failure_in_one_line(tmp_path, monkeypatch, capsys):
    from kit import get_data
    tasks = tmp_path / "tasks"
    monkeypatch.setattr(get_data, "OUT", str(tasks))
    tasks.mkdir()
    (tasks / ".downloads").write_text("a file where the downloads go")
    one_line(get_data.main, [], r"^error: .*/tasks/.downloads: .*a file is in the way")  # before any fetch
    monkeypatch.setattr(get_data, "fetch", lambda name: sentiment_archive())
    (tasks / "uci").write_text("a file where a task folder goes")
    one_line(get_data.main, [], r"^error: could not write .*/tasks/uci/train.jsonl: .*nothing half-written")
    os.remove(tasks / "uci")
    real_mkstemp = get_data.disk.tempfile.mkstemp
    monkeypatch.setattr(get_data.disk.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied")))
    one_line(get_data.main, [], r"^error: could not write .*/tasks/uci/train.jsonl: Permission denied")
    monkeypatch.setattr(get_data.disk.tempfile, "mkstemp", real_mkstemp)
    real_fdopen = os.fdopen

    def full(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        f.write = lambda b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f
    monkeypatch.setattr(os, "fdopen", full)
    one_line(get_data.main, [], r"^error: could not write .*/tasks/uci/train.jsonl: the disk is full")
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert sorted(os.listdir(tasks)) == [".downloads", "uci"] and os.listdir(tasks / "uci") == []

    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(get_data, "fetch", interrupted)
    with pytest.raises(SystemExit) as e:
        get_data.main([])
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted: nothing half-written was kept\n"


# 4. Deep nesting is refused past a stated depth, in one line naming the file

def test_json_and_gguf_nested_past_the_stated_depth_are_one_line(tiny_out, tmp_path):
    import struct
    from kit import gguf_reader, pretrained, task_files, tokenizer
    deep = "[" * 100_000 + "]" * 100_000
    assert task_files.loads("[" * task_files.DEPTH + "]" * task_files.DEPTH, "x")  # the stated depth: read
    lines = "\n".join(json.dumps(dict(prompt=f"Q{i}?", completion=f" A{i}")) for i in range(20))
    task = tmp_path / "deep.jsonl"
    task.write_text(lines + "\n" + '{"prompt": ' + deep + "}")
    one_line(train.main, [*TINY_ARGS, "--out-dir", tiny_out, "--task", str(task)],
             r"deep.jsonl line 21 nests JSON more than 100 levels deep")
    nested = f"more than {task_files.DEPTH} levels deep"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"test": ' + deep + "}")
    with pytest.raises(ValueError, match=r"/run/metrics.json nests JSON " + nested):
        checkpoints.read_metrics(str(run))
    for name, read in (("config.json", pretrained.read), ("vocab.json", tokenizer.load),
                       ("tokenizer.json", tokenizer.load), ("model.safetensors.index.json", pretrained.read_weights)):
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        (folder / "merges.txt").write_text("#version: 0.2\n")
        if name != "config.json":
            (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2")))
        (folder / name).write_text('{"a": ' + deep + "}")
        with pytest.raises(ValueError, match=rf"/{name} nests JSON {nested}"):
            read(str(folder))
    header = ('{"a": ' + deep + "}").encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match=rf"model.safetensors's header nests JSON {nested}"):
        pretrained.read_safetensors(str(tmp_path / "model.safetensors"))
    levels = struct.pack("<IQ", 9, 1) * 100_000  # an array of an array of ... 100,000 deep
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"deep" + struct.pack("<I", 9) + levels
    (tmp_path / "deep.gguf").write_bytes(raw)
    with pytest.raises(ValueError, match=rf"deep.gguf: its metadata nests arrays more than "
                                         rf"{gguf_reader.MAX_DEPTH} deep"):
        gguf_reader.read_gguf(str(tmp_path / "deep.gguf"))
