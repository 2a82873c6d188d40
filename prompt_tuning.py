"""
Prompt tuning: "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester, Al-Rfou &
Constant, 2021).

n trainable vectors, the "soft prompt", are prepended to the token embeddings of every sequence.
They act like the embeddings of n made-up words, found by gradient descent; every weight of the GPT
stays frozen. Trainable parameters: n x n_embd.

    import prompt_tuning
    # freezes the model and fills its input slot:
    prompt = prompt_tuning.attach(model, prompt_tuning.Config(prompt_len=20))
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=0.3)  # only the prompt learns

Positions: the prompt vectors take position slots 0..n-1 (they get positions like tokens: a row of
the position table, or rotary angles) and the real tokens follow from slot n, so n + sequence length
must fit in block_size. Multi-task serving: one frozen model, one prompt per task, and a batch that
mixes the tasks in one forward pass (MixedPrompts).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from kit.options import Options, option

INITS = ("random", "vocab", "text")


@dataclass
class Config(Options):
    prompt_len: int = option(20, "soft prompt vectors", least=1)
    prompt_init: str = option("vocab", "how the vectors start: uniform random, the embeddings of "
                                       "sampled tokens, or those of a text", choices=INITS)
    prompt_text: str = option(None, "the text for --prompt-init text "
                                    "(default: the task's label words)")
    where = "input: soft prompt"   # where the new parameters go, for the tables
    lr = 0.3  # the paper's (with Adafactor), and the best of a small sweep on qa here (AdamW)

    @property
    def positions(self):  # context positions the soft prompt takes in front of every sequence
        return self.prompt_len

    def unused(self):
        return {"prompt_text"} if self.prompt_init != "text" else set()


class SoftPrompt(nn.Module):

    def __init__(self, init):
        super().__init__()
        self.prompt = nn.Parameter(init.clone())  # (n, C)

    def forward(self, tok_emb):
        # (B, T, C) -> (B, n + T, C): the same prompt in front of every row
        return torch.cat([self.prompt.expand(tok_emb.size(0), -1, -1).to(tok_emb.dtype), tok_emb],
                         dim=1)


def initial_prompt(model, cfg, task=None):
    """The paper's three initialisations (its section 3.2), as an (n, C) tensor."""
    wte, n = model.transformer.wte.weight.detach(), cfg.prompt_len  # (vocab, C)
    # uniform in [-0.5, 0.5], as in the paper; far from any real embedding
    if cfg.prompt_init == "random":
        return (torch.rand(n, wte.size(1)) - 0.5).to(wte.device)
    # embeddings of sampled tokens: starts among the words the model knows
    if cfg.prompt_init == "vocab":
        # any id but the last: our own BPE's end-of-text
        ids = torch.randint(wte.size(0) - 1, (n,)).to(wte.device)
        return wte[ids]
    # "text": the embeddings of a string (by default the task's label words),
    # repeated or cut to n tokens
    label_words = "".join(task.choices) if task is not None and task.choices else None
    text = cfg.prompt_text or label_words
    if not text:
        raise ValueError("--prompt-init text needs --prompt-text on a task without label words")
    if task is None or task.encode is None:
        raise ValueError("prompt init 'text' needs the task, tokenized, to encode its text")
    ids = task.encode(text)
    return wte[torch.tensor((ids * n)[:n], device=wte.device)]


def attach(model, cfg=None, task=None):
    """Freeze the model, fill its input injection point with a soft prompt, and return the prompt
    module."""
    cfg = cfg or Config()
    if cfg.prompt_len >= model.config.block_size:
        raise ValueError(f"--prompt-len {cfg.prompt_len} leaves no room in the context of "
                         f"{model.config.block_size} positions: use fewer prompt vectors")
    model.check_plain("prompt tuning", own="soft_prompt")  # on top of another method: refused
    model.requires_grad_(False)
    model.soft_prompt = SoftPrompt(initial_prompt(model, cfg, task))
    # new parameters train by default: exactly the prompt has requires_grad
    return model.soft_prompt


# Multi-task serving: one frozen model, one trained prompt per task,
# rows of several tasks in one batch.

class MixedPrompts(nn.Module):
    """Row b of a batch gets prompts[task_ids[b]]: one forward pass serves several tasks at once."""

    def __init__(self, prompts, task_ids):
        super().__init__()
        if len({p.prompt.shape for p in prompts}) != 1:
            raise ValueError("prompts served in one batch must have the same length and width")
        self.prompts = nn.ModuleList(prompts)
        self.task_ids = torch.as_tensor(task_ids)
        ids = self.task_ids
        if ids.dtype != torch.long or not ((0 <= ids) & (ids < len(prompts))).all():
            raise ValueError(f"MixedPrompts: task_ids must index the {len(prompts)} prompts (0 to "
                             f"{len(prompts) - 1}), got {self.task_ids.tolist()}")

    def forward(self, tok_emb):
        table = torch.stack([p.prompt for p in self.prompts])  # (n_tasks, n, C)
        chosen = table[self.task_ids.to(table.device)]          # (B, n, C)
        return torch.cat([chosen.to(tok_emb.dtype), tok_emb], dim=1)
