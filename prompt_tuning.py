"""
Prompt tuning: "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester, Al-Rfou & Constant, 2021).

n trainable vectors, the "soft prompt", are prepended to the token embeddings of every sequence. They act like
the embeddings of n made-up words, found by gradient descent; every weight of the GPT stays frozen.
Trainable parameters: n x n_embd.

    import prompt_tuning
    prompt = prompt_tuning.attach(model, n_tokens=20, init="vocab")   # freezes model, fills model.soft_prompt
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=0.3)       # train as usual: only the prompt learns

Positions: the prompt vectors take position slots 0..n-1 (they get position embeddings like tokens) and the real
tokens follow from slot n, so n + sequence length must fit in block_size; model.py raises a clear error otherwise.
Multi-task serving: one frozen model, one prompt per task, and a mixed batch in one forward pass (MixedPrompts).
"""
import torch
import torch.nn as nn


class SoftPrompt(nn.Module):

    def __init__(self, init):
        super().__init__()
        self.prompt = nn.Parameter(init.clone())  # (n, C)

    def forward(self, tok_emb):
        # (B, T, C) -> (B, n + T, C): the same prompt in front of every row
        return torch.cat([self.prompt.expand(tok_emb.size(0), -1, -1).to(tok_emb.dtype), tok_emb], dim=1)


def initial_prompt(model, n_tokens, init, init_ids=None, generator=None):
    """The paper's three initialisations (its section 3.2), as an (n, C) tensor."""
    wte = model.transformer.wte.weight.detach()  # (vocab, C)
    if init == "random":  # uniform in [-0.5, 0.5], as in the paper; far from any real embedding
        return (torch.rand(n_tokens, wte.size(1), generator=generator) - 0.5).to(wte.device)
    if init == "vocab":  # embeddings of sampled real tokens: starts the prompt among the words the model knows
        ids = torch.randint(wte.size(0) - 1, (n_tokens,), generator=generator).to(wte.device)  # -1: skip the EOT id
        return wte[ids]
    if init == "text":  # embeddings of a string (the label words, say), repeated or cut to n tokens
        if not init_ids:
            raise ValueError("prompt init 'text' needs the text's token ids (train.py: --prompt-text)")
        ids = torch.tensor((list(init_ids) * n_tokens)[:n_tokens], device=wte.device)
        return wte[ids]
    raise ValueError(f"unknown prompt init {init!r}: use random, vocab or text")


def attach(model, n_tokens=20, init="vocab", init_ids=None, generator=None):
    """Freeze the model, fill its input injection point with a soft prompt, and return the prompt module."""
    if n_tokens < 1 or n_tokens >= model.config.block_size:
        raise ValueError(f"prompt length {n_tokens} must be between 1 and block_size - 1 "
                         f"({model.config.block_size - 1})")
    model.requires_grad_(False)
    model.soft_prompt = SoftPrompt(initial_prompt(model, n_tokens, init, init_ids, generator))
    return model.soft_prompt  # new parameters train by default: exactly the prompt has requires_grad


# Multi-task serving: one frozen model, one trained prompt per task, rows of several tasks in one batch.

class MixedPrompts(nn.Module):
    """Row b of a batch gets prompts[task_ids[b]]: one forward pass serves several tasks at once."""

    def __init__(self, prompts, task_ids):
        super().__init__()
        if len({p.prompt.shape for p in prompts}) != 1:
            raise ValueError("prompts served in one batch must have the same length and width")
        self.prompts = nn.ModuleList(prompts)
        self.task_ids = torch.as_tensor(task_ids)

    def forward(self, tok_emb):
        table = torch.stack([p.prompt for p in self.prompts])  # (n_tasks, n, C)
        chosen = table[self.task_ids.to(table.device)]          # (B, n, C)
        return torch.cat([chosen.to(tok_emb.dtype), tok_emb], dim=1)
