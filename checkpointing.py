"""Recent checkpoints of a run, bounded in count and disk, for rollback and resume.

Saving copies the state to CPU on the training thread (a memory copy) and
writes the file on a background thread, so a checkpoint costs the loop little.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Checkpoint:
    step: int
    epoch: int
    path: Path
    reason: str


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
        """Save (or, if this step is already saved, reuse: no update happened since)."""
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

    def seed(self, rows: list[dict[str, Any]]) -> None:
        """Take over the checkpoints a previous process of the run left (resume)."""
        with self._lock:
            for row in rows:
                path = Path(row["path"])
                if path.exists():
                    self._ring.append(
                        (Checkpoint(row["step"], row["epoch"], path, row["reason"]), row["bytes"])
                    )
            self._ring.sort(key=lambda cb: cb[0].step)

    @staticmethod
    def from_row(row: dict[str, Any]) -> Checkpoint:
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

    @staticmethod
    def load(checkpoint: Checkpoint, device: torch.device) -> dict[str, Any]:
        return torch.load(checkpoint.path, map_location=device, weights_only=False)
