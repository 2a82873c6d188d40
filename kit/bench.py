"""
Benchmarks: speed and memory as ratios measured in one run, on randomly initialised models (weights
change neither). Tests check properties; the numbers live here and in RESULTS.md.

    python -m kit.bench                         # the small preset (--size large on CUDA)
    python -m kit.bench --shape smollm2-135m    # a released model's shape: gpt2 ... smollm2-1.7b
    python -m kit.bench --tiny                  # a few seconds: a smoke run, numbers meaningless
    python -m kit.bench --memory                # each method's peak training memory, computed
    python -m kit.bench --versus --shape gpt2   # beside transformers and peft (a scratch venv)
    python -m kit.gpu_bench                     # on a CUDA machine: released shapes in bf16

1. training step time of each method (the rows of train.METHODS, with their default options)
   relative to full fine-tuning, and our GPT against a plain nanoGPT forward of the same weights
2. generation with the KV cache relative to re-running the sequence, at 256 new tokens; and greedy
   tokens per second as train.py --generate decodes, each method attached, relative to the plain model
3. proxy-tuned decoding relative to the large model alone, beside 1 + 2 x (small / large cost)
4. gradient + optimizer-state bytes of each method relative to full fine-tuning
The methods take turns, so one model per method is alive at once: six models of --shape's size
(about 6 GB for SmolLM2-135M; too many for the largest shapes on a small machine).
"""
import argparse
import sys
import statistics
import time

import torch
import torch.nn.functional as F

import prefix_tuning
import proxy_tuning
import train
from model import GPT, SIZES, SMALLER, GPTConfig
from kit import generate
from kit.options import autocast, pick_device

LLAMA = dict(bias=False, norm="rmsnorm", mlp="swiglu", rope_theta=1e5, tie_head=True,
             vocab_size=49152)
SHAPES = {  # the released models' shapes: (n_layer, n_head, n_embd) + the rest of GPTConfig
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "smollm2-135m": dict(n_layer=30, n_head=9, n_embd=576, n_kv_head=3, n_hidden=1536, **LLAMA),
    "smollm2-360m": dict(n_layer=32, n_head=15, n_embd=960, n_kv_head=5, n_hidden=2560, **LLAMA),
    "smollm2-1.7b": dict(n_layer=24, n_head=32, n_embd=2048, n_kv_head=32, n_hidden=8192, **LLAMA),
}


def shape_config(name, block_size=1024):
    return GPTConfig(**{"vocab_size": 50257, "block_size": block_size, **SHAPES[name]})


def methods():
    """name -> attach with the default options (None: nothing attached): every row of train.METHODS
    that trains, plus the direct prefix beside the reparameterised one."""
    out = {"full": None}
    for name, m in train.METHODS.items():
        if name not in ("none", "full"):
            out[name] = lambda model, m=m: m.attach(model, m.Config())
    out["prefix --no-reparam"] = lambda model: prefix_tuning.attach(
        model, prefix_tuning.Config(reparam=False))
    return out


def plain_forward(model, idx, targets=None):
    """nanoGPT's forward on the same weights, with no injection points: the yardstick for 'empty
    seams cost nothing' (GPT-2's blocks)."""
    t, C, nh = model.transformer, model.config.n_embd, model.config.n_head
    B, T = idx.size()
    x = t.wte(idx) + t.wpe(torch.arange(T, device=idx.device))
    for b in t.h:
        q, k, v = b.attn.c_attn(b.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = (F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous()
             .view(B, T, C))
        x = x + b.attn.c_proj(y)
        x = x + b.mlp(b.ln_2(x))
    logits = model.lm_head(t.ln_f(x))
    loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)),
                                                        targets.reshape(-1), ignore_index=-1)
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


def training(cfg, device, dtype, B, T, repeat, plain=True):
    """Step time and gradient + AdamW-state bytes per method, on one model size and one batch. The
    methods take turns, one step each per round, so a machine that speeds up or slows down affects
    them all alike."""
    x, y = batch(cfg, B, T, device)
    steps = {}
    for method, attach in (({"plain": None} if plain else {}) | methods()).items():
        model = make(cfg, device)
        if attach:
            attach(model)
        params = [p for p in model.parameters() if p.requires_grad]
        fwd = ((lambda m=model: plain_forward(m, x, y)[1]) if method == "plain" else
               (lambda m=model: m(x, y)[1]))
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
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if v.dim() > 0)
        out[method] = dict(sec=statistics.median(times[method]), bytes=grad + state,
                           trainable=sum(p.numel() for p in params))
    return out


def generation(cfg, device, dtype, new, repeat, warmup=2):
    model = make(cfg, device).eval()
    idx = torch.randint(cfg.vocab_size, (1, 16),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, dtype):
        cached = timed(lambda: model.generate(idx, new, temperature=0), device, repeat, warmup)
        uncached = timed(lambda: model.generate(idx, new, temperature=0, use_cache=False), device,
                         repeat, warmup)
    return cached, uncached


def proxy(large_cfg, small_cfg, device, dtype, new, repeat):
    small, expert = make(small_cfg, device, 0).eval(), make(small_cfg, device, 1).eval()
    large = make(large_cfg, device).eval()
    idx = torch.randint(small_cfg.vocab_size, (1, 16),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, dtype):
        t_small = timed(lambda: small.generate(idx, new, temperature=0), device, repeat)
        t_large = timed(lambda: large.generate(idx, new, temperature=0), device, repeat)
        t_proxy = timed(lambda: proxy_tuning.generate(large, expert, small, idx, new,
                                                      temperature=0), device, repeat)
    return t_small, t_large, t_proxy


# --------------------------------------------------------------------------------------------------
# Memory of the released shapes, computed on the meta device: shapes only, no weights and no 30 GB
# needed

def memory(name, B=8, T=128):
    """Bytes one bf16-autocast training step holds at its peak, per method: float32 weights, the
    bf16 copies autocast makes of the matmul weights, gradients and AdamW moments of what trains,
    the activations autograd saves for the backward pass (counted by hooking them on a bf16 copy),
    and the float32 logits of the loss and of their gradient (B x T x vocab each: the largest
    tensors of the step)."""
    cfg, out = shape_config(name), {}
    for method, attach in methods().items():
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
        out[method] = dict(weights=4 * n + 2 * matmul, state=12 * trainable,
                           activations=sum(saved.values()) + logits)
    return out


# --------------------------------------------------------------------------------------------------
# Side by side with the libraries people use instead (transformers, peft): same shapes, batch,
# threads

def versus(cfg, device, dtype, B, T, new, repeat):
    try:
        import peft
        import transformers
    except ImportError:
        raise SystemExit("error: --versus needs transformers and peft: pip install them in a "
                         "scratch venv (they are not this project's dependencies)")
    x, y = batch(cfg, B, T, device)
    llama = cfg.rope_theta is not None
    if llama:
        hf_cfg = transformers.LlamaConfig(
            hidden_size=cfg.n_embd, intermediate_size=cfg.n_hidden, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_head,
            attn_implementation="sdpa")
        hf_class = transformers.LlamaForCausalLM
    else:
        hf_cfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                         n_positions=cfg.block_size, vocab_size=cfg.vocab_size,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         eos_token_id=None, bos_token_id=None)
        hf_class = transformers.GPT2LMHeadModel
    peft_configs = dict(
        prompt=lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        prefix=lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                               prefix_projection=True, encoder_hidden_size=256),
        lora=lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                     target_modules=["q_proj", "v_proj"] if llama else ["c_attn"]))

    def hf(method):
        torch.manual_seed(0)
        model = hf_class(hf_cfg).to(device)
        return (peft.get_peft_model(model, peft_configs[method]()) if method in peft_configs
                else model)
    rows, ours_of = {}, methods()
    for method in ("full", "prompt", "prefix", "adapter", "lora"):
        theirs = None if method == "adapter" else hf(method)
        hf_step = theirs and step_fn(lambda: theirs(input_ids=x, labels=y).loss,
                                     [p for p in theirs.parameters() if p.requires_grad],
                                     device, dtype)[0]
        ours_step = None
        if method in ours_of:
            ours = make(cfg, device)
            if ours_of[method]:
                ours_of[method](ours)
            ours_step = step_fn(lambda: ours(x, y)[1],
                                [p for p in ours.parameters() if p.requires_grad], device, dtype)[0]
        # taking turns, as in training(): one step each per round
        times = ([], [])
        for r in range(2 + repeat):
            for out, step in zip(times, (ours_step, hf_step)):
                if step is not None:
                    seconds = timed(step, device, 1, warmup=0)
                    if r >= 2:
                        out.append(seconds)
        rows[method] = tuple(statistics.median(t) if t else None for t in times)
        del theirs
    ours, theirs = make(cfg, device).eval(), hf("full").eval()
    idx = x[:1, :16]
    with torch.no_grad(), autocast(device, dtype):
        rows["greedy generation"] = (
            timed(lambda: ours.generate(idx, new, temperature=0), device, max(1, repeat // 3)),
            timed(lambda: theirs.generate(idx, max_new_tokens=new, min_new_tokens=new,
                                          do_sample=False, pad_token_id=0),
                  device, max(1, repeat // 3)))
    return rows, transformers.__version__, peft.__version__


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kit.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, choices=SIZES,
                   help="default: small on CPU, large on CUDA")
    p.add_argument("--shape", default=None, choices=SHAPES,
                   help="time a released model's shape instead")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model, few tokens: a smoke run")
    p.add_argument("--memory", action="store_true",
                   help="peak training memory of every released shape, computed")
    p.add_argument("--versus", action="store_true",
                   help="beside transformers and peft (needs both installed)")
    p.add_argument("--batch", type=int, default=None,
                   help="rows per training batch (default 32; 8 with --shape)")
    p.add_argument("--length", type=int, default=None,
                   help="tokens per row (default 128; 64 with --shape)")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        # an option that another one overrides is refused, never silently dropped
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for flag, drops in (("--memory", given - {"--memory", "--device"}),
                            ("--tiny", given & {"--size", "--shape"}),
                            ("--shape", given & {"--size"})):
            if flag in given and drops:
                raise ValueError(f"{sorted(drops)[0]}: {flag} sets it already; leave one out")
        for name in ("batch", "length"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.memory:
        return print_memory()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    size = "tiny" if args.tiny else args.size or ("large" if device.startswith("cuda") else "small")
    new, repeat, B, T = (16, 1, 4, 32) if args.tiny else (256, 9, 32, 128)
    B, T = args.batch or (8 if args.shape else B), args.length or (64 if args.shape else T)
    shape = lambda s: {k: v for k, v in SIZES[s].items() if k != "pretrain_steps"}
    cfg = (shape_config(args.shape) if args.shape else  # room for --length + a 20-long soft prompt
           GPTConfig(block_size=max(16 + new, T) + 20, vocab_size=2048, **shape(size)))
    if T + 20 > cfg.block_size:
        raise SystemExit(f"error: --length {T}: {args.shape}'s context ({cfg.block_size:,}) holds "
                         f"rows of at most {cfg.block_size - 20:,} beside a soft prompt")
    print(f"bench on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.shape or size} ({make(cfg, device).num_params() / 1e6:.2f}M parameters), "
          f"batch {B} x {T}, {dtype}")
    if args.versus:
        return print_versus(*versus(cfg, device, dtype, B, T, new, 5 if args.shape else repeat),
                            B, T)
    print_training(training(cfg, device, dtype, B, T, 5 if args.shape else repeat,
                            plain=cfg.rope_theta is None and cfg.n_kv_head == cfg.n_head))
    cached, uncached = generation(cfg, device, dtype, new, *((1, 1) if args.shape else (repeat, 2)))
    print(f"\ngeneration of {new} tokens: KV cache {cached:.3f}s, re-running the sequence "
          f"{uncached:.3f}s: {uncached / cached:.1f}x faster with the cache")
    rate = generate.speed(cfg, {n: a for n, a in methods().items() if a}, device, dtype, new,
                          1 if args.shape else repeat)
    print(f"greedy generation as train.py --generate, {new} tokens, tokens/s (x the plain model's; "
          f"target: at least 0.90x): " + ", ".join(f"{n} {r:.0f} ({r / rate['plain']:.2f}x)"
                                                   for n, r in rate.items()))
    if args.shape:
        return
    small = SMALLER.get(size, size)  # the tiny preset has nothing smaller: then all three are tiny
    small_cfg = GPTConfig(block_size=cfg.block_size, vocab_size=2048, **shape(small))
    t_small, t_large, t_proxy = proxy(cfg, small_cfg, device, dtype, new, repeat)
    expected = 1 + 2 * t_small / t_large
    print(f"proxy decoding ({size} large model, {small} expert and anti-expert), {new} tokens: "
          f"small {t_small:.3f}s, large {t_large:.3f}s, proxy {t_proxy:.3f}s: "
          f"{t_proxy / t_large:.2f}x the large model alone; expected 1 + 2 x small/large = "
          f"{expected:.2f}x (target at most {1.1 * expected:.2f}x)")


def print_training(tr):
    full = tr["full"]
    print("\n| method | trainable | step time vs full | grad + AdamW state | vs full |\n"
          "|---|---|---|---|---|")
    for m, r in tr.items():
        print(f"| {m} | {r['trainable']:,} | {r['sec'] / full['sec']:.3f} ({1000 * r['sec']:.1f} "
              f"ms) | {r['bytes'] / 2**20:.3f} MiB | {100 * r['bytes'] / full['bytes']:.2f}% |")


def print_memory(B=8, T=128):
    print(f"peak memory of one training step at batch {B} x {T}, bf16 autocast, computed on the "
          f"meta device (not measured on a GPU)\n")
    print("| model | method | weights (fp32 + bf16 copies) | grads + AdamW | "
          "activations + logits | total |")
    print("|---|---|---|---|---|---|")
    for name in SHAPES:
        for method, r in memory(name, B, T).items():
            total = sum(r.values())
            print(f"| {name} | {method} | {r['weights'] / 2**30:.2f} GiB | "
                  f"{r['state'] / 2**30:.2f} GiB | {r['activations'] / 2**30:.2f} GiB | "
                  f"{total / 2**30:.2f} GiB |")


def print_versus(rows, tf_version, peft_version, B, T):
    print(f"\nside by side with transformers {tf_version} / peft {peft_version}, batch {B} x {T} "
          f"(median seconds, methods taking turns; ratio < 1: ours faster)")
    print("| what | ours | theirs | ours / theirs |\n|---|---|---|---|")
    names = {"full": "full fine-tuning step",
             "prompt": "prompt tuning step (peft, 20 virtual tokens)",
             "prefix": "prefix tuning step (peft, 10 virtual tokens, projection 256)",
             "adapter": "adapter step (peft has no Houlsby adapter for causal LMs)",
             "lora": "LoRA r = 8 step (peft; not one of our methods: a reference)"}
    for what, (ours, theirs) in rows.items():
        show = lambda v: "-" if v is None else f"{v:.3f}"
        ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
        print(f"| {names.get(what, what + ' (generate), 256 tokens')} | {show(ours)} | "
              f"{show(theirs)} | {ratio} |")


if __name__ == "__main__":
    main()
