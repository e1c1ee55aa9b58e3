"""A user's model with lazy layers, for `train.py --model lazy_model.py:LazyMLP`.

`nn.LazyLinear` learns its input size from the first batch: until then its weights have
no shape. bench.insight trains it as a healthy run of its evaluation half.
"""

from __future__ import annotations

import torch
from torch import nn


class LazyMLP(nn.Module):
    """Flatten, then two hidden lazy linear layers with ReLU and dropout, then the logits."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Dropout(dropout),
            nn.LazyLinear(64), nn.ReLU(), nn.LazyLinear(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
