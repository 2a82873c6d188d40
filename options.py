"""
The command line of train.py: every option with its help and default, and the checks that refuse a bad one with
one line before any work starts (as nanoGPT keeps its configurator.py beside train.py). An option is used as given
or refused; none is quietly replaced by a default.

    args = options.parse(argv, methods=train.METHODS)     # argparse.Namespace, checked and resolved
"""
import argparse
import math
import os
import tempfile

import torch

import data
from model import SIZES, SMALLER, gpt2_config


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show "(default: X)" only where there is a plain default to show
        return action.help if action.default in (None, True, False) else super()._get_help_string(action)


def parser(methods, description=""):
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--method", default="prompt", choices=["pretrain", *methods, "proxy", "all"], help="what to run")
    g = p.add_argument_group("task")
    g.add_argument("--task", default="qa", help="qa, sentiment, or a .jsonl file of prompt/completion or text/label "
                                                "lines (a few distinct completions make it classification)")
    g.add_argument("--template", default=data.DEFAULT_TEMPLATE,
                   help="the prompt for text/label lines; {text} is replaced, \\n is a newline")
    g.add_argument("--metric", default="auto", choices=["auto", "accuracy", "exact_match"],
                   help="auto: accuracy of the likeliest label when the completions are a few labels, else exact match")
    g.add_argument("--head", action="store_true", help="classification: train a classification layer with the method")
    g.add_argument("--world-size", type=int, default=200, help="people in the generated world (qa, sentiment)")
    g = p.add_argument_group("base model")
    g.add_argument("--base", default=None, help="a GPT-2 folder (config.json, model.safetensors or pytorch_model.bin, "
                                                "vocab.json, merges.txt) instead of pretraining a base here")
    g.add_argument("--size", default=None, choices=SIZES,
                   help="preset to pretrain (default: small on CPU, large on CUDA)")
    g.add_argument("--data", default=None, help="a UTF-8 .txt file to pretrain on (default: the generated world)")
    g.add_argument("--tokenizer", default=None, help="a named tiktoken encoding, e.g. gpt2 (default: our own BPE)")
    g.add_argument("--vocab-size", type=int, default=2048, help="most tokens of our BPE (fewer if the text runs out)")
    g.add_argument("--pretrain-steps", type=int, default=None, help="default: the size preset's")
    g.add_argument("--pretrain-seed", type=int, default=1337, help="seed of the base's pretraining")
    g.add_argument("--block-size", type=int, default=None,
                   help="context length, soft prompt included (default: 128; with --base, the model's own)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's, see METHODS)")
    g.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the classification layer")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per step, pretraining and fine-tuning")
    g.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    g.add_argument("--seed", type=int, default=1337, help="same seed, same device: same numbers")
    g.add_argument("--device", default="auto", help="auto picks cuda > mps > cpu; or cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: autocast matmuls (weights stay float32); auto: bfloat16 on CUDA, else float32")
    g.add_argument("--out-dir", default="out", help="cached bases, tokenizers and runs")
    g.add_argument("--load", default=None,
                   help="evaluate a saved ckpt.pt (on its own base and task) instead of training")
    g = p.add_argument_group("prompt tuning")
    g.add_argument("--prompt-len", type=int, default=20, help="soft prompt vectors")
    g.add_argument("--prompt-init", default="vocab", choices=["random", "vocab", "text"],
                   help="uniform random, sampled token embeddings, or the embeddings of a text")
    g.add_argument("--prompt-text", default=None, help="init text (default for 'text': the task's label words)")
    g = p.add_argument_group("prefix tuning")
    g.add_argument("--prefix-len", type=int, default=10, help="prefix positions in every layer")
    g.add_argument("--no-reparam", dest="reparam", action="store_false", help="train the prefix directly, no MLP")
    g.add_argument("--prefix-hidden", type=int, default=256, help="hidden width of the reparameterisation MLP")
    g = p.add_argument_group("adapters")
    g.add_argument("--bottleneck", type=int, default=16, help="adapter width r (n_embd -> r -> n_embd)")
    g.add_argument("--adapter-where", default="houlsby", choices=["houlsby", "pfeiffer"],
                   help="after attention and MLP (houlsby) or after the MLP only (pfeiffer)")
    g.add_argument("--no-train-layernorm", dest="train_layernorm", action="store_false",
                   help="keep the layer norms frozen too")
    g = p.add_argument_group("proxy tuning")
    g.add_argument("--alpha", type=float, default=2.0,
                   help="strength of the expert's shift (the paper's default is 1; 2 measured best on qa here)")
    g.add_argument("--small-size", default=None, choices=SIZES,
                   help=f"size of the small expert/anti-expert; --size is the large base's (default: {SMALLER})")
    g.add_argument("--small-base", default=None, help="with --base: the GPT-2 folder of the small expert/anti-expert")
    return p


AT_LEAST = {"steps": 0, "pretrain_steps": 1, "batch_size": 1, "eval_every": 1, "prompt_len": 1, "prefix_len": 1,
            "prefix_hidden": 1, "bottleneck": 1, "vocab_size": 257, "block_size": 2, "world_size": 10}
ONLY_OWN_BASE = ("size", "data", "tokenizer", "vocab_size", "pretrain_steps", "pretrain_seed", "small_size")


def parse(argv=None, methods=(), description=""):
    """Parse and check the command line. Returns the resolved options; a bad one raises ValueError (one line)."""
    p = parser(methods, description)
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}
    check_values(args)
    args.device = pick_device(args.device)
    args.dtype = ("bfloat16" if args.device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    if args.load:
        extra = sorted(given - {"load", "device", "dtype"})
        if extra:
            raise ValueError(f"--load evaluates a run on its own base and task: leave out "
                             f"{', '.join('--' + k.replace('_', '-') for k in extra)}")
        return args
    if args.base or args.small_base:
        check_folders(args, given)
    else:
        args.size = args.size or ("large" if args.device.startswith("cuda") else "small")
        args.block_size = 128 if args.block_size is None else args.block_size
    if args.prompt_len >= args.block_size - 1 and args.method in ("prompt", "all"):
        raise ValueError(f"--prompt-len {args.prompt_len} leaves no room in the context of {args.block_size} "
                         f"(--block-size): use fewer prompt vectors")
    if args.method in ("proxy", "all") and not args.base:
        check_proxy_sizes(args)
    args.out_dir = writable_folder(args.out_dir)
    return args


def check_values(args):
    for name in ("task", "template", "data", "tokenizer", "base", "small_base", "out_dir", "load", "prompt_text"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise ValueError(f"--{name.replace('_', '-')} is empty: give a value or leave the option out")
    for name, least in AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    for name in ("lr", "head_lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not math.isfinite(args.alpha):
        raise ValueError(f"--alpha must be a finite number, got {args.alpha}")
    if "{text}" not in args.template:
        raise ValueError(f"--template must contain {{text}}, where each line's text goes; got {args.template!r}")
    if args.method == "pretrain" and (args.head or args.load):
        raise ValueError("--method pretrain trains a base: leave out --head and --load")


def check_folders(args, given):
    """--base (and --small-base): GPT-2 folders instead of bases pretrained here."""
    if not args.base:
        raise ValueError("--small-base names proxy tuning's small model beside a --base: give --base too")
    if given & set(ONLY_OWN_BASE):
        raise ValueError(f"--{sorted(given & set(ONLY_OWN_BASE))[0].replace('_', '-')} is for bases pretrained here; "
                         f"with --base the model, its size and its tokenizer come from {args.base}")
    if args.method == "pretrain":
        raise ValueError("--method pretrain trains a base here; with --base there is nothing to pretrain")
    for folder in filter(None, (args.base, args.small_base)):
        if not os.path.isdir(folder):
            raise ValueError(f"GPT-2 folder {folder!r} not found: see the README for how to get one")
    config = gpt2_config(args.base)
    args.block_size = config.block_size if args.block_size is None else args.block_size
    if args.block_size > config.block_size:
        raise ValueError(f"--block-size {args.block_size} is longer than {args.base}'s {config.block_size} positions")
    if args.small_base:
        small = gpt2_config(args.small_base)
        if small.vocab_size != config.vocab_size:
            raise ValueError(f"proxy tuning needs one vocabulary: {args.small_base} has {small.vocab_size} tokens, "
                             f"{args.base} {config.vocab_size}")
        if params(small) >= params(config):
            raise ValueError(f"--small-base {args.small_base} is not smaller than --base {args.base}")
        if args.block_size > small.block_size:
            raise ValueError(f"--block-size {args.block_size} is longer than {args.small_base}'s {small.block_size}")
    elif args.method == "proxy":
        raise ValueError("proxy tuning with --base needs --small-base, the GPT-2 folder of the small expert")


def check_proxy_sizes(args):
    small = args.small_size or SMALLER.get(args.size)
    if small is None:
        if args.method == "proxy":
            raise ValueError(f"proxy tuning needs a model smaller than the {args.size} base: use --size small or "
                             f"larger, or name one with --small-size")
        return
    if params(SIZES[small]) >= params(SIZES[args.size]):
        raise ValueError(f"--small-size {small} is not smaller than the large base --size {args.size}")


def params(shape):  # parameters of a transformer body, for comparing sizes
    get = shape.get if isinstance(shape, dict) else lambda k: getattr(shape, k)
    return get("n_layer") * 12 * get("n_embd") ** 2


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise ValueError(f"--device {name}: this code runs on cpu, cuda or mps devices")
    if not available[device.type]:
        raise ValueError(f"--device {name}: this torch has no {device.type} device; leave out --device to pick one")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return name


def writable_folder(path):
    """The output folder as an absolute path (so checkpoints find their bases from anywhere), created and tried."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out-dir {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {path} cannot be written ({e.strerror}): choose another folder") from None
    return path


def load_task(args):
    """The task the options name, before tokenization."""
    task = data.load_task(args.task, args.world_size, args.seed, args.template.replace("\\n", "\n"), args.metric)
    if args.head and not task.choices:
        raise ValueError(f"--head trains a classification layer, and {args.task} is not a classification task "
                         f"(its completions are free text): leave out --head, or use --metric accuracy")
    return task


def task_record(args):  # what a checkpoint keeps to rebuild its task
    return dict(task=os.path.abspath(args.task) if args.task.endswith(".jsonl") else args.task,
                world_size=args.world_size, template=args.template, metric=args.metric, seed=args.seed,
                head=args.head, dtype=args.dtype)
