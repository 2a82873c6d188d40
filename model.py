"""
A small GPT in the style of nanoGPT, with four named injection points for parameter-addition
fine-tuning.

GPT-2's architecture is the default. Five switches in GPTConfig turn the same blocks into a
Llama-family model (Llama, Mistral, SmolLM2): RMSNorm, a gated SwiGLU MLP, rotary positions,
grouped-query attention, and no biases (tie_head=False: an LM head of its own, as in Llama 2 and 3).
A sixth, qkv_bias, gives Qwen2's blocks: Llama's, with biases on the queries, keys and values alone.
Each injection point does nothing until a method fills it:

    1. input      model.soft_prompt          None         -> prompt_tuning.py  (Lester et al. 2021)
    2. attention  block.attn.prefix          None         -> prefix_tuning.py  (Li & Liang 2021)
    3. sublayers  block.adapter_attn / _mlp  None         -> adapter.py        (Houlsby et al. 2019)
    4. output     the logits                 --           -> proxy_tuning.py   (Liu et al. 2024)

Usage:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=2048))  # GPT-2's blocks, random weights
    model = GPT(GPTConfig(norm="rmsnorm", mlp="swiglu", rope_theta=1e4, n_kv_head=2, bias=False))
    model = GPT(GPTConfig(..., bias=False, qkv_bias=True))  # ... and Qwen2's: q, k, v with biases
    logits, loss = model(idx, targets)  # idx: (B, T) token ids; targets -1 = ignored
    out = model.generate(idx, max_new_tokens=20, temperature=0)  # greedy, with a KV cache
Released weights (GPT-2, Llama-family and Qwen2 folders, .gguf files) are read by
kit/pretrained.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


# Presets of the bases that train.py pretrains here; pretrain_steps fit a 2-core CPU for tiny and
# small, one GPU for large and xl.
SIZES = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, pretrain_steps=300),
    "small": dict(n_layer=4, n_head=4, n_embd=128, pretrain_steps=1500),
    "medium": dict(n_layer=6, n_head=6, n_embd=192, pretrain_steps=1500),
    "large": dict(n_layer=8, n_head=8, n_embd=384, pretrain_steps=4000),
    "xl": dict(n_layer=12, n_head=12, n_embd=768, pretrain_steps=4000),
}
# proxy's small model
SMALLER = {"small": "tiny", "medium": "small", "large": "small", "xl": "medium"}

# The injection points, declared once: {attribute: the module that holds it}. Each holds None
# until a method fills it, and a module sets its own to None (empty_seams); attached() reads this
# table, so every "is a method attached?" check covers a new seam with no further edit: a seam is
# a row.
SEAMS = {
    "soft_prompt": "GPT",                  # 1. input: embeddings (B, T, C) -> (B, n + T, C)
    "prefix": "CausalSelfAttention",       # 2. attention: prefix(B) -> (k, v), (B, n_kv, P, hs)
    "adapter_attn": "Block",               # 3. after attention, before the residual add
    "adapter_mlp": "Block",                # 3. after the MLP, before the residual add
}


def empty_seams(module):
    """Set `module`'s seams (its class's rows, or a parent class's) to None: with every seam empty
    the model computes exactly what it computes without them."""
    classes = {c.__name__ for c in type(module).__mro__}
    for name, owner in SEAMS.items():
        if owner in classes:
            setattr(module, name, None)


@dataclass
class GPTConfig:
    block_size: int = 256       # the most positions a sequence may use (soft prompt included)
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # The switches: GPT-2's values are the defaults; the README's table gives Llama's and where each
    # acts.
    bias: bool = True           # biases in the Linear layers and LayerNorms (Llama has none)
    qkv_bias: bool = False      # biases on q, k, v (c_attn) even when bias=False (Qwen2)
    norm: str = "layernorm"     # or "rmsnorm": x / rms(x) * w, no mean subtraction, no bias
    norm_eps: float = 1e-5
    mlp: str = "gelu"           # or "swiglu": down(silu(gate(x)) * up(x)), a gated MLP
    n_hidden: int = None        # the MLP's hidden width; None: 4 x n_embd, as in GPT-2
    rope_theta: float = None    # rotary positions with this base; None: a learned position table
    n_kv_head: int = None       # key/value heads (grouped-query attention);
                                # None: one per query head (set so when made)
    tie_head: bool = True       # the LM head is the token embedding matrix (GPT-2, SmolLM2)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head  # None: one key/value head per query head
        # a typo in a switch would otherwise quietly build GPT-2's blocks
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")


class KVCache:
    """Keys and values of the positions a model has already seen, one (k, v) pair per layer.

    A prefix (prefix_tuning.py) is the same thing: keys and values of positions that have no
    queries. So the attention layer treats both alike, as `past` keys/values that come before the
    new positions."""

    def __init__(self, n_layer):
        # per layer: (k, v), each (B, n_kv, S, hs), S = prefix + positions seen
        self.kv = [None] * n_layer
        # positions seen so far (soft prompt + tokens): where the next starts
        self.pos = 0


def norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rotary(positions, head_size, theta):
    """cos and sin of the rotation angles, each (T, hs): dimension i turns with i + hs/2
    ("rotate half", the pairing of the Llama checkpoints), at a frequency that falls from 1 to
    1/theta across the pairs."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_size, 2, device=positions.device).float() / head_size)
    angles = torch.outer(positions.float(), inv_freq)   # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)         # (T, hs)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """x (B, nh, T, hs) turned by its positions' angles: q.k then depends on the positions'
    difference only."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        # width of the keys (and of the values)
        kv = config.n_embd // config.n_head * self.n_kv_head
        self.split = [config.n_embd, kv, kv]
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, sum(self.split), bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        # injection point 2, self.prefix: None until prefix_tuning.py fills it (SEAMS)
        empty_seams(self)

    def forward(self, x, past=None, rope=None):
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.split, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        # rotary positions turn the new queries and keys; cached keys are turned already
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if past is None and self.prefix is not None:
            # injection point 2: keys/values of P positions that have no queries
            past = self.prefix(B)
        # keys/values of earlier positions (prefix, KV cache, or both) come first
        if past is not None:
            # (.to: under bf16 autocast a float32 prefix meets bf16 keys)
            k = torch.cat([past[0].to(k.dtype), k], dim=2)  # (B, n_kv, S + T, hs)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        present = (k, v)
        # Causal mask aligned bottom-right: query i sees every key up to its own position. SDPA's
        # is_causal=True aligns top-left, which is only right when there are as many keys as
        # queries.
        S = k.size(2) - T
        mask = (None if S == 0 or T == 1
                else torch.ones(T, S + T, dtype=torch.bool, device=x.device).tril(S))
        # enable_gqa: each key/value head serves n_head / n_kv_head query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(S == 0 and T > 1),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        # re-assemble all head outputs side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), present


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        hidden = config.n_hidden or 4 * config.n_embd
        self.gated = config.mlp == "swiglu"
        # swiglu: the gate and the up projection in one matmul, (B, T, 2 x hidden), split in forward
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * hidden, bias=config.bias)
        self.act = nn.SiLU() if self.gated else nn.GELU(approximate='tanh')  # GPT-2: the tanh GELU
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            # SwiGLU (Shazeer 2020): the gate decides how much of `up` passes
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        # injection point 3, self.adapter_attn and self.adapter_mlp: modules applied to each
        # sublayer's output before the residual add; None until adapter.py fills them (SEAMS)
        empty_seams(self)

    def forward(self, x, past=None, rope=None):
        a, present = self.attn(self.ln_1(x), past, rope)
        if self.adapter_attn is not None:
            a = self.adapter_attn(a)   # injection point 3 (after attention)
        x = x + a
        m = self.mlp(self.ln_2(x))
        if self.adapter_mlp is not None:
            m = self.adapter_mlp(m)    # injection point 3 (after the MLP)
        return x + m, present


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # a learned position table (GPT-2); rotary positions need none
            wpe=(nn.Embedding(config.block_size, config.n_embd) if config.rope_theta is None
                 else None),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        # injection point 1, self.soft_prompt: None until prompt_tuning.py fills it (SEAMS)
        empty_seams(self)
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

    @classmethod
    def from_pretrained(cls, path, block_size=None):
        """Released weights, as float32: a GPT-2, Llama-family or Qwen2 folder, or a .gguf file.
        The door to kit/pretrained.py, which reads the files; block_size shortens the context (as
        nanoGPT's crop_block_size)."""
        from kit import pretrained  # reading files is the kit's job: this file needs torch alone
        # GPTConfig's fields, {our name: tensor reader}
        config, tensors = pretrained.read(path, block_size)
        # shapes only: no time spent on a random init that the weights replace
        with torch.device("meta"):
            model = cls(GPTConfig(**config))
        pretrained.fill(model, path, tensors)
        return model.eval()

    def attached(self):
        """The injection points a method has filled, e.g. ['h.0.attn.prefix', ...]: every seam of
        SEAMS in every module that holds one, so a new row there is checked too. None on the plain
        model."""
        return [f"{path.removeprefix('transformer.')}.{name}".lstrip(".")
                for path, module in self.named_modules()
                for name in SEAMS if getattr(module, name, None) is not None]

    def check_plain(self, method, own=None):
        """A method attaches to the plain model only: on top of another one it would silently keep
        (and train) what that one left. `own`: the method's own point, which attaching again
        replaces."""
        left = [p for p in self.attached() if own is None or not p.endswith(own)]
        if left:
            raise ValueError(f"{method}: this model already has {left[0]} attached (a method was "
                             f"attached before); attach to a fresh copy of the base")

    def num_params(self, trainable_only=False):
        """Parameters counted once (a tied embedding/head once), optionally only those that
        train."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, vocab) for every token position, and the mean cross-entropy
        over the targets that are not -1 (or None). With a KVCache, idx holds only the new tokens
        and the cache grows."""
        # injection point 4: proxy_tuning.py combines these
        logits = self.lm_head(self.features(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def features(self, idx, cache=None):
        """idx (B, T) -> the final hidden states (B, T, C) of the real tokens, which the LM head (or
        a classification layer, kit/classifier.py) turns into scores."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        x = self.transformer.wte(idx)  # token embeddings (B, T, C)
        if self.soft_prompt is not None and start == 0:
            # injection point 1: (B, n + T, C); the prompt takes positions 0..n-1
            x = self.soft_prompt(x)
        n = x.size(1) - T  # soft-prompt positions: their outputs are dropped below
        if start + n + T > self.config.block_size:
            raise ValueError(f"a sequence of {start + n + T} positions (soft prompt included) is "
                             f"longer than the model's block_size {self.config.block_size}: "
                             f"shorten the input or generate fewer tokens")
        pos = torch.arange(start, start + n + T, dtype=torch.long, device=idx.device)
        rope = None
        if self.config.rope_theta is None:
            x = x + self.transformer.wpe(pos)
        else:  # rotary: positions turn the queries and keys inside attention instead
            rope = rotary(pos, self.config.n_embd // self.config.n_head, self.config.rope_theta)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, cache.kv[i] if cache is not None else None, rope)
            if cache is not None:
                cache.kv[i] = present
        if cache is not None:
            cache.pos = start + n + T
        # real tokens only: losses and metrics never see the prompt
        return self.transformer.ln_f(x[:, n:])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, stop=None):
        """Continue idx (B, T) by max_new_tokens tokens (fewer once every row has produced the
        `stop` token). temperature=0 is greedy. With the KV cache each new token runs one position
        through the model instead of the whole sequence again."""
        cache = KVCache(self.config.n_layer) if use_cache else None
        logits = self.next_logits(idx, cache)
        T = idx.size(1)
        for i in range(max_new_tokens):
            idx_next = sample(logits, temperature, top_k)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop is not None and (idx[:, T:] == stop).any(1).all():
                break
            if i < max_new_tokens - 1:  # the last token needs no forward pass of its own
                logits = self.next_logits(idx_next, cache) if use_cache else self.next_logits(idx)
        return idx

    def next_logits(self, idx, cache=None):
        """The logits (B, vocab) of the token after idx (B, T): the LM head at the last position
        only, since with a large vocabulary the others' would be most of a first pass's memory."""
        return self.lm_head(self.features(idx, cache)[:, -1])


def usable(logits):
    """No NaN, no +inf, and in every row at least one token with a finite score."""
    return not (logits.isnan().any() or logits.isposinf().any()
                or not logits.isfinite().any(-1).all())


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """Next token ids (B, 1) from last-position logits (B, vocab); temperature 0 picks the argmax;
    top_k keeps the k likeliest, top_p the likeliest until they sum to top_p (nucleus sampling).
    -inf means "never this token" (proxy tuning's TopK); NaN, +inf or a row of -inf is an error."""
    if not usable(logits):  # argmax of NaN is a token too: never decode one silently
        raise ValueError("the logits are NaN or infinite while decoding: the model diverged or a "
                         "weight is damaged; lower --lr, or train it again")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    if top_p is not None:
        p, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        late = p.cumsum(-1) - p >= top_p - 1e-6  # the likelier ones reach top_p (to rounding)
        late[:, 0] = False  # the likeliest token always stays
        logits[torch.zeros_like(late).scatter(-1, order, late)] = -float('Inf')
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
