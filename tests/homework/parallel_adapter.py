"""
A parallel adapter: "Towards a Unified View of Parameter-Efficient Transfer Learning" (He et al., 2022). The
solution of the README's homework 3, kept beside the tests: try it yourself first. tests/test_homework.py copies
the project, adds this file, one line in train.METHODS and a seam in model.py, and runs its tests there (the
whole suite with HOMEWORK_WHOLE_SUITE=1).

Houlsby's adapter sits after the MLP and changes its output: h -> h + up(act(down(h))). The parallel adapter sits
beside it and reads the MLP's input x: the block adds mlp(x) + s * up(relu(down(x))). So it needs a seam of its own,
one that sees the sublayer's input, where Houlsby's sees its output. Empty (None), the block adds mlp(x) alone:
the plain model's numbers, bit for bit.

    import parallel_adapter
    adapters = parallel_adapter.attach(model, parallel_adapter.Config(parallel_bottleneck=16))
"""
from dataclasses import dataclass

import torch.nn as nn

from kit.options import Options, option


@dataclass
class Config(Options):
    parallel_bottleneck: int = option(16, "bottleneck width r of the parallel adapter", least=1)
    parallel_scale: float = option(4.0, "the adapter's output is scaled by s (He et al.: 4)", above=0)
    where = "model: beside each MLP"
    lr = 3e-3


class Parallel(nn.Module):

    def __init__(self, d, r, scale):
        super().__init__()
        self.down, self.up, self.scale = nn.Linear(d, r), nn.Linear(r, d), scale  # 2dr + d + r
        nn.init.zeros_(self.up.weight)  # zero: the block starts as the base's
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.down(x).relu()) * self.scale  # (B, T, d) -> (B, T, d), no skip of its own


def attach(model, cfg=None, task=None):
    """Freeze the model, fill every block's mlp_parallel seam, and return the adapters."""
    cfg = cfg or Config()
    model.check_plain("parallel adapter")
    model.requires_grad_(False)
    adapters = nn.ModuleList()
    for block in model.transformer.h:
        block.mlp_parallel = Parallel(model.config.n_embd, cfg.parallel_bottleneck,
                                      cfg.parallel_scale).to(model.lm_head.weight.device)
        adapters.append(block.mlp_parallel)
    return adapters
