"""
Adapter tuning: "Parameter-Efficient Transfer Learning for NLP" (Houlsby et al., 2019).

A bottleneck module sits after a sublayer (attention or MLP), on the sublayer's output before the
residual add:

    adapter(h) = h + W_up act(W_down h + b_down) + b_up      W_down: d -> r, W_up: r -> d, r << d

Its parameters: W_down d*r, b_down r, W_up r*d, b_up d; together 2dr + d + r. The inner "h +" is the
adapter's own skip connection, and W_up starts at zero, so at step 0 the adapter is exactly the
identity and the adapted model computes what the base does. The GPT's weights stay frozen; the
adapters and (as in the paper) the layer norms train (RMSNorm's weights, on a Llama-family model).

    import adapter
    # freezes the model, fills its adapter slots, returns adapters + layer norms:
    trained = adapter.attach(model, adapter.Config(bottleneck=16))
    ... train trained.parameters() ...

adapter_where="houlsby": two adapters per block (after attention and after the MLP), as in the
paper. adapter_where="pfeiffer": one per block, after the MLP only (Pfeiffer et al. 2021): half the
adapters.
"""
from dataclasses import dataclass

import torch.nn as nn

from kit.options import Options, option

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass
class Config(Options):
    bottleneck: int = option(16, "adapter width r (n_embd -> r -> n_embd)", least=1)
    adapter_where: str = option("houlsby", "after attention and the MLP (houlsby) or after the MLP "
                                           "only (pfeiffer)", choices=("houlsby", "pfeiffer"))
    adapter_act: str = option("gelu", "the bottleneck's nonlinearity", choices=tuple(ACTIVATIONS))
    train_layernorm: bool = option(True, "the layer norms train too, as in the paper "
                                         "(--no-train-layernorm: they stay frozen)")
    where = "model: after each sublayer"
    lr = 3e-3  # the best of a small sweep on qa


class Adapter(nn.Module):

    def __init__(self, d, r, act="gelu"):
        super().__init__()
        self.down = nn.Linear(d, r)   # d*r + r
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(r, d)     # r*d + d
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # zero up-projection: the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        # (B, T, d) -> (B, T, d), with its own skip connection
        return h + self.up(self.act(self.down(h)))


def attach(model, cfg=None, task=None):
    """Freeze the model, fill the adapter injection points, and return what trains: the adapters
    (and the layer norms, which the model keeps) in one ModuleList."""
    cfg = cfg or Config()
    model.check_plain("adapter tuning")  # not on top of another method
    model.requires_grad_(False)
    d, device = model.config.n_embd, model.lm_head.weight.device
    trained = nn.ModuleList()
    for block in model.transformer.h:
        if cfg.adapter_where == "houlsby":
            block.adapter_attn = Adapter(d, cfg.bottleneck, cfg.adapter_act).to(device)
            trained.append(block.adapter_attn)
        block.adapter_mlp = Adapter(d, cfg.bottleneck, cfg.adapter_act).to(device)
        trained.append(block.adapter_mlp)
    # the paper trains the layer norms too; the embedding and the LM head stay frozen
    if cfg.train_layernorm:
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                trained.append(m.requires_grad_(True))
    return trained
