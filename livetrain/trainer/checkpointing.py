"""Recent checkpoints of a run, bounded in count and disk, for rollback and resume.

Saving copies the state to CPU on the training thread (a memory copy) and
writes the file on a background thread, so a checkpoint costs the loop little.

A checkpoint file is untrusted input: anyone who can write the run's directory,
or a `checkpoints` row that names a path, could hand the trainer a pickle that
runs code. So a file holds only tensors and plain values (`weights_only=True`
loads it), it is read only from inside the run's own directory, and what it
holds is checked against the model before anything live changes.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from livetrain.db.contract import Hyperparameters, validate
from livetrain.trainer.steering import build_optimizer, trainable


class CheckpointRefusedError(Exception):
    """A checkpoint that was not loaded; the message says which file and why."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    epoch: int
    path: Path
    reason: str


@dataclass(frozen=True)
class Restorable:
    """A checked checkpoint, ready to take over a model: nothing here can fail any more."""

    parameters: Hyperparameters
    model_state: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def inside(directory: Path, path: Path | str) -> Path:
    """The real path of `path` (symlinks resolved) if it lies in `directory`.

    A path read from the database, or a symlink planted in the directory, may
    point anywhere; only the run's own directory holds checkpoints it wrote.
    """
    try:
        home = directory.resolve()
        real = Path(path).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, symlink loop
        raise CheckpointRefusedError(f"checkpoint path {str(path)!r} is unusable ({exc})") from None
    if not real.is_relative_to(home):
        raise CheckpointRefusedError(f"checkpoint {str(path)!r} refused: it is not inside the "
                                f"run's checkpoint directory {home}")
    return real


def read_checkpoint(directory: Path, checkpoint: Checkpoint, run_id: int) -> dict[str, Any]:
    """The state saved in `checkpoint`, on CPU, if it is a file of this run's that holds
    tensors and plain values only (never unpickled otherwise); CheckpointRefusedError if not."""
    path = inside(directory, checkpoint.path)
    if not path.is_file():
        raise CheckpointRefusedError(f"checkpoint {path} is missing (or not a regular file)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: we say why
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure of an untrusted file is a refusal, not a crash
        raise CheckpointRefusedError(
            f"checkpoint {path} refused: it is not a checkpoint of tensors and plain values "
            f"(damaged, or holding objects whose loading could run code; "
            f"{type(exc).__name__}); it was not loaded") from None
    problem = _state_problem(state, checkpoint, run_id)
    if problem:
        raise CheckpointRefusedError(f"checkpoint {path} refused: {problem}")
    return state


def _state_problem(state: Any, checkpoint: Checkpoint, run_id: int) -> str | None:
    """What is wrong with a loaded state's layout, or None."""
    if not isinstance(state, dict):
        return "it does not hold a checkpoint's fields"
    model, optimizer = state.get("model"), state.get("optimizer")
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        return "its model weights are not a mapping of names to tensors"
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        return "its optimizer state is not an optimizer's state_dict"
    if state.get("run_id") != run_id:
        return f"it belongs to run {state.get('run_id')!r}, not to run {run_id}"
    if state.get("step") != checkpoint.step or not _whole(state.get("epoch")):
        return (f"it holds step {state.get('step')!r} (epoch {state.get('epoch')!r}), "
                f"not step {checkpoint.step}")
    if not isinstance(state.get("parameters"), dict):
        return "it holds no training parameters"
    return None


def restorable(state: dict[str, Any], model: nn.Module, checkpoint: Checkpoint,
               like: torch.optim.Optimizer | None = None) -> Restorable:
    """Check a state read from `checkpoint` against `model` and build its optimizer, over
    the param groups of `like` (the live optimizer) when given; CheckpointRefusedError
    says why it does not fit. Nothing live is touched, so a refusal changes nothing."""
    try:
        parameters = _parameters(state["parameters"])
        _check_weights(state["model"], model.state_dict())
        optimizer = _optimizer(parameters, _groups(parameters, model, like), state["optimizer"])
    except ValueError as exc:
        raise CheckpointRefusedError(f"checkpoint {checkpoint.path} refused: {exc}") from None
    return Restorable(parameters, state["model"], optimizer)


def _parameters(saved: dict[str, Any]) -> Hyperparameters:
    parameters, errors = validate(
        saved.get("optimizer"), saved.get("learning_rate"), saved.get("weight_decay"),
        saved.get("dropout"), saved.get("grad_clip", 0.0),  # older checkpoints lack it
    )
    if parameters is None:
        raise ValueError(f"its parameters are invalid: {'; '.join(errors.values())}")
    return parameters


def _check_weights(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """Same names, shapes and dtypes; a lazy layer that has no shape yet takes the
    saved one when it is loaded."""
    misfits = sorted(set(ours) ^ set(theirs)) or [
        name for name, tensor in theirs.items()
        if (not is_lazy(ours[name]) and tensor.shape != ours[name].shape)
        or tensor.dtype != ours[name].dtype
    ]
    if misfits:
        raise ValueError(f"its weights do not fit this model ({', '.join(misfits[:3])})")


def _groups(parameters: Hyperparameters, model: nn.Module,
            like: torch.optim.Optimizer | None) -> list[dict[str, Any]]:
    """The param groups of the optimizer to restore: the live one's, with their lr and
    weight-decay ratios to group 0 kept and group 0 at the saved values."""
    if like is None:
        return [{"params": trainable(model)}]
    base = like.param_groups[0]
    groups = []
    for group in like.param_groups:
        lr = parameters.learning_rate * (group["lr"] / base["lr"] if base["lr"] else 1.0)
        decay = parameters.weight_decay * (group["weight_decay"] / base["weight_decay"]
                                           if base["weight_decay"] else 1.0)
        groups.append({"params": group["params"], "lr": lr, "weight_decay": decay})
    return groups


def _optimizer(
    parameters: Hyperparameters, groups: list[dict[str, Any]], saved: dict[str, Any]
) -> torch.optim.Optimizer:
    """A new optimizer with the saved state; its settings are ours (built from validated
    parameters), only the moments and step counts come from the file."""
    optimizer = build_optimizer(parameters.optimizer, groups,
                                parameters.learning_rate, parameters.weight_decay)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except Exception as exc:  # any malformed optimizer state is a refusal, never a crash
        raise ValueError(f"its optimizer state does not fit ({type(exc).__name__})") from None
    for group, setting in zip(optimizer.param_groups, settings, strict=True):
        group.update(setting)
    if problem := _optimizer_state_problem(optimizer):
        raise ValueError(f"its optimizer state does not fit ({problem})")
    return optimizer


def _optimizer_state_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Each saved buffer is a float tensor shaped like its parameter (a lazy one takes
    its shape from the saved weights), or a scalar (a step count), or None: anything
    else would fail at the next update."""
    for parameter, buffers in optimizer.state.items():
        if not isinstance(parameter, torch.Tensor) or not isinstance(buffers, dict):
            return "a state entry names no parameter of this model"
        for name, value in buffers.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                return f"{name} is not a float tensor"
            if value.dim() and not is_lazy(parameter) and value.shape != parameter.shape:
                return f"{name} has shape {tuple(value.shape)}, not {tuple(parameter.shape)}"
    return None


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


class CheckpointRing:
    """The newest `keep` checkpoints of a run (and at most `max_bytes` of them).

    `on_saved(checkpoint, bytes)` and `on_removed(checkpoint)` let the trainer
    tell the database which steps can be rolled back to.
    """

    def __init__(
        self,
        directory: Path,
        keep: int = 5,
        max_bytes: int = 2 * 1024**3,
        on_saved: Callable[[Checkpoint, int], None] | None = None,
        on_removed: Callable[[Checkpoint], None] | None = None,
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.max_bytes = max_bytes
        self.on_saved = on_saved
        self.on_removed = on_removed
        self._ring: list[tuple[Checkpoint, int]] = []
        self._lock = threading.Lock()
        self._writing: threading.Thread | None = None

    def save(
        self,
        step: int,
        epoch: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        reason: str,
        wait: bool = False,
    ) -> Checkpoint:
        """Save (or, if this step is already saved, reuse: no update happened since).

        `extra` holds plain values only (numbers, text, lists, dicts): the file must
        load with `weights_only=True`, which refuses any other object.
        """
        self.flush()  # one write at a time, in order
        with self._lock:
            same = [c for c, _ in self._ring if c.step == step]
        if same:
            return same[0]
        state = {
            "step": step,
            "epoch": epoch,
            "reason": reason,
            "model": _to_cpu(model.state_dict()),
            "optimizer": _to_cpu(optimizer.state_dict()),
            "optimizer_class": type(optimizer).__name__,
            **extra,
        }
        path = (self.directory / f"step_{step:09d}.pt").resolve()
        checkpoint = Checkpoint(step, epoch, path, reason)
        self._writing = threading.Thread(
            target=self._write, args=(checkpoint, state), name="checkpoint", daemon=True
        )
        self._writing.start()
        if wait:
            self.flush()
        return checkpoint

    def flush(self) -> None:
        if self._writing is not None:
            self._writing.join()
            self._writing = None

    def _write(self, checkpoint: Checkpoint, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(checkpoint.path)
        size = checkpoint.path.stat().st_size
        with self._lock:
            self._ring.append((checkpoint, size))
            self._ring.sort(key=lambda cb: cb[0].step)
            removed = []
            while len(self._ring) > 1 and (
                len(self._ring) > self.keep or sum(b for _, b in self._ring) > self.max_bytes
            ):
                removed.append(self._ring.pop(0)[0])
        if self.on_saved:
            self.on_saved(checkpoint, size)
        for old in removed:
            old.path.unlink(missing_ok=True)
            if self.on_removed:
                self.on_removed(old)

    def seed(self, rows: list[dict[str, Any]]) -> list[str]:
        """Take over the checkpoints a previous process of the run left (resume).

        Rows are read from the database: one that points outside the run's directory
        is not taken (a rollback could otherwise load it); returns why, per row.
        Rows whose file is gone are skipped silently, as before.
        """
        refused = []
        for row in rows:
            try:
                checkpoint = self.from_row(row)
                path = inside(self.directory, checkpoint.path)
            except CheckpointRefusedError as exc:
                refused.append(str(exc))
                continue
            if not path.is_file():
                continue
            size = row["bytes"] if _whole(row.get("bytes")) else path.stat().st_size
            with self._lock:
                self._ring.append((Checkpoint(checkpoint.step, checkpoint.epoch, path,
                                              checkpoint.reason), size))
        with self._lock:
            self._ring.sort(key=lambda cb: cb[0].step)
        return refused

    @staticmethod
    def from_row(row: dict[str, Any]) -> Checkpoint:
        """A `checkpoints` row as a Checkpoint; CheckpointRefusedError if its values are not
        a checkpoint's (any SQL client may have written it)."""
        if not (_whole(row.get("step")) and _whole(row.get("epoch"))
                and isinstance(row.get("path"), str) and isinstance(row.get("reason"), str)):
            raise CheckpointRefusedError(f"the checkpoints row of step {row.get('step')!r} is "
                                    "malformed: not loaded")
        return Checkpoint(row["step"], row["epoch"], Path(row["path"]), row["reason"])

    def newest_at_or_before(self, step: int) -> Checkpoint | None:
        self.flush()
        with self._lock:
            found = [c for c, _ in self._ring if c.step <= step]
        return found[-1] if found else None

    def forget_after(self, step: int) -> None:
        """Checkpoints of an abandoned branch must not be rolled back to."""
        with self._lock:
            gone = [c for c, _ in self._ring if c.step > step]
            self._ring = [(c, b) for c, b in self._ring if c.step <= step]
        for old in gone:
            old.path.unlink(missing_ok=True)
            if self.on_removed:
                self.on_removed(old)
