"""
Generation from any saved run, or from a base as it is: `python train.py --generate`. The run's
method stays attached (a soft prompt, a prefix, adapters, fully tuned weights; or proxy tuning's
three models), each model with its own KV cache; the text is printed as it comes, and the tokens
per second after it.

    python train.py --load out/runs/.../ckpt.pt --generate "Q: Where was Paula Holm born?\\nA:"
    python train.py --load out/runs/.../ckpt.pt --generate-file prompts.txt --compare
    python train.py --load out/runs/<a proxy run>/metrics.json --generate -   # typed, one a line
    python train.py --base SmolLM2-135M-Instruct.Q4_1.gguf --chat --generate "What is a prefix?"

A prompt's \\n, \\t and \\\\ are a newline, a tab and a backslash (on the command line, in a file of
prompts, typed). A run tuned on text/label lines puts each prompt into its own --template, and a run
tuned with --chat wraps it in the base's chat template (kit/chat.py), as the run saw its inputs;
--template and --chat given here do so instead. A proxy run's folder holds its scores only: it
records its large model, and its expert (a full run, with a ckpt.pt) lies beside it, whose base is
the anti-expert; --alpha changes the strength it was run with. --compare prints the frozen model's
continuation (the base without the method; proxy tuning's large model alone) after the tuned one,
for the same prompt and seed.
"""
import codecs
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

import proxy_tuning
from model import GPT, KVCache, sample
from kit import bases, checkpoints, options, tokenizer
from kit.chat import ChatML
from kit.options import Options, autocast, option


@dataclass
class Config(Options):
    generate: str = option(None, "continue this prompt with --load's run (a ckpt.pt; for proxy "
                                 "tuning its folder, which records its large model, its expert's "
                                 "run beside it) or without --load with the base as it is; - reads "
                                 "prompts typed one a line until an empty line. \\n, \\t, \\\\ "
                                 "are a newline, a tab, a backslash. A run tuned on text/label "
                                 "lines puts the prompt into its --template")
    generate_file: str = option(None, "a UTF-8 file of prompts to continue, one a line (\\n in a "
                                      "line is a newline)")
    max_new_tokens: int = option(None, "most new tokens per prompt (default: 64, or half the "
                                       "context where that is less)", least=1, most=1 << 20)
    temperature: float = option(0.0, "0: greedy; above 0: sampled (with --seed)", least=0)
    top_k: int = option(None, "sample among the k likeliest tokens only", least=1)
    top_p: float = option(None, "sample among the likeliest tokens until their probabilities "
                                "sum to top_p (nucleus sampling)", above=0, most=1)
    stop: str = option(None, "stop where the continuation holds this text (escapes as in a "
                             "prompt); it always stops at the end-of-text token, and at <|im_end|> "
                             "where the tokenizer has it (an Instruct model's end of a turn)")
    compare: bool = option(False, "print the frozen model's continuation after the tuned one, "
                                  "same prompt and seed")


TITLE = "generation (--generate: from --load's run, or from a base as it is)"
CLI = [(TITLE, Config)]  # its group of the command line (train.py adds it)
FIELDS = {f.name for f in options.cli_fields(Config)}


def check_used(args, given):
    """Refuse, in one line each, before any work, the options generation would not use."""
    greedy = args.temperature == 0
    if args.generate is not None and args.generate_file is not None:
        raise ValueError("--generate and --generate-file: give one of them")
    if args.generate_file and not os.path.isfile(args.generate_file):
        raise ValueError(f"--generate-file {args.generate_file} is not a file")
    options.refuse(given, {"top_k", "top_p", "seed"} if greedy else set(),
                   "greedy decoding (--temperature 0, the default) draws nothing at random: "
                   "give --temperature")
    used = FIELDS | {"device", "dtype", "seed", "chat", "template"}
    if args.load:
        if proxy_folder(args.load) is None:
            options.refuse(given, {"alpha"}, f"the strength of a proxy run's expert, and "
                                             f"{args.load} is not a proxy run")
        return options.refuse(given, given - used - {"load", "alpha"},
                              "--generate with --load uses the run's own base and task: leave "
                              "them out")
    if args.method != "none":
        options.refuse(given, {"method"}, f"generating with {args.method} needs its tuned run: "
                                          f"--load out/runs/.../ckpt.pt (without --load, "
                                          f"--generate continues with the base as it is)")
    if args.compare:
        raise ValueError("--compare prints the frozen base after a tuned run: give --load")
    ours = {f.name for f in options.cli_fields(bases.BaseOptions)} - {"base", "block_size"}
    if args.base:
        options.refuse(given, ours, f"for bases pretrained here; --base {args.base} is a "
                                    f"released model")
    options.refuse(given, given - used - ours - {"method", "out_dir", "base", "block_size",
                                                 "people"},
                   "--generate without --load continues with the base as it is: leave them out "
                   "(or tune a run, then --load its ckpt.pt)")


# --------------------------------------------------------------------------------------------------
# Decoding

@dataclass
class Source:
    """What continues a prompt: one model, or proxy tuning's three (large, expert, anti-expert)."""
    name: str
    models: list
    positions: int = 0   # a soft prompt's, in front of the tokens
    alpha: float = None  # proxy tuning: s_large + alpha (s_expert - s_anti)

    def context(self):
        """Positions left to the tokens: the smallest context less a soft prompt's positions."""
        return min(m.config.block_size for m in self.models) - self.positions


@torch.no_grad()
def tokens(source, idx, n, pick=lambda s: sample(s, 0), use_cache=True):
    """The next n token ids (ints) after idx (1, T), each yielded as soon as it is picked. Every
    model keeps its own KV cache, so a step runs one new position through each (use_cache=False
    runs the whole sequence again: the tests' yardstick). pick: (1, vocab) logits -> (1, 1) id."""
    caches = [KVCache(m.config.n_layer) if use_cache else None for m in source.models]
    step = idx
    for _ in range(n):
        s = [m.next_logits(step, c) for m, c in zip(source.models, caches)]  # each (1, vocab)
        nxt = pick(s[0] if source.alpha is None else proxy_tuning.combine(*s, alpha=source.alpha))
        yield nxt.item()
        idx = torch.cat((idx, nxt), dim=1)
        step = nxt if use_cache else idx


def speed(cfg, attach, device, dtype, new, repeat):
    """{name: greedy tokens per second} as --generate decodes, continuing 16 random tokens by `new`:
    the plain model, and one with each of `attach` ({name: fn(model)}) attached, taking turns after
    two warm-up rounds (python -m kit.bench: the tests time nothing)."""
    models = {}
    for name, fn in {"plain": None, **attach}.items():
        torch.manual_seed(0)  # the same weights for all
        models[name] = GPT(cfg).to(device).eval()
        fn and fn(models[name])
    idx = torch.randint(cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    with autocast(device, dtype):
        for _ in range(2 + repeat):
            for name, m in models.items():
                t0 = time.perf_counter()
                list(tokens(Source(name, [m]), idx.to(device), new))  # .item() a token: in sync
                times[name].append(time.perf_counter() - t0)
    return {name: new / statistics.median(t[2:]) for name, t in times.items()}


class Stream:
    """Token ids in, text out as soon as it is final: the bytes of a character split across tokens
    wait for its last byte, and text that may begin the stop string waits until it cannot."""

    def __init__(self, enc, stop=None):
        self.enc, self.stop = enc, stop
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown, self.stopped = "", 0, False

    def add(self, token, final=False):
        """The text that token (None: none) makes final."""
        if self.stopped:
            return ""
        if token is not None:
            self.text += self.utf8.decode(self.enc.decode_single_token_bytes(token))
        if final:
            self.text += self.utf8.decode(b"", final=True)
        found = (self.text.find(self.stop, max(0, self.shown - len(self.stop) + 1)) if self.stop
                 else -1)
        if found >= 0:  # where the stop string starts
            self.text, self.stopped, final = self.text[:found], True, True
        # held back: the longest end of the text that begins the stop string
        held = 0 if final or not self.stop else next(
            (k for k in range(min(len(self.stop) - 1, len(self.text)), 0, -1)
             if self.text.endswith(self.stop[:k])), 0)
        out, self.shown = self.text[self.shown:len(self.text) - held], len(self.text) - held
        return out


def unescape(text):
    """\\n, \\t and \\\\ as a newline, a tab and a backslash; any other backslash stays."""
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def escape(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def prompts(opts, stdin=None):
    """The prompts, one at a time: --generate's, --generate-file's lines, or typed (--generate -)
    until an empty line or the end of the input."""
    if opts.generate_file:
        try:
            with open(opts.generate_file, encoding="utf-8") as f:
                lines = [line.rstrip("\r") for line in f.read().split("\n") if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--generate-file {opts.generate_file} is not UTF-8 text") from None
        if not lines:
            raise ValueError(f"--generate-file {opts.generate_file} holds no prompt")
        yield from map(unescape, lines)
    elif opts.generate == "-":
        stdin = stdin or sys.stdin
        while True:
            if stdin.isatty():
                print("prompt (an empty line ends): ", end="", file=sys.stderr, flush=True)
            line = stdin.readline().rstrip("\r\n")
            if not line:
                return
            yield unescape(line)
    else:
        yield unescape(opts.generate)


# --------------------------------------------------------------------------------------------------
# What generates: a saved run, a proxy run, or a base

def proxy_folder(path):
    """The folder of a proxy run (its metrics.json and no ckpt.pt), or None."""
    folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    if not os.path.isdir(path) and os.path.basename(path) != "metrics.json":
        return None
    has = lambda name: os.path.isfile(os.path.join(folder, name))
    return folder if has("metrics.json") and not has("ckpt.pt") else None


def from_run(cmd, opts, load_run):
    """A run's model with its method attached, and the base alone (--compare)."""
    r = load_run(cmd.load, cmd.device)
    base = bases.find(r.ckpt["base"], cmd.load)
    enc, method = bases.tokenizer_of(base), r.ckpt["method"]
    if opts.compare and method == "none":
        raise ValueError("--compare: this run is the frozen base already (--method none); "
                         "leave out --compare")
    if r.classifier is not None:
        print("(generation uses the LM head: the run's classification layer is left out)",
              file=sys.stderr)
    frozen = opts.compare and Source("frozen base", [bases.load(base, enc, cmd.device)])
    tuned = Source("frozen base" if method == "none" else f"{method} tuned", [r.model],
                   r.method_cfg.positions)
    return tuned, frozen, enc, r, base.name


def from_proxy(cmd, opts, load_run, folder):
    """Proxy tuning's three models: the large one its run recorded, the expert beside it (a full
    run), the expert's base as the anti-expert."""
    m = checkpoints.read_metrics(folder, checkpoint=False)
    if m.get("method") != "proxy" or not isinstance(m.get("large_base"), dict):
        raise ValueError(f"{folder} is not a proxy run that records its large model (runs written "
                         f"before --generate existed do not): run it again, python train.py "
                         f"--method proxy with its options")
    expert_path = os.path.join(os.path.dirname(os.path.abspath(folder)),
                               os.path.basename(str(m.get("run_dir"))), "ckpt.pt")
    expert = load_run(expert_path, cmd.device)
    small = bases.find(expert.ckpt["base"], expert_path)
    large = bases.find(m["large_base"], folder)  # recorded relative to the folder's parent
    enc = bases.tokenizer_of(small)
    if m["large_base"]["tokenizer"] != tokenizer.identity(enc):
        raise ValueError(f"{folder}: its large model and its expert read text with other "
                         f"tokenizers now: run it again")
    big = bases.load(large, enc, cmd.device)
    alpha = cmd.proxy.alpha if "alpha" in cmd.given else m["alpha"]
    tuned = Source(f"proxy-tuned, alpha {alpha:g}",
                   [big, expert.model, bases.load(small, enc, cmd.device)], alpha=alpha)
    frozen = opts.compare and Source("large model alone", [big])
    return tuned, frozen, enc, expert, large.name


def from_base(cmd):
    base = bases.named_base(cmd.base_opts, cmd.out_dir, cmd.task_opts.people, dtype=cmd.dtype)
    if not base.released and not os.path.exists(base.path):
        raise ValueError(f"no {base.name} base at {base.path}: pretrain it first (python train.py "
                         f"--method pretrain, same options), or name one with --base")
    enc = bases.tokenizer_of(base)
    if "chat" in cmd.given:
        ChatML.of(enc)  # refused before the model loads
    return Source("base", [bases.load(base, enc, cmd.device)]), None, enc, None, base.name


def main(cmd, load_run):
    """--generate: every prompt continued by the run (and, with --compare, by the frozen model)."""
    opts = cmd.extra[TITLE]
    folder = cmd.load and proxy_folder(cmd.load)
    tuned, frozen, enc, run, base_name = (
        from_proxy(cmd, opts, load_run, folder) if folder else
        from_run(cmd, opts, load_run) if cmd.load else from_base(cmd))
    saved = run.ckpt["task"]["options"] if run else {}
    # the run's own inputs: its template (of text/label lines only), its chat wrapping
    template = (cmd.task_opts.template if "template" in cmd.given else
                saved["template"] if run and run.task.labelled else None)
    chat = ChatML.of(enc) if "chat" in cmd.given or saved.get("chat") else None
    sources = [tuned] + ([frozen] if frozen else [])
    context = min(s.context() for s in sources)
    opts = replace(opts, max_new_tokens=opts.max_new_tokens or min(64, context // 2))
    room = context - opts.max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {opts.max_new_tokens} leaves no room for a prompt in "
                         f"the context of {context} positions: give at most {context - 1}")
    dtype = cmd.dtype if "dtype" in cmd.given or not run else run.ckpt["train"]["dtype"]
    seed = cmd.train.seed
    pick = lambda s: sample(s, opts.temperature, opts.top_k, opts.top_p)
    stops = stop_tokens(enc)
    decoding = ("greedy" if opts.temperature == 0 else
                f"sampled at temperature {opts.temperature:g}"
                + (f", top-k {opts.top_k}" if opts.top_k else "")
                + (f", top-p {opts.top_p:g}" if opts.top_p else "") + f", seed {seed}")
    print(f"generating with {tuned.name} ({base_name}): {decoding}, at most "
          f"{opts.max_new_tokens} new token{'s' * (opts.max_new_tokens > 1)}"
          + (f"; each prompt goes into the template {escape(template)!r}" if template else "")
          + (f"; chat: ChatML, system message {chat.system!r}" if chat else ""), file=sys.stderr)
    with autocast(cmd.device, dtype):
        for text in prompts(opts):
            shown = template.replace("{text}", text) if template else text
            ids = chat.encode(shown) if chat else enc.encode_ordinary(shown)
            if len(ids) > room:
                print(f"(the prompt is {len(ids)} tokens: cut from the left to {room}, so that "
                      f"{opts.max_new_tokens} new tokens fit the context of {context})",
                      file=sys.stderr)
                ids = chat.cut(ids, room) if chat else ids[-room:]
            print(f">>> {escape(shown)}", flush=True)
            for source in sources:
                torch.manual_seed(seed)  # the same draws for the tuned and the frozen model
                write(source, ids, opts, enc, stops, pick, cmd.device)


def stop_tokens(enc):
    """{token id: why decoding stops there}: the end-of-text token, and <|im_end|> where the
    tokenizer has it: an Instruct model ends its turn there, asked with --chat or not."""
    stops = {enc.eot: "the end-of-text token"}
    if "<|im_end|>" in enc._special_tokens:
        stops[enc._special_tokens["<|im_end|>"]] = "<|im_end|>"
    return stops


def write(source, ids, opts, enc, stops, pick, device, out=None):
    """One continuation, printed as it comes, then its tokens per second."""
    out = out or sys.stdout
    stream = Stream(enc, unescape(opts.stop) if opts.stop else None)
    out.write(f"[{source.name}] ")
    t0, n, why = time.perf_counter(), 0, f"--max-new-tokens {opts.max_new_tokens}"
    for t in tokens(source, torch.tensor([ids], device=device), opts.max_new_tokens, pick):
        n += 1
        if t in stops:
            why = stops[t]
            break
        out.write(stream.add(t))
        out.flush()
        if stream.stopped:
            why = f"the stop string {escape(stream.stop)!r}"
            break
    out.write(stream.add(None, final=True) + "\n")
    seconds = time.perf_counter() - t0
    print(f"    ({n} new tokens in {seconds:.2f}s, {n / seconds:.1f} tokens/s; stopped at {why})",
          file=sys.stderr, flush=True)
    return n
