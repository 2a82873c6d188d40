"""
Proxy tuning's scores (proxy_tuning.py; train.py's run_proxy trains the expert, then calls score()):
the large model M alone, the small model M- alone, the expert M+ alone, and M steered by M+ - M- at
each strength alpha, with M's full scores and through its top k only (what a hosted model's API
gives), and the cost of a generated token each way.

    result = proxy_eval.score(large, expert, anti_expert, task, "cpu", "float32", alpha=1.0)
    proxy_eval.report(result, task, names)    # the table, as train.py prints it

Every model's logits at the scored positions are computed once and kept (Kept), so the sweep over
alphas and k's costs one forward pass per model: label scores at the last input position for
classification, evaluate.forced_match (greedy exact match without decoding) for generation. The
combination at --alpha is also decoded for real: that is the run's score, it times a token, and it
checks forced_match against generation.
"""
import time

import proxy_tuning
from kit.evaluate import evaluate, forced_match, logits_at, with_interval
from kit.loop import log, mean

SWEEP = (0.5, 1.0, 1.5, 2.0)  # strengths scored beside the chosen --alpha
TOP_KS = (None, 100, 20, 5)   # M's full scores, then its top k as an API gives them (the paper: 5)


class Kept:
    """Each model's logits at the scored positions, computed once and kept."""

    def __init__(self, models):
        self.models, self.logits = models, [{} for _ in models]

    def __call__(self, i, idx, last=None):
        if last is None:  # held-out text: every position, not kept
            return logits_at(self.models[i], idx)
        key = (idx.cpu().numpy().tobytes(), last.cpu().numpy().tobytes())
        if key not in self.logits[i]:
            self.logits[i][key] = logits_at(self.models[i], idx, last)
        return self.logits[i][key]

    def model(self, i):
        return lambda idx, last=None: self(i, idx, last)

    def steered(self, alpha, k=None):
        """The combination's logits_fn, with M's full scores or (k) only its top k."""
        def logits_fn(idx, last=None):
            large = self(0, idx, last)
            large = large if k is None else proxy_tuning.top_k_only(large, k)
            return proxy_tuning.combine(large, self(1, idx, last), self(2, idx, last), alpha)
        return logits_fn


class Timed:
    """A generate_fn that counts its seconds and the tokens it wrote (rows x steps, the prompt's
    reading included): seconds per generated token, M alone against the combination."""

    def __init__(self, generate_fn):
        self.generate_fn, self.seconds, self.tokens = generate_fn, 0.0, 0

    def __call__(self, idx, n):
        t0 = time.time()
        out = self.generate_fn(idx, n)
        self.seconds += time.time() - t0
        self.tokens += out[:, idx.size(1):].numel()
        return out

    def per_token(self):
        return self.seconds / max(1, self.tokens)


def score(big, expert, anti, task, device, dtype, alpha):
    """Every score of proxy tuning on `task`, as one dict (see report())."""
    kept, eot = Kept((big, expert, anti)), task.eot
    alone_gen = Timed(lambda idx, n: big.generate(idx, n, temperature=0, stop=eot))
    steer_gen = Timed(lambda idx, n: proxy_tuning.generate(big, expert, anti, idx, n, alpha,
                                                           temperature=0, stop=eot))
    t0 = time.time()
    alone, _ = evaluate(big, task, device, dtype, logits_fn=kept.model(0), generate_fn=alone_gen)
    t_large = time.time() - t0
    small, _ = evaluate(anti, task, device, dtype, heldout=False, logits_fn=kept.model(2))
    for logits in kept.logits:  # the combination is timed with all three models at work
        logits.clear()
    t0 = time.time()
    scores, preds = evaluate(big, task, device, dtype, logits_fn=kept.steered(alpha),
                             generate_fn=steer_gen)
    result = dict(alone=alone, small=small, scores=scores, preds=preds,
                  eval_time_ratio=(time.time() - t0) / t_large, alpha=alpha)
    if not task.choices:
        result.update(s_per_token_large=alone_gen.per_token(),
                      s_per_token_proxy=steer_gen.per_token())
    # {"all" or "top K": {alpha: scores}}: M's full scores, then only its top k
    result["sweep"] = {f"top {k}" if k else "all": {
                           f"{a:g}": sweep_point(kept.steered(a, k), big, task, device, dtype)
                           for a in sorted({*SWEEP, alpha})} for k in TOP_KS}
    if not task.choices:  # each model alone, scored the same way: does M know what M+ says?
        result["forced"] = {name: sweep_point(kept.model(i), big, task, device, dtype)
                            for i, name in enumerate(("large", "expert", "anti"))}
        result["forced_agrees"] = sum(a == b for a, b in zip(
            forced_match(kept.steered(alpha), task, task.test, device, 16)[0],
            [p.strip() == ex.answer.strip() for p, ex in zip(preds, task.test)]))
    return result


def sweep_point(logits_fn, big, task, device, dtype):
    """test and val (and, for generation, the share of test answers whose tokens come out right
    however the model then goes on: what it knows)."""
    if task.choices:
        s = evaluate(big, task, device, dtype, heldout=False, logits_fn=logits_fn)[0]
        return dict(test=s["test"], val=s["val"])
    (test, starts), (val, _) = (forced_match(logits_fn, task, exs, device, 16)
                                for exs in (task.test, task.val or task.test[:0]))
    return dict(test=mean(test), val=mean(val), starts=mean(starts))  # shares of the hits


def best_alpha(points):
    """The strength ({alpha: scores}) with the best validation score; the smaller on a tie."""
    return max(points, key=lambda a: (points[a]["val"] or 0, -float(a)))


def report(r, task, names, expert_test, tuned):
    """The table of proxy tuning's scores, as train.py logs it. names: (large, small) bases' names;
    tuned: the best directly tuned large model's (method, test), or None."""
    n, nv = len(task.test), len(task.val or [])
    row = lambda label, v, extra="": log(f"  {label + ':':44} " + (
        "not run" if v is None else with_interval(v, n)) + extra)
    log(f"\nproxy tuning on {task.name}, test {task.metric} on {n} examples, 95% interval; "
        f"val ({nv}) beside the sweep, to choose alpha on:")
    knows = r.get("forced", {})
    starts = lambda who: (f"   starts right {knows[who]['starts']:.4f}" if who in knows else "")
    row(f"large model alone ({names[0]})", r["alone"]["test"], starts("large"))
    row(f"small model alone ({names[1]})", r["small"]["test"], starts("anti"))
    row(f"small expert alone (tuned {names[1]})", expert_test, starts("expert"))
    row(f"proxy-tuned, alpha {r['alpha']:g}, decoded", r["scores"]["test"])
    for k, points in r["sweep"].items():  # the scores kept: no decoding
        for a, v in points.items():
            extra = "".join(f"   {name} {v[key]:.4f}" for name, key in (("val", "val"), (
                "starts right", "starts")) if v.get(key) is not None)
            best = " (best val)" if a == best_alpha(points) else ""
            row(f"  alpha {a}, M's scores: {k}{best}", v["test"], extra)
    if tuned:
        row(f"large model tuned directly ({tuned[0]})", tuned[1])
    if "forced_agrees" in r:
        log(f"  forced scoring agrees with decoding on {r['forced_agrees']} of {n} test answers "
            f"(alpha {r['alpha']:g})")
        log(f"  seconds per generated token: large model alone {r['s_per_token_large']:.4f}, "
            f"proxy-tuned {r['s_per_token_proxy']:.4f} "
            f"({r['s_per_token_proxy'] / r['s_per_token_large']:.2f}x)")
    log(f"  evaluation time, proxy / large model alone: {r['eval_time_ratio']:.2f}x")
    for ex, p in list(zip(task.test, r["preds"]))[:3]:
        log(f"  {ex.input[-60:]!r} -> {p!r} (gold {ex.answer!r})")
