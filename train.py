"""
One entry point: pretrain a small GPT, then fine-tune it by adding parameters, and measure the result.

    python train.py --method prompt               # soft prompt at the input        (prompt_tuning.py)
    python train.py --method prefix               # keys/values in every attention  (prefix_tuning.py)
    python train.py --method adapter              # bottlenecks after sublayers     (adapter.py)
    python train.py --method proxy                # a small tuned model steers a large one at the output (proxy_tuning.py)
    python train.py --method full                 # full fine-tuning: the baseline
    python train.py --method none                 # the frozen base as it is: the floor
    python train.py --method all                  # all of the above on one task, one table
    python train.py --method pretrain             # (re)train the base; method runs do it first when it is missing

A method run needs a pretrained base for the chosen data, tokenizer and size; when none is cached under
--out-dir it is pretrained first and kept. Every run writes metrics.json and ckpt.pt (only the trained tensors and
the options to rebuild them) to its own folder; `--load ckpt.pt` evaluates such a checkpoint again.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext

import torch

import adapter
import data
import prefix_tuning
import prompt_tuning
import proxy_tuning
from model import GPT, GPTConfig

WHERE = {"none": "nothing trains", "full": "every weight", "prompt": "input: soft prompt",
         "prefix": "model: attention keys/values", "adapter": "model: after each sublayer",
         "proxy": "output: logits of a small tuned model"}
# What trains decides the learning rate; each was the best of a small sweep on qa (prompt: also the paper's 0.3).
# proxy: the small expert's full fine-tuning (a small, briefly pretrained model wants a larger step than `full`'s).
LR = {"full": 1e-4, "prompt": 0.3, "prefix": 3e-3, "prefix --no-reparam": 0.1, "adapter": 3e-3, "proxy": 1e-3}
SIZES = {  # model presets; pretrain_steps fit a 2-core CPU for tiny/small, one GPU for large/xl
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, pretrain_steps=300),
    "small": dict(n_layer=4, n_head=4, n_embd=128, pretrain_steps=1500),
    "medium": dict(n_layer=6, n_head=6, n_embd=192, pretrain_steps=1500),
    "large": dict(n_layer=8, n_head=8, n_embd=384, pretrain_steps=4000),
    "xl": dict(n_layer=12, n_head=12, n_embd=768, pretrain_steps=4000),
}
SMALLER = {"small": "tiny", "medium": "small", "large": "small", "xl": "medium"}  # proxy tuning's small model


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show "(default: X)" only where there is a plain default to show
        return action.help if action.default in (None, True, False) else super()._get_help_string(action)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--method", default="prompt", choices=["pretrain", *WHERE, "all"], help="what to run")
    p.add_argument("--task", default="qa", help="qa, sentiment, or a .jsonl file of prompt/completion lines")
    p.add_argument("--data", default=None, help="a UTF-8 .txt file to pretrain on (default: the generated world)")
    p.add_argument("--world-size", type=int, default=200, help="people in the generated world")
    p.add_argument("--tokenizer", default=None, help="a named tiktoken encoding, e.g. gpt2 (default: our own BPE)")
    p.add_argument("--vocab-size", type=int, default=2048, help="most tokens of our BPE (fewer if the text runs out)")
    p.add_argument("--size", default=None, choices=SIZES, help="model preset (default: small on CPU, large on CUDA)")
    p.add_argument("--block-size", type=int, default=128, help="context length of the base (soft prompt included)")
    p.add_argument("--device", default="auto", help="auto picks cuda > mps > cpu")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="steps when a base is pretrained (default: the size preset's); a cached base is reused as is")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default by method: {LR})")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step, pretraining and fine-tuning")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same device: same numbers")
    p.add_argument("--out-dir", default="out", help="cached bases, tokenizer and runs")
    p.add_argument("--load", default=None, help="evaluate a saved ckpt.pt instead of training")
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
    return p.parse_args(argv)


DATA_ARGS = ("task", "data", "world_size", "tokenizer", "vocab_size", "block_size", "seed")  # what a checkpoint needs


def log(*a):
    print(*a, flush=True)


def pick_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this torch sees no CUDA GPU: leave out --device to pick one")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def autocast(device):  # bf16 on CUDA: faster matmuls, no loss scaling needed
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


def lr_at(step, steps, lr):  # linear warmup over 5%, then cosine down to 10%
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def digest(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def save_atomic(obj, path):  # write aside, then rename: never a half-written checkpoint
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".json"):
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------------------
# Data, tokenizer and the pretrained base

def corpus(args):
    """(pretraining text, a tag naming it): the tag keys the cached tokenizer and bases."""
    return _corpus(args.data, args.world_size)


@functools.lru_cache(maxsize=4)  # made once per run, however many paths ask for it
def _corpus(path, world_size):
    if path:
        text = data.load_text(path)
        return text, f"{os.path.splitext(os.path.basename(path))[0]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return data.pretrain_corpus(data.make_world(world_size)), f"world{world_size}"


def base_dir(args):
    _, tag = corpus(args)
    return os.path.join(args.out_dir, "base", f"{tag}-{args.tokenizer or f'bpe{args.vocab_size}'}")


def base_path(args, size):
    return os.path.join(base_dir(args), f"{size}-ctx{args.block_size}.pt")


def tokenizer(args):
    """Our BPE is trained once per corpus and saved beside the bases, so every model on that data shares it."""
    if args.tokenizer:
        return data.named_tokenizer(args.tokenizer)
    path = os.path.join(base_dir(args), "tokenizer.tiktoken")
    if not os.path.exists(path):
        os.makedirs(base_dir(args), exist_ok=True)
        data.save_tokenizer(data.train_tokenizer(corpus(args)[0], args.vocab_size), path)
    return data.load_tokenizer(path)


def pretrain(args, size, enc, device):
    cfg = GPTConfig(block_size=args.block_size, vocab_size=enc.n_vocab,
                    **{k: v for k, v in SIZES[size].items() if k != "pretrain_steps"})
    steps = args.pretrain_steps or SIZES[size]["pretrain_steps"]
    ids = torch.tensor(enc.encode(corpus(args)[0], allowed_special={data.EOT}), dtype=torch.long)
    # Your own text keeps its last 5% apart to report a validation loss. The world's corpus is trained on whole:
    # every biography is a fact the qa task asks about.
    val = ids[len(ids) * 19 // 20:] if args.data else ids[:0]
    ids = ids[:len(ids) - len(val)]
    if len(ids) <= cfg.block_size + 1:
        raise ValueError(f"the pretraining text has {len(ids)} tokens: it needs more than block_size {cfg.block_size}")
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    log(f"pretraining a {size} GPT ({model.num_params() / 1e6:.2f}M parameters) on {len(ids):,} tokens, "
        f"{steps} steps on {device}")
    decay = [p for p in model.parameters() if p.dim() >= 2]  # as nanoGPT: no decay on biases and layer norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(steps):
        ix = torch.randint(len(ids) - cfg.block_size - 1, (args.batch_size,), generator=g)
        x = torch.stack([ids[i:i + cfg.block_size] for i in ix]).to(device)
        y = torch.stack([ids[i + 1:i + 1 + cfg.block_size] for i in ix]).to(device)
        loss = train_step(model, opt, x, y, lr_at(step, steps, 2e-3), device)
        progress("pretrain", step, steps, loss, t0, x.numel())
    if len(val) > cfg.block_size + 1:
        model.eval()
        with torch.no_grad(), autocast(device):
            starts = range(0, len(val) - cfg.block_size - 1, cfg.block_size)
            losses = [model(val[i:i + cfg.block_size][None].to(device), val[i + 1:i + 1 + cfg.block_size][None]
                            .to(device))[1].item() for i in starts]
        log(f"pretrain val loss {mean(losses):.4f} on the last 5% of {args.data}")
    path = base_path(args, size)
    save_atomic(dict(config=vars(cfg), model=model.state_dict(), steps=steps), path)
    log(f"saved the pretrained base to {path}")
    return model


def load_base(args, size, enc, device):
    path = base_path(args, size)
    if not os.path.exists(path):
        log(f"no pretrained {size} base at {path}: pretraining one first (it is cached for later runs)")
        return pretrain(args, size, enc, device).eval()
    ckpt = torch.load(path, map_location=device)
    model = GPT(GPTConfig(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    if args.pretrain_steps and args.pretrain_steps != ckpt["steps"]:
        log(f"note: the cached {size} base was pretrained for {ckpt['steps']} steps; --pretrain-steps applies when a "
            f"base is trained: python train.py --method pretrain --size {size} --pretrain-steps {args.pretrain_steps}")
    if model.config.vocab_size != enc.n_vocab:
        raise ValueError(f"{path} was trained with {model.config.vocab_size} tokens, the tokenizer has {enc.n_vocab}: "
                         f"delete {base_dir(args)} to retrain both")
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# The fine-tuning task

def load_task(args, enc, block_size, extra):
    """The task's examples, tokenized and checked against the context (`extra`: soft prompt positions)."""
    if args.task.endswith(".jsonl"):
        task = data.load_jsonl_task(args.task, args.seed)
    else:
        task = data.make_task(args.task, data.make_world(args.world_size))
    return data.encode_task(task, enc, block_size, extra, args.task)


@torch.no_grad()
def evaluate(exs, task, logits_fn, generate_fn, device, batch_size=64, prefix=False):
    """Accuracy over the label words (classification) or exact match of greedy answers (generation; with prefix,
    the answer need only start with the gold text)."""
    pad = task["eot"]
    if task["choice_ids"]:  # pick the label whose tokens have the lowest total loss
        rows = [(ex["p"], c) for ex in exs for c in task["choice_ids"]]
        nll = []
        for i in range(0, len(rows), batch_size):
            idx, tgt = data.collate(rows[i:i + batch_size], device, pad)
            logp = torch.log_softmax(logits_fn(idx).float(), dim=-1)
            tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt >= 0)
            nll += (-tok.sum(1)).tolist()
        k = len(task["choice_ids"])
        preds = [task["choices"][min(range(k), key=lambda j: nll[i * k + j])] for i in range(len(exs))]
    else:  # batches of prompts of equal length need no padding; stop at EOT
        preds, by_len = [None] * len(exs), {}
        for i, ex in enumerate(exs):
            by_len.setdefault(len(ex["p"]), []).append(i)
        new = max(len(ex["c"]) for ex in exs)
        for group in by_len.values():
            for j in range(0, len(group), batch_size):
                part = group[j:j + batch_size]
                idx = torch.tensor([exs[i]["p"] for i in part], device=device)
                out = generate_fn(idx, new)[:, idx.size(1):].tolist()
                for i, seq in zip(part, out):
                    preds[i] = seq[:seq.index(pad)] if pad in seq else seq
        preds = [task["decode"](p) for p in preds]
    hits = [p.startswith(ex["completion"]) if prefix else p.strip() == ex["completion"].strip()
            for p, ex in zip(preds, exs)]
    return sum(hits) / len(exs), preds


def evaluate_model(model, exs, task, device, prefix=False):
    model.eval()
    with autocast(device):
        return evaluate(exs, task, lambda idx: model(idx)[0],
                        lambda idx, n: model.generate(idx, n, temperature=0), device, prefix=prefix)


# ----------------------------------------------------------------------------------------------------------------------
# Training

def train_step(model, opt, x, y, lr, device):
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(device):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def progress(what, step, steps, loss, t0, ntok, every=50):
    if step % every == 0 or step == steps - 1:
        dt = time.time() - t0
        log(f"{what} step {step + 1:5d}/{steps} | loss {loss:.4f} | {ntok * (step + 1) / dt:8,.0f} tok/s | "
            f"{dt / (step + 1) * (steps - step - 1):5.0f}s left")


def attach(model, method, opts):
    """Add the method's parameters at its injection point; afterwards exactly the parameters to train need grad."""
    if method == "prompt":
        prompt_tuning.attach(model, **opts)
    elif method == "prefix":
        prefix_tuning.attach(model, **opts)
    elif method == "adapter":
        adapter.attach(model, **opts)
    elif method == "none":
        model.requires_grad_(False)
    elif method != "full":  # full: every parameter keeps requires_grad
        raise ValueError(f"unknown method {method!r}")


def method_options(args, method, enc, task):
    if method == "prompt":
        text = args.prompt_text or ("".join(task["choices"]) if task["choices"] else None)
        if args.prompt_init == "text" and not text:
            raise ValueError("--prompt-init text needs --prompt-text on a task without label words")
        ids = enc.encode(text) if args.prompt_init == "text" else None
        return dict(n_tokens=args.prompt_len, init=args.prompt_init, init_ids=ids)
    if method == "prefix":
        return dict(n_prefix=args.prefix_len, reparam=args.reparam, hidden=args.prefix_hidden)
    if method == "adapter":
        return dict(bottleneck=args.bottleneck, where=args.adapter_where, train_layernorm=args.train_layernorm)
    return {}


def run_key(args, method, size, task, opts, lr, steps):
    """Everything a run's result depends on, and the folder named by its digest: equal options, same folder."""
    key = dict(method=method, size=size, task=args.task, opts=opts, lr=lr, steps=steps, seed=args.seed,
               data=digest([(ex["prompt"], ex["completion"]) for s in ("train", "val", "test") for ex in task[s]]),
               batch=args.batch_size, base=base_path(args, size),
               base_time=os.path.getmtime(base_path(args, size)))  # a retrained base makes a new key
    return key, os.path.join(args.out_dir, "runs", f"{os.path.basename(args.task)}-{size}-{method}-{digest(key)}")


@torch.no_grad()
def val_loss(model, task, device, batch_size=64):
    model.eval()
    with autocast(device):
        losses = [model(*data.collate([(ex["p"], ex["c"]) for ex in task["val"][i:i + batch_size]], device,
                                      task["eot"]))[1].item() for i in range(0, len(task["val"]), batch_size)]
    model.train()
    return mean(losses)


def finetune(args, method, size, enc, device, reuse=False):
    """Attach `method` to the `size` base, train what requires grad, test, save. Returns (metrics, model)."""
    extra = args.prompt_len if method == "prompt" else 0
    task = load_task(args, enc, args.block_size, extra)
    pad = task["eot"]
    opts = method_options(args, method, enc, task)  # before the base: bad options fail before any pretraining
    model = load_base(args, size, enc, device)
    base_params = model.num_params()
    lr = args.lr or LR.get("prefix --no-reparam" if method == "prefix" and not args.reparam else method, 0.0)
    steps = args.steps if method != "none" else 0
    key, run_dir = run_key(args, method, size, task, opts, lr, steps)
    if reuse and os.path.exists(os.path.join(run_dir, "metrics.json")):
        log(f"reusing the finished {method} run in {run_dir}")
        return json.load(open(os.path.join(run_dir, "metrics.json"))), load_run(os.path.join(run_dir, "ckpt.pt"), device)[0]
    torch.manual_seed(args.seed)
    attach(model, method, opts)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    log(f"{method} on {args.task}: {trainable:,} trainable parameters ({100 * trainable / base_params:.3f}% of the "
        f"base's {base_params:,})")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0) if params else None
    rng = random.Random(args.seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0, ntok, losses = time.time(), 0, []
    model.train()
    for step in range(steps if params else 0):
        x, y = data.collate([(ex["p"], ex["c"]) for ex in rng.choices(task["train"], k=args.batch_size)], device, pad)
        losses.append(train_step(model, opt, x, y, lr_at(step, steps, lr), device))
        ntok += x.numel()
        progress(method, step, steps, losses[-1], t0, x.numel())
        if (step + 1) % args.eval_every == 0 or step == steps - 1:
            log(f"{method} step {step + 1:5d} | val loss {val_loss(model, task, device):.4f}")
    seconds = time.time() - t0
    stored = trainable
    if method == "prefix" and opts["reparam"]:  # keep the MLP's output only; the test metric is of the merged prefix
        prefix_tuning.merge(model)
        opts, stored = dict(opts, reparam=False), prefix_tuning.stored_params(model)
        log(f"merged the prefix: {trainable:,} parameters while training -> {stored:,} stored "
            f"(n_layer x 2 x P x n_embd)")
    metric, preds = evaluate_model(model, task["test"], task, device)
    val_metric, _ = evaluate_model(model, task["val"], task, device)  # for choosing options without the test split
    probe = None
    if method == "none" and "probe" in task:  # what the base knows, asked the way it read it: the ceiling for qa
        probe, _ = evaluate_model(model, task["probe"], task, device, prefix=True)
        log(f"the frozen base completes {probe:.4f} of the test facts asked in its pretraining's words "
            f"({task['probe'][0]['prompt']!r} -> {task['probe'][0]['completion']!r})")
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    ckpt = dict(method=method, opts=opts, size=size, base=base_path(args, size),
                args={k: getattr(args, k) for k in DATA_ARGS}, trainable=state)
    save_atomic(ckpt, os.path.join(run_dir, "ckpt.pt"))
    metrics = dict(method=method, where=WHERE[method], task=args.task, size=size,
                   metric="accuracy" if task["choices"] else "exact_match", test=metric, n_test=len(task["test"]),
                   val=val_metric, probe=probe,
                   trainable_params=trainable, stored_params=stored, base_params=base_params,
                   pct_of_base=100 * trainable / base_params, seconds=seconds,
                   loss_start=mean(losses[:10]), loss_end=mean(losses[-10:]), tokens_per_s=ntok / max(seconds, 1e-9),
                   state_bytes=4 * sum(p.numel() * p.element_size() for p in params),  # param + grad + 2 Adam moments
                   cuda_peak_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                   ckpt_bytes=os.path.getsize(os.path.join(run_dir, "ckpt.pt")), device=device, options=key,
                   run_dir=run_dir)
    save_atomic(metrics, os.path.join(run_dir, "metrics.json"))
    for ex, p in list(zip(task["test"], preds))[:3]:
        log(f"  {ex['prompt']!r} -> {p!r} (gold {ex['completion']!r})")
    log(f"{method}: test {metrics['metric']} {metric:.4f} on {len(task['test'])} examples | {trainable:,} trainable "
        f"| {seconds:.0f}s | saved {run_dir}")
    return metrics, model


def load_run(path, device):
    """Rebuild base + method from a ckpt.pt: (model, ckpt)."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} not found: train one first (it is written as runs/.../ckpt.pt)")
    ckpt = torch.load(path, map_location=device)
    if not os.path.exists(ckpt["base"]):
        raise ValueError(f"{path} needs its base {ckpt['base']}, which is missing: pretrain it with the same options")
    base = torch.load(ckpt["base"], map_location=device)
    model = GPT(GPTConfig(**base["config"])).to(device)
    model.load_state_dict(base["model"])
    attach(model, ckpt["method"], ckpt["opts"])
    unexpected = model.load_state_dict(ckpt["trainable"], strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} holds tensors the rebuilt {ckpt['method']} model lacks: {unexpected[:3]}")
    return model.eval(), ckpt


# ----------------------------------------------------------------------------------------------------------------------
# Proxy tuning, the comparison of all methods, and the command line

def proxy_sizes(args):
    if not (args.small_size or SMALLER.get(args.size)):
        raise ValueError(f"proxy tuning needs a model smaller than the {args.size} base: use --size small or larger, "
                         f"or name one with --small-size")
    return args.size, args.small_size or SMALLER[args.size]


def run_proxy(args, enc, device):
    """Large base alone, small expert alone, proxy-tuned large, and (if trained) the large model fully fine-tuned.
    The large base is --size (the one every other method tunes); the small one is --small-size."""
    large, small = proxy_sizes(args)
    task = load_task(args, enc, args.block_size, 0)
    expert_args = argparse.Namespace(**{**vars(args), "lr": args.lr or LR["proxy"]})
    expert_m, expert = finetune(expert_args, "full", small, enc, device, reuse=True)  # M+: M- fully fine-tuned
    anti, big = load_base(args, small, enc, device), load_base(args, large, enc, device)
    exs = task["test"]
    t0 = time.time()
    base_metric, _ = evaluate_model(big, exs, task, device)
    t_base = time.time() - t0

    def proxy_eval(exs):
        with autocast(device):
            return evaluate(exs, task, lambda idx: proxy_tuning.proxy_logits(big, expert, anti, idx, args.alpha),
                            lambda idx, n: proxy_tuning.generate(big, expert, anti, idx, n, args.alpha, temperature=0),
                            device)
    t0 = time.time()
    proxy_metric, preds = proxy_eval(exs)
    t_proxy = time.time() - t0
    proxy_val, _ = proxy_eval(task["val"])
    tuned = None  # the large model fully fine-tuned, if `--method full` ran on it with these options
    full_dir = run_key(args, "full", large, task, {}, args.lr or LR["full"], args.steps)[1]
    if os.path.exists(os.path.join(full_dir, "metrics.json")):
        tuned = json.load(open(os.path.join(full_dir, "metrics.json")))["test"]
    gap = (proxy_metric - base_metric) / (tuned - base_metric) if tuned is not None and tuned != base_metric else None
    name = "accuracy" if task["choices"] else "exact_match"
    log(f"\nproxy tuning on {args.task} (alpha {args.alpha}), test {name}:")
    not_yet = f"not trained yet (python train.py --method full --size {large} --task {args.task})"
    for label, v in [(f"large base alone ({large})", base_metric), (f"small expert alone ({small})", expert_m["test"]),
                     ("proxy-tuned large", proxy_metric), ("large fully fine-tuned", tuned)] + (
                     [("share of the gap closed", gap)] if gap is not None else []):
        log(f"  {label + ':':32}" + (f"{v:.4f}" if v is not None else not_yet))
    log(f"  evaluation time, proxy / large base alone: {t_proxy / t_base:.2f}x")
    for ex, p in list(zip(exs, preds))[:3]:
        log(f"  {ex['prompt']!r} -> {p!r} (gold {ex['completion']!r})")
    metrics = dict(expert_m, method="proxy", where=WHERE["proxy"], size=large, small_size=small, test=proxy_metric,
                   val=proxy_val,
                   large_base=base_metric, small_expert=expert_m["test"], large_full=tuned, gap_closed=gap,
                   alpha=args.alpha, pct_of_base=100 * expert_m["trainable_params"] / big.num_params(),
                   eval_time_ratio=t_proxy / t_base)
    key = dict(expert_m["options"], method="proxy", large=large, alpha=args.alpha)
    save_atomic(metrics, os.path.join(args.out_dir, "runs", f"{os.path.basename(args.task)}-{large}-proxy-"
                                      f"{digest(key)}", "metrics.json"))
    return metrics


def evaluate_checkpoint(args, device):
    """--load: rebuild a run from its ckpt.pt and test it on the task and data it was trained on."""
    model, ckpt = load_run(args.load, device)
    vars(args).update(ckpt["args"], out_dir=os.path.dirname(os.path.dirname(os.path.dirname(ckpt["base"]))))
    enc = tokenizer(args)
    task = load_task(args, enc, model.config.block_size, ckpt["opts"].get("n_tokens", 0))
    metric, _ = evaluate_model(model, task["test"], task, device)
    log(f"{ckpt['method']} from {args.load}: test {metric:.4f} on {len(task['test'])} examples")
    return metric


def run_all(args, enc, device):
    proxy_sizes(args)  # fail now, not after five runs
    rows = [finetune(args, m, args.size, enc, device, reuse=True)[0] for m in ("none", "full", "prompt", "prefix", "adapter")]
    rows.append(run_proxy(args, enc, device))
    mem = "CUDA peak allocated" if device == "cuda" else "params + grads + AdamW state"
    lines = [f"| method | where the parameters go | trainable | % of base | test {rows[0]['metric']} | train s | "
             f"tokens/s | training memory ({mem}) | checkpoint |", "|" + "---|" * 9]
    for r in rows:
        m = r["cuda_peak_bytes"] if device == "cuda" else r["state_bytes"]
        n = f"{r['trainable_params']:,}" + (f" ({r['stored_params']:,} stored)" if r["stored_params"] != r[
            "trainable_params"] else "")
        lines.append(f"| {r['method']} | {r['where']} | {n} | {r['pct_of_base']:.3f} | "
                     f"{r['test']:.4f} | {r['seconds']:.0f} | {r['tokens_per_s']:,.0f} | {(m or 0) / 2**20:.2f} MiB | "
                     f"{r['ckpt_bytes'] / 2**10:,.0f} KiB |")
    out = os.path.join(args.out_dir, f"all-{os.path.basename(args.task)}-{args.size}-{args.steps}steps-seed{args.seed}")
    save_atomic(rows, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n" + "\n".join(lines) + f"\n\nwritten to {out}/results.md and results.json")
    return rows


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    args.size = args.size or ("large" if device == "cuda" else "small")
    try:
        if args.load:
            return evaluate_checkpoint(args, device)
        enc = tokenizer(args)
        if args.method == "pretrain":
            return pretrain(args, args.size, enc, device)
        if args.method == "proxy":
            return run_proxy(args, enc, device)
        if args.method == "all":
            return run_all(args, enc, device)
        return finetune(args, args.method, args.size, enc, device)[0]
    except ValueError as e:  # our errors say what to do; a traceback would bury that
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
