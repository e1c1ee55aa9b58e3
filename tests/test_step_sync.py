"""The step between two logs at GPU speed: it reads no tensor on the host (on a GPU, each
read is a device sync), and the NaN guard still keeps a non-finite update from the
weights, in each of its modes. Mixed precision, the optimizers' implementations and
gradient accumulation train with finite telemetry; board clipping acts on unscaled
gradients. Counted with bench.counting's wrappers of Tensor.item/__bool__/tolist/cpu/
numpy, on a real LiveRun writing to SQLite.
"""

from __future__ import annotations

import functools
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.counting import count_host_reads
from livetrain import LiveRun
from livetrain.trainer.guard import fuse

LOG_EVERY = 10
Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        yield torch.randn(16, 20, generator=generator), torch.randint(0, 4, (16,),
                                                                       generator=generator)


def open_run(tmp_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             **options: object) -> LiveRun:
    return LiveRun(model, optimizer, db=f"sqlite:///{tmp_path / 'run.db'}",
                   checkpoint_dir=tmp_path / "checkpoints", log_every=LOG_EVERY,
                   handle_signals=False, **options)


def train_step(run: LiveRun, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    run.step(loss, outputs=out, targets=y)


def rows(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "run.db") as conn:
        return conn.execute(sql).fetchall()


NO_READ_OPTIMIZERS: dict[str, tuple[Factory, dict[str, object]]] = {
    "adam (torch's default, run fused)": (lambda p: torch.optim.Adam(p, lr=1e-3), {}),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), {}),
    "sgd momentum": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), {}),
    "adam fused by the user": (lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), {}),
    "adam with board clipping": (lambda p: torch.optim.Adam(p, lr=1e-3), {"grad_clip": 0.5}),
    "rmsprop, device guard": (lambda p: torch.optim.RMSprop(p, lr=1e-3),
                              {"nan_guard": "device"}),
    "adam foreach, device guard": (lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
                                   {"nan_guard": "device"}),
}


def bare_reads(factory: Factory, fused: bool) -> int:
    """Host reads of a bare step with the same optimizer, as LiveRun runs it: torch's
    own foreach Adam reads its step counts (CPU tensors, even on a GPU: no sync)."""
    model = mlp()
    optimizer = factory(list(model.parameters()))
    if fused:
        fuse(optimizer)
    counts = []
    for x, y in batches(3):
        with count_host_reads() as reads:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        counts.append(reads.count)
    return counts[-1]


@pytest.mark.parametrize("name", list(NO_READ_OPTIMIZERS))
def test_a_non_logging_step_reads_no_tensor_on_the_host(tmp_path: Path, name: str) -> None:
    """LiveRun adds no host read to a step between logs: it makes the reads of the same
    bare step, and none at all with torch's default Adam."""
    factory, options = NO_READ_OPTIMIZERS[name]
    model = mlp()
    with open_run(tmp_path, model, factory(list(model.parameters())), **options) as run:
        fused = bool(run.optimizer.param_groups[0].get("fused"))
        between, at_logs = [], []
        for x, y in batches(3 * LOG_EVERY):
            logs = (run.global_step + 1) % LOG_EVERY == 0
            with count_host_reads() as reads:
                train_step(run, model, x, y)
            (at_logs if logs else between).append(reads)
    bare = bare_reads(factory, fused)
    assert [r.count for r in between] == [bare] * len(between), between[0].where
    if name.startswith("adam (torch's default"):
        assert bare == 0 and fused
    assert all(r.count > bare for r in at_logs)  # a log reads: the counter does count
    losses = rows(tmp_path, "SELECT train_loss FROM statistics WHERE step > 0")
    assert len(losses) == 3 and all(math.isfinite(v) for (v,) in losses)


def test_the_exact_guard_reads_one_flag_a_step(tmp_path: Path) -> None:
    """The price of `nan_guard="exact"` (and of "auto" for an optimizer torch cannot fuse,
    on the CPU, where a read waits for no device): one read per update."""
    model = mlp()
    with open_run(tmp_path, model, torch.optim.RMSprop(model.parameters(), lr=1e-3)) as run:
        assert run.guard.mode == "exact"
        bare = bare_reads(lambda p: torch.optim.RMSprop(p, lr=1e-3), fused=False)
        counts = []
        for x, y in batches(LOG_EVERY - 1):
            with count_host_reads() as reads:
                train_step(run, model, x, y)
            counts.append(reads.count)
    assert counts == [bare + 1] * (LOG_EVERY - 1)


def stop_when_paused(run: LiveRun) -> threading.Thread:
    """The board's part: once the guard has paused the run, stop it."""
    def watch() -> None:
        deadline = time.monotonic() + 30
        while not run.control.paused and time.monotonic() < deadline:
            time.sleep(0.01)
        run.request_stop()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


GUARDED: dict[str, tuple[str, Factory, int]] = {  # mode, optimizer, step paused at
    "exact, adam": ("exact", lambda p: torch.optim.Adam(p, lr=1e-2), 6),
    "device, adam fused": ("device", lambda p: torch.optim.Adam(p, lr=1e-2), LOG_EVERY),
    "auto, sgd fused": ("auto", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), LOG_EVERY),
    "device, rmsprop zeroed": ("device", lambda p: torch.optim.RMSprop(p, lr=1e-2), LOG_EVERY),
    "auto, rmsprop exact": ("auto", lambda p: torch.optim.RMSprop(p, lr=1e-2), 6),
}


@pytest.mark.parametrize("bad", ["inf gradient", "nan loss"])
@pytest.mark.parametrize("name", list(GUARDED))
def test_the_guard_keeps_a_non_finite_update_from_the_weights(
    tmp_path: Path, name: str, bad: str
) -> None:
    """Step 7 goes non-finite: its update, and in the device modes every one after it
    until the log reads the flag, never reaches the weights; the run pauses."""
    mode, factory, paused_at = GUARDED[name]
    model = mlp()
    with open_run(tmp_path, model, factory(list(model.parameters())), nan_guard=mode) as run:
        watcher = stop_when_paused(run)
        for x, y in batches(3 * LOG_EVERY):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            if run.global_step == 6 and bad == "nan loss":
                loss = loss * float("nan")
            run.optimizer.zero_grad()
            loss.backward()
            if run.global_step == 6:
                before = [p.detach().clone() for p in model.parameters()]
                if bad == "inf gradient":
                    model[0].weight.grad[0, 0] = float("inf")
            run.optimizer.step()
            run.step(loss, outputs=out, targets=y)
            if run.should_stop:
                break
        watcher.join()
        assert run.global_step == paused_at
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)  # not one refused update moved a weight
    events = rows(tmp_path, "SELECT step, message FROM events WHERE code = 'non_finite'")
    assert [step for step, _ in events] == [paused_at]
    losses = rows(tmp_path, "SELECT train_loss FROM statistics")
    assert all(v is None or math.isfinite(v) for (v,) in losses)


def test_mixed_precision_and_accumulation_log_finite_telemetry(tmp_path: Path) -> None:
    """bf16 autocast, and two micro-batches an update: every row and layer is finite."""
    model = mlp()
    with open_run(tmp_path, model, torch.optim.AdamW(model.parameters(), lr=1e-3)) as run:
        data = batches(4 * LOG_EVERY)
        for x, y in data:
            run.optimizer.zero_grad()
            for micro_x, micro_y in ((x, y), next(data)):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(micro_x)
                    loss = nn.functional.cross_entropy(out, micro_y)
                (loss / 2).backward()
            run.optimizer.step()
            run.step(loss, outputs=out, targets=micro_y)
    assert_finite_telemetry(tmp_path, logs=2)


def assert_finite_telemetry(tmp_path: Path, logs: int) -> None:
    stats = rows(tmp_path, "SELECT train_loss, train_accuracy FROM statistics WHERE step > 0")
    assert len(stats) == logs and all(math.isfinite(v) for row in stats for v in row)
    layers = rows(tmp_path, "SELECT grad_norm, update_ratio, act_std FROM layer_statistics "
                  "WHERE step > 0")
    assert layers and all(v is not None and math.isfinite(v) for row in layers for v in row)


@pytest.mark.parametrize("optimizer", ["adam fused by the user (the scaler passes its scale)",
                                       "rmsprop (the scaler unscales first)"])
def test_grad_scaler_and_board_clipping_see_unscaled_gradients(
    tmp_path: Path, optimizer: str
) -> None:
    """GradScaler with fp16 autocast: clipping from the board (0.05) bounds the true
    gradients, not the scaled ones (2**12 larger), and the telemetry is finite."""
    model = mlp()
    make = functools.partial(torch.optim.Adam, fused=True) if optimizer.startswith("adam") \
        else torch.optim.RMSprop
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    norms = []
    with open_run(tmp_path, model, make(model.parameters(), lr=1e-3), grad_clip=0.05) as run:
        for x, y in batches(2 * LOG_EVERY):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
                loss = nn.functional.cross_entropy(out, y)
            run.optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(run.optimizer)
            scaler.update()
            norms.append(float(nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            run.step(loss, outputs=out, targets=y)
    assert all(n <= 0.05 * 1.001 for n in norms), norms
    assert sum(n > 0.04 for n in norms) > len(norms) / 2  # clipped to 0.05, not to 0.05/2**12
    assert_finite_telemetry(tmp_path, logs=2)


def test_a_compiled_model_keeps_its_activations_and_layer_names(tmp_path: Path) -> None:
    """torch.compile (inductor on the CPU): the recorded passes run eagerly, so the
    activations are there, under the model's own names, and the graph is not compiled
    again after the first log."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = mlp()
    compiled = torch.compile(model)
    logs = 10
    with open_run(tmp_path, compiled, torch.optim.Adam(model.parameters(), lr=1e-3)) as run:
        for i, (x, y) in enumerate(batches(logs * LOG_EVERY)):
            train_step(run, compiled, x, y)
            if i + 1 == LOG_EVERY:
                graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it did compile
    assert counters["stats"]["unique_graphs"] == graphs  # and never again after the first log
    acts = rows(tmp_path, "SELECT layer_name, count(*) FROM activations WHERE step > 0 "
                "GROUP BY layer_name")
    assert dict(acts) == {"0": logs, "2": logs}
    stats = rows(tmp_path, "SELECT layer_name, act_std FROM layer_statistics WHERE step > 0")
    assert {name for name, _ in stats} == {"0", "2"}
    assert all(std is not None and math.isfinite(std) for _, std in stats)
    assert rows(tmp_path, "SELECT count(*) FROM model_layers")[0][0] == 3
