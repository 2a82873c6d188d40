"""
One entry point: pretrain a small GPT (or load GPT-2), fine-tune it by adding parameters, and measure the result.

    python train.py --method prompt               # soft prompt at the input        (prompt_tuning.py)
    python train.py --method prefix               # keys/values in every attention  (prefix_tuning.py)
    python train.py --method adapter              # bottlenecks after sublayers     (adapter.py)
    python train.py --method proxy                # a small tuned model steers a large one at the output (proxy_tuning.py)
    python train.py --method full                 # full fine-tuning: the baseline
    python train.py --method none                 # the frozen base as it is: the floor
    python train.py --method all                  # all of the above on one task, one table (compare.py)
    python train.py --method pretrain             # train a base; method runs do it first when it is missing
    python train.py --base models/gpt2 --method adapter --task sentiment     # GPT-2's released weights as the base

A method run needs a base: with --base, a GPT-2 folder; otherwise one pretrained here for the chosen data, tokenizer
and size, cached under --out-dir. Every run writes metrics.json and ckpt.pt (only the trained tensors, the options to
rebuild them and the identity of their base) to its own folder; `--load ckpt.pt` evaluates one again.

Reading order: METHODS (one row per method), the loop train() and finetune(), pretraining, runs, the command line.
Beside it: evaluate.py (the metrics), checkpoints.py (bases and runs on disk), options.py (every option, checked),
compare.py (--method all and proxy).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import adapter
import checkpoints
import data
import options
import prefix_tuning
import prompt_tuning
import tokenizer
from evaluate import evaluate, text_loss
from head import ClassificationHead
from model import GPT, SIZES, GPTConfig, autocast


# ----------------------------------------------------------------------------------------------------------------------
# The methods: one row each. Adding one (the README's LoRA homework) takes its file, a row here, an argparse group.

@dataclass
class Method:
    where: str                                      # where its parameters go
    attach: Callable                                # attach(model, **opts): freeze the model, add the parameters
    lr: Callable = lambda opts: 3e-3                # its default learning rate, given its options
    options: Callable = lambda args, enc, task: {}  # the command line -> attach's options
    positions: Callable = lambda opts: 0            # context positions it puts in front of the tokens
    after: Callable = None                          # after training: (model, opts) -> (opts as saved, stored params)


def prompt_options(args, enc, task):
    text = args.prompt_text or ("".join(task.choices) if task.choices else None)
    if args.prompt_init == "text" and not text:
        raise ValueError("--prompt-init text needs --prompt-text on a task without label words")
    ids = enc.encode_ordinary(text) if args.prompt_init == "text" else None
    return dict(n_tokens=args.prompt_len, init=args.prompt_init, init_ids=ids)


def merge_prefix(model, opts):  # keep only the reparameterisation MLP's output (Li & Liang, section 4.3)
    if not opts["reparam"]:
        return opts, None
    prefix_tuning.merge(model)
    return dict(opts, reparam=False), prefix_tuning.stored_params(model)  # n_layer x 2 x P x n_embd


METHODS = {  # name: Method(where its parameters go, attach, default learning rate by its options, ...)
    "none": Method("nothing trains", lambda model: model.requires_grad_(False), lr=lambda o: 0.0),  # --head: a probe
    "full": Method("every weight", lambda model: model.requires_grad_(True), lr=lambda o: 1e-4),
    "prompt": Method("input: soft prompt", prompt_tuning.attach, lr=lambda o: 0.3, options=prompt_options,
                     positions=lambda o: o["n_tokens"]),
    "prefix": Method("model: attention keys/values", prefix_tuning.attach,
                     lr=lambda o: 3e-3 if o["reparam"] else 0.1, after=merge_prefix,
                     options=lambda a, enc, task: dict(n_prefix=a.prefix_len, reparam=a.reparam,
                                                       hidden=a.prefix_hidden)),
    "adapter": Method("model: after each sublayer", adapter.attach, lr=lambda o: 3e-3,
                      options=lambda a, enc, task: dict(bottleneck=a.bottleneck, where=a.adapter_where,
                                                        train_layernorm=a.train_layernorm)),
}
# Default learning rates: each the best of a small sweep on qa (prompt's 0.3 is also the paper's).


# ----------------------------------------------------------------------------------------------------------------------
# The shared loop: the same for every method, because attach() leaves exactly the new parameters requiring grad

@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 32
    eval_every: int = 100       # steps between validation losses
    warmup: float = 0.05        # share of the steps with a linear warmup, then a cosine ...
    min_lr: float = 0.1         # ... down to this share of lr
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.0   # on 2-D weights only, as nanoGPT; new parameters train without it
    clip: float = 1.0           # gradient-norm clipping
    head_lr: float = 1e-3       # the classification layer's (head.py), whatever the method's
    seed: int = 1337
    dtype: str = "float32"      # "bfloat16": matmuls under autocast (weights and optimizer state stay float32)


PRETRAIN = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)  # the base's own training (nanoGPT's small models)


def train(model, groups, next_batch, loss_fn, cfg, device, val_loss=None, name="train"):
    """AdamW on the parameter groups ([{"params": [...], "lr": ...}], lr defaulting to cfg.lr), each following the
    warmup + cosine schedule; gradients clipped. next_batch(step) -> batch, loss_fn(batch) -> loss, and every
    cfg.eval_every steps val_loss() is logged. Returns the losses, the (step, val loss) pairs and the tokens seen."""
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        group["peak_lr"] = group["lr"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, curve, t0, ntok = [], [], time.time(), 0
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, group["peak_lr"])
        batch = next_batch(step)
        with autocast(device, cfg.dtype):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ntok += batch[0].numel()
        if step % 50 == 0 or step == cfg.steps - 1:
            dt = time.time() - t0
            log(f"{name} step {step + 1:5d}/{cfg.steps} | loss {losses[-1]:.4f} | {ntok / dt:8,.0f} tok/s | "
                f"{dt / (step + 1) * (cfg.steps - step - 1):5.0f}s left")
        if val_loss and ((step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1):
            curve.append((step + 1, val_loss()))
            log(f"{name} step {step + 1:5d} | val loss {curve[-1][1]:.4f}")
            model.train()
    model.eval()
    return losses, curve, ntok


def lr_at(step, cfg, lr):  # linear warmup, then cosine down to min_lr x lr
    warm = max(1, int(cfg.steps * cfg.warmup + 1e-9))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (cfg.min_lr + (1 - cfg.min_lr) / 2 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm))))


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning one method: plain values in, plain values out

def finetune(model, task, method, opts, cfg, device, head=False):
    """Attach `method` to `model` with `opts`, train what requires grad (and a classification layer if head) on
    task.train with the shared loop, then evaluate. Returns (opts as saved, the layer or None, metrics)."""
    row, base_params = METHODS[method], model.num_params()
    torch.manual_seed(cfg.seed)
    row.attach(model, **opts)
    clf = ClassificationHead(model, [ids[0] for ids in task.choice_ids]) if head else None
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups += [{"params": list(clf.parameters()), "lr": cfg.head_lr}] if clf else []
    params = [p for g in groups for p in g["params"]]
    trainable = sum(p.numel() for p in params)
    log(f"{method}{' + head' if clf else ''} on {task.name}: {trainable:,} trainable parameters "
        f"({100 * trainable / base_params:.3f}% of the base's {base_params:,})")
    rng, t0 = random.Random(cfg.seed), time.time()
    batches = lambda step: make_batch(rng.choices(task.train, k=cfg.batch_size), task, device, clf)
    val_loss = lambda: validation_loss(model, clf, task, device, cfg.dtype)
    losses, curve, ntok = (train(model, groups, batches, lambda b: loss_of(model, clf, b), cfg, device, val_loss,
                                 method) if params else ([], [], 0))
    seconds, stored = time.time() - t0, trainable
    if row.after:  # e.g. the prefix's merge: what is kept can be fewer numbers than what trained
        opts, kept = row.after(model, opts)
        stored = trainable if kept is None else kept + sum(p.numel() for p in params[len(groups[0]["params"]):])
        log(f"{method}: {trainable:,} parameters while training -> {stored:,} stored")
    scores, preds = evaluate(model, task, device, cfg.dtype, row.positions(opts), clf)
    for ex, p in list(zip(task.test, preds))[:3]:
        log(f"  {ex.prompt[-60:]!r} -> {p!r} (gold {ex.completion!r})")
    return opts, clf, dict(
        method=method, where=row.where, task=task.name, metric=task.metric, **scores, majority=task.majority(),
        n_test=len(task.test), truncated=task.truncated, head=bool(clf), trainable_params=trainable,
        stored_params=stored, base_params=base_params, pct_of_base=100 * trainable / base_params, seconds=seconds,
        steps=cfg.steps, lr=cfg.lr, loss_start=mean(losses[:10]), loss_end=mean(losses[-10:]), losses=losses,
        val_curve=curve, tokens_per_s=ntok / max(seconds, 1e-9), device=device, dtype=cfg.dtype,
        state_bytes=4 * sum(p.numel() * p.element_size() for p in params),  # param + grad + 2 AdamW moments
        cuda_peak_bytes=torch.cuda.max_memory_allocated() if device.startswith("cuda") else None)


def make_batch(exs, task, device, clf=None):
    """Language modelling: (idx, targets) on the completions. With a classification layer: (idx, last, labels)."""
    if clf is None:
        return data.collate([(ex.prompt_ids, ex.completion_ids) for ex in exs], device, task.eot)
    idx, last = data.prompts_only(exs, device, task.eot)
    return idx, last, torch.tensor([task.choices.index(ex.completion) for ex in exs], device=device)


def loss_of(model, clf, batch):
    if clf is None:
        return model(*batch)[1]
    idx, last, labels = batch
    return torch.nn.functional.cross_entropy(clf(model.features(idx), last).float(), labels)


@torch.no_grad()
def validation_loss(model, clf, task, device, dtype, most=512, batch=64):
    """The training loss on (at most `most` of) the validation examples."""
    model.eval()
    exs = task.val[:most]
    with autocast(device, dtype):
        return mean([loss_of(model, clf, make_batch(exs[i:i + batch], task, device, clf)).item()
                     for i in range(0, len(exs), batch)])


def mean(xs):
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------------------------------------------------
# Bases: pretrained here when missing, or GPT-2's weights (checkpoints.py knows where they live and what they are)

def load_model(base, device):
    """The base model: GPT-2 weights from their folder, or our cached base, checked against its tokenizer."""
    if base.folder:
        return GPT.from_pretrained(base.path, base.block_size).to(device).eval()
    saved = checkpoints.read_file(base.path, "the cached base", "delete it to pretrain it again")
    if saved.get("tokenizer") != checkpoints.tokenizer_identity(base.tokenizer):
        raise ValueError(f"{base.path} was pretrained with another tokenizer than {base.tokenizer}: "
                         f"delete {os.path.dirname(base.path)} to train both again")
    model = GPT(GPTConfig(**saved["config"])).to(device)
    model.load_state_dict(saved["model"])
    return model.eval()


def pretrain(args, base, enc, device):
    """Train a base from scratch on the corpus with the shared loop, and cache it (never replacing another)."""
    ids, val = checkpoints.corpus_split(args, enc, log)
    shape = {k: v for k, v in SIZES[base.name].items() if k != "pretrain_steps"}
    cfg = GPTConfig(block_size=base.block_size, vocab_size=enc.n_vocab, **shape)
    steps = SIZES[base.name]["pretrain_steps"] if args.pretrain_steps is None else args.pretrain_steps
    if len(ids) <= cfg.block_size + 1:
        raise ValueError(f"the pretraining text has {len(ids)} tokens: it needs more than block_size {cfg.block_size}")
    torch.manual_seed(args.pretrain_seed)
    model = GPT(cfg).to(device)
    log(f"pretraining a {base.name} GPT ({model.num_params() / 1e6:.2f}M parameters) on {len(ids):,} tokens, "
        f"{steps} steps on {device}")
    g = torch.Generator().manual_seed(args.pretrain_seed)

    def batch(step):  # random windows of the corpus; targets are the next tokens
        ix = torch.randint(len(ids) - cfg.block_size - 1, (args.batch_size,), generator=g)
        x = torch.stack([ids[i:i + cfg.block_size] for i in ix]).to(device)
        return x, torch.stack([ids[i + 1:i + 1 + cfg.block_size] for i in ix]).to(device)
    tcfg = TrainConfig(steps=steps, batch_size=args.batch_size, seed=args.pretrain_seed, dtype=args.dtype, **PRETRAIN)
    params = list(model.parameters())  # weight decay on the matrices only, as nanoGPT
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2],
                                                                "weight_decay": 0.0}]
    train(model, groups, batch, lambda b: model(*b)[1], tcfg, device, name="pretrain")
    if len(val) > cfg.block_size + 1:  # at most 256 windows, batched
        rows = data.window_rows(val, cfg.block_size)
        with torch.no_grad(), autocast(device, args.dtype):
            loss = text_loss(lambda idx: model(idx)[0], rows, device, tokenizer.eot_id(enc))
        log(f"pretrain val loss {loss:.4f} on {len(rows)} windows of the last 5% of {args.data}")
    saved = dict(config=vars(cfg), model=model.state_dict(), steps=steps,
                 tokenizer=checkpoints.tokenizer_identity(base.tokenizer))
    if checkpoints.save_file(saved, base.path, replace=False):
        log(f"saved the pretrained base to {base.path}")
    else:
        log(f"another run saved the base {base.path} first; using that one")


# ----------------------------------------------------------------------------------------------------------------------
# Runs: the command line's options -> plain values for finetune() -> a saved run; and --load

def plan(args, method, base, enc):
    """What a run of `method` on `base` is: its tokenized task, options, loop settings, and the folder named by all
    of them (a base that is missing is pretrained first: its identity is part of the name)."""
    row, task = METHODS[method], options.load_task(args)
    opts = row.options(args, enc, task)
    data.encode_task(task, enc, base.block_size, row.positions(opts))
    if args.data:  # forgetting on your own text: the 5% that pretraining held out
        length = data.heldout_length(base.block_size, row.positions(opts))
        task.heldout_rows = data.window_rows(checkpoints.corpus_split(args, enc, log)[1], length)
    if not base.folder and not os.path.exists(base.path):
        log(f"no pretrained {base.name} base at {base.path}: pretraining one first (it is cached for later runs)")
        pretrain(args, base, enc, args.device)
    cfg = TrainConfig(steps=args.steps if method != "none" or args.head else 0, batch_size=args.batch_size,
                      lr=row.lr(opts) if args.lr is None else args.lr, eval_every=args.eval_every, seed=args.seed,
                      dtype=args.dtype, head_lr=args.head_lr)
    key = dict(task=args.task, base=base.name, base_identity=checkpoints.identity(base), block=base.block_size,
               code=checkpoints.code_digest(), method=method, opts=opts, head=args.head,
               train=vars(cfg) | dict(betas=list(cfg.betas)),
               data=checkpoints.digest([(ex.prompt_ids, ex.completion_ids) for s in ("train", "val", "test")
                                        for ex in getattr(task, s)]))  # token ids: what the model was given
    return task, opts, cfg, key, checkpoints.run_dir(args.out_dir, key)


def run(args, method, base, enc, reuse=False):
    """One method on one base: finetune() with the options' values, then ckpt.pt and metrics.json in the run's folder.
    With reuse, a finished run with the very same options is read back instead of trained again."""
    task, opts, cfg, key, folder = plan(args, method, base, enc)
    if reuse and os.path.exists(os.path.join(folder, "metrics.json")):
        log(f"reusing the finished {method} run in {folder}")
        with open(os.path.join(folder, "metrics.json")) as f:
            return json.load(f)
    for line in task.describe():
        log(line)
    model = load_model(base, args.device)
    opts, clf, metrics = finetune(model, task, method, opts, cfg, args.device, args.head)
    path = os.path.join(folder, "ckpt.pt")
    checkpoints.save_file(dict(format=2, method=method, opts=opts, base=checkpoints.base_record(base, path),
                               trainable={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                               head=clf.state_dict() if clf else None, head_labels=clf.label_ids if clf else None,
                               task=options.task_record(args)), path)
    metrics |= dict(base=base.name, ckpt_bytes=os.path.getsize(path), options=key, run_dir=folder)
    checkpoints.save_file(metrics, os.path.join(folder, "metrics.json"))
    log(f"{method}: test {task.metric} {metrics['test']:.4f} on {len(task.test)} examples"
        + (f" (always the commonest label: {metrics['majority']:.4f})" if task.choices else "")
        + f" | {metrics['trainable_params']:,} trainable | {metrics['seconds']:.0f}s | saved {folder}")
    return metrics


def load_run(path, device):
    """Rebuild base + method (+ classification layer) from a ckpt.pt: (model, head or None, checkpoint, base)."""
    ckpt, base = checkpoints.read_run(path)
    model = load_model(base, device)
    METHODS[ckpt["method"]].attach(model, **ckpt["opts"])
    unexpected = model.load_state_dict(ckpt["trainable"], strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} holds tensors the rebuilt {ckpt['method']} model lacks: {unexpected[:3]}")
    clf = None
    if ckpt["head"] is not None:
        clf = ClassificationHead(model, ckpt["head_labels"])
        clf.load_state_dict(ckpt["head"])
    return model.eval(), clf, ckpt, base


def evaluate_checkpoint(args):
    """--load: test a saved run again, on the base and the task it was trained on."""
    model, clf, ckpt, base = load_run(args.load, args.device)
    enc = checkpoints.load_tokenizer(base.tokenizer)
    saved = argparse.Namespace(**{**vars(args), **ckpt["task"], "dtype": args.dtype})
    task = options.load_task(saved)
    positions = METHODS[ckpt["method"]].positions(ckpt["opts"])
    data.encode_task(task, enc, model.config.block_size, positions)
    scores, _ = evaluate(model, task, args.device, saved.dtype, positions, clf)
    log(f"{ckpt['method']} from {args.load}: test {task.metric} {scores['test']:.4f} on {len(task.test)} examples")
    return scores["test"]


# ----------------------------------------------------------------------------------------------------------------------
# The command line (its options and their checks: options.py)

def main(argv=None):
    try:
        args = options.parse(argv, METHODS, __doc__)
        if args.load:
            return evaluate_checkpoint(args)
        options.load_task(args)  # a bad task file fails now, before any tokenizer or base is trained
        if args.method in ("proxy", "all"):
            import compare  # the experiments behind --method proxy and --method all
            return compare.run_proxy(args) if args.method == "proxy" else compare.run_all(args)
        base = checkpoints.chosen_base(args)
        enc = checkpoints.load_tokenizer(base.tokenizer, args)
        if args.method != "pretrain":
            return run(args, args.method, base, enc)
        if os.path.exists(base.path):
            raise ValueError(f"a base with these options exists at {base.path}, and runs trained on it would no longer "
                             f"load if it changed: delete it to pretrain it again, or change --pretrain-steps, "
                             f"--pretrain-seed, --size or --block-size to pretrain another beside it")
        return pretrain(args, base, enc, args.device)
    except ValueError as e:  # our errors say what to do; a traceback would bury that
        raise SystemExit(f"error: {e}")
    except OSError as e:
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was kept", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
