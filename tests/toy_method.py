"""A method of its own file, as a student writes one, for the tests: BitFit (Ben Zaken et al. 2022) trains the
model's biases and nothing else. No parameter is added, so it needs no seam in model.py."""
from dataclasses import dataclass

import torch.nn as nn

from kit.options import Options, option


@dataclass
class Config(Options):
    bitfit_which: str = option("all", "every bias, or the MLPs' only", choices=("all", "mlp"))
    where = "model: biases"
    lr = 1e-2


def attach(model, cfg=None, task=None):
    cfg = cfg or Config()
    model.requires_grad_(False)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and (cfg.bitfit_which == "all"
                                                                               or ".mlp." in n)]
    return nn.ParameterList([p.requires_grad_(True) for p in biases])
