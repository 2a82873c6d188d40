"""
Prefix tuning: "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (Li & Liang, 2021).

Every attention layer gets P extra positions that have keys and values but no queries: each real
token can attend to them, they attend to nothing. They work like a KV cache of P made-up tokens, and
model.py serves them through the same `past` mechanism as its KV cache. Only the prefix trains.

    import prefix_tuning
    # freezes the model and fills every block.attn.prefix:
    prefix = prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=10))
    ... train prefix.parameters() ...
    # keep the MLP's output as plain tensors, n_layer x 2 x P x kv_width numbers:
    prefix_tuning.finish(model)

Reparameterisation (the paper's section 4.3): optimising the prefix directly was unstable, so during
training it is produced by a small MLP from a smaller table, prefix = MLP(P'), and only the MLP's
output is kept afterwards. Initialisation: the paper found activations of real words better than
random ones in low-data settings. A direct prefix starts as the keys/values the frozen model
computes for P real tokens; a reparameterised one starts its table P' at those tokens' embeddings,
the MLP at random. A zero prefix is NOT an identity: zero keys still take softmax weight (exp(0) =
1) and dilute the attention.

Llama-family models: with grouped-query attention a prefix has as many heads as the keys
(n_kv_head), so each prefix head serves a group of query heads. With rotary positions the prefix
keys are used as they are stored: nothing turns them, as nothing turns cached keys, and the real
tokens' positions start at 0, as without a prefix. So a prefix key has no position of its own; a
direct prefix starts as the keys of P real tokens at positions 0..P-1.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KVCache
from kit.options import Options, option


@dataclass
class Config(Options):
    prefix_len: int = option(10, "prefix positions in every layer", least=1)
    reparam: bool = option(True, "the reparameterisation MLP, as the paper trains it "
                                 "(--no-reparam: the prefix itself trains)")
    prefix_hidden: int = option(256, "hidden width of the reparameterisation MLP", least=1)
    where = "model: attention keys/values"

    @property
    def lr(self):  # each the best of a small sweep on qa: the direct prefix needs a far larger step
        return 3e-3 if self.reparam else 0.1

    def unused(self):
        return {"prefix_hidden"} if not self.reparam else set()


def heads(x, n_kv, B):
    """(P, n_kv x hs) -> (B, n_kv, P, hs), the layout of keys and values inside attention;
    expand shares memory across rows."""
    P, C = x.shape
    return x.view(P, n_kv, C // n_kv).transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1)


class Prefix(nn.Module):
    """One layer's prefix, stored directly: keys and values, each (P, kv_width)."""

    def __init__(self, k, v, n_kv):
        super().__init__()
        self.k, self.v, self.n_kv = nn.Parameter(k.clone()), nn.Parameter(v.clone()), n_kv

    def forward(self, B):
        return heads(self.k, self.n_kv, B), heads(self.v, self.n_kv, B)


class PrefixMLP(nn.Module):
    """The reparameterisation shared by all layers: P' (P, C) -> tanh(P' W1 + b1) W2 + b2, the keys
    and values of every layer side by side (P, n_layer x 2 x kv_width)."""

    def __init__(self, table, hidden, n_layer, kv_width):
        super().__init__()
        self.table = nn.Parameter(table.clone())               # P'
        self.hidden = nn.Linear(table.size(1), hidden)          # W1, b1
        self.out = nn.Linear(hidden, n_layer * 2 * kv_width)    # W2, b2
        self.kv_width = kv_width

    def forward(self, layer):
        """Layer `layer`'s keys and values, (P, 2, kv_width): its slice of the MLP's output. Each
        layer runs the small first matmul and only its own rows of the large last one (the last is
        n_layer times the first here), so the MLP costs little more than running it once."""
        h = torch.tanh(self.hidden(self.table))  # (P, hidden)
        rows = slice(layer * 2 * self.kv_width, (layer + 1) * 2 * self.kv_width)
        return F.linear(h, self.out.weight[rows], self.out.bias[rows]).view(-1, 2, self.kv_width)


class ReparamPrefix(nn.Module):
    """Layer i's prefix, made by the shared MLP."""

    def __init__(self, shared, layer, n_kv):
        super().__init__()
        self.shared, self.layer, self.n_kv = shared, layer, n_kv

    def forward(self, B):
        kv = self.shared(self.layer)  # (P, 2, kv_width)
        return heads(kv[:, 0], self.n_kv, B), heads(kv[:, 1], self.n_kv, B)


@torch.no_grad()
def real_word_kv(model, ids):
    """Keys and values the frozen model computes at every layer for the tokens `ids`, each
    (P, kv_width)."""
    cache = KVCache(model.config.n_layer)
    model(ids.view(1, -1), cache=cache)
    # (1, n_kv, P, hs) -> (P, kv_width)
    flat = lambda t: t[0].transpose(0, 1).reshape(t.size(2), -1)
    return [(flat(k), flat(v)) for k, v in cache.kv]


def attach(model, cfg=None, task=None):
    """Freeze the model, fill every block.attn.prefix, and return a module holding the new
    parameters."""
    cfg = cfg or Config()
    model.check_plain("prefix tuning", own="prefix")  # on top of another method: refused
    model.requires_grad_(False)
    c, wte = model.config, model.transformer.wte.weight
    n, kv_width = cfg.prefix_len, c.n_embd // c.n_head * c.n_kv_head
    if not cfg.reparam and n >= c.block_size:  # the direct init runs P tokens through the model
        raise ValueError(f"--prefix-len {n} is not shorter than the model's context of "
                         f"{c.block_size} positions: use a shorter prefix")
    # P real tokens, sampled on the CPU's generator (any id but the last, our own BPE's EOT)
    ids = torch.randint(c.vocab_size - 1, (n,), device="cpu").to(wte.device)
    if cfg.reparam:
        shared = PrefixMLP(wte[ids].detach(), cfg.prefix_hidden, c.n_layer, kv_width).to(wte.device)
        prefixes = [ReparamPrefix(shared, i, c.n_kv_head) for i in range(c.n_layer)]
    else:
        prefixes = [Prefix(k, v, c.n_kv_head) for k, v in real_word_kv(model, ids)]
    for block, prefix in zip(model.transformer.h, prefixes):
        block.attn.prefix = prefix
    return nn.ModuleList(prefixes)  # shared parameters are listed once by .parameters()


@torch.no_grad()
def finish(model, cfg=None):
    """After training: replace MLP-produced prefixes by their output, stored as plain per-layer
    tensors (same logits, fewer numbers: n_layer x 2 x P x kv_width). Returns the options that
    rebuild what is kept."""
    for block in model.transformer.h:
        if isinstance(block.attn.prefix, ReparamPrefix):
            kv = block.attn.prefix.shared(block.attn.prefix.layer)  # (P, 2, kv_width)
            block.attn.prefix = Prefix(kv[:, 0], kv[:, 1], block.attn.n_kv_head)
    return replace(cfg or Config(), reparam=False)
