"""
The GPU run, ready for a CUDA machine: every method's training-step time and peak memory on
released models' shapes (SmolLM2-135M, GPT-2, GPT-2 medium; random weights), in bf16 autocast, as a
table and a figure for RESULTS.md. About 3 minutes on one H100-class GPU (an estimate).

    python -m kit.gpu_bench                 # writes figures/gpu-bench.md and figures/gpu-bench.png
    python -m kit.gpu_bench --device cpu --shapes gpt2 --batch 1 --length 8 --repeat 1   # smoke run

Each method trains alone on a fresh model, so the allocator's peak (max_memory_allocated) is its
own; on a CPU the peak is the process's resident memory (loop.peak_memory), which only grows.
"""
import argparse
import io
import os

import torch

from kit import bench, disk
from kit.loop import peak_memory
from kit.options import autocast, pick_device


def report(shapes, B, T, repeat, device, out):
    rows = []
    for name in shapes:
        cfg = bench.shape_config(name)
        x, y = bench.batch(cfg, B, T, device)
        for method, attach in bench.methods().items():
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            with peak_memory(device) as memory:
                model = bench.make(cfg, device)
                if attach:
                    attach(model)
                params = [p for p in model.parameters() if p.requires_grad]
                dtype = "bfloat16" if device.startswith("cuda") else "float32"
                step, opt = bench.step_fn(lambda: model(x, y)[1], params, device, dtype)
                sec = bench.timed(step, device, repeat, warmup=min(3, repeat))
            rows.append((name, method, sum(p.numel() for p in params), sec, memory.peak))
            print(f"{name:14} {method:20} {1000 * sec:9.1f} ms {memory.peak / 2**30:7.2f} GiB",
                  flush=True)
            del model, params, step, opt  # nothing of this method is left for the next one
    where = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    full = {n: s for n, m, _, s, _ in rows if m == "full"}
    lines = [f"{where}, torch {torch.__version__}, batch {B} x {T}, median of {repeat} steps", "",
             "| model | method | trainable | step | vs full | peak memory |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {m} | {k:,} | {1000 * s:.1f} ms | {s / full[n]:.2f} | {b / 2**30:.2f} GiB |"
              for n, m, k, s, b in rows]
    disk.save_file(("\n".join(lines) + "\n").encode(), os.path.join(out, "gpu-bench.md"))
    print("\n".join(lines))
    picture(rows, shapes, where, B, T, out)


def picture(rows, shapes, where, B, T, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("no picture: pip install matplotlib")
    names = list(bench.methods())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, shape in enumerate(shapes):
        sub = [r for r in rows if r[0] == shape]
        xs = [j + 0.8 * i / len(shapes) for j in range(len(sub))]
        axes[0].bar(xs, [1000 * r[3] for r in sub], width=0.8 / len(shapes), label=shape)
        axes[1].bar(xs, [r[4] / 2**30 for r in sub], width=0.8 / len(shapes), label=shape)
    for ax, what in zip(axes, ("step time (ms)", "peak memory (GiB)")):
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set(ylabel=what)
        ax.legend(fontsize=8)
    fig.suptitle(f"{where}: one training step per method, batch {B} x {T}")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    disk.save_file(png.getvalue(), os.path.join(out, "gpu-bench.png"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kit.gpu_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="smollm2-135m,gpt2,gpt2-medium",
                   help="of bench.SHAPES, separated by commas")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", default="figures")
    args = p.parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("python -m kit.gpu_bench measures on a CUDA device, and this machine has none "
                             "(--device cpu for a smoke run)")
        device = pick_device(args.device)
        shapes = args.shapes.split(",")
        unknown = [s for s in shapes if s not in bench.SHAPES]
        if unknown:
            raise ValueError(f"--shapes: unknown {', '.join(unknown)}; "
                             f"use {', '.join(bench.SHAPES)}")
        if min(args.batch, args.length, args.repeat) < 1:
            raise ValueError("--batch, --length and --repeat must be at least 1")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    report(shapes, args.batch, args.length, args.repeat, device, args.out)


if __name__ == "__main__":
    main()
