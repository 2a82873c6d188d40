"""
Evaluation: how a run is scored. Every function takes the model (or proxy tuning's combination of
three models) as plain callables, so one code path scores every method.

    scores, preds = evaluate(model, task, device)     # test/val/ood metric, probe, held-out loss

- classification (task.choices): accuracy of the likeliest label word, or of a classification layer
  (classifier.py)
- generation: exact match of the greedy answer, which stops at <|endoftext|> (forced_match: the
  same score without decoding, from one forward pass over input + answer, for sweeps)
- the probe (qa): does the greedy continuation of a biography sentence start with the fact?
- forgetting: the language-modelling loss on documents the base never saw in pretraining
- every share comes with its 95% interval (Wilson's score interval, see wilson()): a test split of
  200 examples cannot tell 0.92 from 0.94
"""
import math

import torch

from kit import data
from model import usable
from kit.options import autocast


def wilson(share, n, z=1.96):
    """The 95% (z = 1.96) Wilson score interval of a share of n examples, as (low, high). Unlike
    share +- z * sqrt(share * (1 - share) / n), it stays inside [0, 1] and is not zero-width at 0
    or 1: centre (k + z^2/2) / (n + z^2), half-width z * sqrt(k (n - k) / n + z^2 / 4) / (n + z^2)."""
    k = round(share * n)  # a share of n examples is a count
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - half), min(1.0, centre + half)


def with_interval(share, n):
    """'0.9400 (0.90-0.96)': a share with its interval, as every table and log line prints it."""
    lo, hi = wilson(share, n)
    return f"{share:.4f} ({lo:.2f}-{hi:.2f})"


def check_finite(logits, where):
    """-inf may mark a token that cannot be chosen (proxy tuning through the large model's top k);
    NaN, +inf, or no finite score in a row is an error."""
    if not usable(logits):
        raise ValueError(f"the model's logits are NaN or infinite while scoring {where}: the run "
                         f"diverged or a weight is damaged; lower --lr, or train it again")
    return logits


# one batch's (rows, T, vocab) float logits: about 256 MB at most
def rows_per_batch(vocab_size, length):
    return max(1, min(64, (1 << 26) // (vocab_size * max(1, length))))


@torch.no_grad()
def label_scores(logits_fn, task, exs, device, batch):
    """(N, K) log-probability of each label word's tokens after each input. When every label word is
    one token, one row per input gives all K scores at its last position; otherwise each
    (input, label) is a row of its own. Rows of any lengths are sorted by length and padded on the
    right, so no batch is mostly padding."""
    K, single = len(task.choice_ids), all(len(c) == 1 for c in task.choice_ids)
    labels = task.choice_ids[:1] if single else task.choice_ids
    rows = [(ex.input_ids, c) for ex in exs for c in labels]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    scores = torch.empty(len(rows), K if single else 1)
    for i in range(0, len(rows), batch):
        part = order[i:i + batch]
        idx, tgt = data.collate([rows[j] for j in part], device, task.eot)
        if single:  # every label's token at the last input position: the LM head there only
            last = torch.tensor([len(rows[j][0]) - 1 for j in part], device=device)
            logits = check_finite(logits_fn(idx, last).float(), task.name)
            logp = torch.log_softmax(logits, dim=-1)  # (B, vocab)
            scores[part] = logp[:, [c[0] for c in task.choice_ids]].cpu()
        else:
            logp = torch.log_softmax(check_finite(logits_fn(idx).float(), task.name), dim=-1)
            # (B, T, vocab)
            # (B, T): label tokens
            tok = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt >= 0)
            scores[part] = tok.sum(1, keepdim=True).cpu()
    return scores.view(len(exs), K)


@torch.no_grad()
def classifier_scores(model, classifier, task, exs, device, batch):
    """(N, K) scores of the classification layer at each input's last position."""
    out = []
    for i in range(0, len(exs), batch):
        idx, last = data.inputs_only(exs[i:i + batch], device, task.eot)
        hidden = model.features(idx)[torch.arange(len(last), device=device), last]  # (B, C)
        out.append(check_finite(classifier(hidden).float(), task.name).cpu())
    return torch.cat(out)


@torch.no_grad()
def exact_match(generate_fn, task, exs, device, context, batch=64, prefix=False):
    """Share of greedy answers equal to the gold answer (with prefix: that start with it). Inputs of
    one length are batched together, so no padding is needed; generation stops at EOT, within
    `context` positions."""
    preds, by_len = [None] * len(exs), {}
    for i, ex in enumerate(exs):
        by_len.setdefault(len(ex.input_ids), []).append(i)
    longest = max(len(ex.answer_ids) for ex in exs)
    for length, group in by_len.items():
        for j in range(0, len(group), batch):
            part = group[j:j + batch]
            idx = torch.tensor([exs[i].input_ids for i in part], device=device)
            out = generate_fn(idx, min(longest, context - length))[:, length:].tolist()
            for i, seq in zip(part, out):
                preds[i] = task.decode(seq[:seq.index(task.eot)] if task.eot in seq else seq)
    hits = [p.startswith(ex.answer) if prefix else p.strip() == ex.answer.strip()
            for p, ex in zip(preds, exs)]
    return sum(hits) / len(exs), preds


@torch.no_grad()
def forced_match(logits_fn, task, exs, device, batch):
    """Greedy exact match without decoding, as two lists of booleans (exact, starts): greedy
    decoding writes the gold answer and stops right after it exactly when, fed the gold answer, each
    of its tokens and then EOT is the likeliest at its position (it starts with the answer when its
    tokens are). One forward pass over input + answer + EOT per model scores it, so a sweep over
    proxy tuning's strengths reuses every model's logits. Stricter than exact_match() only where
    greedy writes the answer's text in other tokens than the tokenizer's own."""
    exact, starts = [], []
    for i in range(0, len(exs), batch):
        rows = [(ex.input_ids, ex.answer_ids + [task.eot] * (ex.answer_ids[-1:] != [task.eot]))
                for ex in exs[i:i + batch]]  # the answer, then EOT (encode_task has put it there)
        idx, _ = data.collate(rows, device, task.eot)
        P = max(len(c) for _, c in rows)  # answer positions, EOT included; shorter rows repeat
        pos = torch.tensor([[len(p) - 1 + min(j, len(c) - 1) for j in range(P)] for p, c in rows],
                           device=device)  # (B, P): position t predicts token t + 1
        gold = torch.tensor([[c[min(j, len(c) - 1)] for j in range(P)] for _, c in rows])
        hit = check_finite(logits_fn(idx, pos).float(), task.name).argmax(-1).cpu() == gold
        exact += hit.all(1).tolist()  # (B,)
        starts += [bool(h[:len(c) - 1].all()) for h, (_, c) in zip(hit, rows)]
    return exact, starts


@torch.no_grad()
def text_loss(logits_fn, rows, device, pad, batch=16):
    """Mean cross-entropy per token over (first token, rest) rows: the language-modelling loss on a
    text."""
    total = count = 0
    for i in range(0, len(rows), batch):
        idx, tgt = data.collate(rows[i:i + batch], device, pad)
        logits = check_finite(logits_fn(idx).float(), "the held-out text")
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(),
                                                   ignore_index=-1, reduction="sum").item()
        count += (tgt >= 0).sum().item()
    return total / count


def logits_at(model, idx, last=None):
    """The model's logits (B, T, vocab), or only at each row's position `last` (B,) -> (B, vocab),
    or positions (B, P) -> (B, P, vocab): a label is scored at one position, an answer at a few, and
    the LM head is a fifth of a small model's work."""
    if last is None:
        return model(idx)[0]
    rows = torch.arange(len(last), device=idx.device)
    return model.lm_head(model.features(idx)[rows if last.dim() == 1 else rows[:, None], last])


def evaluate(model, task, device, dtype="float32", positions=0, classifier=None, logits_fn=None,
             generate_fn=None, heldout=True):
    """Every score of a run: the metric on test, val and the out-of-distribution split, the probe,
    and (unless heldout=False) the loss on held-out text. logits_fn and generate_fn default to the
    model's own; proxy tuning passes its three-model ones."""
    data.check_inputs(model, task, "evaluate()", classifier is not None)
    model.eval()
    logits_fn = logits_fn or (lambda idx, last=None: logits_at(model, idx, last))
    generate_fn = generate_fn or (lambda idx, n: model.generate(idx, n, temperature=0,
                                                                stop=task.eot))
    context = model.config.block_size - positions
    longest = max(len(ex.input_ids) + len(ex.answer_ids) for ex in task.test)
    batch = rows_per_batch(model.config.vocab_size, longest)

    def metric(exs, prefix=False):
        if not exs:
            return None, []
        if task.choices and not prefix:
            scores = (classifier_scores(model, classifier, task, exs, device, batch)
                      if classifier else label_scores(logits_fn, task, exs, device, batch))
            preds = [task.choices[k] for k in scores.argmax(1).tolist()]
            return sum(p == ex.answer for p, ex in zip(preds, exs)) / len(exs), preds
        return exact_match(generate_fn, task, exs, device, context, prefix=prefix)
    with autocast(device, dtype):
        (test, preds), (val, _), (ood, _) = metric(task.test), metric(task.val), metric(task.ood)
        probe = metric(task.probe, prefix=True)[0]
        rows, per_batch = task.heldout_rows, rows_per_batch(model.config.vocab_size, context)
        # forgetting
        heldout = (text_loss(logits_fn, rows, device, task.eot, per_batch)
                   if rows and heldout else None)
    scores = dict(test=test, val=val, ood=ood, probe=probe, heldout_loss=heldout)
    for split in ("test", "val", "ood"):  # each split's 95% interval and size, kept beside it
        exs = getattr(task, split)
        if scores[split] is not None:
            scores[f"{split}_n"], scores[f"{split}_ci"] = len(exs), wilson(scores[split], len(exs))
    return scores, preds
