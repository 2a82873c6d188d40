"""
Adapter tuning: "Parameter-Efficient Transfer Learning for NLP" (Houlsby et al., 2019).

A bottleneck module sits after a sublayer (attention or MLP), on the sublayer's output before the residual add:

    adapter(h) = h + W_up act(W_down h + b_down) + b_up        W_down: d -> r,  W_up: r -> d,  r << d

Its parameters: W_down d*r, b_down r, W_up r*d, b_up d; together 2dr + d + r. The inner "h +" is the adapter's own
skip connection, and W_up starts at zero, so at step 0 the adapter is exactly the identity and the adapted model
computes what the base does. The GPT's weights stay frozen; the adapters and (as in the paper) the layer norms train.

    import adapter
    adapters = adapter.attach(model, bottleneck=16, where="houlsby")   # freezes model, fills the adapter slots
    ... train [p for p in model.parameters() if p.requires_grad] ...   # adapters + layer norms

where="houlsby": two adapters per block (after attention and after the MLP), as in the paper.
where="pfeiffer": one per block, after the MLP only (Pfeiffer et al. 2021), half the adapters.
"""
import torch.nn as nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


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
        return h + self.up(self.act(self.down(h)))  # (B, T, d) -> (B, T, d), with its own skip connection


def attach(model, bottleneck=16, where="houlsby", train_layernorm=True, act="gelu"):
    """Freeze the model, fill the adapter injection points, and return the adapters in a ModuleList."""
    if where not in ("houlsby", "pfeiffer"):
        raise ValueError(f"unknown adapter placement {where!r}: use houlsby or pfeiffer")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown adapter activation {act!r}: use one of {', '.join(ACTIVATIONS)}")
    if not 1 <= bottleneck:
        raise ValueError(f"adapter bottleneck must be at least 1, got {bottleneck}")
    model.requires_grad_(False)
    d, device = model.config.n_embd, model.lm_head.weight.device
    adapters = nn.ModuleList()
    for block in model.transformer.h:
        if where == "houlsby":
            block.adapter_attn = Adapter(d, bottleneck, act).to(device)
            adapters.append(block.adapter_attn)
        block.adapter_mlp = Adapter(d, bottleneck, act).to(device)
        adapters.append(block.adapter_mlp)
    if train_layernorm:  # the paper trains the layer norms too; the tied embedding/LM head stays frozen
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.requires_grad_(True)
    return adapters
