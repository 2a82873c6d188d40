"""
What a released model costs on this machine: the seconds to load its file, the memory the process then
holds, and the seconds of one training step of each method (batch --batch x --length tokens, AdamW), with
the peak memory of that step. Each method runs in a process of its own, so that each peak is its own.

    python -m kit.real_bench --base models/qwen2.5-0.5b.gguf                  # every method, batch 8 x 64
    python -m kit.real_bench --base models/qwen2.5-1.5b.gguf --methods none,prompt,prefix,adapter

A method whose step would not fit in this machine's memory is skipped with the arithmetic that says so
(full fine-tuning holds, per parameter, the float32 weight, its gradient and AdamW's two moments: 16 bytes).
Weights and token ids are the released model's and random ids: speed does not depend on them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from kit.loop import peak_memory

METHODS = ("none", "prompt", "prefix", "adapter", "full")
GB = 1e9


def machine_memory():
    """Bytes of memory this machine has (MemTotal), or None where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except OSError:
        return None


def one_method(base, method, B, T, steps):
    """Load the base, attach the method with its defaults, time `steps` training steps (after one
    warm-up step): a dict of the numbers."""
    import train  # the table of methods; only this script's child process imports it
    from model import GPT
    with peak_memory("cpu") as load_mem:
        t0 = time.perf_counter()
        model = GPT.from_pretrained(base)  # its whole context: a soft prompt needs room beside T
        load_s = time.perf_counter() - t0
    m = train.METHODS[method]
    trained = m.attach(model, m.Config())
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(model.config.vocab_size, (B, T), generator=g)
    y = torch.randint(model.config.vocab_size, (B, T), generator=g)
    out = dict(method=method, load_s=load_s, load_peak=load_mem.peak,
               params=model.num_params(), trainable=sum(p.numel() for p in params))
    if not params:  # --method none: the forward pass alone is its cost
        step = lambda: model(x, y)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.train(bool(params))
    with peak_memory("cpu") as mem, torch.set_grad_enabled(bool(params)):
        step()  # warm-up: AdamW's state is made here
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    del trained
    return dict(out, step_s=statistics.median(times), step_peak=mem.peak)


def full_fits(base):
    """(fits, why) for full fine-tuning: 16 bytes a parameter against this machine's memory."""
    from kit import pretrained
    _, tensors = pretrained.read(base)
    n = sum(int(torch.Size(shape).numel()) for shape, _ in tensors.values())  # a tied head once
    need, have = 16 * n, machine_memory()
    why = (f"{n / 1e9:.2f}B parameters x 16 bytes (float32 weight, gradient, AdamW's two moments) "
           f"= {need / GB:.1f} GB before activations, on a {have / GB:.1f} GB machine"
           if have else "")
    return (have is None or need < 0.9 * have), why


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kit.real_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a .gguf file or a model folder")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad or a.batch < 1 or a.length < 1 or a.steps < 1 or not os.path.exists(a.base):
        p.exit(2, "error: " + (f"unknown method {bad[0]!r}: choose from {', '.join(METHODS)}" if bad
                                else f"{a.base} does not exist" if not os.path.exists(a.base)
                                else "--batch, --length and --steps must be at least 1") + "\n")
    if a.child:
        print(json.dumps(one_method(a.base, methods[0], a.batch, a.length, a.steps)))
        return
    print(f"{a.base}: batch {a.batch} x {a.length} tokens, median of {a.steps} steps, "
          f"{torch.get_num_threads()} threads", flush=True)
    print(f"{'method':8} {'load s':>7} {'load GB':>8} {'trainable':>13} {'step s':>7} {'step GB':>8}")
    for m in methods:
        if m == "full":
            fits, why = full_fits(a.base)
            if not fits:
                print(f"{m:8} does not fit: {why}", flush=True)
                continue
        r = subprocess.run([sys.executable, "-m", "kit.real_bench", "--child", "--base", a.base,
                            "--methods", m, "--batch", str(a.batch), "--length", str(a.length),
                            "--steps", str(a.steps)], capture_output=True, text=True)
        if r.returncode:
            print(f"{m:8} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{m:8} {d['load_s']:7.1f} {d['load_peak'] / GB:8.2f} {d['trainable']:13,} "
              f"{d['step_s']:7.2f} {d['step_peak'] / GB:8.2f}", flush=True)


if __name__ == "__main__":
    main()
