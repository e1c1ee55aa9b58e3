"""`train.py --model path/to/file.py:ClassName` (or `package.module:factory`): the user's own
nn.Module trained by the playground, without writing a loop.

The class or factory is called with whichever of `num_classes`, `in_channels`,
`image_size` and `dropout` (a probability) its signature names, so `Net()` and
`Net(num_classes=10, dropout=0.5)` both work. It then runs once on a validation batch
(`first_batch`), before anything inspects it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from livetrain.playground.models import MODEL_NAMES, ModelUnavailable
from livetrain.trainer.inspection import model_device

OFFERED = ("num_classes", "in_channels", "image_size", "dropout")


def is_user_model(spec: str) -> bool:
    return spec not in MODEL_NAMES


def model_spec(value: str) -> str:
    """argparse type for --model: a playground model's name, or FILE.py:NAME, or
    package.module:NAME. Only the form is checked here: loading it runs its code."""
    if value in MODEL_NAMES:
        return value
    where, sep, name = value.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{value!r}: use one of {', '.join(MODEL_NAMES)}, "
                         "path/to/file.py:ClassName or package.module:factory")
    return value


def _load_object(spec: str) -> Any:
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ModelUnavailable(f"--model {spec}: there is no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"livetrain_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ModelUnavailable(f"--model {spec}: {where} has no {name}") from None


def build_user_model(spec: str, num_classes: int, in_channels: int, image_size: int,
                     dropout: float) -> nn.Module:
    """Import and build the user's model; ModelUnavailable says what went wrong (a missing
    file, an import error, a factory that does not return an nn.Module)."""
    try:
        factory = _load_object(spec)
        offered = {"num_classes": num_classes, "in_channels": in_channels,
                   "image_size": image_size, "dropout": dropout}
        try:
            accepted = inspect.signature(factory).parameters
            kwargs = {k: v for k, v in offered.items() if k in accepted}
        except (TypeError, ValueError):
            kwargs = {}
        model = factory(**kwargs)
    except ModelUnavailable:
        raise
    except Exception as exc:  # the user's code: any error is theirs to read, in one line
        raise ModelUnavailable(f"--model {spec}: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelUnavailable(f"--model {spec} gave a {type(model).__name__}, not an nn.Module")
    return model


def _described(output: object) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    return f"a {type(output).__name__}"


@torch.no_grad()
def first_batch(spec: str, model: nn.Module, loader: DataLoader, num_classes: int) -> None:
    """Run the user's model once, in eval mode, on the first validation batch, before the
    optimizer, the initialisation or DDP look at it: lazy layers (nn.LazyLinear) take
    their shapes from it, and a model that does not fit the data says so in one line
    instead of a traceback at the first step. ModelUnavailable says what is wrong."""
    batch = next(iter(loader), None)
    if batch is None:
        return  # no validation data: the first training batch shapes it
    x = batch[0].to(model_device(model))  # where it was built: it moves once shaped
    was_training = model.training
    model.eval()  # no batch-norm statistics or dropout from a pass that trains nothing
    try:
        output = model(x)
    except Exception as exc:  # the user's code: any error is theirs to read, in one line
        raise ModelUnavailable(f"--model {spec} fails on a batch of shape {tuple(x.shape)}: "
                               f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 \
            or output.shape[1] != num_classes:
        raise ModelUnavailable(f"--model {spec} returned {_described(output)} for a batch "
                               f"of shape {tuple(x.shape)}; train.py needs class scores "
                               f"of shape (batch, {num_classes})")
