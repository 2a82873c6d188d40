"""
Proxy tuning: "Tuning Language Models by Proxy" (Liu, Han, Wang, Tsvetkov, Choi & Smith, 2024).

Tune a small model, then let it steer a large one at decoding time. Three models share a vocabulary:
    M   the large model: never trained, used as a black box that only gives logits
    M-  a small model, the "anti-expert"
    M+  M- fine-tuned on the task, the "expert"
At every step the next token comes from
    softmax(s_M + alpha * (s_M+ - s_M-))
so the large model gets the change in the small model's opinion that fine-tuning caused. The paper's
alpha is 1, the default of the functions below; train.py's is 2 (Config.alpha, measured best on qa).
With one shared vocabulary, combining log-probabilities instead of logits gives the same
distribution (each log_softmax only shifts a row by a constant). Nothing here has parameters; no
model is changed.

    import proxy_tuning
    # (B, T, vocab) at every position:
    logits = proxy_tuning.proxy_logits(large, expert, anti_expert, idx)
    # greedy decoding, each model with its own KV cache:
    out = proxy_tuning.generate(large, expert, anti_expert, idx, 20, temperature=0)
    # the large model as a hosted API offers it: only its 5 likeliest next tokens' log-probabilities
    out = proxy_tuning.generate(TopK(large, 5), expert, anti_expert, idx, 20, temperature=0)

M is a black box: generate() asks it only for next-token scores (`next_logits`), so anything that
answers "the log-probabilities of the next token after these tokens" can be M. A hosted model's API
gives fewer: the log-probabilities of its top k tokens (the paper's GPT-3.5 run used k = 5). TopK is
that API, with one of our models behind it: the combination can then choose only among M's top k.

Why proxy tuning is not a row of train.METHODS: every other method adds parameters to the model it
tunes and trains them in the loop. Proxy tuning adds none to the large model; what trains is a whole
small model (full fine-tuning of M-), and the models meet only at decoding. So train.py runs it as
three steps (train the expert, then score M alone and the combination), and its options below are
the command line's "proxy tuning" group.
"""
from dataclasses import dataclass

import torch

from model import SIZES, KVCache, sample
from kit.options import Options, option


@dataclass
class Config(Options):
    alpha: float = option(2.0, "strength of the expert's shift (the paper's default is 1; "
                               "2 measured best on qa here)")
    small_size: str = option(None, "preset of our small expert/anti-expert, pretrained here on the "
                                   "large model's tokenizer (default: the next smaller preset, or "
                                   "small beside a --base)", choices=tuple(SIZES))
    small_base: str = option(None, "a released model (folder or .gguf) as the small "
                                   "expert/anti-expert")
    small_layers: int = option(None, "the small model as --base's first N blocks (+ its final "
                                     "norm and head), healed on --data for --pretrain-steps "
                                     "(default 300): small, and it knows English", least=1)
    where = "output: logits of a small tuned model"
    # the expert's full fine-tuning: a small, briefly pretrained model of ours wants a larger step
    # (a released small model, --small-base, takes full fine-tuning's own: train.Full.Config.lr)
    lr = 1e-3


class TopK:
    """A model seen through a hosted API: for the tokens so far, the log-probabilities of its k
    likeliest next tokens and nothing else (every other token is -inf: unknown, never chosen). With
    k = the vocabulary it is the model's log_softmax, which steers exactly as its logits do."""

    def __init__(self, model, k):
        if type(k) is not int or k < 1:
            raise ValueError(f"TopK: k must be a whole number of at least 1, got {k!r}")
        self.model, self.k, self.config = model, k, model.config

    def next_logits(self, idx, cache=None):
        return top_k_only(self.model.next_logits(idx, cache), self.k)


def top_k_only(s, k):
    """Scores (..., vocab) -> log-probabilities of the k likeliest tokens, -inf elsewhere."""
    logp = torch.log_softmax(s.float(), dim=-1)
    top = logp.topk(min(k, logp.size(-1)), dim=-1)
    return torch.full_like(logp, float("-inf")).scatter(-1, top.indices, top.values)


def check(models, length):
    """The three models must share a vocabulary, and `length` positions must fit each one's
    context."""
    sizes = [m.config.vocab_size for m in models]
    if len(set(sizes)) != 1:
        raise ValueError(f"proxy tuning needs one shared vocabulary; the large model, expert and "
                         f"anti-expert have vocab sizes {sizes}: train them on the same tokenizer")
    for name, m in zip(("large model", "expert", "anti-expert"), models):
        if length > m.config.block_size:
            raise ValueError(f"a sequence of {length} positions is longer than the {name}'s "
                             f"block_size {m.config.block_size}: shorten the prompt or generate "
                             f"fewer tokens")


def combine(s_large, s_expert, s_anti, alpha=1.0):
    # the shift fine-tuning caused in the small model, applied to M
    return s_large + alpha * (s_expert - s_anti)


def proxy_logits(large, expert, anti_expert, idx, alpha=1.0):
    """idx (B, T) -> combined logits (B, T, vocab) at every position."""
    models = (large, expert, anti_expert)
    check(models, idx.size(1))
    return combine(*(m(idx)[0] for m in models), alpha=alpha)


@torch.no_grad()
def generate(large, expert, anti_expert, idx, max_new_tokens, alpha=1.0, temperature=1.0,
             top_k=None, use_cache=True, stop=None):
    """Continue idx (B, T) by max_new_tokens tokens sampled from the proxy-tuned distribution
    (temperature 0: greedy; fewer once every row has produced the `stop` token). Each model keeps
    its own KV cache, so a step costs one position per model. `large` needs only `config` and
    `next_logits(idx, cache)`: a GPT, or TopK(GPT, k)."""
    models = (large, expert, anti_expert)
    if type(max_new_tokens) is not int or max_new_tokens < 0:  # -3 would return idx silently
        raise ValueError(f"proxy_tuning.generate: max_new_tokens must be a whole number of at "
                         f"least 0, got {max_new_tokens!r}")
    check(models, idx.size(1) + max_new_tokens)
    caches = [KVCache(m.config.n_layer) if use_cache else None for m in models]
    step, T = idx, idx.size(1)
    for i in range(max_new_tokens):
        # each model's logits of the next token, (B, V), combined:
        s = combine(*(m.next_logits(step, c) for m, c in zip(models, caches)), alpha=alpha)
        idx_next = sample(s, temperature, top_k)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
        if stop is not None and (idx[:, T:] == stop).any(1).all():
            break
        step = idx_next if use_cache else idx
    return idx
