"""What LiveRun and the playground read off any model a user brings, without assuming its kind.

A model may have lazy layers (`nn.LazyLinear`: no shapes until the first batch), no
parameters at all, only frozen ones, parameters shared between layers, or layers whose
gradients are sparse (`nn.Embedding(sparse=True)`). Each of these breaks a question
that is trivial for an ordinary CNN (which device? how many parameters?), so the
questions are asked here, once, in a way that holds for all of them.

A model may also come wrapped: in DistributedDataParallel, or compiled (`torch.compile`
returns a wrapper whose parameters are named `_orig_mod.*`, and inside whose graph no
forward hook runs). `unwrapped` finds the user's own module under them.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn
from torch.nn.parameter import is_lazy

SPARSE_LAYERS = (nn.Embedding, nn.EmbeddingBag)


def unwrapped(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module to inspect, name and save, and whether the model runs compiled (by
    `torch.compile(model)` or `model.compile()`)."""
    compiled = False
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model, compiled = model._orig_mod, True
        else:
            break
    return model, compiled or getattr(model, "_compiled_call_impl", None) is not None


def model_device(model: nn.Module) -> torch.device:
    """Where the model lives: its first parameter's (or buffer's) device; the CPU for a
    model that holds neither, which then runs wherever its inputs are."""
    for tensor in chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def awaits_first_batch(model: nn.Module) -> bool:
    """Whether lazy layers still wait for the first batch to give them their shapes:
    until then their parameters cannot be counted, saved or measured."""
    return any(is_lazy(t) for t in chain(model.parameters(), model.buffers()))


def parameters_count(model: nn.Module) -> int:
    """Distinct parameters (a weight tied between two layers counts once); only
    meaningful once the model no longer awaits its first batch."""
    return sum(p.numel() for p in model.parameters())


def sparse_parameters(model: nn.Module) -> dict[int, str]:
    """The parameters whose gradients are sparse, by id, each with its layer's name:
    torch's Adam, AdamW and RMSprop, and any weight decay, cannot update them."""
    return {id(module.weight): name or "model" for name, module in model.named_modules()
            if isinstance(module, SPARSE_LAYERS) and module.sparse}


def trains_anything(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any parameter of the optimizer can learn: a parameter-free or fully frozen
    model still runs (its loss is measured) but no update changes it."""
    return any(p.requires_grad for group in optimizer.param_groups for p in group["params"])
