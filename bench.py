"""
Benchmarks: speed and memory as ratios measured in one run, on randomly initialised models (weights do not change
speed or memory). Tests check properties; the numbers live here and in the README.

    python bench.py                 # the small preset (large with --size large, the default on CUDA)
    python bench.py --tiny          # a few seconds: a smoke run, numbers meaningless

1. training step time of each method relative to full fine-tuning (and our GPT against a plain nanoGPT forward)
2. generation with the KV cache relative to re-running the sequence, at 256 new tokens
3. proxy-tuned decoding relative to the large base alone, beside the expected 1 + 2 x (small cost / large cost)
4. gradient + optimizer-state bytes of each method relative to full fine-tuning, counted from the live tensors
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import adapter
import prefix_tuning
import prompt_tuning
import proxy_tuning
from model import GPT, SIZES, SMALLER, GPTConfig, autocast
from options import pick_device

METHODS = {  # name -> attach with train.py's default options (None: nothing attached, every weight trains)
    "plain": None, "full": None,
    "prompt": lambda m: prompt_tuning.attach(m, n_tokens=20),
    "prefix": lambda m: prefix_tuning.attach(m, n_prefix=10),  # reparameterisation MLP, hidden 256
    "prefix --no-reparam": lambda m: prefix_tuning.attach(m, n_prefix=10, reparam=False),
    "adapter": lambda m: adapter.attach(m, bottleneck=16),
}


def plain_forward(model, idx, targets=None):
    """nanoGPT's forward on the same weights, with no injection points: the yardstick for 'empty seams cost nothing'."""
    t, C, nh = model.transformer, model.config.n_embd, model.config.n_head
    B, T = idx.size()
    x = t.wte(idx) + t.wpe(torch.arange(T, device=idx.device))
    for b in t.h:
        q, k, v = b.attn.c_attn(b.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + b.attn.c_proj(y)
        x = x + b.mlp(b.ln_2(x))
    logits = model.lm_head(t.ln_f(x))
    loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                                        ignore_index=-1)
    return logits, loss


def timed(fn, device, repeat):
    """Median seconds of fn() after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make(cfg, device, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def training(cfg, device, dtype, B, T, repeat):
    """Step time and gradient + AdamW-state bytes per method, on one model size and one batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(cfg.vocab_size, (B, T), generator=g).to(device)
    out = {}
    for method, attach in METHODS.items():
        model = make(cfg, device)
        if attach:
            attach(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        fwd = (lambda a, b: plain_forward(model, a, b)) if method == "plain" else model

        def step():
            with autocast(device, dtype):
                _, loss = fwd(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # keep the grads alive so they can be counted below

        sec = timed(step, device, repeat)
        grad = sum(p.grad.numel() * p.grad.element_size() for p in params)
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim() > 0)
        out[method] = dict(sec=sec, bytes=grad + state, trainable=sum(p.numel() for p in params))
    return out


def generation(cfg, device, dtype, new, repeat):
    model = make(cfg, device).eval()
    idx = torch.randint(cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, dtype):
        cached = timed(lambda: model.generate(idx, new, temperature=0), device, repeat)
        uncached = timed(lambda: model.generate(idx, new, temperature=0, use_cache=False), device, repeat)
    return cached, uncached


def proxy(large_cfg, small_cfg, device, dtype, new, repeat):
    small, expert, large = make(small_cfg, device, 0).eval(), make(small_cfg, device, 1).eval(), make(large_cfg, device).eval()
    idx = torch.randint(small_cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, dtype):
        t_small = timed(lambda: small.generate(idx, new, temperature=0), device, repeat)
        t_large = timed(lambda: large.generate(idx, new, temperature=0), device, repeat)
        t_proxy = timed(lambda: proxy_tuning.generate(large, expert, small, idx, new, temperature=0), device, repeat)
    return t_small, t_large, t_proxy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, choices=SIZES, help="default: small on CPU, large on CUDA")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model, few tokens: a smoke run")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    size = "tiny" if args.tiny else args.size or ("large" if device == "cuda" else "small")
    new, repeat, B, T = (16, 1, 4, 32) if args.tiny else (256, 5, 32, 128)
    shape = lambda s: {k: v for k, v in SIZES[s].items() if k != "pretrain_steps"}
    cfg = GPTConfig(block_size=16 + new + 20, vocab_size=2048, **shape(size))  # +20: room for a soft prompt
    print(f"bench on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, size {size} "
          f"({make(cfg, device).num_params() / 1e6:.2f}M parameters), batch {B} x {T}")

    tr = training(cfg, device, dtype, B, T, repeat)
    full = tr["full"]
    print("\n| method | trainable | step time vs full | grad + AdamW state | vs full |\n|---|---|---|---|---|")
    for m, r in tr.items():
        print(f"| {m} | {r['trainable']:,} | {r['sec'] / full['sec']:.3f} ({1000 * r['sec']:.1f} ms) | "
              f"{r['bytes'] / 2**20:.3f} MiB | {100 * r['bytes'] / full['bytes']:.2f}% |")

    cached, uncached = generation(cfg, device, dtype, new, repeat)
    print(f"\ngeneration of {new} tokens: KV cache {cached:.3f}s, re-running the sequence {uncached:.3f}s: "
          f"{uncached / cached:.1f}x faster with the cache")

    small = SMALLER.get(size, size)  # the tiny preset has nothing smaller: then all three are tiny
    small_cfg = GPTConfig(block_size=cfg.block_size, vocab_size=2048, **shape(small))
    t_small, t_large, t_proxy = proxy(cfg, small_cfg, device, dtype, new, repeat)
    expected = 1 + 2 * t_small / t_large
    print(f"proxy decoding ({size} base, {small} expert and anti-expert), {new} tokens: small {t_small:.3f}s, "
          f"large {t_large:.3f}s, proxy {t_proxy:.3f}s: {t_proxy / t_large:.2f}x the large base alone; "
          f"expected 1 + 2 x small/large = {expected:.2f}x (target at most {1.1 * expected:.2f}x)")


if __name__ == "__main__":
    main()
