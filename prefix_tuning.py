"""
Prefix tuning: "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (Li & Liang, 2021).

Every attention layer gets P extra positions that have keys and values but no queries: each real token can attend
to them, they attend to nothing. They work like a KV cache of P made-up tokens, and model.py serves them through
the same `past` mechanism as its KV cache. Only the prefix trains; the GPT stays frozen.

    import prefix_tuning
    prefix = prefix_tuning.attach(model, n_prefix=10, reparam=True)   # freezes model, fills every block.attn.prefix
    ... train prefix.parameters() ...
    prefix_tuning.merge(model)              # keep the MLP's output as plain tensors: n_layer x 2 x P x n_embd numbers

Reparameterisation (the paper's section 4.3): optimising the prefix directly was unstable, so during training it is
produced by a small MLP from a smaller table, prefix = MLP(P'), and only the MLP's output is kept afterwards.
Initialisation: the paper found activations of real words better than random ones in low-data settings. Direct
prefixes start as the keys/values the frozen model computes for P real tokens (sampled or given); a reparameterised
prefix starts its table P' at those tokens' embeddings, the MLP at a standard random init.
A zero prefix is NOT an identity: zero keys still take softmax weight (exp(0) = 1) and dilute the attention.
"""
import torch
import torch.nn as nn

from model import KVCache


def heads(x, n_head, B):
    """(P, C) -> (B, nh, P, hs): the layout of keys and values inside attention; expand shares memory across rows."""
    P, C = x.shape
    return x.view(P, n_head, C // n_head).transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1)


class Prefix(nn.Module):
    """One layer's prefix, stored directly: keys and values, each (P, C)."""

    def __init__(self, k, v, n_head):
        super().__init__()
        self.k, self.v, self.n_head = nn.Parameter(k.clone()), nn.Parameter(v.clone()), n_head

    def forward(self, B):
        return heads(self.k, self.n_head, B), heads(self.v, self.n_head, B)


class PrefixMLP(nn.Module):
    """The reparameterisation shared by all layers: P' (P, C) -> MLP -> keys and values for every layer."""

    def __init__(self, table, hidden, n_layer):
        super().__init__()
        P, C = table.shape
        self.table = nn.Parameter(table.clone())  # P'
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.Tanh(), nn.Linear(hidden, n_layer * 2 * C))
        self.n_layer = n_layer

    def forward(self):
        P, C = self.table.shape
        return self.mlp(self.table).view(P, self.n_layer, 2, C)


class ReparamPrefix(nn.Module):
    """Layer i's slice of the shared MLP's output. Each layer re-runs the tiny MLP: simpler than caching it, and
    its cost (P rows) is negligible beside the model's own work on B x T tokens."""

    def __init__(self, shared, layer, n_head):
        super().__init__()
        self.shared, self.layer, self.n_head = shared, layer, n_head

    def forward(self, B):
        kv = self.shared()[:, self.layer]  # (P, 2, C)
        return heads(kv[:, 0], self.n_head, B), heads(kv[:, 1], self.n_head, B)


@torch.no_grad()
def real_word_kv(model, ids):
    """Keys and values the frozen model computes at every layer for the tokens `ids`, each (n_layer, P, C)."""
    cache = KVCache(model.config.n_layer)
    model(ids.view(1, -1), cache=cache)
    flat = lambda t: t[0].transpose(0, 1).reshape(t.size(2), -1)  # (1, nh, P, hs) -> (P, C)
    return [(flat(k), flat(v)) for k, v in cache.kv]


def attach(model, n_prefix=10, reparam=True, hidden=256, init_ids=None, generator=None):
    """Freeze the model, fill every block.attn.prefix, and return a module holding the new parameters."""
    if n_prefix < 1:
        raise ValueError(f"prefix length must be at least 1, got {n_prefix}")
    model.requires_grad_(False)
    cfg, wte = model.config, model.transformer.wte.weight
    if init_ids is None:  # P real tokens, sampled from the vocabulary (the EOT id, the last one, left out)
        init_ids = torch.randint(cfg.vocab_size - 1, (n_prefix,), generator=generator)
    ids = torch.tensor((list(init_ids) * n_prefix)[:n_prefix], device=wte.device)
    if reparam:
        shared = PrefixMLP(wte[ids].detach(), hidden, cfg.n_layer).to(wte.device)
        prefixes = [ReparamPrefix(shared, i, cfg.n_head) for i in range(cfg.n_layer)]
    else:
        prefixes = [Prefix(k, v, cfg.n_head) for k, v in real_word_kv(model, ids)]
    for block, prefix in zip(model.transformer.h, prefixes):
        block.attn.prefix = prefix
    return nn.ModuleList(prefixes)  # shared parameters are listed once by .parameters()


@torch.no_grad()
def merge(model):
    """Replace MLP-produced prefixes by their output, stored as plain per-layer tensors: same logits, fewer numbers."""
    for block in model.transformer.h:
        if isinstance(block.attn.prefix, ReparamPrefix):
            kv = block.attn.prefix.shared()[:, block.attn.prefix.layer]  # (P, 2, C)
            block.attn.prefix = Prefix(kv[:, 0], kv[:, 1], block.attn.n_head)


def stored_params(model):
    """What a merged prefix keeps: n_layer x 2 x P x n_embd."""
    P = model.transformer.h[0].attn.prefix(1)[0].size(2)
    return model.config.n_layer * 2 * P * model.config.n_embd
