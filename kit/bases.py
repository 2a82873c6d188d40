"""
Bases: the frozen model a run starts from, where it lives, what identifies it, its tokenizer and its
corpus.

A base is one of our small GPTs, pretrained here on a corpus (cached under --out-dir: a folder per
corpus and tokenizer, a file per size, context, steps and seed; the default one ships with the
repository in base/), or a released model (--base: a GPT-2 or Llama-family folder, or a .gguf file).
It is known by hashes of what decides its outputs: its weights, its config, its tokenizer. Every
checkpoint records them, and a run is only ever loaded onto the very base it was trained on.

    base = bases.named_base(opts, out_dir, people)  # a Base: where the model is, its tokenizer
    enc = bases.tokenizer_of(base, opts, people)    # our BPE: trained on the corpus the first time
    model = bases.load(base, enc, "cpu")            # checked against its tokenizer
"""
import dataclasses
import hashlib
import os
from dataclasses import dataclass

import torch

from model import GPT, SIZES, GPTConfig
from kit import chat, disk, distributed, pretrained, task_files, tokenizer, world
from kit.options import Options, option

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHIPPED = os.path.join(ROOT, "base")  # the default base, so that a first run needs no pretraining


@dataclass
class BaseOptions(Options):
    base: str = option(None, "a released model instead of one pretrained here: a GPT-2 or "
                             "Llama-family folder (config.json, weights, tokenizer) or a "
                             ".gguf file")
    size: str = option(None, "preset of our GPT to pretrain (default: small on CPU, large on CUDA)",
                       choices=tuple(SIZES))
    data: str = option(None, "a UTF-8 .txt file to pretrain on (default: the generated world)")
    tokenizer: str = option(None, "the tokenizer to pretrain with: a named tiktoken encoding "
                                  "(gpt2), or a released model's folder or .gguf file (default: "
                                  "our BPE, trained on the corpus)")
    vocab_size: int = option(2048, "most tokens of our BPE (fewer if the text runs out)", least=257,
                             most=1 << 20)
    pretrain_steps: int = option(None, "default: the size preset's", least=1, most=10 ** 7)
    pretrain_seed: int = option(1337, "seed of the base's pretraining", least=0, most=2 ** 32 - 1)
    pretrain_batch_size: int = option(32, "sequences per pretraining step", least=1, most=1 << 16)
    block_size: int = option(None, "context length, soft prompt included (default: 128; with "
                                   "--base, the model's own, at most 1,024)", least=2, most=1 << 20)


@dataclass
class Base:
    name: str         # the size preset, or the released model's name
    path: str         # our .pt file, or the released model's folder or .gguf file
    tokenizer: str    # a .tiktoken file beside our bases, a released model's path, or
                      # "tiktoken:NAME"
    released: bool    # a released model's weights (GPT-2, Llama, GGUF): nothing to pretrain here
    block_size: int   # the context the runs use
    start: str = None   # a base cut from a released model (proxy tuning's small model): its path
    layers: int = None  # ... and how many of its first blocks it keeps


def released_base(path, block_size=None):
    """A released model as a base; block_size shortens its context (default: all of its
    positions)."""
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip(os.sep)).removesuffix(".gguf")
    config, _ = pretrained.read(path, block_size)
    return Base(name, path, path, True, config["block_size"])


def our_base(opts, size, out_dir, people, write=False, dtype="float32"):
    """Where our base for these options lives: a folder per corpus and tokenizer, a file per size,
    context and pretraining (steps, seed, batch, dtype), so that bases of other options are written
    beside it, never over it. The folder under --out-dir comes first; the shipped one (base/) is
    used when it holds the very same file, except by pretraining (write), which writes under
    --out-dir. Our BPE is one per corpus: the shipped folder's serves a base of another size too."""
    folder = folder_of(opts, people)
    steps = SIZES[size]["pretrain_steps"] if opts.pretrain_steps is None else opts.pretrain_steps
    extra = "".join(part for part, default in ((f"-seed{opts.pretrain_seed}", "-seed1337"),
                                               (f"-batch{opts.pretrain_batch_size}", "-batch32"),
                                               (f"-{dtype}", "-float32")) if part != default)
    name = f"{size}-ctx{opts.block_size}-{steps}steps{extra}.pt"  # the defaults: a short name
    here, shipped = os.path.join(out_dir, "base", folder), os.path.join(SHIPPED, folder)
    if not write and not os.path.exists(os.path.join(here, name)) and \
            os.path.exists(os.path.join(shipped, name)):
        here = shipped
    spec = os.path.join(here, "tokenizer.tiktoken")
    if not os.path.exists(spec) and os.path.exists(os.path.join(shipped, "tokenizer.tiktoken")):
        spec = os.path.join(shipped, "tokenizer.tiktoken")
    if opts.tokenizer:
        spec = (os.path.abspath(opts.tokenizer) if os.path.exists(opts.tokenizer)
                else f"tiktoken:{opts.tokenizer}")  # a name: one of tiktoken's encodings
    return Base(size, os.path.join(here, name), spec, False, opts.block_size)


HEAL_STEPS = 300  # a cut base's default healing (--pretrain-steps)


def cut_base(large, layers, opts, out_dir, people):
    """A small model that knows the large one's language: its first `layers` blocks, its final norm
    and its head, healed on the corpus (--data) for --pretrain-steps (a file per such choice, beside
    our bases of that corpus and tokenizer). It reads text with the large model's own tokenizer."""
    folder = folder_of(opts, people)
    steps = HEAL_STEPS if opts.pretrain_steps is None else opts.pretrain_steps
    seed = "" if opts.pretrain_seed == 1337 else f"-seed{opts.pretrain_seed}"
    name = f"{large.name}-first{layers}"
    file = (f"{name}-{identity(large)['weights'][:8]}-ctx{large.block_size}-{steps}steps"
            f"-batch{opts.pretrain_batch_size}{seed}.pt")
    return Base(name, os.path.join(out_dir, "base", folder, file), large.path, False,
                large.block_size, start=large.path, layers=layers)


def first_blocks(model, layers):
    """The same model with only its first `layers` blocks: the embedding, the final norm and the
    head are kept, so its logits are over the very same vocabulary."""
    if not 1 <= layers < model.config.n_layer:
        raise ValueError(f"--small-layers {layers}: the model has {model.config.n_layer} blocks; "
                         f"keep between 1 and {model.config.n_layer - 1}")
    small = GPT(dataclasses.replace(model.config, n_layer=layers))
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("transformer.h.") or int(k.split(".")[2]) < layers}
    small.load_state_dict(keep)
    return small


def config_of(base, enc):
    """The base's GPTConfig, without reading its weights."""
    if base.released or base.start:
        config = GPTConfig(**pretrained.read(base.start or base.path, base.block_size)[0])
        return dataclasses.replace(config, n_layer=base.layers) if base.start else config
    shape = {k: v for k, v in SIZES[base.name].items() if k != "pretrain_steps"}
    return GPTConfig(block_size=base.block_size, vocab_size=enc.n_vocab, **shape)


def pretrain_steps(base, opts):
    if opts.pretrain_steps is not None:
        return opts.pretrain_steps
    return HEAL_STEPS if base.start else SIZES[base.name]["pretrain_steps"]


def folder_of(opts, people):
    """The folder of our bases for a corpus and a tokenizer (and of our BPE, trained on that
    corpus): the corpus' tag (corpus()) and the tokenizer's, e.g. world200-bpe2048."""
    text = corpus(opts, people)[1] if opts.data else f"world{people}"  # the world: no text needed
    if not opts.tokenizer:
        return f"{text}-bpe{opts.vocab_size}"
    if not os.path.exists(opts.tokenizer):  # a name: one of tiktoken's encodings
        return f"{text}-tiktoken-{opts.tokenizer}"
    enc = tokenizer.load(opts.tokenizer)
    return (f"{text}-{os.path.basename(opts.tokenizer.rstrip(os.sep)).removesuffix('.gguf')}-"
            f"{tokenizer.identity(enc)[:8]}")


def named_base(opts, out_dir, people, write=False, dtype="float32"):
    """The base the options name: the --base model, or ours of --size."""
    if opts.base:
        return released_base(opts.base, opts.block_size)
    return our_base(opts, opts.size, out_dir, people, write, dtype)


# --------------------------------------------------------------------------------------------------
# Identity: hashes of the files that decide a base's outputs

# path -> (size, mtime, hash): a comparison asks at every run, and a 1.5B model is 6 GB
_HASHES = {}


def identity(base):
    """{what: hash} of the base's weights and config (a released folder keeps them in separate
    files; our .pt and a .gguf hold everything in one)."""
    one = not base.released or os.path.isfile(base.path)
    names = [] if one else sorted(f for f in os.listdir(base.path)
                                  if f.endswith((".safetensors", ".bin", ".index.json")))
    hashes = {}
    for path in [base.path] if one else [os.path.join(base.path, f)
                                         for f in names + ["config.json"]]:
        st = os.stat(path)
        if _HASHES.get(path, (None,))[:2] != (st.st_size, st.st_mtime_ns):  # new, or rewritten
            _HASHES[path] = st.st_size, st.st_mtime_ns, disk.sha256_of(path)[:16]
        hashes[path] = _HASHES[path][2]
    if one:
        return dict(weights=hashes[base.path])
    weights = "".join(hashes[os.path.join(base.path, f)] for f in names)
    return dict(weights=hashlib.sha256(weights.encode()).hexdigest()[:16],
                config=hashes[os.path.join(base.path, "config.json")])


# --------------------------------------------------------------------------------------------------
# The corpus our bases are pretrained on, and their tokenizer

_CORPUS, _SPLITS = {}, {}  # made once per process, however many bases ask for them


def corpus(opts, people):
    """(pretraining text, a tag naming it): the tag keys the cached tokenizer and bases."""
    key = (opts.data, people)
    if key not in _CORPUS:
        if opts.data:
            text = task_files.load_text(opts.data)
            name = os.path.splitext(os.path.basename(opts.data))[0]
            _CORPUS[key] = text, f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
        else:
            _CORPUS[key] = world.pretrain_corpus(world.make_world(people)), f"world{people}"
    return _CORPUS[key]


def corpus_split(opts, people, enc, log=print):
    """The corpus' token ids as pretraining splits them: (trained on, held out). Your own text keeps
    its last 5% apart, for pretraining's validation loss and for forgetting after fine-tuning. The
    world's corpus is trained on whole: every biography is a fact the qa task asks about (its
    held-out documents are written apart, world.heldout_corpus)."""
    key = (corpus(opts, people)[1], tokenizer.identity(enc))
    if key not in _SPLITS:
        ids = tokenizer.encode_corpus(enc, corpus(opts, people)[0], log=log)
        val = ids[len(ids) * 19 // 20:] if opts.data else ids[:0]
        _SPLITS[key] = ids[:len(ids) - len(val)], val
    return _SPLITS[key]


def tokenizer_of(base, opts=None, people=200, log=print):
    """A base's tokenizer. Our BPE is trained once per corpus (when opts are given) and kept beside
    its bases, so every model on that data shares one vocabulary."""
    if base.tokenizer.startswith("tiktoken:"):
        return tokenizer.named(base.tokenizer.removeprefix("tiktoken:"))
    if not os.path.exists(base.tokenizer) and opts is not None and not base.released:
        # under torchrun, rank 0 trains and writes it; the others wait, then read it
        distributed.on_main(train_tokenizer, base, opts, people, log)
    enc = tokenizer.load(base.tokenizer)
    if os.path.isdir(base.tokenizer):  # a hub folder's chat template (a .gguf's comes with it)
        enc.chat_template = chat.folder_template(base.tokenizer)
    return enc


def train_tokenizer(base, opts, people, log):
    os.makedirs(os.path.dirname(base.tokenizer), exist_ok=True)
    log(f"training a byte-level BPE of at most {opts.vocab_size} tokens on "
        f"{corpus(opts, people)[1]}")
    tokenizer.save(tokenizer.train(corpus(opts, people)[0], opts.vocab_size, log=log),
                   base.tokenizer)


# --------------------------------------------------------------------------------------------------
# Loading a base

def load(base, enc, device):
    """The base model, on `device`, checked against its tokenizer: every id the tokenizer makes must
    have a row in the embedding."""
    if base.released:
        model = GPT.from_pretrained(base.path, base.block_size)
    else:
        fix = f"delete that file ({os.path.basename(base.path)}) to pretrain it again"
        saved = disk.read_file(base.path, "the cached base", fix)
        if saved.get("tokenizer") != tokenizer.identity(enc):
            raise ValueError(f"{base.path} was pretrained with another tokenizer than "
                             f"{base.tokenizer}: {fix}")
        try:
            model = GPT(GPTConfig(**saved["config"]))
            model.load_state_dict(saved["model"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"the cached base {base.path} is damaged ({type(e).__name__}): "
                             f"{fix}") from None
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ValueError(f"the cached base {base.path} holds NaN or infinite weights: {fix}")
    if enc.n_vocab > model.config.vocab_size or enc.eot >= model.config.vocab_size:
        raise ValueError(f"{base.path}: its tokenizer has {enc.n_vocab:,} tokens but the model's "
                         f"embedding has {model.config.vocab_size:,} rows: the tokenizer does not "
                         f"match the weights")
    return model.to(device).eval()


def record(base, enc, run_path):
    """What a checkpoint keeps of its base: how to find it, and its identity."""
    relative = os.path.relpath(base.path, os.path.dirname(os.path.abspath(run_path)))
    return dict(spec=vars(base).copy(), relative=relative, identity=identity(base),
                tokenizer=tokenizer.identity(enc))


def find(record, run_path):
    """The base a checkpoint was trained on, found where it was or beside the checkpoint's out-dir
    if the whole folder moved, and checked to be the very same."""
    spec = record["spec"] if isinstance(record["spec"], dict) else {}
    # runs before 2026-12-08 called `released` "pretrained"
    spec = {("released" if k == "pretrained" else k): v for k, v in spec.items()}
    try:
        base = Base(**spec)
    except TypeError:
        raise ValueError(f"{run_path} was written by another version of train.py: train it "
                         f"again") from None
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(run_path)),
                                           record["relative"]))
    if not os.path.exists(base.path) and os.path.exists(beside):  # the whole out-dir moved
        if os.path.dirname(base.tokenizer) == os.path.dirname(base.path):  # our BPE, beside it
            base.tokenizer = os.path.join(os.path.dirname(beside), os.path.basename(base.tokenizer))
        base.path = beside
    if not os.path.exists(base.path):
        raise ValueError(f"{run_path} needs its base {base.path}, which is missing: restore it "
                         f"(a retrained base is another base, so the run would have to be trained "
                         f"again)")
    now = identity(base)
    for what, then in record["identity"].items():
        if now.get(what) != then:
            raise ValueError(f"{run_path} was trained on another base than the one now at "
                             f"{base.path} (its {what} changed): restore that base, or train this "
                             f"run again")
    return base
