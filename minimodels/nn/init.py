"""The initialisation GPT-2 and BERT share (and GLM and BriVL's image tower through them)."""

import torch.nn as nn

from minimodels.nn.feedforward import StackedLinear


def normal_init(module: nn.Module) -> None:
    """For `model.apply`: every Linear and Embedding matrix ~ N(0, 0.02^2), Linear biases 0 (each expert's of a
    StackedLinear too); LayerNorms keep PyTorch's gain 1 and bias 0."""
    if isinstance(module, (nn.Linear, StackedLinear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, (nn.Linear, StackedLinear)) and module.bias is not None:
        nn.init.zeros_(module.bias)
