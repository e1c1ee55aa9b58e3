"""Counters for what a training step must not do: read a tensor on the host, or wait on
the other ranks.

On a GPU every host read of a tensor (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`,
...) waits for the device to finish all the work queued before it: the Python thread
stops feeding the GPU, and a step that should overlap the next one's launch runs in
series with it instead. A blocking collective (`all_reduce` without `async_op=True`, a
barrier, an object collective) does the same across ranks, and also makes every rank
wait for the slowest one. Both cost little on this CPU-only machine, where tensors
already live on the host and gloo is local, so a timing alone would not show them; a
count does, on any machine.

    with count_host_reads() as reads:
        run.step(loss, outputs=out, targets=y)
    assert reads.count == 0, reads.where

Both counters patch the functions for the time of the `with` block and put the
originals back on exit. Both count only calls made on the thread that entered the
block: the library's background writer and listener threads may read what they like,
as they hold nobody up. A call made inside a counted call (`all_gather_object` calling
`all_gather`, `tolist` reaching `__index__`) is counted once, as the outer call.
"""

from __future__ import annotations

import functools
import inspect
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The methods through which Python code reads a tensor's values on the host.
HOST_READS = ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__",
              "__index__")
# torch.distributed's collectives. Those listed in ALWAYS_BLOCKING have no async_op
# (the object collectives) or wait by their nature (a barrier: the library has no use
# for an async one); the rest block unless called with async_op=True.
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object",
               "broadcast_object_list", "reduce", "barrier", "all_to_all", "gather",
               "scatter", "reduce_scatter")
ALWAYS_BLOCKING = frozenset({"all_gather_object", "broadcast_object_list", "barrier"})
WHERE_LIMIT = 5  # call sites described in `where`: enough for an error message
_THIS_FILE = str(Path(__file__).resolve())


@dataclass
class Count:
    """What a counter saw: `count` calls, and `where` the first few distinct places they
    were made from (the call's name and the innermost frames outside torch and this
    module; a loop's reads from one line are one place)."""

    count: int = 0
    where: list[str] = field(default_factory=list)
    thread: int = field(default_factory=threading.get_ident)
    depth: int = 0  # > 0 inside a counted call: calls it makes are not counted again

    def record(self, name: str) -> None:
        self.count += 1
        if len(self.where) < WHERE_LIMIT:
            site = f"{name}() at {call_site()}"
            if site not in self.where:
                self.where.append(site)


def call_site(frames: int = 3) -> str:
    """The innermost `frames` frames of the current stack that are neither torch's nor
    this module's, innermost first: where the counted call came from."""
    torch_dir = str(Path(torch.__file__).resolve().parent)
    picked = []
    for frame in reversed(traceback.extract_stack()):
        path = str(Path(frame.filename).resolve())
        if path == _THIS_FILE or path.startswith(torch_dir):
            continue
        picked.append(f"{frame.filename}:{frame.lineno} in {frame.name}")
        if len(picked) == frames:
            break
    return " <- ".join(picked) or "(torch internals)"


def _counting(original: Callable[..., Any], name: str, counter: Count,
              counts: Callable[[tuple[Any, ...], dict[str, Any]], bool]) -> Callable[..., Any]:
    """`original`, counting its calls on the counter's thread for which `counts(args,
    kwargs)` holds; calls it makes in turn are not counted."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != counter.thread:
            return original(*args, **kwargs)
        if counter.depth == 0 and counts(args, kwargs):
            counter.record(name)
        counter.depth += 1
        try:
            return original(*args, **kwargs)
        finally:
            counter.depth -= 1

    return wrapper


@contextmanager
def _patched(owners: list[Any], names: tuple[str, ...],
             make: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Each `owner.name` replaced by `make(name, original)` for the block; on exit the
    original is put back (and an attribute the owner only inherited is deleted again)."""
    saved: list[tuple[Any, str, bool, Any]] = []
    try:
        for owner in owners:
            for name in names:
                if not hasattr(owner, name):  # an older torch without this collective
                    continue
                own = name in vars(owner)
                original = getattr(owner, name)
                saved.append((owner, name, own, vars(owner).get(name)))
                setattr(owner, name, make(name, original))
        yield
    finally:
        for owner, name, own, original in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


@contextmanager
def count_host_reads() -> Iterator[Count]:
    """Count host reads of tensors (the methods in HOST_READS, patched on torch.Tensor)
    made on this thread inside the block. Yields the Count, filled as calls happen."""
    counter = Count()
    with _patched([torch.Tensor], HOST_READS,
                  lambda name, original: _counting(original, name, counter,
                                                   lambda args, kwargs: True)):
        yield counter


def _blocking(name: str, original: Callable[..., Any]) -> Callable[
        [tuple[Any, ...], dict[str, Any]], bool]:
    """Whether a call of the collective `name` blocks: always for ALWAYS_BLOCKING, else
    unless its async_op argument (by keyword or by position) is true."""
    if name in ALWAYS_BLOCKING:
        return lambda args, kwargs: True
    try:
        signature: inspect.Signature | None = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    def blocks(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if "async_op" in kwargs or signature is None:
            return not kwargs.get("async_op", False)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # the call itself is wrong: torch will say so
            return True
        return not bound.arguments.get("async_op", False)

    return blocks


@contextmanager
def count_blocking_collectives() -> Iterator[Count]:
    """Count blocking collectives (see COLLECTIVES) called on this thread inside the
    block. They are patched on `torch.distributed` and on
    `torch.distributed.distributed_c10d` alike, since code may call either (a name
    imported with `from torch.distributed import all_reduce` before the block is not
    seen). A `Work.wait()` on an async op is not counted: it is where the caller chose
    to wait, after overlapping the op with its own work. Yields the Count."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    counter = Count()

    def make(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        return _counting(original, name, counter, _blocking(name, original))

    with _patched([dist, distributed_c10d], COLLECTIVES, make):
        yield counter
