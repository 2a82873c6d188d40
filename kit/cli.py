"""
The command line of train.py and compare.py. Its options come from the groups' dataclasses (a
method's Config, loop.TrainConfig, data.TaskOptions, bases.BaseOptions, proxy_tuning.Config), and
each value is checked by its dataclass. This file adds the checks across groups: an option that the
run would not use (another method's, --classifier-lr without --classifier, --people beside your
own files, ...) is refused with one line, before any work starts.

    args = cli.parse(sys.argv[1:], train.METHODS)       # argparse.Namespace, checked and resolved
    cmd = cli.typed(args, train.METHODS)                # a Command: what every function below takes
"""
import dataclasses
import sys
from dataclasses import dataclass, field

import proxy_tuning
from kit import bases, data, distributed, generate, loop, options



def groups(methods):
    """[(title, dataclass)]: every group of options of the command line, a method's among them."""
    methods = [(f"--method {n} ({m.Config.where})", m.Config) for n, m in methods.items()]
    return [("task", data.TaskOptions), ("base model", bases.BaseOptions),
            ("training", loop.TrainConfig),
            *[(title, cls) for title, cls in methods if options.cli_fields(cls)],
            (f"--method proxy ({proxy_tuning.Config.where})", proxy_tuning.Config)]


def parse(argv, methods, description="", choices=None, extra=()):
    """Parse and check the command line of train.py (methods: its METHODS): every option is used as
    given or refused with one line. compare.py adds its own group (extra) and --method all."""
    argv = sys.argv[1:] if argv is None else argv
    choices = choices or ["pretrain", *methods, "proxy"]
    every = groups(methods) + list(extra)
    p = options.parser(every, choices, description + distributed.USAGE,
                       "prompt" if "prompt" in choices else choices[0])
    args = p.parse_args(argv)
    args.given = options.given(p, argv)
    for name in ("load", "out_dir"):  # paths no dataclass checks: '' would be the current folder
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise ValueError(f"{options.flag(name)} is empty: give a path or leave the option out")
    for _, cls in every:  # each group checks its own fields: types and limits
        options.build(cls, args)
    args.device = options.pick_device(args.device)
    args.dtype = options.pick_dtype(args.dtype, args.device)
    check_used(args, args.given, every)
    if not args.load:
        args.out_dir = options.writable_folder(args.out_dir)
        args.size = args.size or ("large" if args.device.startswith("cuda") else "small")
        # our bases: 128; a released model: its own context, at most 1,024
        if args.block_size is None:
            args.block_size = min(1024, bases.released(args.base).block_size) if args.base else 128
    return args


@dataclass(frozen=True)
class Command:
    """The command line, typed: each group's dataclass, built and checked once. The entry points
    (train.py's and compare.py's main) make one; every function below them takes it, never
    argparse's Namespace."""
    method: str                    # --method (compare.py: all, or prompt for --prompt-grid)
    task: data.TaskOptions
    base: bases.BaseOptions
    train: loop.TrainConfig        # lr None: each method's own (Config.lr)
    proxy: proxy_tuning.Config
    configs: dict                  # {method name: its Config, from the command line}
    out_dir: str
    device: str
    dtype: str
    given: frozenset = frozenset()  # the option names given on the command line
    load: str = None
    extra: dict = field(default_factory=dict)  # {group title: its dataclass}: compare.py's own

    def with_train(self, **train):
        """The same run with other training values (a seed, a learning rate)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **train))

    def on_tokenizer(self, tokenizer):
        """The same run, its own bases pretrained on another tokenizer (proxy tuning's small one)."""
        return dataclasses.replace(self, base=dataclasses.replace(self.base, tokenizer=tokenizer))

    def record(self):
        """Every option's value, for naming a comparison's folder."""
        groups = [self.task, self.base, self.train, self.proxy, *self.configs.values(),
                  *self.extra.values()]
        return {"method": self.method, **{k: v for g in groups
                                          for k, v in dataclasses.asdict(g).items()}}


def typed(args, methods, extra=()):
    """The Command of a parsed, checked command line (methods: train.METHODS; extra: compare.py's
    groups)."""
    return Command(args.method, options.build(data.TaskOptions, args),
               options.build(bases.BaseOptions, args),
               options.build(loop.TrainConfig, args, dtype=args.dtype),
               options.build(proxy_tuning.Config, args),
               {n: options.build(m.Config, args) for n, m in methods.items()}, args.out_dir,
               args.device, args.dtype, frozenset(args.given), args.load,
               {title: options.build(cls, args) for title, cls in extra})


def running(args):
    """The methods this command line runs: --method, or compare.py's --methods (None: all)."""
    if getattr(args, "prompt_grid", False):
        return {"prompt"}
    if args.method != "all":
        return {args.method}
    return None if args.methods == "all" else set(args.methods.split(","))


def check_used(args, given, groups):
    """Refuse, in one line, the options given that this run would not use."""
    if args.load and args.method == "all":  # compare.py
        raise ValueError("--load evaluates one run: python train.py --load out/runs/.../ckpt.pt")
    if generate.asked(args):  # train.py --generate: what it uses is kit/generate.py's to say
        return generate.check_used(args, given)
    options.refuse(given, generate.FIELDS, "generation's: give --generate (or --generate-file)")
    if args.load:
        return options.refuse(given, given - {"load", "device", "dtype"},
                              "--load evaluates a run on its own base and task: leave them out")
    given = given - {"method", "device", "dtype", "out_dir"}
    m, runs = args.method, running(args)
    fields = {title: {f.name for f in options.cli_fields(cls)} for title, cls in groups}
    own_base = fields["base model"] - {"base", "block_size"}
    if m == "pretrain":
        pretraining = own_base | {"block_size", "people"}
        options.refuse(given, set().union(*fields.values()) - pretraining,
                       "--method pretrain trains a base: leave them out")
        options.refuse(given, {"base"},
                       "--method pretrain trains a base of our own; a --base has been trained")
    for title, cls in groups:
        name = title.split()[1] if title.startswith("--method ") else None
        if name and runs is not None and name not in runs:
            options.refuse(given, fields[title],
                           f"{name}'s options: {describe(args)} does not use them")
        elif name:  # a method that runs: the options its own configuration leaves unused
            options.refuse(given, options.build(cls, args).unused(),
                           f"{name} does not use it with these options")
    if not args.classifier:
        options.refuse(given, {"classifier_lr"}, "the classification layer's: add --classifier")
    if args.classifier and m in ("proxy", "pretrain"):
        options.refuse(given, {"classifier"}, f"--method {m} trains no classification layer")
    if runs == {"none"}:  # train.py's --method none, or compare.py's --methods none
        options.refuse(given, {"lr"}, f"{describe(args)} trains nothing of its own (a "
                                      f"classification layer has --classifier-lr)")
        if not args.classifier:
            options.refuse(given, {"steps", "eval_every", "grad_accum", "seeds"},
                           f"{describe(args)} trains nothing (add --classifier for a linear "
                           f"probe)")
    if args.tokenizer:
        options.refuse(given, {"vocab_size"}, "our BPE's size: --tokenizer names another tokenizer")
    small_is_ours = (runs is None or "proxy" in runs) and not args.small_base
    if args.base:  # a released base: its size, tokenizer and training are its own
        ours = own_base - ({"data", "pretrain_steps", "pretrain_seed", "pretrain_batch_size"}
                           if small_is_ours else set())
        options.refuse(given, ours,
                       f"for bases pretrained here; --base {args.base} is a released model")
    if args.small_base and not args.base:
        options.refuse(given, {"small_base"},
                       "proxy tuning's small model beside a released --base: give --base too")
    if args.small_base:
        options.refuse(given, {"small_size", "small_layers"},
                       "--small-base is the small model already")
    if args.small_layers:
        if not args.base:
            options.refuse(given, {"small_layers"}, "it cuts a released --base: give --base too")
        options.refuse(given, {"small_size"}, "--small-layers is the small model already")
        if not args.data:
            raise ValueError("--small-layers heals the cut blocks on a text of yours: "
                             "give --data (e.g. tasks/english.txt)")
    world_task = args.task in ("qa", "sentiment")
    world_corpus = not args.data and (not args.base or small_is_ours)
    if not world_task and not world_corpus:
        options.refuse(given, {"people"},
                       "the generated world's: neither the task nor the corpus is it")


def describe(args):
    if getattr(args, "prompt_grid", False):
        return "--prompt-grid"
    return f"--method {args.method}" if args.method != "all" else f"--methods {args.methods}"
