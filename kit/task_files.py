"""
Your own files, read and checked: UTF-8 text (--data, --heldout) and task files of .jsonl lines
(--task, --val, --test, --ood), each problem one error naming the file and the line. data.py makes a
Task of what they hold.
"""
import json
import os
import re
import stat
import unicodedata

import numpy as np

DEPTH = 100  # JSON nested deeper than this is refused before Python's parser recurses into it


def loads(text, where):
    """json.loads of any JSON file or line the project reads (task lines, metrics.json, config.json,
    tokenizer.json, vocab.json, a shard index, a safetensors header), with nesting past DEPTH
    refused in one line naming `where`: the parser recurses once per level, so 100,000 levels would
    end in a RecursionError."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    if text.count("[") + text.count("{") > DEPTH and nesting(text) > DEPTH:
        raise ValueError(f"{where} nests JSON more than {DEPTH} levels deep: it is no file this "
                         f"project reads (or it is damaged)")
    return json.loads(text)


def path_of(path, what):
    """A path given as a string or a pathlib.Path, as a string; anything else is one line."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} must be a path (a string or a pathlib.Path), got {path!r}")
    return path


def nesting(text):
    """How deep JSON text nests: its brackets outside strings, counted."""
    bare = np.frombuffer(re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', "", text).encode(), np.uint8)
    step = np.isin(bare, (91, 123)).astype(np.int64) - np.isin(bare, (93, 125))  # [{ and ]}
    return int(step.cumsum().max(initial=0))


def read_text(path, what):
    """A UTF-8 file's text (a byte-order mark is allowed); bytes that are not UTF-8 are one error
    naming the line."""
    if not os.path.exists(path):
        raise ValueError(f"{what} {path!r} not found")
    if not stat.S_ISREG(os.stat(path).st_mode):
        kind = "a folder" if os.path.isdir(path) else "not a regular file"
        raise ValueError(f"{what} {path!r} is {kind}: give a text file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path!r} is not UTF-8 text: line {line} has a byte it "
                         f"cannot decode ({e.reason}); save it as UTF-8") from None

def load_text(path):
    """A text file of yours (--data, --heldout), refused when empty."""
    text = read_text(path, "text file")
    if not text.strip():
        raise ValueError(f"text file {path!r} is empty: give a text to read")
    return text

def parse_line(path, i, line, template):
    """One .jsonl line -> ((input, answer, line number), whether it was a text/label line).
    {"prompt", "completion"} as they are; {"text", "label"} through the template, the answer
    " " + the label."""
    try:
        obj = loads(line, f"{path} line {i}")
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and \
            isinstance(obj.get("completion"), str):
        text, answer, labelled = obj["prompt"], obj["completion"], False
    elif isinstance(obj, dict) and isinstance(obj.get("text"), str) and \
            isinstance(obj.get("label"), (str, int)) and not isinstance(obj.get("label"), bool):
        text, answer, labelled = (template.replace("{text}", obj["text"]),
                                  " " + str(obj["label"]).strip(), True)
    else:
        raise ValueError(f'{path} line {i}: expected {{"prompt": "...", "completion": "..."}} or '
                         f'{{"text": "...", "label": "..."}}, got {line.strip()[:60]!r}')
    for part, value in (("prompt", text), ("completion", answer)):
        if not value.strip():
            raise ValueError(f"{path} line {i}: the {part} is empty")
    return (text, answer, i), labelled

def read_examples(path, template):
    lines = read_text(path, "task file").split("\n")
    parsed = [parse_line(path, i, line, template)
              for i, line in enumerate(lines, 1) if line.strip()]
    if not parsed:
        raise ValueError(f"task file {path!r} has no examples")
    return [ex for ex, _ in parsed], any(labelled for _, labelled in parsed)

def split_files(opts):
    """{split: path}: a folder's train/val/test/ood.jsonl, or --task with --val, --test and
    --ood."""
    if os.path.isdir(opts.task):
        given = [flag for flag, v in
                 (("--val", opts.val), ("--test", opts.test), ("--ood", opts.ood)) if v]
        if given:
            raise ValueError(f"--task {opts.task} is a folder of split files: "
                             f"put {given[0][2:]}.jsonl in it instead of giving {given[0]}")
        files = {s: os.path.join(opts.task, s + ".jsonl") for s in ("train", "val", "test", "ood")}
        if not os.path.isfile(files["train"]):
            raise ValueError(f"task folder {opts.task!r} has no train.jsonl")
        return {s: f for s, f in files.items() if os.path.isfile(f)}
    if not opts.task.endswith(".jsonl"):
        raise ValueError(f"unknown task {opts.task!r}: use qa, sentiment, a .jsonl file, or a "
                         f"folder of .jsonl files")
    return {s: f for s, f in
            dict(train=opts.task, val=opts.val, test=opts.test, ood=opts.ood).items() if f}

def check_overlap(splits, files):
    """Lines of one split that another holds too (the same input and answer): counted for the log,
    and refused when a whole split is in another one (the same file given twice)."""
    seen = {s: {(ex.input, ex.answer) for ex in exs} for s, exs in splits.items()}
    where = lambda s: files.get(s, f"{files['train']}'s {s} split")
    notes = []
    earlier = dict(val=["train"], test=["train", "val"], ood=["train", "val", "test"])
    for a, before in earlier.items():
        present = [b for b in before if b in seen]
        if not splits.get(a) or not present:
            continue
        both = sum(any((ex.input, ex.answer) in seen[b] for b in present) for ex in splits[a])
        if both == len(splits[a]):
            raise ValueError(f"every {a} example is also in {' or '.join(present)} ({where(a)}, "
                             f"{files['train']}): a score on it would measure memory; give "
                             f"another {a} file")
        if both:
            notes.append(f"{both} of {len(splits[a])} {a} examples are in "
                         f"{' or '.join(present)} too")
    return notes


def check_labels(splits, files):
    """Label words that differ only in spaces or in Unicode normalisation would be separate classes
    that print alike; an ood example's label must be one of the task's."""
    labels = {ex.answer for s in ("train", "val", "test") for ex in splits[s]}
    for ex in splits.get("ood", []):
        if ex.answer not in labels:
            raise ValueError(f"{files['ood']} line {ex.line}: its label {ex.answer.strip()!r} "
                             f"is none of the task's "
                             f"({', '.join(sorted(l.strip() for l in labels))})")
    first = {}
    for s, exs in splits.items():
        for ex in exs:
            # NFC: "café" typed as one character or as "e" + an accent prints alike
            other = first.setdefault(unicodedata.normalize("NFC", ex.answer.strip()),
                                     (ex.answer, s, ex.line))
            if other[0] != ex.answer:
                raise ValueError(f"{files.get(other[1], files['train'])} line {other[2]} has "
                                 f"the label {ascii(other[0])} and {files.get(s, files['train'])} "
                                 f"line {ex.line} has {ascii(ex.answer)}: labels that differ only "
                                 f"in spaces, or in how accents are encoded (Unicode NFC and NFD), "
                                 f"are one label; write them alike")
