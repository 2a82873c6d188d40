"""
LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021). The solution of the README's
homework 4, kept beside the tests: try it yourself first. tests/test_homework.py copies the project, adds this
file, one line in train.METHODS and the seam in model.py, and runs its tests and the command line on
it (the whole suite with HOMEWORK_WHOLE_SUITE=1).

A frozen weight W gets a trainable update of rank r: h = W x + (alpha / r) B A x, with A (r x d_in) random and
B (d_out x r) zero, so at step 0 the model computes what the base does. Trainable: r (d_in + d_out) per matrix.

    import lora
    updates = lora.attach(model, lora.Config(lora_rank=8))    # freezes model, fills every attention's seam
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from kit.options import Options, option


@dataclass
class Config(Options):
    lora_rank: int = option(8, "rank r of the update B A", least=1)
    lora_alpha: float = option(16.0, "the update is scaled by alpha / r", above=0)
    where = "model: low-rank updates of c_attn"
    lr = 1e-3


class LowRank(nn.Module):

    def __init__(self, d_in, d_out, r, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))  # zero: the update starts at nothing
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / r

    def forward(self, x):
        return (x @ self.A.T) @ self.B.T * self.scale  # (B, T, d_in) -> (B, T, d_out), through rank r


def attach(model, cfg=None, task=None):
    """Freeze the model, fill every attention layer's c_attn_update seam, and return the updates."""
    cfg = cfg or Config()
    model.check_plain("LoRA")  # not on top of another method
    model.requires_grad_(False)
    updates = nn.ModuleList()
    for block in model.transformer.h:
        linear = block.attn.c_attn
        block.attn.c_attn_update = LowRank(linear.in_features, linear.out_features, cfg.lora_rank,
                                           cfg.lora_alpha).to(linear.weight.device)
        updates.append(block.attn.c_attn_update)
    return updates
