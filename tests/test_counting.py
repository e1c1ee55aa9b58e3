"""bench.counting: host reads counted on the calling thread only, blocking collectives
counted and async ones not, and the patched functions put back afterwards."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from bench.counting import count_blocking_collectives, count_host_reads


def test_host_reads_on_this_thread_are_counted() -> None:
    t = torch.tensor([1.5])
    with count_host_reads() as reads:
        t.item()
        assert bool(t)
        t.tolist()
        float(t)
        t.cpu()
    assert reads.count == 5
    assert reads.where[0].startswith("item() at ") and "test_counting.py" in reads.where[0]
    assert "__bool__()" in reads.where[1] and "tolist()" in reads.where[2]


def test_host_reads_on_another_thread_are_not_counted() -> None:
    t = torch.tensor([2.0])
    with count_host_reads() as reads:
        worker = threading.Thread(target=lambda: (t.item(), bool(t), t.tolist()))
        worker.start()
        worker.join()
        t.item()
    assert reads.count == 1


def test_arithmetic_is_not_a_host_read_and_patches_are_undone() -> None:
    before = {name: vars(torch.Tensor).get(name) for name in ("item", "__bool__", "tolist")}
    t = torch.ones(3)
    with count_host_reads() as reads:
        (t * 2 + 1).sum()
    assert reads.count == 0 and reads.where == []
    assert {name: vars(torch.Tensor).get(name) for name in before} == before
    with count_host_reads() as reads:
        pass
    t.sum().item()
    assert reads.count == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_blocking_collectives_are_counted_and_async_ones_not(one_rank: None) -> None:
    t = torch.ones(2)
    originals = (dist.all_reduce, distributed_c10d.all_reduce, dist.barrier)
    with count_blocking_collectives() as calls:
        dist.all_reduce(t)
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        distributed_c10d.all_reduce(t, dist.ReduceOp.SUM, None, True).wait()  # positional
        distributed_c10d.all_reduce(t, op=dist.ReduceOp.MAX)
    assert calls.count == 2, calls.where
    assert all(w.startswith("all_reduce() at ") for w in calls.where)
    assert (dist.all_reduce, distributed_c10d.all_reduce, dist.barrier) == originals


def test_object_collectives_count_once(one_rank: None) -> None:
    with count_blocking_collectives() as calls:
        gathered: list[object] = [None]
        dist.all_gather_object(gathered, {"a": 1})  # calls all_gather inside: one call
        dist.barrier()
    assert calls.count == 2, calls.where
    assert gathered == [{"a": 1}]
