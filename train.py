"""
One run: pretrain a GPT (or load a released one), fine-tune it by adding parameters, measure it.

    python train.py --method prompt     # soft prompt at the input          (prompt_tuning.py)
    python train.py --method prefix     # keys/values in every attention    (prefix_tuning.py)
    python train.py --method adapter    # bottlenecks after sublayers       (adapter.py)
    python train.py --method proxy      # a small tuned model steers a large one (proxy_tuning.py)
    python train.py --method full       # full fine-tuning: the baseline
    python train.py --method none       # the frozen base as it is: the floor
    python train.py --method pretrain   # a base of our own (the default one ships in base/)
    python train.py --base SmolLM2-135M-Instruct.Q4_1.gguf --method adapter --task sentiment
    python compare.py                   # every method on one task, in one table

Every run writes metrics.json and ckpt.pt (only the trained tensors, the options that rebuild them,
and what the score depends on) to a folder of its own; `--load ckpt.pt` evaluates it again, and
`--generate "text"` writes with it (kit/generate.py). The loop (finetune, pretrain): kit/loop.py.
Reading order: METHODS; main() at the bottom -> run_command() -> run() (plan, the base, finetune,
save); load_run (--load); proxy tuning's run.
"""
import dataclasses
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import adapter
import prefix_tuning
import prompt_tuning
import proxy_tuning
from model import GPT, SMALLER
from kit import bases, checkpoints, data, disk, generate, loop, options, task_files, tokenizer
from kit import distributed, proxy_eval
from kit.classifier import Classifier
from kit.evaluate import evaluate, with_interval
from kit.options import Options


# --------------------------------------------------------------------------------------------------
# The methods, one line each. A method is a file with a Config (its options, its default lr, where
# its parameters go), attach(model, cfg, task) that freezes the model, adds the parameters and
# returns what trains, and, if something happens after training, finish(model, cfg). Full
# fine-tuning and the frozen model add nothing, so they are two small classes here. Proxy tuning is
# not a row: see proxy_tuning.py for why.

class Full:
    """--method full, the baseline every method is measured against: every weight trains."""

    @dataclass
    class Config(Options):
        where = "every weight"
        lr = 1e-4

    @staticmethod
    def attach(model, cfg=None, task=None):
        return model.requires_grad_(True)


class Frozen:
    """--method none, the floor: nothing trains (with --classifier, a linear probe of the frozen
    model)."""

    @dataclass
    class Config(Options):
        where = "nothing trains"
        lr = None

    @staticmethod
    def attach(model, cfg=None, task=None):
        model.requires_grad_(False)
        return nn.ModuleList()


METHODS = {
    "none": Frozen,
    "full": Full,
    "prompt": prompt_tuning,
    "prefix": prefix_tuning,
    "adapter": adapter,
}

# the command line's other groups of options, each the dataclass of the code that uses it
GROUPS = dict(task=data.TaskOptions, base=bases.BaseOptions, train=loop.TrainConfig,
              proxy=proxy_tuning.Config)


# --------------------------------------------------------------------------------------------------
# Runs: the command line's options -> plain values for finetune() -> a saved run; and --load

@dataclass
class Plan:
    """What a run will do, every part checked: checked() fills the first three, plan() the rest."""
    task: data.Task
    method_cfg: Options
    train_cfg: loop.TrainConfig
    key: dict = None     # everything the result depends on
    folder: str = None   # named by the key


def checked(cmd, name, base, enc):
    """The Plan of a run of method `name` on `base` (its task, the method's options and the loop's),
    every part checked before any work: the task, the options, and attach() itself, on a model of
    the base's shape on the meta device (no memory, no time)."""
    method, task = METHODS[name], data.load_task(cmd.task_opts)
    if "template" in cmd.given and not task.labelled:
        raise ValueError(f"--template shapes text/label lines, and {cmd.task_opts.task} has none: "
                         f"leave it out")
    if cmd.train.classifier and not task.choices:
        raise ValueError(f"--classifier trains a classification layer, and {task.name} is not a "
                         f"classification task (its answers are free text): "
                         f"leave out --classifier")
    method_cfg = cmd.configs[name]
    data.encode_task(task, enc, base.block_size, method_cfg.positions)
    length = data.heldout_length(base.block_size, method_cfg.positions)
    if cmd.task_opts.heldout:  # forgetting on a text of your own
        ids = torch.tensor(enc.encode_ordinary(task_files.load_text(cmd.task_opts.heldout)))
        task.heldout_rows = data.window_rows(ids, length)
        if not task.heldout_rows:
            raise ValueError(f"--heldout {cmd.task_opts.heldout} is {len(ids)} tokens long: it "
                             f"needs at least {length + 1} for one row of held-out text")
    with torch.device("meta"):
        shape = GPT(bases.config_of(base, enc))
        method.attach(shape, method_cfg, task)
    loop.check_memory(shape, cmd.device, f"--method {name} on {base.name}")
    lr = cmd.train.lr if cmd.train.lr is not None else method_cfg.lr
    trains = name != "none" or cmd.train.classifier
    train_cfg = dataclasses.replace(cmd.train, steps=cmd.train.steps if trains else 0, lr=lr)
    return Plan(task, method_cfg, train_cfg)


def plan(cmd, name, base, enc):
    """What a run will do (checked), with its key and the folder the key names. A missing base is
    pretrained first."""
    p = checked(cmd, name, base, enc)
    if not base.released and not os.path.exists(base.path):
        loop.log(f"no pretrained {base.name} base at {base.path}: pretraining one first "
                 f"(it is kept for later runs)")
        loop.pretrain(cmd.base_opts, base, enc, cmd.device, cmd.dtype, cmd.task_opts.people)
    # forgetting on your corpus: the 5% that pretraining held out (beside a released base, --data is
    # only the small proxy model's corpus, so that proxy tuning finds the full run of its options)
    if cmd.base_opts.data and not cmd.task_opts.heldout and not base.released:
        held = bases.corpus_split(cmd.base_opts, cmd.task_opts.people, enc, loop.log)[1]
        p.task.heldout_rows = data.window_rows(held, data.heldout_length(base.block_size,
                                                                           p.method_cfg.positions))
    p.key = dict(task=p.task.name, base=base.name, base_identity=bases.identity(base),
                 block=base.block_size, code=disk.code_digest(), method=name,
                 options=asdict(p.method_cfg), train=asdict(p.train_cfg), data=p.task.digest(),
                 heldout=disk.digest(p.task.heldout_rows), device=cmd.device.split(":")[0])
    p.folder = disk.run_dir(cmd.out_dir, p.key)
    return p


def run(cmd, name, base, enc, reuse=False):
    """One method on one base: finetune() with the options' values, then ckpt.pt and metrics.json.
    With reuse, a finished run of the very same options, data, base and code is read back
    instead."""
    p = plan(cmd, name, base, enc)  # 1. everything checked, the folder named: no work yet
    if reuse and os.path.exists(os.path.join(p.folder, "metrics.json")):
        loop.log(f"reusing the finished {name} run in {p.folder}")
        # where it is now (an out-dir that moved keeps its runs)
        return dict(checkpoints.read_metrics(p.folder, p.key), run_dir=p.folder)
    for line in p.task.describe():
        loop.log(line)
    model = bases.load(base, enc, cmd.device)  # 2. the frozen base
    # 3. attach the method, train what it added, evaluate (kit/loop.py)
    method_cfg, clf, metrics = loop.finetune(model, p.task, METHODS[name], p.method_cfg,
                                              p.train_cfg, cmd.device, name)
    # 4. save: the trained tensors alone, and what the score depends on
    trainable = {n: t.detach().cpu() for n, t in model.named_parameters() if t.requires_grad}
    ckpt = dict(format=checkpoints.FORMAT, method=name, config=asdict(method_cfg),
                trainable=trainable, train=asdict(p.train_cfg), classifier=clf and clf.state_dict(),
                classifier_labels=clf.label_ids if clf else None,
                base=bases.record(base, enc, os.path.join(p.folder, "ckpt.pt")),
                task=dict(options=asdict(cmd.task_opts),
                          data=p.key["data"]))
    metrics = distributed.on_main(checkpoints.write_run, p.folder, ckpt,  # rank 0 writes
                                  dict(metrics, base=base.name, options=p.key, run_dir=p.folder))
    loop.log(f"{name}: test {p.task.metric} {with_interval(metrics['test'], len(p.task.test))} on "
             f"{len(p.task.test)} examples, 95% interval"
        + (f" (always the commonest label: {metrics['majority']:.4f})" if p.task.choices else "")
        + f" | {metrics['trainable_params']:,} trainable | {metrics['seconds']:.0f}s | "
          f"saved {p.folder}")
    return metrics


@dataclass
class Rebuilt:
    """A saved run, rebuilt by load_run."""
    model: GPT
    classifier: Classifier   # or None
    task: data.Task
    method_cfg: Options
    ckpt: dict


def load_run(path, device):
    """Rebuild a saved run: its base, its task, the method with its tensors (+ classification
    layer), each checked to be what the run was trained with."""
    ckpt = checkpoints.read_run(path)
    base = bases.find(ckpt["base"], path)
    enc = bases.tokenizer_of(base)
    if tokenizer.identity(enc) != ckpt["base"]["tokenizer"]:
        raise ValueError(f"{path}: the base's tokenizer ({base.tokenizer}) changed since the run "
                         f"was trained")
    if ckpt["method"] not in METHODS:
        raise ValueError(f"{path} is a run of method {ckpt['method']!r}, "
                         f"which train.METHODS no longer has")
    method = METHODS[ckpt["method"]]
    method_cfg = checkpoints.recorded(method.Config, ckpt["config"], f"{ckpt['method']}'s", path)
    task_opts = checkpoints.recorded(data.TaskOptions, data.saved_options(ckpt), "the task's", path)
    task = data.load_task(task_opts)
    data.encode_task(task, enc, base.block_size, method_cfg.positions)
    if task.digest() != ckpt["task"]["data"]:
        raise ValueError(f"{path}: the task's data ({task.name}) changed since the run was trained")
    model = bases.load(base, enc, device)
    method.attach(model, method_cfg, task)
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(ckpt["trainable"]) != wanted:
        extra, lacking = (sorted(set(ckpt["trainable"]) - wanted),
                          sorted(wanted - set(ckpt["trainable"])))
        raise ValueError(f"{path} does not hold exactly the tensors {ckpt['method']} trains: "
                         f"{'extra ' + str(extra[:3]) if extra else ''} "
                         f"{'lacking ' + str(lacking[:3]) if lacking else ''}")
    try:
        model.load_state_dict(ckpt["trainable"], strict=False)
        clf = None
        if ckpt["classifier"] is not None:
            clf = Classifier(model, ckpt["classifier_labels"])
            clf.load_state_dict(ckpt["classifier"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its tensors don't fit the rebuilt model "
                         f"({str(e).splitlines()[0]})") from None
    return Rebuilt(model.eval(), clf, task, method_cfg, ckpt)


def evaluate_checkpoint(cmd):
    """--load: test a saved run again, on the base and the task it was trained on."""
    r = load_run(cmd.load, cmd.device)
    note = checkpoints.loaded_note(cmd.load, r.ckpt)  # its metrics.json's run; the code's
    dtype = cmd.dtype if "dtype" in cmd.given else r.ckpt["train"]["dtype"]
    scores, _ = evaluate(r.model, r.task, cmd.device, dtype, r.method_cfg.positions, r.classifier)
    loop.log(f"{r.ckpt['method']} from {cmd.load}: test {r.task.metric} "
             f"{with_interval(scores['test'], len(r.task.test))} on {len(r.task.test)} examples, 95% "
             f"interval{note}")
    return scores["test"]


def run_proxy(cmd, large, small, enc, reuse=False):
    """Proxy tuning, in its three steps: fully fine-tune the small model (the expert); score the
    large model alone; score the large model steered by expert minus anti-expert (the small model as
    it was), at each strength and through the large model's top k (kit/proxy_eval.py). Beside them:
    the best of the large model's runs tuned directly by each method, where they exist (python
    train.py --method prompt, prefix, adapter or full, same options). With reuse, the finished
    scores of this very expert are read back."""
    pcfg, plain = cmd.proxy, cmd.with_train(classifier=False)
    task = plan(plain, "none", large, enc).task  # plans (and pretrains) the large model first
    lr = (cmd.train.lr if cmd.train.lr is not None else    # a released small model: full's own
          Full.Config.lr if small.released else pcfg.lr)
    expert_m = run(plain.with_train(lr=lr), "full", small, enc, reuse=True)
    key = dict(expert=os.path.basename(expert_m["run_dir"]), large=bases.identity(large),
               alpha=pcfg.alpha, sweep=proxy_eval.SWEEP, top_ks=proxy_eval.TOP_KS)
    folder = os.path.join(cmd.out_dir, "runs",
                          f"{task.name}-{large.name}-proxy-{disk.digest(key)}")
    if reuse and os.path.exists(os.path.join(folder, "metrics.json")):
        loop.log(f"reusing the finished proxy run in {folder}")
        return dict(checkpoints.read_metrics(folder, key, False), run_dir=expert_m["run_dir"])
    if not distributed.is_main():  # decoding runs on rank 0; the others wait for its metrics
        return distributed.share(None)
    expert = load_run(os.path.join(expert_m["run_dir"], "ckpt.pt"), cmd.device).model
    anti, big = bases.load(small, enc, cmd.device), bases.load(large, enc, cmd.device)
    r = proxy_eval.score(big, expert, anti, task, cmd.device, cmd.dtype, pcfg.alpha)
    tuned = max(((name, m["test"]) for name in METHODS if name != "none"
                 for m in [tuned_directly(plain, name, large, enc)] if m),
                key=lambda t: t[1], default=None)
    alone = r["alone"]["test"]
    gap = (r["scores"]["test"] - alone) / (tuned[1] - alone) if tuned and tuned[1] != alone else None
    proxy_eval.report(r, task, (large.name, small.name), expert_m["test"], tuned)
    if gap is not None:
        loop.log(f"  share of the gap to the tuned large model closed: {gap:.4f}")
    metrics = dict(expert_m, method="proxy", where=pcfg.where, base=large.name, options=key,
                   small_base=small.name, **r["scores"], large_alone=alone,
                   small_alone=r["small"]["test"], small_expert=expert_m["test"],
                   large_tuned=tuned, gap_closed=gap, alpha=pcfg.alpha, alpha_sweep=r["sweep"],
                   **{k: r[k] for k in ("forced", "forced_agrees", "s_per_token_large",
                                        "s_per_token_proxy", "eval_time_ratio") if k in r},
                   pct_of_base=100 * expert_m["trainable_params"] / big.num_params(),
                   majority=task.majority())
    metrics["large_base"] = bases.record(large, enc, folder)  # for --generate (kit/generate.py)
    metrics["seal"] = checkpoints.seal(metrics)
    disk.save_file(metrics, os.path.join(folder, "metrics.json"))
    return distributed.share(metrics)


def tuned_directly(cmd, name, large, enc):
    """The finished run of method `name` on the large model with these options, or None (also where
    it cannot fit: full fine-tuning of a large model, say)."""
    try:
        p = plan(cmd, name, large, enc)
    except loop.TooBig:
        return None
    return checkpoints.finished(p.folder, p.key)


def proxy_bases(cmd):
    """(large model, small model or None): --base and --small-base, or ours of --size and
    --small-size, or a released --base with our small model pretrained here on its tokenizer (or,
    with --small-layers, its own first blocks)."""
    b, p, world = cmd.base_opts, cmd.proxy, cmd.task_opts.people
    large = bases.named_base(b, cmd.out_dir, world, dtype=cmd.dtype)
    if p.small_base:
        return large, bases.released_base(p.small_base, b.block_size)
    if p.small_layers:  # the large model's first blocks, healed on --data
        return large, bases.cut_base(large, p.small_layers, cmd.on_tokenizer(b.base).base_opts,
                                     cmd.out_dir, world)
    small = p.small_size or (SMALLER.get(b.size) if not b.base else "small")
    if small is None:
        return large, None
    return large, bases.our_base(cmd.on_tokenizer(b.base or b.tokenizer).base_opts, small,
                                 cmd.out_dir, world, dtype=cmd.dtype)


# --------------------------------------------------------------------------------------------------
# The command line (its options and their checks: kit/options.py)

def parse(argv=None):
    """train.py's options (and --generate's: kit/generate.py), checked, as an options.Command."""
    args = options.parse(argv, GROUPS, METHODS, __doc__ + distributed.USAGE, extra=generate.CLI,
                         generation=generate)
    return options.typed(args, GROUPS, METHODS, generate.CLI)


def main(argv=None):
    """python train.py: the options, each checked; then --generate, --load, or, as the out-dir's one
    writer, pretraining, proxy tuning or a method's run (run_command -> run)."""
    with disk.one_line_errors():
        cmd = parse(argv)
        if cmd.generating:
            return generate.main(cmd, load_run)
        if cmd.load:
            return evaluate_checkpoint(cmd)
        if "WORLD_SIZE" in os.environ:  # one of torchrun's processes (kit/distributed.py)
            with distributed.session(cmd, disk.writer(cmd.out_dir)) as cmd:
                return run_command(cmd)
        with disk.writer(cmd.out_dir):  # the out-dir's one writer: a second run is refused
            return run_command(cmd)


def run_command(cmd):
    """What the command line asks for, --load aside: pretrain, a method's run, or proxy tuning."""
    world = cmd.task_opts.people
    if cmd.method == "proxy":
        large, small = proxy_bases(cmd)
        if small is None:
            raise ValueError(f"proxy tuning needs a model smaller than the {large.name} base: "
                             f"name one with --small-size")
        enc = bases.tokenizer_of(large, cmd.base_opts, world, loop.log)
        check_proxy(cmd, large, small, enc)
        return run_proxy(cmd, large, small, enc)
    base = bases.named_base(cmd.base_opts, cmd.out_dir, world, cmd.method == "pretrain", cmd.dtype)
    enc = bases.tokenizer_of(base, cmd.base_opts, world, loop.log)
    if cmd.method != "pretrain":
        return run(cmd, cmd.method, base, enc)
    return loop.pretrain(cmd.base_opts, base, enc, cmd.device, cmd.dtype, world)


def check_proxy(cmd, large, small, enc):
    """The small model must be smaller than the large one and read text with the very same
    tokenizer."""
    large_tokenizer = cmd.base_opts.base or cmd.base_opts.tokenizer
    small_enc = bases.tokenizer_of(small, cmd.on_tokenizer(large_tokenizer).base_opts,
                                   cmd.task_opts.people, loop.log)
    if tokenizer.identity(small_enc) != tokenizer.identity(enc):
        raise ValueError(f"proxy tuning needs one vocabulary: {small.path} reads text with "
                         f"another tokenizer than {large.path}")
    params = lambda c: c.n_layer * c.n_embd ** 2
    if params(bases.config_of(small, enc)) >= params(bases.config_of(large, enc)):
        raise ValueError(f"proxy tuning's small model ({small.name}) is not smaller than its "
                         f"large one ({large.name}): give a smaller --small-size or --small-base")


if __name__ == "__main__":
    main()
