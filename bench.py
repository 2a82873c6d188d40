"""
Benchmarks: speed and memory as ratios measured in one run, on randomly initialised models (weights do not change
speed or memory). Tests check properties; the numbers live here and in the README.

    python bench.py                 # the small preset (large with --size large, the default on CUDA)
    python bench.py --tiny          # a few seconds: a smoke run, numbers meaningless
    python bench.py --memory        # peak training memory of GPT-2's sizes per method, computed (no weights needed)
    python bench.py --versus        # our steps and generation beside transformers' and peft's (needs both installed)

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
GPT2 = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}


def gpt2_config(name):
    n_layer, n_head, n_embd = GPT2[name]
    return GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


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


def timed(fn, device, repeat, warmup=2):
    """Median seconds of fn() after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make(cfg, device, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def batch(cfg, B, T, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(cfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2)]


def step_fn(forward, params, device, dtype):
    """One AdamW training step of forward(), which returns the loss."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with autocast(device, dtype):
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the grads alive so they can be counted
    return step, opt


def training(cfg, device, dtype, B, T, repeat):
    """Step time and gradient + AdamW-state bytes per method, on one model size and one batch. The methods take turns,
    one step each per round, so a machine that speeds up or slows down during the run affects them all alike."""
    x, y = batch(cfg, B, T, device)
    steps = {}
    for method, attach in METHODS.items():
        model = make(cfg, device)
        if attach:
            attach(model)
        params = [p for p in model.parameters() if p.requires_grad]
        fwd = (lambda m=model: plain_forward(m, x, y)[1]) if method == "plain" else (lambda m=model: m(x, y)[1])
        steps[method] = (*step_fn(fwd, params, device, dtype), params)
    times = {m: [] for m in steps}
    for r in range(2 + repeat):  # two warm-up rounds
        for method, (step, _, _) in steps.items():
            seconds = timed(step, device, 1, warmup=0)
            if r >= 2:
                times[method].append(seconds)
    out = {}
    for method, (step, opt, params) in steps.items():
        grad = sum(p.grad.numel() * p.grad.element_size() for p in params)
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim() > 0)
        out[method] = dict(sec=statistics.median(times[method]), bytes=grad + state,
                           trainable=sum(p.numel() for p in params))
    return out


def generation(cfg, device, dtype, new, repeat, warmup=2):
    model = make(cfg, device).eval()
    idx = torch.randint(cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, dtype):
        cached = timed(lambda: model.generate(idx, new, temperature=0), device, repeat, warmup)
        uncached = timed(lambda: model.generate(idx, new, temperature=0, use_cache=False), device, repeat, warmup)
    return cached, uncached


def proxy(large_cfg, small_cfg, device, dtype, new, repeat):
    small, expert, large = make(small_cfg, device, 0).eval(), make(small_cfg, device, 1).eval(), make(large_cfg, device).eval()
    idx = torch.randint(small_cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, dtype):
        t_small = timed(lambda: small.generate(idx, new, temperature=0), device, repeat)
        t_large = timed(lambda: large.generate(idx, new, temperature=0), device, repeat)
        t_proxy = timed(lambda: proxy_tuning.generate(large, expert, small, idx, new, temperature=0), device, repeat)
    return t_small, t_large, t_proxy


# ----------------------------------------------------------------------------------------------------------------------
# Memory of GPT-2's sizes, computed on the meta device: shapes only, so gpt2-xl needs neither its weights nor 30 GB

def memory(name, B=8, T=128):
    """Bytes one bf16-autocast training step holds at its peak, per method: float32 weights, the bf16 copies autocast
    makes of the matmul weights, gradients and AdamW moments of what trains, the activations autograd saves for the
    backward pass (counted by hooking them on a bf16 copy of the model), and the float32 logits of the loss and of
    their gradient (B x T x 50,257 each: the largest tensors of the step)."""
    cfg, out = gpt2_config(name), {}
    for method, attach in METHODS.items():
        if method == "plain":
            continue
        with torch.device("meta"):
            model = GPT(cfg)
            if attach:
                attach(model)
            x = torch.zeros(B, T, dtype=torch.long)
        n = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        model = model.to(torch.bfloat16)
        weights, saved = {p.untyped_storage()._cdata for p in model.parameters()}, {}

        def pack(t):  # each storage once; the parameters themselves are not activations
            s = t.untyped_storage()
            if s._cdata not in weights:
                saved[s._cdata] = s.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, x)
        logits = 2 * 4 * B * T * cfg.vocab_size
        out[method] = dict(weights=4 * n + 2 * matmul, state=12 * trainable, activations=sum(saved.values()) + logits)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Side by side with the libraries people use instead (transformers, peft): same shapes, same batch, one process

def versus(cfg, device, dtype, B, T, new, repeat):
    try:
        import peft
        import transformers
    except ImportError:
        raise SystemExit("error: --versus needs transformers and peft: pip install them in a scratch venv (they are "
                         "not this project's dependencies)")
    hf_cfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                     n_positions=cfg.block_size, vocab_size=cfg.vocab_size, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=None, bos_token_id=None)
    x, y = batch(cfg, B, T, device)

    def hf(method):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(hf_cfg).to(device)
        if method == "prompt":
            model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
        if method == "prefix":
            model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                                                       prefix_projection=True, encoder_hidden_size=256))
        return model
    rows = {}
    for method in ("full", "prompt", "prefix"):
        ours = make(cfg, device)
        if METHODS[method]:
            METHODS[method](ours)
        theirs = hf(method)
        ours_step, _ = step_fn(lambda: ours(x, y)[1], [p for p in ours.parameters() if p.requires_grad], device, dtype)
        hf_step, _ = step_fn(lambda: theirs(input_ids=x, labels=y).loss,
                             [p for p in theirs.parameters() if p.requires_grad], device, dtype)
        rows[method] = timed(ours_step, device, repeat), timed(hf_step, device, repeat)
    ours, theirs = make(cfg, device).eval(), hf("full").eval()
    idx = x[:1, :16]
    with torch.no_grad(), autocast(device, dtype):
        rows["greedy generation"] = (timed(lambda: ours.generate(idx, new, temperature=0), device, repeat),
                                     timed(lambda: theirs.generate(idx, max_new_tokens=new, min_new_tokens=new,
                                                                   do_sample=False, pad_token_id=0), device, repeat))
    return rows, transformers.__version__, peft.__version__


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, choices=SIZES, help="default: small on CPU, large on CUDA")
    p.add_argument("--gpt2", default=None, choices=GPT2, help="time GPT-2's shape instead of a preset")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model, few tokens: a smoke run")
    p.add_argument("--memory", action="store_true", help="peak training memory of every GPT-2 size, computed")
    p.add_argument("--versus", action="store_true", help="beside transformers and peft (needs both installed)")
    p.add_argument("--batch", type=int, default=None, help="rows per training batch (default 32; 8 for --gpt2)")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"error: --batch must be at least 1, got {args.batch}")
    if args.memory:
        return print_memory()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    size = "tiny" if args.tiny else args.size or ("large" if device.startswith("cuda") else "small")
    new, repeat, B, T = (16, 1, 4, 32) if args.tiny else (256, 9, 32, 128)
    B = args.batch or (8 if args.gpt2 else B)
    shape = lambda s: {k: v for k, v in SIZES[s].items() if k != "pretrain_steps"}
    cfg = gpt2_config(args.gpt2) if args.gpt2 else GPTConfig(block_size=16 + new + 20, vocab_size=2048, **shape(size))
    print(f"bench on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.gpt2 or size} "
          f"({make(cfg, device).num_params() / 1e6:.2f}M parameters), batch {B} x {T}, {dtype}")
    if args.versus:
        return print_versus(*versus(cfg, device, dtype, B, T, new, repeat))
    print_training(training(cfg, device, dtype, B, T, repeat))
    cached, uncached = generation(cfg, device, dtype, new, *((1, 1) if args.gpt2 else (repeat, 2)))  # GPT-2: minutes
    print(f"\ngeneration of {new} tokens: KV cache {cached:.3f}s, re-running the sequence {uncached:.3f}s: "
          f"{uncached / cached:.1f}x faster with the cache")
    if args.gpt2:
        return
    small = SMALLER.get(size, size)  # the tiny preset has nothing smaller: then all three are tiny
    small_cfg = GPTConfig(block_size=cfg.block_size, vocab_size=2048, **shape(small))
    t_small, t_large, t_proxy = proxy(cfg, small_cfg, device, dtype, new, repeat)
    expected = 1 + 2 * t_small / t_large
    print(f"proxy decoding ({size} base, {small} expert and anti-expert), {new} tokens: small {t_small:.3f}s, "
          f"large {t_large:.3f}s, proxy {t_proxy:.3f}s: {t_proxy / t_large:.2f}x the large base alone; "
          f"expected 1 + 2 x small/large = {expected:.2f}x (target at most {1.1 * expected:.2f}x)")


def print_training(tr):
    full = tr["full"]
    print("\n| method | trainable | step time vs full | grad + AdamW state | vs full |\n|---|---|---|---|---|")
    for m, r in tr.items():
        print(f"| {m} | {r['trainable']:,} | {r['sec'] / full['sec']:.3f} ({1000 * r['sec']:.1f} ms) | "
              f"{r['bytes'] / 2**20:.3f} MiB | {100 * r['bytes'] / full['bytes']:.2f}% |")


def print_memory(B=8, T=128):
    print(f"peak memory of one training step at batch {B} x {T}, bf16 autocast, computed on the meta device "
          f"(not measured on a GPU)\n")
    print("| model | method | weights (fp32 + bf16 copies) | grads + AdamW | activations + logits | total |")
    print("|---|---|---|---|---|---|")
    for name in GPT2:
        for method, r in memory(name, B, T).items():
            total = sum(r.values())
            print(f"| {name} | {method} | {r['weights'] / 2**30:.2f} GiB | {r['state'] / 2**30:.2f} GiB | "
                  f"{r['activations'] / 2**30:.2f} GiB | {total / 2**30:.2f} GiB |")


def print_versus(rows, tf_version, peft_version):
    print(f"\nside by side with transformers {tf_version} / peft {peft_version} "
          f"(median seconds; ratio < 1: ours faster)")
    print("| what | ours | theirs | ours / theirs |\n|---|---|---|---|")
    for what, (ours, theirs) in rows.items():
        name = {"full": "full fine-tuning step", "prompt": "prompt tuning step (peft)",
                "prefix": "prefix tuning step (peft)"}.get(what, what + " (transformers generate)")
        print(f"| {name} | {ours:.4f} | {theirs:.4f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
