"""One process, or one rank of a `torchrun` job: what the training loop needs to agree on.

Under torchrun every rank runs train.py; rank 0 alone talks to the database. Every
decision that changes what the loop does next (a new parameters version, stop,
pause, early stopping) is agreed by a collective, so all ranks take it at the same
step. At a step boundary that agreement must not stop the loop: the flags go out in
a non-blocking all_reduce over a gloo group (CPU tensors, so no device sync even
under NCCL), and the next boundary reads the answer, which has long arrived. A
change raised at step k is therefore applied at step k + 1 on every rank. Logs, which
read tensors anyway, agree with blocking collectives. Without torchrun every call
here is a no-op that returns its argument.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class Ranks:
    """The ranks of this job, from the environment torchrun sets."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self._device = torch.device("cpu")
        self._owns_group = False
        self._control_group: Any = None  # the gloo group of the step boundary's flags
        self._in_flight: tuple[Any, torch.Tensor] | None = None  # the last boundary's
        if dist.is_available() and dist.is_initialized():  # the user's script started it
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
            if dist.get_backend() == "nccl":
                self._device = torch.device("cuda", torch.cuda.current_device())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that owns the run in the database."""
        return self.rank == 0

    def start(self, device: torch.device, timeout_minutes: float = 30.0) -> None:
        """Join the process group: NCCL between GPUs, gloo on CPU."""
        if not self.distributed or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        self._owns_group = True
        self._device = device  # gloo reduces CPU tensors; NCCL, tensors on this rank's GPU

    def device(self, requested: str) -> torch.device:
        """The device this rank trains on: its own GPU under torchrun."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else \
                "mps" if torch.backends.mps.is_available() and not self.distributed else "cpu"
        if requested == "cuda" and self.distributed:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around the model (which stays the one to inspect and
        save); not around a model with nothing to train, which DDP refuses and which has
        no gradients to average."""
        if not self.distributed or not any(p.requires_grad for p in model.parameters()):
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true on every rank when it is true on any rank: one collective."""
        if not self.distributed:
            return flags
        agreed = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self._device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in agreed.tolist())

    def send(self, *flags: bool) -> None:
        """Put this boundary's flags in a non-blocking collective that the next boundary
        reads (`agreed`); a CPU tensor over gloo, whatever the training backend."""
        if self._control_group is None:  # every rank reaches its first boundary: collective
            self._control_group = dist.new_group(backend="gloo") \
                if dist.get_backend() != "gloo" else dist.group.WORLD
        sent = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        work = dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=self._control_group,
                               async_op=True)
        self._in_flight = (work, sent)

    def agreed(self, count: int) -> tuple[bool, ...]:
        """The flags the last boundary sent, true on every rank when true on any; all
        false before the first."""
        if self._in_flight is None:
            return (False,) * count
        (work, agreed), self._in_flight = self._in_flight, None
        work.wait()  # it went out a step ago: done, unless a rank is a step behind
        return tuple(bool(v) for v in agreed.tolist())

    def settle(self) -> None:
        """Wait for the last boundary's collective (before the group can go)."""
        if self._in_flight is not None:
            self._in_flight[0].wait()
            self._in_flight = None

    def from_main(self, value: T) -> T:
        """Rank 0's `value`, on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box: list[Any] = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over the ranks (a non-finite one stays non-finite)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks."""
        if not self.distributed:
            return values
        total = values.detach().clone()
        dist.all_reduce(total)
        return total

    def close(self) -> None:
        """Leave the process group if this object joined it (a user's stays theirs)."""
        self.settle()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
