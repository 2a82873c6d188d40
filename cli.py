"""
The command line of train.py and compare.py. Its options come from the groups' dataclasses (a
method's Config, loop.TrainConfig, data.TaskOptions, bases.BaseOptions, proxy_tuning.Config), and
each value is checked by its dataclass. This file adds the checks across groups: an option that the
run would not use (another method's, --classifier-lr without --classifier, --world-size beside your
own files, ...) is refused with one line, before any work starts.

    args = cli.parse(sys.argv[1:], train.METHODS)       # argparse.Namespace, checked and resolved
"""
import sys

import bases
import data
import loop
import options
import proxy_tuning



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
    p = options.parser(every, choices, description, "prompt" if "prompt" in choices else choices[0])
    args = p.parse_args(argv)
    args.given = options.given(p, argv)
    for _, cls in every:  # each group checks its own fields: types and limits
        options.build(cls, args)
    args.device = options.pick_device(args.device)
    args.dtype = options.pick_dtype(args.dtype, args.device)
    check_used(args, args.given - {"method", "device", "dtype", "out_dir"}, groups(methods))
    if not args.load:
        args.out_dir = options.writable_folder(args.out_dir)
        args.size = args.size or ("large" if args.device.startswith("cuda") else "small")
        # our bases: 128; a released model: its own context, at most 1,024
        if args.block_size is None:
            args.block_size = min(1024, bases.released(args.base).block_size) if args.base else 128
    return args


def check_used(args, given, groups):
    """Refuse, in one line, the options given that this run would not use."""
    m, every = args.method, args.method == "all"
    fields = {title: {f.name for f in options.cli_fields(cls)} for title, cls in groups}
    own_base = fields["base model"] - {"base", "block_size"}
    if args.load:
        return options.refuse(given, given - {"load"},
                              "--load evaluates a run on its own base and task: leave them out")
    if m == "pretrain":
        options.refuse(given, set().union(*fields.values()) - own_base
                       - {"block_size", "batch_size", "world_size"},
                       "--method pretrain trains a base: leave them out")
        options.refuse(given, {"base"},
                       "--method pretrain trains a base of our own; a --base has been trained")
    for title, names in fields.items():
        if title.startswith("--method ") and not every and not title.startswith(f"--method {m} "):
            options.refuse(given, names,
                           f"{title.split()[1]}'s options: --method {m} does not use them")
    if not args.classifier:
        options.refuse(given, {"classifier_lr"}, "the classification layer's: add --classifier")
    if args.classifier and m in ("proxy", "pretrain"):
        options.refuse(given, {"classifier"}, f"--method {m} trains no classification layer")
    if m == "none" and not args.classifier:
        options.refuse(given, {"steps", "lr", "eval_every"},
                       "--method none trains nothing (add --classifier for a linear probe)")
    small_is_ours = m in ("proxy", "all") and not args.small_base
    if args.base:  # a released base: its size, tokenizer and training are its own
        ours = own_base - ({"data", "pretrain_steps", "pretrain_seed"} if small_is_ours else set())
        options.refuse(given, ours,
                       f"for bases pretrained here; --base {args.base} is a released model")
    if args.small_base and not args.base:
        options.refuse(given, {"small_base"},
                       "proxy tuning's small model beside a released --base: give --base too")
    if args.small_base:
        options.refuse(given, {"small_size"}, "--small-base is the small model already")
    world_task = args.task in ("qa", "sentiment")
    world_corpus = not args.data and (not args.base or small_is_ours)
    if not world_task and not world_corpus:
        options.refuse(given, {"world_size"},
                       "the generated world's: neither the task nor the corpus is it")
