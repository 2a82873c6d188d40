"""
The loop every method trains in, and the two things it trains: a method's new parameters (finetune)
and a base of our own (pretrain). train.py is the command line around them; a notebook can call them
directly:

    import adapter
    from kit import loop
    train_cfg = loop.TrainConfig(steps=300)
    method_cfg, layer, metrics = loop.finetune(model, task, adapter, adapter.Config(), train_cfg,
                                               "cpu")

One step, in train_loop: the next batch (idx, targets), loss_of() (the LM head's cross-entropy on
the answer tokens, or a classification layer's on the label), backward, clipping, an AdamW step on
the parameters that require grad: since attach() leaves exactly the new parameters requiring grad,
the same loop trains every method, full fine-tuning and the base's own pretraining.
"""
import contextlib
import functools
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import GPT
from kit import bases, data, disk, distributed, options, tokenizer
from kit.classifier import Classifier
from kit.evaluate import evaluate, text_loss
from kit.options import Options, autocast, option


# --------------------------------------------------------------------------------------------------
# The loop: the same for every method, since attach() leaves exactly the new parameters
# requiring grad

@dataclass
class TrainConfig(Options):
    steps: int = option(300, "fine-tuning steps", least=0, most=10 ** 7)
    lr: float = option(None, "learning rate (default: the method's own, its Config.lr)", above=0)
    batch_size: int = option(32, "sequences per fine-tuning step (under torchrun: of all the "
                                 "processes together, each taking its share)", least=1,
                             most=1 << 16)
    grad_accum: int = option(1, "micro-batches per step (gradient accumulation): the same step "
                                "as the whole batch, in less memory", least=1, most=1 << 16)
    eval_every: int = option(100, "steps between validation losses", least=1)
    seed: int = option(1337, "same seed, same device: same numbers", least=0, most=2 ** 32 - 1)
    classifier: bool = option(False, "classification: train a classification layer with the method")
    classifier_lr: float = option(1e-3, "learning rate of the classification layer", above=0)
    warmup: float = option(0.05, "share of the steps with a linear warmup", least=0, most=1,
                           cli=False)
    min_lr: float = option(0.1, "the cosine decays to this share of lr", least=0, most=1, cli=False)
    betas: tuple = field(default=(0.9, 0.99))  # AdamW's
    weight_decay: float = option(0.0, "on 2-D weights (pretraining)", least=0, cli=False)
    clip: float = option(1.0, "gradient-norm clipping", above=0, cli=False)
    dtype: str = option("float32", "bfloat16: matmuls under autocast",
                        choices=("float32", "bfloat16"), cli=False)

    def __post_init__(self):
        super().__post_init__()
        options.check_batch(self.batch_size, self.grad_accum)


# the base's own training (nanoGPT's small)
PRETRAIN = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
HEAL = dict(PRETRAIN, lr=3e-4)  # blocks cut from a trained model: a gentler step keeps what they know


class Diverged(ValueError):
    """The loss became NaN or infinite: the run has no score."""


def train_loop(model, groups, batches, train_cfg, device, classifier=None, val_batches=None,
               name="train"):
    """AdamW on the parameter groups [{"params": [...], "lr": peak}], each on the warmup + cosine
    schedule. A step: the next batch, its loss and gradients (under torchrun: of this process's
    rows, all-reduced by DDP), clipped, one optimizer step. Returns the training losses, the (step,
    validation loss) pairs, and the tokens seen."""
    opt = torch.optim.AdamW(groups, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay)
    for group in opt.param_groups:
        group["peak_lr"] = group["lr"]
    params = [p for g in opt.param_groups for p in g["params"]]
    # everything that trains in one module, so that DDP reduces all of it (a classification
    # layer lives outside the model, and with it an untied LM head trains but gets no gradient)
    head = model.lm_head.weight
    unused = (classifier is not None and head.requires_grad
              and head is not model.transformer.wte.weight)
    objective = functools.partial(loss_of, model, classifier)  # (idx, targets) -> the loss
    ddp = dist.is_initialized()  # one of torchrun's processes (kit/distributed.py)
    if ddp:  # the same loss as a module, for DDP to wrap
        objective = distributed.wrap(Objective(model, classifier), device, unused)
    losses, curve, ntok, t0 = [], [], 0, time.time()
    model.train()
    for step in range(train_cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train_cfg, group["peak_lr"])
        idx, targets = next(batches)  # the whole batch: the same on every process
        loss = accumulate(objective, idx, targets, train_cfg, device)
        norm = torch.nn.utils.clip_grad_norm_(params, train_cfg.clip)
        if not (math.isfinite(loss.item()) and math.isfinite(norm.item())):
            raise Diverged(f"{name} diverged at step {step + 1}: the loss is {loss.item()} "
                           f"(learning rate {opt.param_groups[0]['lr']:.3g}); nothing was saved: "
                           f"lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ntok += idx.numel()
        if step == 0 and ddp:  # what DDP sent: the trained parameters' gradients
            log(f"{name}: {distributed.world_size()} processes; DDP all-reduced "
                f"{objective.reduced.floats:,} gradient floats in step 1 (the trained "
                f"parameters: {sum(p.numel() for p in params):,})")
        if step % 50 == 0 or step == train_cfg.steps - 1:
            dt = time.time() - t0
            log(f"{name} step {step + 1:5d}/{train_cfg.steps} | loss {losses[-1]:.4f} | "
                f"{ntok / dt:8,.0f} tok/s | "
                f"{dt / (step + 1) * (train_cfg.steps - step - 1):5.0f}s left")
        if val_batches and ((step + 1) % train_cfg.eval_every == 0 or step == train_cfg.steps - 1):
            curve.append((step + 1, distributed.on_main(validation_loss, model, classifier,
                                                        val_batches, device, train_cfg.dtype)))
            log(f"{name} step {step + 1:5d} | val loss {curve[-1][1]:.4f}")
            model.train()
    model.eval()
    return losses, curve, ntok


class Objective(nn.Module):
    """loss_of() as a module: the model (with the method's parameters) and the classification
    layer, if any, in one place for DDP to wrap."""

    def __init__(self, model, classifier=None):
        super().__init__()
        self.model, self.classifier = model, classifier

    def forward(self, idx, targets):
        return loss_of(self.model, self.classifier, idx, targets)


def accumulate(objective, idx, targets, train_cfg, device):
    """The gradients of one step on the batch (idx, targets), from this process's rows (all of
    them with one process) in train_cfg.grad_accum micro-batches; returns the batch's loss.

    The loss is the mean over the batch's target tokens, however the rows are split: a
    micro-batch's mean counts by its share of the batch's targets (answers differ in length, so
    equal rows hold unequal tokens), and DDP's mean over the processes is undone by x world. So
    the gradients equal one process's on the whole batch, up to float rounding; with one process
    and one micro-batch every factor is 1.0 and the step is exactly the plain one."""
    # torchrun's processes (with one, 1 without asking kit/distributed.py)
    world = distributed.world_size() if dist.is_initialized() else 1
    micro = train_cfg.grad_accum
    n = (targets >= 0).sum().item()  # every row has a target: an answer, a label, the next token
    rows, row_targets = distributed.shard(idx, targets) if world > 1 else (idx, targets)
    loss = torch.zeros((), device=device)
    for k, (x, y) in enumerate(zip(rows.chunk(micro), row_targets.chunk(micro))):
        # right padding past the last target changes nothing before it (causal attention)
        keep = int((y >= 0).any(0).nonzero()[-1]) + 1
        x, y = x[:, :keep], y[:, :keep]
        share = (y >= 0).sum().item() / n
        if world > 1:  # DDP all-reduces after the last micro-batch only (nanoGPT's way)
            objective.require_backward_grad_sync = k == micro - 1
        with autocast(device, train_cfg.dtype):
            part = objective(x, y)
        (part * (share * world)).backward()
        loss += part.detach().float() * share
    # the batch's loss, the same on every process
    return distributed.total(loss) if world > 1 else loss


def loss_of(model, classifier, idx, targets):
    """What a step minimizes: the LM head's cross-entropy on the target tokens (-1: ignored); with a
    classification layer, the layer's cross-entropy at each input's last position, whose target is
    the label."""
    if classifier is None:
        return model(idx, targets)[1]
    rows, cols = (targets >= 0).nonzero(as_tuple=True)
    scores = classifier(model.features(idx)[rows, cols])  # (B, K)
    return F.cross_entropy(scores.float(), targets[rows, cols])


def lr_at(step, train_cfg, lr):
    """The learning rate at a step: a linear warmup to lr, then a cosine down to min_lr x lr at the
    end."""
    warm = max(1, int(train_cfg.steps * train_cfg.warmup + 1e-9))
    if step < warm:
        return lr * (step + 1) / warm
    # 2 at the start, 0 at the end
    cosine = 1 + math.cos(math.pi * (step - warm) / max(1, train_cfg.steps - warm))
    return lr * (train_cfg.min_lr + (1 - train_cfg.min_lr) / 2 * cosine)


@torch.no_grad()
def validation_loss(model, classifier, val_batches, device, dtype):
    model.eval()
    with autocast(device, dtype):
        losses = [loss_of(model, classifier, idx, targets).item() for idx, targets in val_batches]
    if not all(map(math.isfinite, losses)):
        raise Diverged("the validation loss is not finite: the run diverged; nothing was saved: "
                       "lower --lr")
    return mean(losses)


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def log(*a):
    if os.environ.get("RANK", "0") == "0":  # under torchrun (which sets RANK), rank 0 alone
        print(*a, flush=True)


@contextlib.contextmanager
def peak_memory(device):
    """memory.peak: the most the process held inside `with`: CUDA's allocator peak, or on a CPU
    the resident size (libraries included), sampled every 20 ms (None where /proc is missing)."""
    memory, sampling = SimpleNamespace(peak=None), threading.Event()

    def sample():  # until the with block ends
        while True:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            memory.peak = max(memory.peak, pages * os.sysconf("SC_PAGE_SIZE"))
            if sampling.wait(0.02):
                return
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/statm"):
        memory.peak, thread = 0, threading.Thread(target=sample, daemon=True)
        thread.start()
    try:
        yield memory
    finally:
        if device.startswith("cuda"):
            memory.peak = torch.cuda.max_memory_allocated(device)
        elif memory.peak is not None:
            sampling.set()
            thread.join()


def device_memory(device):
    """Bytes of memory on `device` (the machine's RAM on a CPU), or None where unknown (mps)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    if device == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


class TooBig(ValueError):
    """A run that cannot fit the device's memory (compare.py leaves it out of `--methods all`)."""


def check_memory(model, device, what, total=None):
    """Refuse, before any work, a run whose weights and optimizer cannot fit: 4 bytes a float32
    weight, and 12 more for each trained one (its gradient and AdamW's two moments), activations
    not counted. `model` may be on the meta device (train.checked's shape)."""
    params = list(model.parameters())
    need = sum(p.numel() * (16 if p.requires_grad else 4) for p in params)
    total = device_memory(device) if total is None else total
    if total is not None and need > total:
        raise TooBig(f"{what} needs {need / 1e9:.1f} GB for its weights, gradients and AdamW "
                         f"state before any activation (16 bytes a trained weight, 4 a frozen one), "
                         f"and the {device} has {total / 1e9:.1f} GB: tune it by an adding method "
                         f"(--method prompt, prefix or adapter), or on a larger machine")


# --------------------------------------------------------------------------------------------------
# Fine-tuning with one method: plain values in, plain values out

def finetune(model, task, method, method_cfg, train_cfg, device, name=None):
    """Attach `method` (a row of train.METHODS: a method file, or full or none) with its options,
    train what requires grad (and, with train_cfg.classifier, a classification layer) on task.train
    with the loop, evaluate. Returns (the options that rebuild what is kept, the classification layer or
    None, metrics)."""
    for value, kind, what in ((model, GPT, "model"), (task, data.Task, "task"),
                              (train_cfg, TrainConfig, "train_cfg")):
        if not isinstance(value, kind):
            raise ValueError(f"finetune(): {what} must be a {kind.__name__}, got "
                             f"{type(value).__name__}")
    if not hasattr(method, "attach") or not isinstance(method_cfg, method.Config):
        raise ValueError(f"finetune(): method must be a method file (or train.Full / Frozen) and "
                         f"method_cfg its Config, got {type(method_cfg).__name__}")
    name = name or method.__name__
    data.check_inputs(model, task, "finetune()", train_cfg.classifier)
    device, base_params = options.pick_device(device), model.num_params()
    torch.manual_seed(train_cfg.seed)
    model.check_plain(name)  # a second finetune() of one model would train the first's leftovers
    trained = method.attach(model, method_cfg, task)
    params = [p for p in model.parameters() if p.requires_grad]
    if {id(p) for p in params} != {id(p) for p in trained.parameters()}:
        raise ValueError(f"{name}'s attach() returned other parameters than those left "
                         f"requiring grad")
    clf = Classifier(model, [ids[0] for ids in task.choice_ids]) if train_cfg.classifier else None
    lr = train_cfg.lr if train_cfg.lr is not None else method_cfg.lr
    groups = ([{"params": params, "lr": lr}]
              + ([{"params": list(clf.parameters()), "lr": train_cfg.classifier_lr}]
                 if clf else []))
    groups = [g for g in groups if g["params"]]
    trainable = sum(p.numel() for g in groups for p in g["params"])
    log(f"{name}{' + classifier' if clf else ''} on {task.name}: {trainable:,} trainable "
        f"parameters ({100 * trainable / base_params:.3f}% of the base's {base_params:,})")
    batches = data.batches(task, train_cfg.batch_size, train_cfg.seed, device, bool(clf))
    val_batches = [data.make_batch(task.val[i:i + 64], task, device, bool(clf))
                   for i in range(0, 512, 64) if task.val[i:i + 64]]
    t0 = time.time()
    with peak_memory(device) as memory:
        losses, curve, ntok = (
            train_loop(model, groups, batches, train_cfg, device, clf, val_batches, name)
            if groups else ([], [], 0))
    seconds = time.time() - t0
    # e.g. the prefix's merge: what is kept can be fewer numbers
    if getattr(method, "finish", None):
        method_cfg = method.finish(model, method_cfg)
    stored = (model.num_params(trainable_only=True)
              + (sum(p.numel() for p in clf.parameters()) if clf else 0))
    if stored != trainable:
        log(f"{name}: {trainable:,} parameters while training -> {stored:,} stored")
    # rank 0 evaluates, as one process would; the others get its scores
    scores, preds = distributed.on_main(evaluate, model, task, device, train_cfg.dtype,
                                        method_cfg.positions, clf)
    for ex, p in list(zip(task.test, preds))[:3]:
        log(f"  {ex.input[-60:]!r} -> {p!r} (gold {ex.answer!r})")
    run = dict(method=name, where=method_cfg.where, task=task.name, metric=task.metric,
               classifier=bool(clf), steps=train_cfg.steps, lr=lr, device=device,
               dtype=train_cfg.dtype,
               processes=distributed.world_size())
    score = dict(scores, majority=task.majority(), n_test=len(task.test), truncated=task.truncated)
    size = dict(trainable_params=trainable, stored_params=stored, base_params=base_params,
                pct_of_base=100 * trainable / base_params)
    state = sum(p.numel() * p.element_size() for g in groups for p in g["params"])
    cost = dict(seconds=seconds, tokens_per_s=ntok / max(seconds, 1e-9), peak_bytes=memory.peak,
                state_bytes=4 * state)  # what trains, its gradients, AdamW's two moments
    curves = dict(losses=losses, val_curve=curve, loss_start=mean(losses[:10]),
                  loss_end=mean(losses[-10:]))
    return method_cfg, clf, {**run, **score, **size, **cost, **curves}


# --------------------------------------------------------------------------------------------------
# Pretraining a base of our own (a method run does it first when its base is missing)

def pretrain(opts, base, enc, device="cpu", dtype="float32", people=200):
    """Train a base on the corpus with the same loop, and keep it (never replacing another): from
    scratch, or, for a base cut from a released model (base.start), healing its first blocks into a
    small model of their own. opts: bases.BaseOptions."""
    if os.path.exists(base.path):
        raise ValueError(f"a base with these options exists at {base.path}, "
                         f"and runs trained on it would no longer load if it changed: "
                         f"to pretrain another beside it, change "
                         f"--pretrain-steps, --pretrain-seed, --size or --block-size")
    options.check_batch(opts.pretrain_batch_size, name="--pretrain-batch-size")
    disk.in_the_way(base.path)  # a link or a folder where the base goes: refused before
    ids, val = bases.corpus_split(opts, people, enc, log)
    config = bases.config_of(base, enc)
    if len(ids) <= config.block_size + 1:
        raise ValueError(f"the pretraining text is {len(ids):,} tokens long once tokenized: "
                         f"it needs more than --block-size {config.block_size} + 1; "
                         f"give a longer (or more varied) text")
    torch.manual_seed(opts.pretrain_seed)
    steps, hp = bases.pretrain_steps(base, opts), HEAL if base.start else PRETRAIN
    model = (bases.first_blocks(GPT.from_pretrained(base.start, base.block_size), base.layers)
             if base.start else GPT(config)).to(device)
    rows = data.window_rows(val, config.block_size, limit=256)  # at most 256 windows, batched

    def val_loss():
        with torch.no_grad(), autocast(device, dtype):
            return text_loss(lambda idx: model(idx)[0], rows, device, enc.eot)
    what = f"the first {base.layers} blocks of {base.start}" if base.start else f"a {base.name} GPT"
    log(f"pretraining {what} ({model.num_params() / 1e6:.2f}M parameters) on {len(ids):,} "
        f"tokens, {steps} steps on {device}")
    if base.start and rows:
        log(f"val loss before healing {distributed.on_main(val_loss):.4f} on {len(rows)} windows "
            f"of {opts.data}")
    train_cfg = TrainConfig(steps=steps, batch_size=opts.pretrain_batch_size,
                            seed=opts.pretrain_seed,
                      dtype=dtype, **hp)
    params = list(model.parameters())  # weight decay on the matrices only, as nanoGPT
    groups = [{"params": [p for p in params if p.dim() >= 2], "lr": hp["lr"]},
              {"params": [p for p in params if p.dim() < 2], "lr": hp["lr"], "weight_decay": 0.0}]
    batches = data.corpus_batches(ids, config.block_size, opts.pretrain_batch_size,
                                  opts.pretrain_seed, device)
    train_loop(model, groups, batches, train_cfg, device, name="pretrain")
    if rows:
        log(f"pretrain val loss {distributed.on_main(val_loss):.4f} on {len(rows)} windows of "
            f"the last 5% of {opts.data}")
    saved = dict(config=asdict(config), model=model.state_dict(), steps=steps,
                 tokenizer=tokenizer.identity(enc))
    # rank 0 writes it; the others wait, and then read it
    if distributed.on_main(disk.save_file, saved, base.path, replace=False):
        log(f"saved the pretrained base to {base.path}")
    else:
        log(f"another run saved the base {base.path} first; using that one")


