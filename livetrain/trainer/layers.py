"""Which layers of any model the trainer watches, and how dropout reaches all of them.

Nothing here assumes a CNN, image data or named parts: an MLP, an LSTM or a transformer
is watched the same way, through its modules' types.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Dense layers: one matrix product (or a few) per input. Recorded as "fc" in the contract.
DENSE = (nn.Linear, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention)
# Modules whose sub-layers they drive themselves: MultiheadAttention uses out_proj's
# weight without calling out_proj, so out_proj would never be seen running.
OPAQUE = (nn.MultiheadAttention, nn.LSTM, nn.GRU, nn.RNN)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class MonitoredLayer:
    """A layer whose activations, gradients and updates the trainer records."""

    name: str  # dotted module name, e.g. "features.0"
    nn_part: str  # top-level child it lives in, e.g. "features", "encoder"
    layer_type: str  # "conv" or "fc" (dense: linear, recurrent and attention layers)
    number: int  # 0-based index among the watched layers of the same nn_part
    module: nn.Module
    weight: nn.Parameter  # the layer's main weight: gradient norm, update ratio, histogram


def monitored_layers(model: nn.Module, names: Iterable[str] | None = None) -> list[MonitoredLayer]:
    """Every conv, linear, recurrent and attention layer in registration order (the forward
    order of most models), or only the ones `names` lists. ValueError names a listed layer
    that the model does not have or that holds no weight."""
    wanted = None if names is None else list(names)
    modules = dict(model.named_modules())
    if wanted is not None:
        missing = [n for n in wanted if n not in modules]
        if missing:
            raise ValueError(f"the model has no layer named {', '.join(map(repr, missing))}")
    layers: list[MonitoredLayer] = []
    counts: dict[str, int] = {}
    inside: list[str] = []  # names of opaque modules seen: their children are not watched
    for name, module in modules.items():
        if any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if isinstance(module, OPAQUE):
            inside.append(name)
        chosen = name in wanted if wanted is not None else isinstance(module, CONV + DENSE)
        weight = next(module.parameters(recurse=False), None)
        if not chosen:
            continue
        if weight is None:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) holds no weight to watch")
        nn_part = name.split(".")[0] or "model"
        number = counts.get(nn_part, 0)
        counts[nn_part] = number + 1
        layer_type = "conv" if isinstance(module, CONV) else "fc"
        layers.append(MonitoredLayer(name or "model", nn_part, layer_type, number, module, weight))
    return layers


def set_dropout(model: nn.Module, p: float) -> int:
    """Set the drop probability of every dropout layer in place, so the board can change it live.

    Returns the number of dropout layers set (0 means the model has none).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p}")
    count = 0
    for module in model.modules():
        if isinstance(module, DROPOUTS):
            module.p = p
            count += 1
    return count


def dropout_percent(model: nn.Module) -> int | None:
    """The model's dropout in whole percent (its first dropout layer's), None without one."""
    for module in model.modules():
        if isinstance(module, DROPOUTS):
            return round(module.p * 100)
    return None
