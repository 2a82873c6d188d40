"""
Proxy tuning: "Tuning Language Models by Proxy" (Liu, Han, Wang, Tsvetkov, Choi & Smith, 2024).

Tune a small model, then let it steer a large one at decoding time. Three models share one vocabulary:
    M   the large base: never trained, used as a black box that only gives logits
    M-  a small base, the "anti-expert"
    M+  M- fine-tuned on the task, the "expert"
At every step the next token comes from
    softmax(s_M + alpha * (s_M+ - s_M-))
so the large model gets the change in the small model's opinion that fine-tuning caused. alpha = 1 by default.
With one shared vocabulary, combining log-probabilities instead of logits gives the same distribution (each
log_softmax only shifts a row by a constant). Nothing here has parameters; no model is changed.

    import proxy_tuning
    logits = proxy_tuning.proxy_logits(large, small_tuned, small, idx)            # (B, T, vocab)
    out = proxy_tuning.generate(large, small_tuned, small, idx, 20, temperature=0)  # each model keeps its KV cache
"""
import torch

from model import KVCache, sample


def check(models, length):
    """The three models must share a vocabulary, and `length` positions must fit each one's context."""
    sizes = [m.config.vocab_size for m in models]
    if len(set(sizes)) != 1:
        raise ValueError(f"proxy tuning needs one shared vocabulary; the base, expert and anti-expert have "
                         f"vocab sizes {sizes}: train them on the same tokenizer")
    for name, m in zip(("base", "expert", "anti-expert"), models):
        if length > m.config.block_size:
            raise ValueError(f"a sequence of {length} positions is longer than the {name}'s block_size "
                             f"{m.config.block_size}: shorten the prompt or generate fewer tokens")


def combine(s_base, s_expert, s_anti, alpha=1.0):
    return s_base + alpha * (s_expert - s_anti)  # the shift fine-tuning caused in the small model, applied to M


def proxy_logits(base, expert, anti_expert, idx, alpha=1.0):
    """idx (B, T) -> combined logits (B, T, vocab) at every position."""
    models = (base, expert, anti_expert)
    check(models, idx.size(1))
    return combine(*(m(idx)[0] for m in models), alpha=alpha)


@torch.no_grad()
def generate(base, expert, anti_expert, idx, max_new_tokens, alpha=1.0, temperature=1.0, top_k=None, use_cache=True,
             stop=None):
    """Continue idx (B, T) by max_new_tokens tokens sampled from the proxy-tuned distribution (temperature 0: greedy;
    fewer once every row has produced the `stop` token). Each model keeps its own KV cache, so a step costs one
    position per model."""
    models = (base, expert, anti_expert)
    check(models, idx.size(1) + max_new_tokens)
    caches = [KVCache(m.config.n_layer) if use_cache else None for m in models]
    step, T = idx, idx.size(1)
    for i in range(max_new_tokens):
        s = combine(*(m(step, cache=c)[0][:, -1, :] for m, c in zip(models, caches)), alpha=alpha)  # (B, vocab)
        idx_next = sample(s, temperature, top_k)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
        if stop is not None and (idx[:, T:] == stop).any(1).all():
            break
        step = idx_next if use_cache else idx
    return idx
