"""
The experiments behind `python train.py --method all` and `--method proxy`: every method on one base and one task,
measured side by side, in tables (printed and saved as results.md/results.json) and, with matplotlib, in pictures.

    python train.py --method all --task sentiment     # none, full, every method of train.METHODS, then proxy tuning
    python train.py --method proxy --alpha 1          # proxy tuning alone, beside its large and small models
    python compare.py --prompt-grid                   # prompt length x initialisation (Lester et al. section 3.2)

What the tables hold, per method: the test metric (and, for classification, what always answering the commonest
label scores); the same questions worded as fine-tuning never showed them (generalization); forgetting, as the loss
on held-out text of the base's own pretraining kind and (qa) the probe of facts asked in pretraining's words, each
before (the frozen base, row `none`) and after; and the cost: trainable parameters, time, memory, checkpoint size.
Finished runs are reused: a run with the same options, data, base and code is read back, not trained again.
"""
import argparse
import json
import os
import sys
import time

import checkpoints
import options
import proxy_tuning
import train
from evaluate import evaluate
from model import SMALLER

PROXY_WHERE = "output: logits of a small tuned model"
EXPERT_LR = 1e-3  # the small expert's full fine-tuning: a small, briefly pretrained model wants a larger step


def bases(args):
    """(large base, small base or None): --size and --small-size, or --base and --small-base."""
    large = checkpoints.chosen_base(args)
    if args.base:
        return large, checkpoints.folder_base(args.small_base, args.block_size) if args.small_base else None
    small = args.small_size or SMALLER.get(args.size)
    return large, checkpoints.own_base(args, small) if small else None


def run_proxy(args, rows=None):
    """Large base alone, small expert alone, proxy-tuned large, and (if trained) the large model fully fine-tuned.
    The large base is the one every other method tunes; the small one becomes the expert (fully fine-tuned) and,
    as it is, the anti-expert."""
    large, small = bases(args)
    enc = checkpoints.load_tokenizer(large.tokenizer, args)
    if checkpoints.load_tokenizer(small.tokenizer, args).n_vocab != enc.n_vocab:
        raise ValueError(f"proxy tuning needs one vocabulary: {small.path} and {large.path} differ")
    expert_args = argparse.Namespace(**{**vars(args), "lr": EXPERT_LR if args.lr is None else args.lr, "head": False})
    expert_m = train.run(expert_args, "full", small, enc, reuse=True)
    expert, _, _, _ = train.load_run(os.path.join(expert_m["run_dir"], "ckpt.pt"), args.device)
    anti, big = train.load_model(small, args.device), train.load_model(large, args.device)
    task, *_ = train.plan(argparse.Namespace(**{**vars(args), "head": False}), "none", large, enc)
    t0 = time.time()
    alone, _ = evaluate(big, task, args.device, args.dtype)
    t_base = time.time() - t0
    t0 = time.time()
    scores, preds = evaluate(big, task, args.device, args.dtype,
                             logits_fn=lambda idx: proxy_tuning.proxy_logits(big, expert, anti, idx, args.alpha),
                             generate_fn=lambda idx, n: proxy_tuning.generate(big, expert, anti, idx, n, args.alpha,
                                                                              temperature=0, stop=task.eot))
    t_proxy = time.time() - t0
    full = train.plan(argparse.Namespace(**{**vars(args), "head": False}), "full", large, enc)[-1]
    tuned = read_metrics(full)["test"] if os.path.exists(os.path.join(full, "metrics.json")) else None
    gap = (scores["test"] - alone["test"]) / (tuned - alone["test"]) if tuned not in (None, alone["test"]) else None
    log_proxy(args, task, large, small, alone, expert_m, scores, tuned, gap, t_proxy / t_base, preds)
    metrics = dict(expert_m, method="proxy", where=PROXY_WHERE, base=large.name, small_base=small.name, **scores,
                   large_base=alone["test"], small_expert=expert_m["test"], large_full=tuned, gap_closed=gap,
                   alpha=args.alpha, pct_of_base=100 * expert_m["trainable_params"] / big.num_params(),
                   eval_time_ratio=t_proxy / t_base, majority=task.majority())
    key = dict(expert_m["options"], method="proxy", large=large.name, alpha=args.alpha)
    checkpoints.save_file(metrics, os.path.join(args.out_dir, "runs", f"{os.path.basename(args.task)}-{large.name}-"
                                                f"proxy-{checkpoints.digest(key)}", "metrics.json"))
    return metrics


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


def log_proxy(args, task, large, small, alone, expert_m, scores, tuned, gap, slowdown, preds):
    train.log(f"\nproxy tuning on {task.name} (alpha {args.alpha}), test {task.metric}:")
    not_yet = f"not trained yet (python train.py --method full --task {args.task}, same options)"
    rows = [(f"large base alone ({large.name})", alone["test"]), (f"small expert alone ({small.name})",
             expert_m["test"]), ("proxy-tuned large", scores["test"]), ("large fully fine-tuned", tuned)]
    for label, v in rows + ([("share of the gap closed", gap)] if gap is not None else []):
        train.log(f"  {label + ':':32}" + (f"{v:.4f}" if v is not None else not_yet))
    train.log(f"  evaluation time, proxy / large base alone: {slowdown:.2f}x")
    for ex, p in list(zip(task.test, preds))[:3]:
        train.log(f"  {ex.prompt[-60:]!r} -> {p!r} (gold {ex.completion!r})")


def run_all(args):
    """Every method of train.METHODS on the same base and task, then proxy tuning; two tables and two pictures."""
    large, small = bases(args)
    enc = checkpoints.load_tokenizer(large.tokenizer, args)
    task = options.load_task(args)
    for method in train.METHODS:  # every method's options are checked before the first one trains
        train.METHODS[method].options(args, enc, task)
    rows = [train.run(args, method, large, enc, reuse=True) for method in train.METHODS]
    if small:
        rows.append(run_proxy(args))
    else:
        train.log(f"proxy tuning left out: it needs a model smaller than {large.name} "
                  f"({'--small-base' if args.base else '--small-size'})")
    out = os.path.join(args.out_dir, f"all-{os.path.basename(args.task)}-{large.name}{'-head' if args.head else ''}-"
                                     f"{args.steps}steps-seed{args.seed}")
    text = "\n".join(tables(rows, args.device)) + "\n"
    checkpoints.save_file(rows, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    train.log("\n" + text + f"\nwritten to {out}/results.md and results.json")
    pictures(rows, out)
    return rows


def tables(rows, device):
    """Markdown: what each method scores (and kept of the base), then what it costs."""
    none = next((r for r in rows if r["method"] == "none"), {})
    first = rows[0]
    majority = f" (commonest label: {first['majority']:.4f})" if first.get("majority") is not None else ""
    fmt = lambda v, f="{:.4f}": "n/a" if v is None else f.format(v)
    yield (f"| method | test {first['metric']}{majority} | val | reworded test (ood) | held-out text loss "
           f"(before {fmt(none.get('heldout_loss'))}) | probe (before {fmt(none.get('probe'))}) |")
    yield "|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['method']}{' + head' if r.get('head') else ''} | {fmt(r['test'])} | {fmt(r['val'])} | "
               f"{fmt(r['ood'])} | {fmt(r['heldout_loss'])} | {fmt(r['probe'])} |")
    mem = "CUDA peak allocated" if device.startswith("cuda") else "params + grads + AdamW state"
    yield ""
    yield f"| method | where the parameters go | trainable | % of base | train s | tokens/s | {mem} | checkpoint |"
    yield "|---|---|---|---|---|---|---|---|"
    for r in rows:
        m = r["cuda_peak_bytes"] if device.startswith("cuda") else r["state_bytes"]
        n = f"{r['trainable_params']:,}" + (f" ({r['stored_params']:,} stored)"
                                            if r["stored_params"] != r["trainable_params"] else "")
        yield (f"| {r['method']} | {r['where']} | {n} | {r['pct_of_base']:.3f} | {r['seconds']:.0f} | "
               f"{r['tokens_per_s']:,.0f} | {(m or 0) / 2**20:.2f} MiB | {r['ckpt_bytes'] / 2**10:,.0f} KiB |")


# ----------------------------------------------------------------------------------------------------------------------
# Pictures (matplotlib is optional: without it the tables above are the whole output)

def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        train.log("pictures: pip install matplotlib to get them (the tables and metrics.json have every number)")
        return None


def pictures(rows, out):
    plt = pyplot()
    if plt is None:
        return
    color = {r["method"]: f"C{i}" for i, r in enumerate(rows)}  # one color per method in both pictures
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for r in rows:
        if r["losses"]:
            smooth = [sum(r["losses"][max(0, i - 9):i + 1]) / len(r["losses"][max(0, i - 9):i + 1])
                      for i in range(len(r["losses"]))]
            name = r["method"] if r["method"] != "proxy" else f"proxy: its expert\n(full tuning of {r['small_base']})"
            ax.plot(range(1, len(smooth) + 1), smooth, color=color[r["method"]], label=name)
            if r["val_curve"]:
                ax.plot(*zip(*r["val_curve"]), "o--", color=color[r["method"]])
    ax.set(xlabel="fine-tuning step", ylabel="loss (cross-entropy per target token, nats)", yscale="log",
           title=f"{rows[0]['task']}: training loss (solid, mean of 10 steps) and validation loss (dashed)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, os.path.join(out, "loss-curves.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        if r["trainable_params"]:
            kept = f"\n({r['stored_params']:,} stored)" if r["stored_params"] != r["trainable_params"] else ""
            ax.scatter(r["trainable_params"], r["test"], s=40, color=color[r["method"]])
            ax.annotate(r["method"] + kept, (r["trainable_params"], r["test"]), textcoords="offset points",
                        xytext=(0, -14 if kept else 7), ha="center", va="top" if kept else "bottom", fontsize=9)
    none = next((r for r in rows if r["method"] == "none"), None)
    if none:
        ax.axhline(none["test"], color="gray", linestyle="--", label=f"frozen base (none): {none['test']:.2f}")
    if rows[0].get("majority") is not None:
        ax.axhline(rows[0]["majority"], color="gray", linestyle=":",
                   label=f"commonest label: {rows[0]['majority']:.2f}")
    sizes = [r["trainable_params"] for r in rows if r["trainable_params"]]
    ax.set(xscale="log", xlim=(min(sizes) / 3, max(sizes) * 3), ylim=(-0.05, 1.1), ylabel=f"test {rows[0]['metric']}",
           xlabel="trainable parameters (log scale; proxy: its small expert's)",
           title=f"{rows[0]['task']}: test score against trainable parameters")
    ax.legend(fontsize=8, loc="lower right")
    save(fig, os.path.join(out, "score-vs-params.png"))


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    train.log(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------------
# Prompt length x initialisation (Lester et al. section 3.2): `python compare.py --prompt-grid [train.py options]`

LENGTHS, INITS, SEEDS = (1, 5, 20, 100), ("random", "vocab", "text"), 3


def prompt_grid(args):
    """Every length x initialisation, over three seeds (the base stays the same): a table of means and ranges, and a
    picture. Finished runs are reused."""
    base = checkpoints.chosen_base(args)
    enc = checkpoints.load_tokenizer(base.tokenizer, args)
    text = args.prompt_text or "Answer the question about the person"
    grid = {(n, i): [train.run(argparse.Namespace(**{**vars(args), "prompt_len": n, "prompt_init": i, "seed": s,
                                                    "prompt_text": text}), "prompt", base, enc, reuse=True)["test"]
                     for s in range(args.seed, args.seed + SEEDS)] for n in LENGTHS for i in INITS}
    mean = {k: sum(v) / len(v) for k, v in grid.items()}
    lines = [f"| length | {' | '.join(INITS)} |", "|---" * (len(INITS) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{mean[n, i]:.3f} ({min(grid[n, i]):.2f}-{max(grid[n, i]):.2f})" for i in INITS)
              + " |" for n in LENGTHS]
    train.log(f"\nprompt length x initialisation, test {args.task}, mean (min-max) of seeds "
              f"{args.seed}-{args.seed + SEEDS - 1}:\n" + "\n".join(lines))
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i in INITS:
            ys = [mean[n, i] for n in LENGTHS]
            err = [[y - min(grid[n, i]) for n, y in zip(LENGTHS, ys)],
                   [max(grid[n, i]) - y for n, y in zip(LENGTHS, ys)]]
            ax.errorbar(LENGTHS, ys, yerr=err, marker="o", capsize=3, label=i if i != "text" else f"text ({text!r})")
        ax.set(xscale="log", xlabel="soft prompt length (vectors, log scale)", ylim=(-0.05, 1.05),
               ylabel=f"test exact match, {args.task}", title=f"Prompt tuning: length x initialisation "
                                                              f"(mean and range of {SEEDS} seeds)")
        ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
        ax.legend(fontsize=8, loc="lower right")
        save(fig, os.path.join(args.out_dir, f"prompt-grid-{os.path.basename(args.task)}-{base.name}.png"))
    return grid


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a != "--prompt-grid"]
    try:
        prompt_grid(options.parse(argv, train.METHODS, __doc__))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
