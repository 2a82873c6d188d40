"""
A classification layer: one score per label, from the final hidden state at the last prompt position.

Houlsby et al. (2019) train it next to the adapters and the layer norms; here it goes with any method
(`train.py --head`), or alone on a frozen model (`--method none --head`, a linear probe). It does not replace the
LM head: the model still writes text, and the task's examples are scored by the layer instead of by the label words.

    import head
    clf = head.ClassificationHead(model, label_ids)    # label_ids: the first token of each label word
    scores = clf(model.features(idx), last)             # (B, K): one score per label at each row's last prompt position

It starts as the output-embedding rows of the label words' first tokens, with a zero bias, so at step 0 its scores
are the label words' logits: it ranks the labels exactly as scoring the label words with the LM head does when each
label word is one token (longer ones start from their first token). Trainable parameters: K x n_embd + K.
"""
import torch
import torch.nn as nn


class ClassificationHead(nn.Module):

    def __init__(self, model, label_ids):
        super().__init__()
        wte = model.transformer.wte.weight.detach()        # (vocab, C), tied to the LM head
        self.proj = nn.Linear(wte.size(1), len(label_ids))  # C -> K
        with torch.no_grad():
            self.proj.weight.copy_(wte[label_ids])          # label k's score starts as its word's logit
            self.proj.bias.zero_()
        self.label_ids = list(label_ids)
        self.to(wte.device)

    def forward(self, hidden, last):
        """hidden (B, T, C) final hidden states, last (B,) each row's last prompt position -> scores (B, K)."""
        h = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, C)
        return self.proj(h)
