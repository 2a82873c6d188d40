"""
Bases and runs on disk, and what identifies them.

A base is the frozen model a run starts from: one pretrained here (cached under --out-dir, one folder per corpus and
tokenizer, one file per size, context and pretraining steps), or GPT-2's released weights in a folder (--base). It is
known by a hash of its weights' file; every checkpoint records that hash, and a run is only ever loaded onto the very
base it was trained on. Files are written aside and then renamed: an interrupted run never leaves half a file.
"""
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import torch

import data
import tokenizer
from model import SIZES, gpt2_config


@dataclass
class Base:
    name: str        # the size preset, or the GPT-2 folder's name
    path: str        # our cached .pt file, or the GPT-2 folder
    tokenizer: str   # a .tiktoken file beside our bases, a GPT-2 folder, or "tiktoken:NAME"
    folder: bool     # GPT-2 weights from a folder (nothing to pretrain)
    block_size: int  # the context the runs use


def own_base(args, size):
    """Where the base for these options lives: a folder per corpus and tokenizer, a file per size, context, steps
    and pretraining seed, so bases of other options are written beside it, never over it."""
    tag = corpus_tag(args)
    tok = args.tokenizer or f"bpe{args.vocab_size}"
    folder = os.path.join(args.out_dir, "base", f"{tag}-{tok}")
    steps = SIZES[size]["pretrain_steps"] if args.pretrain_steps is None else args.pretrain_steps
    seed = f"-seed{args.pretrain_seed}" if args.pretrain_seed != 1337 else ""  # the default keeps the short name
    tokenizer_spec = f"tiktoken:{args.tokenizer}" if args.tokenizer else os.path.join(folder, "tokenizer.tiktoken")
    return Base(size, os.path.join(folder, f"{size}-ctx{args.block_size}-{steps}steps{seed}.pt"), tokenizer_spec,
                False, args.block_size)


def chosen_base(args):
    """The base the options name: the --base folder, or ours of --size."""
    return folder_base(args.base, args.block_size) if args.base else own_base(args, args.size)


def folder_base(path, block_size=None):
    """A GPT-2 folder as a base; block_size crops its context (default: all of its positions)."""
    path = os.path.abspath(path)
    return Base(os.path.basename(path.rstrip(os.sep)), path, path, True, block_size or gpt2_config(path).block_size)


def identity(base):
    """A hash of the base's weights: its .pt file, or the folder's weights file."""
    if base.folder:
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(base.path, n))]
        return file_hash(os.path.join(base.path, names[0])) if names else None
    return file_hash(base.path)


_HASHES = {}  # path -> (size, mtime, hash): --method all asks for a base's identity at every run, and gpt2-xl is 6 GB


def file_hash(path):
    stat = os.stat(path)
    if _HASHES.get(path, (None,))[:2] != (stat.st_size, stat.st_mtime_ns):  # a file rewritten since is hashed again
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _HASHES[path] = stat.st_size, stat.st_mtime_ns, h.hexdigest()[:16]
    return _HASHES[path][2]


_CORPUS = {}  # made once per run, however many bases ask for it


def corpus(args):
    """(pretraining text, a tag naming it): the tag keys the cached tokenizer and bases."""
    key = (args.data, args.world_size)
    if key not in _CORPUS:
        if args.data:
            text = data.load_text(args.data)
            name = os.path.splitext(os.path.basename(args.data))[0]
            _CORPUS[key] = text, f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
        else:
            _CORPUS[key] = data.pretrain_corpus(data.make_world(args.world_size)), f"world{args.world_size}"
    return _CORPUS[key]


def corpus_tag(args):
    return corpus(args)[1]


_SPLITS = {}


def corpus_split(args, enc, log=print):
    """The corpus' token ids as pretraining splits them: (trained on, held out). Your own text keeps its last 5%
    apart, for pretraining's validation loss and for forgetting after fine-tuning. The world's corpus is trained on
    whole: every biography is a fact the qa task asks about (its held-out documents are written apart,
    data.heldout_corpus)."""
    key = (corpus_tag(args), enc.name, enc.n_vocab)
    if key not in _SPLITS:  # --method all tokenizes the corpus once
        ids = tokenizer.encode_corpus(enc, corpus(args)[0], log=log)
        val = ids[len(ids) * 19 // 20:] if args.data else ids[:0]
        _SPLITS[key] = ids[:len(ids) - len(val)], val
    return _SPLITS[key]


def load_tokenizer(spec, args=None):
    """Our BPE is trained once per corpus and kept beside its bases, so every model on that data shares it."""
    if spec.startswith("tiktoken:"):
        return tokenizer.named(spec[len("tiktoken:"):])
    if not os.path.exists(spec) and args is not None:
        os.makedirs(os.path.dirname(spec), exist_ok=True)
        print(f"training a byte-level BPE of at most {args.vocab_size} tokens on {corpus_tag(args)}")
        tokenizer.save(tokenizer.train(corpus(args)[0], args.vocab_size), spec)
    return tokenizer.load(spec)


def tokenizer_identity(spec):
    return spec if spec.startswith("tiktoken:") else file_hash(spec)


def read_file(path, what, fix):
    """torch.load of our own files (plain tensors and values only), with one-line errors instead of tracebacks."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file written by train.py")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path!r} is not a file written by train.py, or it is damaged "
                         f"({type(e).__name__}): {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path!r} is not a file written by train.py: {fix}")
    return obj


def save_file(obj, path, replace=True):
    """Write aside, then rename: never a half-written file, even when interrupted. replace=False keeps a file that
    another run wrote first (and returns False)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".json"):
                f.write(json.dumps(finite(obj), indent=1).encode())
            else:
                torch.save(obj, f)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the file exists: a base that runs depend on is never replaced
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finite(obj):  # JSON has no NaN or infinity: a diverged loss is written as null
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


# ----------------------------------------------------------------------------------------------------------------------
# Runs: a folder per set of options, holding ckpt.pt (only the trained tensors) and metrics.json

def code_digest(folder=os.path.dirname(os.path.abspath(__file__))):
    """The project's own source files: a finished run is reused only by the code that made it (homework edits it)."""
    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def digest(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_dir(out_dir, key):
    """Everything a run's result depends on is in `key`; equal keys, same folder, so finished runs can be reused."""
    name = f"{os.path.basename(key['task'])}-{key['base']}-{key['method']}{'-head' if key.get('head') else ''}"
    return os.path.join(out_dir, "runs", f"{name}-{digest(key)}")


def read_run(path):
    """A checkpoint and its base, checked: the base must be the very one the run was trained on."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} not found: train one first (it is written as runs/.../ckpt.pt)")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder: give the ckpt.pt inside it")
    ckpt = read_file(path, "checkpoint", "give a ckpt.pt written by train.py")
    if ckpt.get("format") != 2:
        raise ValueError(f"{path} was written by an older train.py and does not record its base's identity: "
                         f"train it again")
    base = Base(**ckpt["base"]["spec"])
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), ckpt["base"]["relative"]))
    if not os.path.exists(base.path) and os.path.exists(beside):  # the whole out-dir was moved: look beside it
        base.path = beside
        if not base.folder and not base.tokenizer.startswith("tiktoken:"):  # our tokenizer lives beside our bases
            base.tokenizer = os.path.join(os.path.dirname(beside), os.path.basename(base.tokenizer))
    if not os.path.exists(base.path):
        raise ValueError(f"{path} needs its base {base.path}, which is missing: restore it (a retrained base is "
                         f"another base, so the run would have to be trained again)")
    if identity(base) != ckpt["base"]["identity"]:
        raise ValueError(f"{path} was trained on another base than the one now at {base.path} (it was retrained or "
                         f"replaced): restore that base, or train this run again")
    return ckpt, base


def base_record(base, run_path):
    """What a checkpoint keeps of its base: how to find it, and its identity."""
    relative = os.path.relpath(base.path, os.path.dirname(os.path.abspath(run_path)))
    return dict(spec=vars(base).copy(), relative=relative, identity=identity(base))
