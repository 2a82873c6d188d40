"""
The comparison: every method on one base and one task, measured side by side, in tables (printed,
and saved as results.md and results.json) and, with matplotlib, in pictures. train.py's options all
apply.

    python compare.py --task sentiment    # none, full, every method of train.METHODS, proxy
    python compare.py --methods prompt,adapter           # some of them
    python compare.py --lrs prompt=0.1,full=3e-5         # learning rates by method
    python compare.py --seeds 2           # each at two seeds: the mean, and the spread in brackets
    python compare.py --prompt-grid       # prompt length x initialisation (Lester et al. 3.2)

What the tables hold, per method: the test metric (and, for classification, what always answering
the commonest label scores); validation; the out-of-distribution split (another wording or another
domain); forgetting, as the loss on held-out text and (qa) the probe of facts asked in pretraining's
words, each before (the frozen base, row `none`) and after; and the cost: trainable parameters,
time, tokens/s, peak memory, checkpoint size. Finished runs are reused: same options, data, base and
code, and a run is read back.
"""
import dataclasses
import io
import math
import os
from dataclasses import dataclass

import train
from kit import bases, data, disk, distributed, loop, options
from kit.evaluate import wilson
from kit.options import Options, option

LENGTHS, INITS = (1, 5, 20, 100), ("random", "vocab", "text")


@dataclass
class CompareOptions(Options):
    methods: str = option("all", "the methods to compare, separated by commas (all: every row of "
                                 "train.METHODS, then proxy tuning)")
    seeds: int = option(1, "seeds per method, from --seed on: the tables show the mean and "
                           "the range", least=1, most=10)
    lrs: str = option(None, "learning rates by method, e.g. prompt=0.1,full=3e-5 (the others: "
                            "--lr, or each method's own); proxy= is its expert's")
    prompt_grid: bool = option(False, "prompt tuning's length x initialisation grid instead "
                                      "(Lester et al.)")

    def __post_init__(self):
        super().__post_init__()
        chosen_methods(self)  # checked before the other options are checked against it


def chosen_methods(opts):
    names = [*train.METHODS, "proxy"] if opts.methods == "all" else opts.methods.split(",")
    unknown = [n for n in names if n not in (*train.METHODS, "proxy")]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; "
                         f"use {', '.join([*train.METHODS, 'proxy'])}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--methods names {twice[0]} twice: a method is one row (--seeds repeats "
                         f"it)")
    return names


def method_lrs(opts, names):
    """--lrs as {method: learning rate}, each checked."""
    lrs = {}
    for pair in (opts.lrs or "").split(",") if opts.lrs else []:
        name, _, value = pair.partition("=")
        try:
            lrs[name] = float(value)
        except ValueError:
            lrs[name] = float("nan")
        if name not in names or not (math.isfinite(lrs[name]) and lrs[name] > 0):
            raise ValueError(f"--lrs: {pair!r} is not method=learning rate for one of "
                             f"{', '.join(n for n in names if n != 'none')}")
        if name == "none":
            raise ValueError("--lrs: none trains nothing, so it has no learning rate; leave "
                             "none= out")
        if (opts.lrs + ",").count(f"{name}=") > 1:
            raise ValueError(f"--lrs gives {name} two learning rates; give one")
    return lrs


def run_all(cmd):
    """Every chosen method on the same base and task (each at every seed), then proxy tuning; then
    the tables and the pictures. Every method's options are checked before the first one trains."""
    opts = cmd.extra["comparison"]
    names = chosen_methods(opts)
    lrs = method_lrs(opts, names)
    if all(n in lrs for n in names if n != "none"):  # none's is refused by options.check_used
        options.refuse(cmd.given, {"lr"}, "--lrs gives every method run its own learning rate")
    large, small = train.proxy_bases(cmd)
    enc = bases.tokenizer_of(large, cmd.base_opts, cmd.task_opts.people, loop.log)
    seeds = [cmd.train.seed + i for i in range(opts.seeds)]
    for name in list(names):
        if name == "proxy":
            continue
        try:
            train.checked(cmd.with_train(lr=lrs.get(name, cmd.train.lr)), name, large, enc)
        except loop.TooBig as e:  # full fine-tuning of a large model, say: asked for by name, refused
            if opts.methods != "all":
                raise
            loop.log(f"{name} left out: {e}")
            names.remove(name)
    if "proxy" in names and small is None:
        if opts.methods != "all":  # asked for by name: used as given, or refused
            raise ValueError(f"proxy tuning needs a model smaller than the {large.name} base: name "
                             f"one with --small-size")
        loop.log(f"proxy tuning left out: it needs a model smaller than {large.name} "
                 "(--small-size)")
        names.remove("proxy")
    elif "proxy" in names:
        train.check_proxy(cmd, large, small, enc)
    rows = []
    for name in names:
        # the frozen model trains nothing: a seed changes none of its scores, so it runs once
        for seed in seeds[:1] if name == "none" and not cmd.train.classifier else seeds:
            seeded = cmd.with_train(seed=seed, lr=lrs.get(name, cmd.train.lr))
            try:
                rows.append(train.run_proxy(seeded, large, small, enc, reuse=True)
                            if name == "proxy" else
                            train.run(seeded, name, large, enc, reuse=True))
            except loop.Diverged as e:  # a diverged run has no score: the table says so
                loop.log(f"{name} (seed {seed}): {e}")
                rows.append(dict(method=name, diverged=str(e), seed=seed))
    if not distributed.is_main():  # every process has the rows; rank 0 alone writes the tables
        return rows
    task = rows[0].get("task", cmd.task_opts.task)
    out = os.path.join(cmd.out_dir, f"compare-{task}-{large.name}-"
                                    f"{disk.digest(cmd.record())}")
    text = "\n".join(tables(rows, cmd.device)) + "\n"
    disk.save_file(rows, os.path.join(out, "results.json"))
    disk.save_file(text.encode(), os.path.join(out, "results.md"))
    loop.log("\n" + text + f"\nwritten to {out}/results.md and results.json")
    pictures(rows, out)
    return rows


SCORES = ("test", "val", "ood", "heldout_loss", "probe", "large_alone", "small_alone",
          "small_expert")


def merged(rows):
    """One row per method: the first seed's, with each score replaced by the seeds'
    (mean, min, max), proxy tuning's sweep of alphas too."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    out = []
    spread = lambda vs: (sum(vs) / len(vs), min(vs), max(vs)) if vs else None
    for method, rs in by.items():
        ok = [r for r in rs if "diverged" not in r]
        row = dict(ok[0] if ok else rs[0], seeds=len(rs), diverged=len(rs) - len(ok))
        for k in SCORES:
            row[k] = spread([r[k] for r in ok if r.get(k) is not None])
        if ok and "alpha_sweep" in ok[0]:  # {M's scores: {alpha: {test, val}}}, each a spread
            row["alpha_sweep"] = {k: {a: {s: spread([r["alpha_sweep"][k][a][s] for r in ok
                                                     if r["alpha_sweep"][k][a].get(s) is not None])
                                          for s in ("test", "val")} for a in points}
                                  for k, points in ok[0]["alpha_sweep"].items()}
        out.append(row)
    return out


def fmt(v, f="{:.4f}", n=None):
    """A score: its mean over seeds, with n examples its 95% Wilson interval in (), and with more
    than one seed their (min-max) in []."""
    if v is None:
        return "n/a"
    mean, lo, hi = v if isinstance(v, tuple) else (v, v, v)
    text = f.format(mean) + (f" ({'-'.join(f'{x:.2f}' for x in wilson(mean, n))})" if n else "")
    return text + (f" [{lo:.3f}-{hi:.3f}]" if lo != hi else "")


def tables(rows, device):
    """Markdown: what each method scores (and kept of the base), then what it costs."""
    rows = merged(rows)
    none = next((r for r in rows if r["method"] == "none"), {})
    first = next((r for r in rows if "metric" in r), {})
    majority = (f" (commonest label: {first['majority']:.4f})" if first.get("majority") is not None
                else "")
    seeds = max(r["seeds"] for r in rows)
    n = lambda r, split: r.get(f"{split}_n", r.get("n_test") if split == "test" else None)
    yield (f"| method | test {first.get('metric', '')}{majority} | val | out of distribution | "
           f"held-out text loss (before {fmt(none.get('heldout_loss'))}) | "
           f"probe (before {fmt(none.get('probe'))}) |")
    yield "|---|---|---|---|---|---|"
    for r in rows:
        name = r["method"] + (" + classifier" if r.get("classifier") else "")
        if r["diverged"]:
            name += f" ({r['diverged']} of {r['seeds']} diverged)"
        yield (f"| {name} | {fmt(r['test'], n=n(r, 'test'))} | {fmt(r['val'], n=n(r, 'val'))} | "
               f"{fmt(r['ood'], n=n(r, 'ood'))} | {fmt(r['heldout_loss'])} | {fmt(r['probe'])} |")
    many = (f"the mean of {seeds} seeds, ", ", the seeds' (min-max) in []") if seeds > 1 else ("", "")
    yield (f"\nScores: {many[0]}its 95% interval over the split's examples in () (Wilson)"
           f"{many[1]}.")
    proxy = next((r for r in rows if r.get("alpha_sweep")), None)
    if proxy:
        yield from sweep_table(proxy, n(proxy, "test"), n(proxy, "val"))
    yield ""
    peak = "CUDA peak allocated" if device.startswith("cuda") else "peak resident (the process)"
    yield (f"| method | where the parameters go | trainable | % of base | lr | train s | "
           f"tokens/s | {peak} | params + grads + AdamW state | checkpoint |")
    yield "|---|---|---|---|---|---|---|---|---|---|"
    for r in rows:
        if "trainable_params" not in r:
            continue
        n = f"{r['trainable_params']:,}" + (f" ({r['stored_params']:,} stored)"
                                            if r["stored_params"] != r["trainable_params"] else "")
        yield (f"| {r['method']} | {r['where']} | {n} | {r['pct_of_base']:.3f} | "
               f"{fmt(r.get('lr'), '{:.3g}')} | {r['seconds']:.0f} | {r['tokens_per_s']:,.0f} | "
               f"{fmt(r['peak_bytes'] and r['peak_bytes'] / 2**20, '{:,.0f} MiB')} | "
               f"{r['state_bytes'] / 2**20:.2f} MiB | {r['ckpt_bytes'] / 2**10:,.0f} KiB |")


def sweep_table(r, n_test, n_val):
    """Proxy tuning's rows: each model alone, then the combination at every strength alpha, with
    the large model's full scores and with only its top k (a hosted API's)."""
    yield f"\n| proxy tuning (large model {r['base']}, small {r['small_base']}) | test | val |"
    yield "|---|---|---|"
    yield f"| large model alone | {fmt(r['large_alone'], n=n_test)} | |"
    yield f"| small model alone | {fmt(r.get('small_alone'), n=n_test)} | |"
    yield f"| small expert alone | {fmt(r['small_expert'], n=n_test)} | |"
    for k, points in r["alpha_sweep"].items():
        for a, v in points.items():
            chosen = " (--alpha)" if float(a) == r["alpha"] else ""
            yield (f"| alpha {a}{chosen}, the large model's scores: {k} | "
                   f"{fmt(v['test'], n=n_test)} | {fmt(v['val'], n=n_val)} |")


# --------------------------------------------------------------------------------------------------
# Pictures (matplotlib is optional: without it the tables and results.json are the whole output)

def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        loop.log("pictures: pip install matplotlib to get them (the tables and results.json have "
                 "every number)")
        return None


def pictures(rows, out):
    plt = pyplot()
    rows = [r for r in rows if "losses" in r]
    if plt is None or not rows:
        return
    # one per method
    color = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for r in rows:
        if r["losses"]:
            smooth = [sum(r["losses"][max(0, i - 9):i + 1]) / len(r["losses"][max(0, i - 9):i + 1])
                      for i in range(len(r["losses"]))]
            name = (r["method"] if r["method"] != "proxy" else
                    f"proxy: its expert\n(full tuning of {r['small_base']})")
            ax.plot(range(1, len(smooth) + 1), smooth, color=color[r["method"]], label=name)
            if r["val_curve"]:
                ax.plot(*zip(*r["val_curve"]), "o--", color=color[r["method"]])
    ax.set(xlabel="fine-tuning step", ylabel="loss (cross-entropy per target token, nats)",
           yscale="log", title=f"{rows[0]['task']}: training loss (solid, mean of 10 steps) "
                               f"and validation loss (dashed)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per method, whatever the seeds
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    save(fig, os.path.join(out, "loss-curves.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in merged(rows):
        if r["trainable_params"] and r["test"] is not None:
            kept = (f"\n({r['stored_params']:,} stored)"
                    if r["stored_params"] != r["trainable_params"] else "")
            mean, lo, hi = r["test"]
            ax.errorbar(r["trainable_params"], mean, yerr=[[mean - lo], [hi - mean]], fmt="o",
                        capsize=3, color=color[r["method"]])
            ax.annotate(r["method"] + kept, (r["trainable_params"], mean),
                        textcoords="offset points", xytext=(0, -14 if kept else 7), ha="center",
                        va="top" if kept else "bottom", fontsize=9)
    none = next((r for r in merged(rows) if r["method"] == "none" and r["test"]), None)
    if none:
        ax.axhline(none["test"][0], color="gray", linestyle="--",
                   label=f"frozen base (none): {none['test'][0]:.2f}")
    if rows[0].get("majority") is not None:
        ax.axhline(rows[0]["majority"], color="gray", linestyle=":",
                   label=f"commonest label: {rows[0]['majority']:.2f}")
    sizes = [r["trainable_params"] for r in rows if r["trainable_params"]]
    if sizes:
        ax.set(xscale="log", xlim=(min(sizes) / 3, max(sizes) * 3))
    ax.set(ylim=(-0.05, 1.1), ylabel=f"test {rows[0]['metric']}",
           title=f"{rows[0]['task']}: test score against "
                 f"trainable parameters",
           xlabel="trainable parameters (log scale; proxy: its small expert's)")
    ax.legend(fontsize=8, loc="lower right")
    save(fig, os.path.join(out, "score-vs-params.png"))


def save(fig, path):
    """A picture, written as every other file is (aside, then renamed)."""
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    disk.save_file(png.getvalue(), path)
    loop.log(f"wrote {path}")


# --------------------------------------------------------------------------------------------------
# Prompt length x initialisation (Lester et al. section 3.2)

def prompt_grid(cmd):
    """Every length x initialisation at every seed, on one base: a table of means and ranges, and a
    picture. The text init uses --prompt-text, or the task's label words, or (a task without
    them) "Answer the question about the person". Every point is checked before the first trains;
    finished runs are reused."""
    options.refuse(cmd.given, {"prompt_len", "prompt_init"}, "--prompt-grid sets them itself")
    world, task_name = cmd.task_opts.people, cmd.task_opts.task
    base = bases.named_base(cmd.base_opts, cmd.out_dir, world, dtype=cmd.dtype)
    enc = bases.tokenizer_of(base, cmd.base_opts, world, loop.log)
    labels = data.load_task(cmd.task_opts).choices
    prompt = cmd.configs["prompt"]
    text = prompt.prompt_text or (None if labels else "Answer the question about the person")
    seeds = range(cmd.train.seed, cmd.train.seed + cmd.extra["comparison"].seeds)

    def point(n, i, s):  # one cell of the grid, at one seed
        prompt_cfg = dataclasses.replace(prompt, prompt_len=n, prompt_init=i,
                                  prompt_text=text if i == "text" else None)
        return dataclasses.replace(cmd.with_train(seed=s),
                                   configs={**cmd.configs, "prompt": prompt_cfg})
    for n in LENGTHS:
        for i in INITS:
            train.checked(point(n, i, cmd.train.seed), "prompt", base, enc)
    grid = {(n, i): [train.run(point(n, i, s), "prompt", base, enc, reuse=True)["test"]
                     for s in seeds] for n in LENGTHS for i in INITS}
    mean = {k: sum(v) / len(v) for k, v in grid.items()}
    lines = [f"| length | {' | '.join(INITS)} |", "|---" * (len(INITS) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{mean[n, i]:.3f} "
                                       f"({min(grid[n, i]):.2f}-{max(grid[n, i]):.2f})"
                                       for i in INITS) + " |" for n in LENGTHS]
    loop.log(f"\nprompt length x initialisation, test {task_name}, mean (min-max) of seeds "
             f"{seeds[0]}-{seeds[-1]}:\n" + "\n".join(lines))
    plt = pyplot() if distributed.is_main() else None  # rank 0 alone draws and writes
    if plt:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i in INITS:
            ys = [mean[n, i] for n in LENGTHS]
            err = [[y - min(grid[n, i]) for n, y in zip(LENGTHS, ys)],
                   [max(grid[n, i]) - y for n, y in zip(LENGTHS, ys)]]
            ax.errorbar(LENGTHS, ys, yerr=err, marker="o", capsize=3,
                        label=i if i != "text" else f"text ({text or 'the label words'!r})")
        ax.set(xscale="log", xlabel="soft prompt length (vectors, log scale)", ylim=(-0.05, 1.05),
               ylabel=f"test score, {task_name}", title=f"Prompt tuning: length x initialisation "
                                                       f"(mean and range of {len(seeds)} seeds)")
        ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
        ax.legend(fontsize=8, loc="lower right")
        save(fig, os.path.join(cmd.out_dir,
                               f"prompt-grid-{os.path.basename(task_name)}-{base.name}.png"))
    return grid


def main(argv=None):
    with disk.one_line_errors():
        args = options.parse(argv, train.GROUPS, train.METHODS, __doc__ + distributed.USAGE,
                             choices=["all"], extra=[("comparison", CompareOptions)])
        args.method = "prompt" if args.prompt_grid else "all"
        if args.prompt_grid:  # the grid is prompt tuning's rows: other rows' options would be dropped
            options.refuse(args.given, {"methods", "lrs"},
                           "--prompt-grid runs prompt tuning's grid only, at --lr")
        cmd = options.typed(args, train.GROUPS, train.METHODS, [("comparison", CompareOptions)])
        with distributed.session(cmd, disk.writer(cmd.out_dir)) as cmd:  # torchrun's, if any
            return prompt_grid(cmd) if args.prompt_grid else run_all(cmd)


if __name__ == "__main__":
    main()
