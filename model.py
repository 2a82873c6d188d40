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
    model = GPT.from_pretrained("models/gpt2")                 # a GPT-2 folder from a model hub, read offline
    logits, loss = model(idx, targets)                        # idx: (B, T) token ids; targets -1 = ignored
    out = model.generate(idx, max_new_tokens=20, temperature=0)   # greedy, with a KV cache
"""
import json
import math
import mmap
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


SIZES = {  # presets; pretrain_steps fit a 2-core CPU for tiny/small, one GPU for large/xl (train.py pretrains them)
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, pretrain_steps=300),
    "small": dict(n_layer=4, n_head=4, n_embd=128, pretrain_steps=1500),
    "medium": dict(n_layer=6, n_head=6, n_embd=192, pretrain_steps=1500),
    "large": dict(n_layer=8, n_head=8, n_embd=384, pretrain_steps=4000),
    "xl": dict(n_layer=12, n_head=12, n_embd=768, pretrain_steps=4000),
}
SMALLER = {"small": "tiny", "medium": "small", "large": "small", "xl": "medium"}  # proxy tuning's small model


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

    @classmethod
    def from_pretrained(cls, path, block_size=None):
        """A GPT-2 checkpoint folder as the model hubs publish it; see from_pretrained() below."""
        return from_pretrained(path, block_size)

    def num_params(self, trainable_only=False):
        """Parameters counted once (the tied embedding/head once), optionally only those that train."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, vocab) for every token position, and the mean cross-entropy over the
        targets that are not -1 (or None). With a KVCache, idx holds only the new tokens and the cache grows."""
        logits = self.lm_head(self.features(idx, cache))  # injection point 4: proxy_tuning.py combines these logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def features(self, idx, cache=None):
        """idx (B, T) -> the final hidden states (B, T, C) of the real tokens, which the LM head (or a classification
        head, head.py) turns into scores."""
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
        return self.transformer.ln_f(x[:, n:])  # real tokens only, so losses and metrics never see the soft prompt

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, stop=None):
        """Continue idx (B, T) by max_new_tokens tokens (fewer once every row has produced the `stop` token).
        temperature=0 is greedy. With the KV cache each new token runs one position through the model instead of
        the whole sequence again."""
        cache = KVCache(self.config.n_layer) if use_cache else None
        logits, _ = self(idx, cache=cache)
        T = idx.size(1)
        for i in range(max_new_tokens):
            idx_next = sample(logits[:, -1, :], temperature, top_k)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop is not None and (idx[:, T:] == stop).any(1).all():
                break
            if i < max_new_tokens - 1:  # the last token needs no forward pass of its own
                logits, _ = self(idx_next, cache=cache) if use_cache else self(idx)
        return idx


# ----------------------------------------------------------------------------------------------------------------------
# Loading GPT-2's released weights. The architecture above is GPT-2's and so are its parameter names, so a checkpoint
# folder (config.json + model.safetensors or pytorch_model.bin) loads into it with three adjustments: the original
# release has no "transformer." prefix, its linear layers are Conv1D modules that store weights as (in, out), and
# the attention-mask buffers it saves are not parameters.

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def from_pretrained(path, block_size=None):
    """GPT-2 weights from a folder, as float32. block_size crops the position table to a shorter context (GPT-2 has
    1024 positions; a task of 100-token examples does not need them), as nanoGPT's crop_block_size does."""
    config = gpt2_config(path)
    if block_size is not None and not 1 <= block_size <= config.block_size:
        raise ValueError(f"--block-size {block_size} must be between 1 and {path}'s {config.block_size} positions")
    with torch.device("meta"):  # shapes only: no time spent on a random init that the weights replace
        model = GPT(config)
    state = gpt2_state_dict(read_weights(path), model.state_dict(), path)
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: lm_head.weight is wte's (checked)
    model.lm_head.weight = model.transformer.wte.weight      # assign=True replaced wte's tensor: tie them again
    if block_size is not None:
        model.transformer.wpe.weight = nn.Parameter(model.transformer.wpe.weight[:block_size].clone())
        config.block_size = block_size
    return model


def gpt2_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path} is not a GPT-2 folder: it has no config.json")
    with open(file, encoding="utf-8") as f:
        c = json.load(f)
    refused = [(c.get("model_type") != "gpt2", f"model_type is {c.get('model_type')!r}, not 'gpt2'"),
               (c.get("activation_function", "gelu_new") != "gelu_new",
                f"activation {c.get('activation_function')!r}, not gelu_new"),
               (c.get("layer_norm_epsilon", 1e-5) != 1e-5, f"layer norm epsilon {c.get('layer_norm_epsilon')}"),
               (c.get("n_inner") not in (None, 4 * c.get("n_embd", 0)), f"n_inner {c.get('n_inner')}, not 4 x n_embd"),
               (c.get("scale_attn_by_inverse_layer_idx", False), "attention scaled by layer index"),
               (not c.get("tie_word_embeddings", True), "an LM head not tied to the token embeddings")]
    reasons = [why for bad, why in refused if bad]
    if reasons:
        raise ValueError(f"{file} describes a model that model.py's GPT can't represent: {'; '.join(reasons)}")
    try:
        return GPTConfig(block_size=c.get("n_positions", c.get("n_ctx")), vocab_size=c["vocab_size"],
                         n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], dropout=0.0, bias=True)
    except KeyError as e:
        raise ValueError(f"{file} has no {e.args[0]}") from None


def read_weights(path):
    """{name: tensor} from model.safetensors or, failing that, pytorch_model.bin (tensors only: weights_only=True)."""
    file = os.path.join(path, "model.safetensors")
    if os.path.isfile(file):
        return read_safetensors(file)
    file = os.path.join(path, "pytorch_model.bin")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {file} ({type(e).__name__}): is it a complete PyTorch checkpoint?") from None


def read_safetensors(file):
    """safetensors' documented layout: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets}} (offsets counted from the end of the header), then the raw little-endian data.
    The file is memory-mapped, so only the tensors' float32 copies take memory (x86 and ARM are little-endian too)."""
    with open(file, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: torch may view it, never writes it
    try:
        n = int.from_bytes(buf[:8], "little")
        header = json.loads(buf[8:8 + n])
        tensors = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if t["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {name} is {t['dtype']}; only F32, F16 and BF16 are read")
            start, end = t["data_offsets"]
            dtype = SAFETENSORS_DTYPES[t["dtype"]]
            flat = torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start)
            tensors[name] = flat.view(t["shape"]).to(torch.float32, copy=True)  # our own memory, not the file's
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        if isinstance(e, ValueError) and str(e).startswith(file):
            raise
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}): download it again") \
            from None


def gpt2_state_dict(raw, ours, path):
    """Rename, transpose and check the file's tensors against our model's state dict."""
    state = {}
    for k, t in raw.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        name = k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k
        t = t.float()
        state[name] = t.t().contiguous() if name.endswith(CONV1D) else t  # Conv1D is (in, out); Linear (out, in)
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head.float(), state.get("transformer.wte.weight", head).float()):
        raise ValueError(f"{path}: its lm_head differs from its token embeddings; model.py's GPT ties the two")
    missing = sorted(set(ours) - set(state) - {"lm_head.weight"})
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights don't match the GPT-2 layout of its config.json: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    wrong = [f"{k} {tuple(t.shape)} (expected {tuple(ours[k].shape)})" for k, t in state.items()
             if t.shape != ours[k].shape]
    if wrong:
        raise ValueError(f"{path}: tensors of the wrong shape for its config.json: {', '.join(wrong[:3])}")
    return state


def autocast(device, dtype):
    """bf16 autocast on any device when dtype is "bfloat16" (matmuls in bf16, weights stay float32), else nothing."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def sample(logits, temperature=1.0, top_k=None):
    """Next token ids (B, 1) from last-position logits (B, vocab); temperature 0 picks the argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
