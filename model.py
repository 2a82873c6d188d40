"""
A small GPT (GPT-2's architecture exactly, in the style of nanoGPT) with four named injection points
for parameter-addition fine-tuning. Each point does nothing until a method file fills it:

    1. input      model.soft_prompt            None          -> prompt_tuning.py  (Lester et al. 2021)
    2. attention  block.attn.prefix            None          -> prefix_tuning.py  (Li & Liang 2021)
    3. sublayers  block.adapter_attn / _mlp    nn.Identity   -> adapter.py        (Houlsby et al. 2019)
    4. output     the logits                   --            -> proxy_tuning.py   (Liu et al. 2024)

Usage:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=2048))
    logits, loss = model(idx, targets)                        # idx: (B, T) token ids; targets -1 = ignored
    out = model.generate(idx, max_new_tokens=20, temperature=0)   # greedy, with a KV cache
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 256    # the most positions a sequence may use (soft prompt included)
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True        # GPT-2 has biases in Linear layers and LayerNorms


class KVCache:
    """Keys and values of the positions a model has already seen, one (k, v) pair per layer.

    A prefix (prefix_tuning.py) is the same thing: keys and values of positions that have no queries. So the
    attention layer treats both alike, as `past` keys/values that come before the new positions."""

    def __init__(self, n_layer):
        self.kv = [None] * n_layer   # per layer: (k, v), each (B, nh, S, hs), S = prefix + positions seen
        self.pos = 0                 # positions seen so far (soft prompt + tokens): where the next one starts


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        # injection point 2: a callable, prefix(B) -> (k, v), each (B, nh, P, hs); see prefix_tuning.py
        self.prefix = None

    def forward(self, x, past=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if past is None and self.prefix is not None:
            past = self.prefix(B)  # injection point 2: prefix keys/values act as a cache of P query-less positions
        if past is not None:  # keys/values of earlier positions (prefix, KV cache, or both) come first
            # (.to: under bf16 autocast a float32 prefix meets bf16 keys)
            k = torch.cat([past[0].to(k.dtype), k], dim=2)  # (B, nh, S + T, hs)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        present = (k, v)
        # Causal mask aligned bottom-right: query i sees every key up to its own position. SDPA's is_causal=True
        # aligns top-left, which is only right when there are as many keys as queries.
        S = k.size(2) - T
        mask = None if S == 0 or T == 1 else torch.ones(T, S + T, dtype=torch.bool, device=x.device).tril(S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(S == 0 and T > 1),
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), present


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # injection point 3: modules applied to each sublayer's output before the residual add; see adapter.py
        self.adapter_attn = nn.Identity()
        self.adapter_mlp = nn.Identity()

    def forward(self, x, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + self.adapter_attn(a)               # injection point 3 (after attention)
        x = x + self.adapter_mlp(self.mlp(self.ln_2(x)))  # injection point 3 (after the MLP)
        return x, present


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        # injection point 1: a module mapping token embeddings (B, T, C) to (B, n + T, C); see prompt_tuning.py
        self.soft_prompt = None
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # scaled init of the residual projections, per GPT-2
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, trainable_only=False):
        """Parameters counted once (the tied embedding/head once), optionally only those that train."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, vocab) for every token position, and the mean cross-entropy over the
        targets that are not -1 (or None). With a KVCache, idx holds only the new tokens and the cache grows."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        x = self.transformer.wte(idx)  # token embeddings (B, T, C)
        if self.soft_prompt is not None and start == 0:
            x = self.soft_prompt(x)  # injection point 1: (B, n + T, C), the prompt vectors take positions 0..n-1
        n = x.size(1) - T  # soft-prompt positions: their outputs are dropped below
        if start + n + T > self.config.block_size:
            raise ValueError(f"sequence of {start + n + T} positions (soft prompt included) is longer than the "
                             f"model's block_size {self.config.block_size}: shorten the input or generate fewer tokens")
        pos = torch.arange(start, start + n + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, cache.kv[i] if cache is not None else None)
            if cache is not None:
                cache.kv[i] = present
        if cache is not None:
            cache.pos = start + n + T
        x = self.transformer.ln_f(x[:, n:])  # real tokens only, so losses and metrics never see the soft prompt
        logits = self.lm_head(x)  # injection point 4: proxy_tuning.py combines these logits across models
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Continue idx (B, T) by max_new_tokens tokens. temperature=0 is greedy. With the KV cache each new
        token runs one position through the model instead of the whole sequence again."""
        cache = KVCache(self.config.n_layer) if use_cache else None
        logits, _ = self(idx, cache=cache)
        for i in range(max_new_tokens):
            idx_next = sample(logits[:, -1, :], temperature, top_k)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if i < max_new_tokens - 1:  # the last token needs no forward pass of its own
                logits, _ = self(idx_next, cache=cache) if use_cache else self(idx)
        return idx


def sample(logits, temperature=1.0, top_k=None):
    """Next token ids (B, 1) from last-position logits (B, vocab); temperature 0 picks the argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
