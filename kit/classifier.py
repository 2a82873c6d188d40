"""
A classification layer: one score per label, from the final hidden state at an input's last
position.

Houlsby et al. (2019) train it next to the adapters and the layer norms; here it goes with any
method (`train.py --classifier`), or alone on a frozen model (`--method none --classifier`: a linear
probe). It does not replace the LM head: the model still writes text, and the task's examples are
scored by the layer instead of by the label words.

    from kit import classifier
    layer = classifier.Classifier(model, label_ids)  # the first token of each label word
    scores = layer(model.features(idx)[rows, last])  # (N, K): at each input's last position

It starts as the LM head's rows for the label words' first tokens, with a zero bias, so at step 0
its scores are the label words' logits: it ranks the labels exactly as scoring the label words with
the LM head does when each label word is one token (longer ones start from their first token).
Trainable: K x n_embd + K.
"""
import torch
import torch.nn as nn


class Classifier(nn.Module):

    def __init__(self, model, label_ids):
        super().__init__()
        head = model.lm_head.weight.detach()                 # (vocab, C): the LM head's rows
        if not label_ids or not all(type(i) is int and 0 <= i < len(head) for i in label_ids):
            raise ValueError(f"Classifier: label_ids must be token ids of the model's vocabulary "
                             f"(0 to {len(head) - 1:,}), one per label; got {list(label_ids)[:5]}")
        self.proj = nn.Linear(head.size(1), len(label_ids))  # C -> K
        with torch.no_grad():
            self.proj.weight.copy_(head[label_ids])          # label k's score starts as
                                                             # its word's logit
            self.proj.bias.zero_()
        self.label_ids = list(label_ids)
        self.to(head.device)

    def forward(self, hidden):
        """hidden (..., C): final hidden states -> scores (..., K), one per label."""
        return self.proj(hidden)
