"""The classifier `tools.finetune_hf --head/--pooling` builds and its layer-wise learning-rate rule.

`SequenceClassifier`: a bare Hugging Face encoder (`AutoModel`), its final hidden states pooled at [CLS] or
averaged over the attention mask, and a freshly initialised head of BERT's shape (dense + tanh "pooler",
dropout, linear) or of ELECTRA's (transformers' ElectraClassificationHead: dropout, dense, GELU, dropout,
linear), so that any encoder can go under either head. `decay_exponent`: the power of the decay factor of a
parameter's learning rate, from its name (ELECTRA's fine-tuning rule, see tools/finetune_hf.py).
"""

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

HEAD_PARTS = ("classifier", "pooler", "head")  # name components of head parameters in every family we load


class SequenceClassifier(torch.nn.Module):
    def __init__(self, encoder, num_labels: int, head: str, pooling: str, dropout: float):
        super().__init__()
        # `base_model`, as transformers' classifiers call their encoder, so that the same code reads both.
        self.base_model = encoder
        self.config = encoder.config
        self.pooling = pooling
        width = encoder.config.hidden_size
        body = ([torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Dropout(dropout)] if head == "bert"
                else [torch.nn.Dropout(dropout), torch.nn.Linear(width, width), torch.nn.GELU(),
                      torch.nn.Dropout(dropout)])
        self.head = torch.nn.Sequential(*body, torch.nn.Linear(width, num_labels))
        for layer in self.head:
            if isinstance(layer, torch.nn.Linear):  # as transformers initialises its heads
                torch.nn.init.normal_(layer.weight, std=encoder.config.initializer_range)
                torch.nn.init.zeros_(layer.bias)

    def forward(self, input_ids, attention_mask, labels=None, **inputs):
        """input_ids, attention_mask [batch, length] (token_type_ids too where the encoder has them);
        -> logits [batch, num_labels] and, with labels [batch], the mean cross-entropy."""
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # the mean over the real tokens: padding neither counts nor weighs
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def decay_exponent(name: str, num_layers: int) -> int:
    """The power of the layer-wise decay factor in the learning rate of parameter `name` (BERT, ELECTRA,
    RoBERTa, DeBERTa-v2 names, with or without a classifier), as ELECTRA's fine-tuning code counts depth: 0 for
    the head (classifier, pooler), L + 1 - k for encoder layer k (`...layer.K...`; the top layer is already one
    factor below the head), L + 2 for the rest of the encoder (embeddings, ELECTRA's
    embeddings_project, DeBERTa's relative embeddings and their LayerNorm)."""
    parts = name.split(".")
    if any(part in HEAD_PARTS for part in parts):
        return 0
    if "layer" in parts:
        k = int(parts[parts.index("layer") + 1])
        if not 0 <= k < num_layers:
            raise ValueError(f"parameter {name}: layer {k} of a {num_layers}-layer encoder")
        return num_layers + 1 - k
    return num_layers + 2
