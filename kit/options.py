"""
Options and the command line made from them. Each option is a field of a dataclass that belongs to
the code that uses it: a method declares its own next to its attach() (prompt_tuning.Config, ...),
the loop its own (loop.TrainConfig), the task and the base theirs (data.TaskOptions,
bases.BaseOptions). A field says its default, its help and its limits:

    @dataclass
    class Config(Options):
        prompt_len: int = option(20, "soft prompt vectors", least=1)  # --prompt-len

From those fields come the command line (`python train.py --help`) and the checks: a value is
checked when its dataclass is made, so a bad option is one line before any work starts, from the
command line or from Python. parse() then refuses the options a run would not use (another method's,
--classifier-lr without --classifier, --people beside your own files, ...): every option is used as
given or refused, never ignored. This file imports no group: the entry points name theirs.

    args = options.parse(argv, train.GROUPS, train.METHODS)   # argparse.Namespace, checked
    cmd = options.typed(args, train.GROUPS, train.METHODS)     # a Command: every group, built
    cfg = options.build(prompt_tuning.Config, args)  # one group of it, as its dataclass
"""
import argparse
import dataclasses
import math
import os
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch

from kit import pretrained


def option(default, help, least=None, above=None, most=None, choices=None, cli=True):
    """A dataclass field that is an option: its default, its help for --help, its limits
    (least <= value, above < value, value <= most, value in choices). cli=False keeps it off the
    command line."""
    return field(default=default, metadata=dict(help=help, least=least, above=above, most=most,
                                                choices=choices, cli=cli))


def flag(name):
    return "--" + name.replace("_", "-")


@dataclass
class Options:
    """The base of every group of options: each field is checked against its type and limits when
    made. A method's Config also says `where` its parameters go, its default `lr` and the context
    `positions` it takes: a class attribute where the value is fixed, a property where it depends on
    the options (prompt tuning's positions, the prefix's lr)."""
    # context positions a method puts in front of the tokens (prompt tuning: its vectors)
    positions = 0

    def __post_init__(self):
        """Each field checked against its type and its limits, in one line naming the option."""
        for f in fields(self):
            if isinstance(getattr(self, f.name), os.PathLike):  # a pathlib.Path: its path string
                setattr(self, f.name, os.fspath(getattr(self, f.name)))
            m, value = f.metadata, getattr(self, f.name)
            name = "--" + f.name.replace("_", "-")
            # not given: the code that uses it picks, as its help says
            if value is None and f.default is None:
                continue
            kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
            kind = f.type if f.type in kinds else None
            ok = kind is None or (isinstance(value, kind)
                                  and not (kind is not bool and isinstance(value, bool)))
            if kind is float:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value))
            if not ok:
                finite = " (finite)" if kind is float else ""
                raise ValueError(f"{name} must be {kinds[kind]}{finite}, got {value!r}")
            if kind is str and not value.strip():
                raise ValueError(f"{name} is empty: give a value or leave the option out")
            if m.get("choices") and value not in m["choices"]:
                raise ValueError(f"{name} must be one of {', '.join(map(str, m['choices']))}; "
                                 f"got {value!r}")
            if m.get("least") is not None and value < m["least"]:
                raise ValueError(f"{name} must be at least {m['least']}, got {value}")
            if m.get("above") is not None and not value > m["above"]:
                raise ValueError(f"{name} must be greater than {m['above']}, got {value}")
            if m.get("most") is not None and value > m["most"]:
                raise ValueError(f"{name} must be at most {m['most']}, got {value}")

    def unused(self):
        """The options that these values leave unused (a given one is refused): none by default."""
        return set()


def cli_fields(cls):
    """The fields of `cls` that are command-line options."""
    return [f for f in fields(cls) if f.metadata.get("cli")]


def build(cls, args, **override):
    """The dataclass `cls` from the command line's values (and overrides), checked."""
    given = {f.name: getattr(args, f.name) for f in cli_fields(cls)}
    return cls(**{**given, **override})


# --------------------------------------------------------------------------------------------------
# The command line, made from the groups' fields

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    # "(default: X)" only where there is a plain default to show
    def _get_help_string(self, action):
        return (action.help if action.default in (None, True, False)
                else super()._get_help_string(action))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other refusal, instead of argparse's usage block
        self.exit(2, f"error: {message} (--help lists every option)\n")


def parser(groups, choices, description="", default="prompt"):
    """argparse from [(title, dataclass)]: --method and the run-wide options, then each group's
    fields. Two groups may not use one name: a new method picks names of its own (LoRA's alpha:
    --lora-alpha)."""
    p = Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--method", default=default, choices=choices, help="what to run")
    p.add_argument("--load", default=None,
                   help="evaluate a saved ckpt.pt again (on its own base and task)")
    p.add_argument("--device", default="auto",
                   help="auto picks cuda > mps > cpu; or cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: autocast matmuls (weights stay float32); auto: bfloat16 on "
                        "CUDA, else float32")
    p.add_argument("--out-dir", default="out", help="cached bases, tokenizers and runs")
    seen = {"method", "load", "device", "dtype", "out_dir"}
    for title, cls in groups:
        g = p.add_argument_group(title)
        for f in cli_fields(cls):
            if f.name in seen:
                raise ValueError(f"two groups of options both define {flag(f.name)} "
                                 f"({title} is the second): "
                                 f"give the new one another name")
            seen.add(f.name)
            m, name = f.metadata, "--" + f.name.replace("_", "-")  # prompt_len: --prompt-len
            if f.type is bool and f.default:  # on by default: the flag turns it off
                g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                               action="store_false", help=m["help"])
            elif f.type is bool:
                g.add_argument(name, action="store_true", help=m["help"])
            # choices are checked by the group's dataclass, with one line like every other check
            else:
                shown = "{" + ",".join(map(str, m["choices"])) + "}" if m["choices"] else None
                g.add_argument(name, type=f.type, default=f.default, metavar=shown,
                               help=m["help"])
    return p


def given(p, argv):
    """The names of the options given on the command line (even when given at their default
    value); one given twice is refused (argparse would keep the last one silently)."""
    seen = [(a.dest, o) for a in p._actions for o in a.option_strings for arg in argv
            if arg == o or arg.startswith(o + "=")]
    dests = [dest for dest, _ in seen]
    for dest, o in seen:
        if dests.count(dest) > 1:
            raise ValueError(f"{o} is given {dests.count(dest)} times: give it once")
    return set(dests)


def refuse(given, names, why):
    """One line for the first given option among `names`, which this run does not use."""
    extra = sorted(given & set(names))
    if extra:
        raise ValueError(f"{', '.join(flag(n) for n in extra)}: {why}")


# --------------------------------------------------------------------------------------------------
# The checks across groups, and the Command every function below the entry points takes

def parse(argv, named, methods, description="", choices=None, extra=(), generation=None):
    """Parse and check the command line of train.py (named: train.GROUPS, {"task", "base", "train",
    "proxy": its dataclass}; methods: train.METHODS): every option is used as given or refused with
    one line. train.py adds generation's group (extra) and its checks (generation: kit/generate.py,
    with its FIELDS and check_used); compare.py its own group and --method all."""
    argv = sys.argv[1:] if argv is None else argv
    choices = choices or ["pretrain", *methods, "proxy"]
    # [(title, dataclass)]: every group of options, a method's among them
    every = [("task", named["task"]), ("base model", named["base"]), ("training", named["train"]),
             *[(f"--method {n} ({m.Config.where})", m.Config) for n, m in methods.items()
               if cli_fields(m.Config)],
             (f"--method proxy ({named['proxy'].where})", named["proxy"]), *extra]
    p = parser(every, choices, description, "prompt" if "prompt" in choices else choices[0])
    args = p.parse_args(argv)
    args.given = given(p, argv)
    # --generate or --generate-file: what it uses is generation.check_used's to say
    args.generating = (getattr(args, "generate", None) is not None
                       or getattr(args, "generate_file", None) is not None)
    for name in ("load", "out_dir"):  # paths no dataclass checks: '' would be the current folder
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise ValueError(f"{flag(name)} is empty: give a path or leave the option out")
    for _, cls in every:  # each group checks its own fields: types and limits
        build(cls, args)
    args.device = pick_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    check_used(args, args.given, every, generation)
    if not args.load:
        args.out_dir = writable_folder(args.out_dir)
        args.size = args.size or ("large" if args.device.startswith("cuda") else "small")
        # our bases: 128; a released model: its own context, at most 1,024
        if args.block_size is None:
            args.block_size = (min(1024, pretrained.read(args.base)[0]["block_size"]) if args.base
                               else 128)
    return args


@dataclass(frozen=True)
class Command:
    """The command line, typed: each group's dataclass, built and checked once. The entry points
    (train.py's and compare.py's main) make one; every function below them takes it, never
    argparse's Namespace."""
    method: str                    # --method (compare.py: all, or prompt for --prompt-grid)
    task_opts: Options             # data.TaskOptions (--task, --template, ...)
    base_opts: Options             # bases.BaseOptions (--base, --size, ...)
    train: Options                 # loop.TrainConfig; lr None: each method's own (Config.lr)
    proxy: Options                 # proxy_tuning.Config
    configs: dict                  # {method name: its Config, from the command line}
    out_dir: str
    device: str
    dtype: str
    given: frozenset = frozenset()  # the option names given on the command line
    load: str = None
    generating: bool = False       # --generate or --generate-file (kit/generate.py)
    extra: dict = field(default_factory=dict)  # {group title: its dataclass}: generation's,
                                               # compare.py's

    def with_train(self, **train):
        """The same run with other training values (a seed, a learning rate)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **train))

    def on_tokenizer(self, tokenizer):
        """The same run, its own bases pretrained on another tokenizer (proxy tuning's small
        one)."""
        return dataclasses.replace(self, base_opts=dataclasses.replace(self.base_opts,
                                                                       tokenizer=tokenizer))

    def record(self):
        """Every option's value, for naming a comparison's folder."""
        groups = [self.task_opts, self.base_opts, self.train, self.proxy, *self.configs.values(),
                  *self.extra.values()]
        return {"method": self.method, **{k: v for g in groups
                                          for k, v in dataclasses.asdict(g).items()}}


def typed(args, named, methods, extra=()):
    """The Command of a parsed, checked command line (named: train.GROUPS; methods:
    train.METHODS; extra: generation's or compare.py's groups)."""
    return Command(args.method, build(named["task"], args), build(named["base"], args),
                   build(named["train"], args, dtype=args.dtype), build(named["proxy"], args),
                   {n: build(m.Config, args) for n, m in methods.items()}, args.out_dir,
                   args.device, args.dtype, frozenset(args.given), args.load, args.generating,
                   {title: build(cls, args) for title, cls in extra})


def check_used(args, given, groups, generation=None):
    """Refuse, in one line, the options given that this run would not use."""
    if args.load and args.method == "all":  # compare.py
        raise ValueError("--load evaluates one run: python train.py --load out/runs/.../ckpt.pt")
    if args.generating:  # train.py --generate: what it uses is kit/generate.py's to say
        return generation.check_used(args, given)
    if generation:
        refuse(given, generation.FIELDS, "generation's: give --generate (or --generate-file)")
    if args.load:
        return refuse(given, given - {"load", "device", "dtype"},
                      "--load evaluates a run on its own base and task: leave them out")
    given = given - {"method", "device", "dtype", "out_dir"}
    m, grid = args.method, getattr(args, "prompt_grid", False)
    # the methods this command line runs: --method, or compare.py's --methods (None: all)
    running = ({"prompt"} if grid else {m} if m != "all" else
               None if args.methods == "all" else set(args.methods.split(",")))
    what = ("--prompt-grid" if grid else f"--method {m}" if m != "all" else
            f"--methods {args.methods}")
    names = {title: {f.name for f in cli_fields(cls)} for title, cls in groups}
    own_base = names["base model"] - {"base", "block_size"}
    if m == "pretrain":
        pretraining = own_base | {"block_size", "people"}
        refuse(given, set().union(*names.values()) - pretraining,
               "--method pretrain trains a base: leave them out")
        refuse(given, {"base"},
               "--method pretrain trains a base of our own; a --base has been trained")
    for title, cls in groups:
        name = title.split()[1] if title.startswith("--method ") else None
        if name and running is not None and name not in running:
            refuse(given, names[title],
                   f"{name}'s options: {what} does not use them")
        elif name:  # a method that runs: the options its own configuration leaves unused
            refuse(given, build(cls, args).unused(),
                   f"{name} does not use it with these options")
    if not args.classifier:
        refuse(given, {"classifier_lr"}, "the classification layer's: add --classifier")
    if args.classifier and m in ("proxy", "pretrain"):
        refuse(given, {"classifier"}, f"--method {m} trains no classification layer")
    if running == {"none"}:  # train.py's --method none, or compare.py's --methods none
        refuse(given, {"lr"}, f"{what} trains nothing of its own (a classification layer has "
                              f"--classifier-lr)")
        if not args.classifier:
            refuse(given, {"steps", "eval_every", "grad_accum", "seeds"},
                   f"{what} trains nothing (add --classifier for a linear probe)")
    if args.tokenizer:
        refuse(given, {"vocab_size"}, "our BPE's size: --tokenizer names another tokenizer")
    small_is_ours = (running is None or "proxy" in running) and not args.small_base
    if args.base:  # a released base: its size, tokenizer and training are its own
        ours = own_base - ({"data", "pretrain_steps", "pretrain_seed", "pretrain_batch_size"}
                           if small_is_ours else set())
        refuse(given, ours,
               f"for bases pretrained here; --base {args.base} is a released model")
    if args.small_base and not args.base:
        refuse(given, {"small_base"},
               "proxy tuning's small model beside a released --base: give --base too")
    if args.small_base:
        refuse(given, {"small_size", "small_layers"},
               "--small-base is the small model already")
    if args.small_layers:
        if not args.base:
            refuse(given, {"small_layers"}, "it cuts a released --base: give --base too")
        refuse(given, {"small_size"}, "--small-layers is the small model already")
        if not args.data:
            raise ValueError("--small-layers heals the cut blocks on a text of yours: "
                             "give --data (e.g. tasks/english.txt)")
    world_task = args.task in ("qa", "sentiment")
    world_corpus = not args.data and (not args.base or small_is_ours)
    if not world_task and not world_corpus:
        refuse(given, {"people"},
               "the generated world's: neither the task nor the corpus is it")


def check_batch(batch_size, micro=1, name="--batch-size"):
    """Each of torchrun's processes (its WORLD_SIZE; one without torchrun) takes batch_size /
    processes rows of a batch, in `micro` micro-batches."""
    procs = int(os.environ.get("WORLD_SIZE", 1))
    n = procs * micro
    if batch_size % n:
        parts = " x ".join(([f"{procs} processes"] if procs > 1 else [])
                           + ([f"--grad-accum {micro}"] if micro > 1 else []))
        equal = f" ({n} equal parts)" if procs > 1 and micro > 1 else ""
        raise ValueError(f"{name} {batch_size} does not split into {parts}{equal}: give a multiple "
                         f"of {n}")


# --------------------------------------------------------------------------------------------------
# Devices, dtypes and folders

def pick_device(name):
    if name == "auto":
        return ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N "
                         f"or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise ValueError(f"--device {name}: this code runs on cpu, cuda or mps devices")
    if not available[device.type]:
        raise ValueError(f"--device {name}: this torch has no {device.type} device; "
                         f"leave out --device to pick one")
    if device.type != "cuda" and device.index not in (None, 0):
        raise ValueError(f"--device {name}: there is one {device.type} device: give "
                         f"--device {device.type}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return name


def autocast(device, dtype):
    """bf16 autocast on any device when dtype is "bfloat16" (matmuls in bf16, weights stay
    float32)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16"
            else nullcontext())


def writable_folder(path):
    """The output folder as an absolute path (so checkpoints find their bases from anywhere),
    created, tried."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out-dir {path} is a file, not a folder: give a folder (made if "
                         f"missing)")
    try:
        # realpath: a link to a folder is that folder
        os.makedirs(os.path.realpath(path), exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {path} cannot be written ({e.strerror}): "
                         f"choose another folder") from None
    return path

