"""Step cost: what LiveRun adds to one training step, at the step sizes of real GPU work.

bench.overhead times whole runs of the playground's small CNN, where a step takes
about 10 ms; this one asks what a step costs at any size, down to the fraction of a
millisecond a GPU takes for a small model's step, where a fixed cost per step shows.

Method. One process, one torch thread (torch.set_num_threads(1): see bench.overhead
on why), the database in SQLite in a temporary folder (--db for PostgreSQL). Per size,
four twins, identical copies of the model (seed 0) and of its optimizer (Adam at lr
1e-3), trained with cross-entropy on the same 32 random batches, made once on the
device and cycled (no DataLoader: nothing but the step is timed):
  bare         forward, loss, zero_grad, backward, optimizer step, with Adam's fused
               kernel: the one LiveRun switches torch's default Adam to (its NaN guard
               skips a non-finite update inside it, without a host sync);
  livetrain    the same, then run.step(loss, outputs=out, targets=y), under
               LiveRun(log_every=50, checkpoint_every=10**9, handle_signals=False):
               checkpoints never come due, so the figures are the step's and the
               log's own cost, not the disk's;
  tensorboard  the bare step, plus every 50 steps SummaryWriter.add_scalar of
               loss.item() and add_histogram of every parameter;
  as written   the bare step with torch's default (foreach) Adam: the user's loop
               before LiveRun, shown beside bare's time (the fused kernel is faster).
The ratios compare livetrain and tensorboard with bare, on the same kernel: LiveRun's
own cost, not the kernel's gain.
The twins take turns a step at a time (bare, livetrain, tensorboard, as written, ...), so
that what the machine does meanwhile (other processes, the hypervisor) hits all four
alike. Each step is timed with time.perf_counter; on CUDA with a pair of CUDA events
around it, read after one synchronisation at the end of the measured span, so the
timing itself adds no sync. After a warm-up (60 steps each) the measured span runs
--steps steps, by default as many as fit in --seconds-per-size (at least 300).

Per size: bare's median ms/step; what livetrain adds to a step that does not log (the
median of its non-logging steps minus bare's median); what a log costs (the mean of
its logging steps minus bare's median); the ratio of livetrain's total time to
bare's, and tensorboard's.

Host reads per non-logging step: a separate pass after the timed one (the counters'
wrappers cost time) counts, with bench.counting.count_host_reads, the tensor reads of
each non-logging step, forward pass to run.step, the optimizer step and backward
included: LiveRun's optimizer hooks run inside optimizer.step(). The bare twin is
counted the same way: torch's own Adam reads its CPU step counters with .item(), which
waits for no GPU. What LiveRun adds is the difference; its budget is 0, since on a GPU
every such read stalls the host until the device has caught up.

Blocking collectives per non-logging step: two gloo ranks under torchrun, each
training a small MLP under DDP with LiveRun, count with count_blocking_collectives
every blocking collective of a non-logging step (again less the bare DDP loop's).
Budget 0: each one makes every rank wait for the slowest at every step.

    python -m bench.step_cost [--steps N | --seconds-per-size 30] [--device cpu]
                              [--db URL] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import statistics as stats
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import budget
from bench.counting import count_blocking_collectives, count_host_reads
from livetrain.trainer.guard import fuse

ROOT = Path(__file__).resolve().parent.parent
LOG_EVERY = 50
WARMUP = 60
BATCHES = 32  # random batches made once, cycled
MIN_STEPS = 300
COLLECTIVES_TAG = "STEP_COST_COLLECTIVES "


@dataclass(frozen=True)
class Size:
    """One step size: an MLP 784-width-width-10 or the playground's CNN, and its batch."""

    label: str
    kind: str  # "mlp" or "cnn"
    width: int
    batch: int
    ratio_budget: float | None  # livetrain / bare, None: only "below TensorBoard's"


SIZES = (
    Size("MLP 784-64-64-10, batch 32", "mlp", 64, 32, 1.05),
    Size("MLP 784-512-512-10, batch 256", "mlp", 512, 256, 1.02),
    Size("MLP 784-1024-1024-10, batch 512", "mlp", 1024, 512, 1.01),
    Size("smallcnn (train.py's default), batch 64", "cnn", 0, 64, None),
)


def build_model(size: Size, device: torch.device) -> nn.Module:
    """The size's model, seed 0: the MLP with ReLU, or train.py's default CNN (smallcnn
    with its default 50 % dropout) for 1x28x28 images."""
    torch.manual_seed(0)
    if size.kind == "cnn":
        from livetrain.playground.models import build_model as playground_model

        model = playground_model("smallcnn", 10, 1, 28, 0.5)
    else:
        w = size.width
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w),
                              nn.ReLU(), nn.Linear(w, 10))
    return model.to(device)


def make_batches(size: Size, device: torch.device, count: int = BATCHES
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random batches of 1x28x28 images and 10 classes, on the device."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size.batch, 1, 28, 28, generator=g).to(device),
             torch.randint(0, 10, (size.batch,), generator=g).to(device))
            for _ in range(count)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bare step: forward, loss, zero_grad, backward, step. Returns (outputs, loss)."""
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out, loss


@dataclass
class Twin:
    """One way to train: its model, optimizer, per-step seconds and whether each logged."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)
    logged: list[bool] = field(default_factory=list)
    steps: int = 0

    def logs_next(self) -> bool:
        return False

    def step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One training step; whether it logged."""
        train_step(self.model, self.optimizer, x, y)
        self.steps += 1
        return False

    def close(self) -> None:
        pass


class LiveTwin(Twin):
    """The bare step, then run.step() of a LiveRun around the model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, db: str,
                 name: str, checkpoint_dir: Path) -> None:
        from livetrain import LiveRun

        super().__init__("livetrain", model, optimizer)
        self.run = LiveRun(model, optimizer, db=db, name=name, log_every=LOG_EVERY,
                           checkpoint_dir=checkpoint_dir, checkpoint_every=10**9,
                           handle_signals=False)

    def logs_next(self) -> bool:
        return (self.run.global_step + 1) % LOG_EVERY == 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        out, loss = train_step(self.model, self.run.optimizer, x, y)
        self.run.step(loss, outputs=out, targets=y)
        self.steps += 1
        return self.run.global_step % LOG_EVERY == 0

    def close(self) -> None:
        self.run.close()


class BoardTwin(Twin):
    """The bare step, and every 50 steps the loss and a histogram of every parameter
    through TensorBoard's SummaryWriter."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__("tensorboard", model, optimizer)
        self.writer = SummaryWriter(str(logdir))

    def logs_next(self) -> bool:
        return (self.steps + 1) % LOG_EVERY == 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        _, loss = train_step(self.model, self.optimizer, x, y)
        self.steps += 1
        if self.steps % LOG_EVERY:
            return False
        self.writer.add_scalar("train/loss", loss.item(), self.steps)
        for name, param in self.model.named_parameters():
            self.writer.add_histogram(name, param, self.steps)
        return True

    def close(self) -> None:
        self.writer.close()


def make_twins(size: Size, device: torch.device, db: str, workdir: Path) -> list[Twin]:
    """bare, livetrain, tensorboard and the bare loop as written: identical models and
    optimizers. LiveRun runs torch's default Adam fused (its NaN guard skips a non-finite
    update inside the fused kernel); bare and tensorboard then run the same kernel, so
    that their difference is LiveRun's own cost, and the fourth twin keeps torch's
    default foreach kernel: what the user's own loop was before LiveRun."""
    model = build_model(size, device)
    models = [model] + [copy.deepcopy(model) for _ in range(3)]
    adams = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    live = LiveTwin(models[1], adams[1], db, f"step-cost {size.kind} {size.width}x{size.batch}",
                    workdir / "checkpoints")
    if live.run.optimizer.param_groups[0].get("fused"):
        fuse(adams[0])
        fuse(adams[2])
    return [Twin("bare", models[0], adams[0]), live,
            BoardTwin(models[2], adams[2], workdir / "tensorboard"),
            Twin("as written", models[3], adams[3])]


class Clock:
    """Per-step times: perf_counter on the host; on CUDA a pair of events per step,
    turned into seconds by `settle()` after one synchronisation (MPS, which has no
    portable events before torch 2.3, synchronises after each step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: list[tuple[Twin, Any, Any, bool]] = []

    def time(self, twin: Twin, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            logged = twin.step(x, y)
            end.record()
            self.pending.append((twin, start, end, logged))
            return
        started = time.perf_counter()
        logged = twin.step(x, y)
        if self.device.type == "mps":
            torch.mps.synchronize()
        twin.times.append(time.perf_counter() - started)
        twin.logged.append(logged)

    def settle(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for twin, start, end, logged in self.pending:
                twin.times.append(start.elapsed_time(end) / 1000)
                twin.logged.append(logged)
        self.pending.clear()


def interleave(twins: list[Twin], batches: list[tuple[torch.Tensor, torch.Tensor]],
               steps: int, clock: Clock) -> float:
    """`steps` steps of each twin, taking turns a step at a time; the wall seconds."""
    started = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        for twin in twins:
            clock.time(twin, x, y)
    clock.settle()
    return time.perf_counter() - started


@dataclass
class Result:
    size: Size
    steps: int
    bare_ms: float
    added_us: float  # per non-logging step
    log_ms: float  # per logging step, beyond a bare step
    ratio: float
    board_ratio: float
    written_ms: float  # the bare loop with torch's default foreach Adam
    reads: float  # host reads per non-logging step, livetrain
    bare_reads: float
    where: list[str]

    @property
    def added_reads(self) -> float:
        return self.reads - self.bare_reads


def summarize(size: Size, twins: list[Twin], reads: tuple[float, float, list[str]]
              ) -> Result:
    """The table row of one size from its twins' measured steps."""
    bare, live, board, written = twins
    bare_median = stats.median(bare.times)
    quiet = [t for t, logged in zip(live.times, live.logged, strict=True) if not logged]
    logs = [t for t, logged in zip(live.times, live.logged, strict=True) if logged]
    return Result(
        size=size, steps=len(bare.times), bare_ms=1000 * bare_median,
        added_us=1e6 * (stats.median(quiet) - bare_median),
        log_ms=1000 * (stats.mean(logs) - bare_median) if logs else float("nan"),
        ratio=sum(live.times) / sum(bare.times),
        board_ratio=sum(board.times) / sum(bare.times),
        written_ms=1000 * stats.median(written.times),
        reads=reads[0], bare_reads=reads[1], where=reads[2])


def count_reads(twin: Twin, batches: list[tuple[torch.Tensor, torch.Tensor]],
                steps: int) -> tuple[float, list[str]]:
    """Host reads per non-logging step of `twin` over `steps` steps (logging steps run
    uncounted), and where the first ones were made."""
    total, counted, where = 0, 0, list[str]()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        if twin.logs_next():
            twin.step(x, y)
            continue
        with count_host_reads() as reads:
            twin.step(x, y)
        total, counted = total + reads.count, counted + 1
        where += [w for w in reads.where if w not in where][:5 - len(where)]
    return total / max(counted, 1), where


def measure_size(size: Size, device: torch.device, db: str, workdir: Path, steps: int | None,
                 seconds: float, warmup: int = WARMUP, count_steps: int = 2 * LOG_EVERY
                 ) -> Result:
    """Warm up, time the interleaved twins, then count host reads: one size's row."""
    twins = make_twins(size, device, db, workdir)
    try:
        batches = make_batches(size, device)
        clock = Clock(device)
        warm = interleave(twins, batches, warmup, clock)
        if steps is None:  # as many as fit in `seconds`, whole logging intervals
            steps = max(MIN_STEPS, int(seconds / (warm / warmup)) // LOG_EVERY * LOG_EVERY)
        for twin in twins:
            twin.times.clear()
            twin.logged.clear()
        interleave(twins, batches, steps, clock)
        live_reads, where = count_reads(twins[1], batches, count_steps)
        bare_reads, bare_where = count_reads(twins[0], batches, count_steps)
        torch_own = {site.split(" <- ")[0] for site in bare_where}  # Adam's, not LiveRun's
        where = [site for site in where if site.split(" <- ")[0] not in torch_own]
        return summarize(size, twins, (live_reads, bare_reads, where))
    finally:
        for twin in twins:
            twin.close()


# -- blocking collectives, under torchrun ------------------------------------------------


def count_collectives(step: Any, logs_next: Any, steps: int) -> tuple[float, list[str]]:
    """Blocking collectives per non-logging step of `step()` over `steps` steps."""
    total, counted, where = 0, 0, list[str]()
    for _ in range(steps):
        if logs_next():
            step()
            continue
        with count_blocking_collectives() as calls:
            step()
        total, counted = total + calls.count, counted + 1
        where += [w for w in calls.where if w not in where][:5 - len(where)]
    return total / max(counted, 1), where


def collectives_worker(db: str, workdir: Path, steps: int) -> int:
    """One rank of the torchrun job: a small MLP under DDP (gloo), first bare, then with
    LiveRun; rank 0 prints both counts as JSON on a line tagged COLLECTIVES_TAG."""
    import torch.distributed as dist

    from livetrain import LiveRun

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    size = SIZES[0]
    model = build_model(size, torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    batches = make_batches(size, torch.device("cpu"))
    feed = iter(batches * (4 * steps // len(batches) + 2))

    def bare_step() -> None:
        train_step(ddp, optimizer, *next(feed))

    for _ in range(5):
        bare_step()
    bare, _ = count_collectives(bare_step, lambda: False, steps)
    run = LiveRun(ddp, optimizer, db=db, name="step-cost collectives", log_every=LOG_EVERY,
                  checkpoint_dir=workdir / f"checkpoints-{rank}", checkpoint_every=10**9,
                  handle_signals=False)

    def live_step() -> None:
        x, y = next(feed)
        out, loss = train_step(ddp, run.optimizer, x, y)
        run.step(loss, outputs=out, targets=y)

    try:
        for _ in range(5):
            live_step()
        live, where = count_collectives(
            live_step, lambda: (run.global_step + 1) % LOG_EVERY == 0, steps)
    finally:
        run.close()
    if rank == 0:
        print(COLLECTIVES_TAG + json.dumps({"livetrain": live, "bare": bare, "where": where}),
              flush=True)
    dist.destroy_process_group()
    return 0


def blocking_collectives(db: str, workdir: Path, steps: int) -> dict[str, Any] | str:
    """Run the two-rank torchrun job; its counts, or a one-paragraph reason it failed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "bench.step_cost", "--collectives-worker",
               "--db", db, "--workdir", str(workdir), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        return "the torchrun job did not finish in 300 s"
    for line in done.stdout.splitlines():
        if line.startswith(COLLECTIVES_TAG):
            return json.loads(line[len(COLLECTIVES_TAG):])
    # The first rank's exception line ("[rank0]: SomeError: why"), not the launcher's
    # ChildFailedError nor the other rank's lost connection that follow it.
    errors = [line for line in (done.stderr + done.stdout).splitlines()
              if re.match(r"\[rank\d+\]: [\w.]*(Error|Exception): ", line)]
    return (f"the torchrun job exited with {done.returncode} and printed no count"
            + (f"; {errors[0].strip()}" if errors else
               f"; the end of its output: {done.stderr.strip()[-300:]}"))


# -- the report ---------------------------------------------------------------------------


def markdown_table(results: list[Result]) -> list[str]:
    """The table, in markdown, to paste into a README."""
    lines = ["| step size | steps | bare ms/step (as written: foreach Adam) "
             "| livetrain µs added per non-logging step "
             "| ms per log | livetrain x bare | tensorboard x bare "
             "| host reads per non-logging step: added by LiveRun (the bare loop's own) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.size.label} | {r.steps} | {r.bare_ms:.2f} ({r.written_ms:.2f}) "
                     f"| {r.added_us:.0f} "
                     f"| {r.log_ms:.1f} | {r.ratio:.3f} | {r.board_ratio:.3f} "
                     f"| {r.added_reads:g} ({r.bare_reads:g}) |")
    return lines


def verdicts(results: list[Result], collectives: dict[str, Any] | str) -> list[budget.Verdict]:
    out = []
    for r in results:
        name = f"step cost, {r.size.label}"
        if r.size.ratio_budget is not None:
            out.append(budget.Verdict(f"{name} ({r.bare_ms:.1f} ms): livetrain x bare",
                                      r.ratio, r.size.ratio_budget, "x"))
        out.append(budget.Verdict(f"{name}: livetrain x bare, below TensorBoard's",
                                  r.ratio, r.board_ratio, "x"))
        out.append(budget.Verdict(f"{name}: host reads per non-logging step added by LiveRun",
                                  r.added_reads, 0))
    added = float("nan") if isinstance(collectives, str) else \
        collectives["livetrain"] - collectives["bare"]
    out.append(budget.Verdict("blocking collectives per non-logging step added by LiveRun "
                              "(2 gloo ranks, DDP)", added, 0))
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, help="measured steps per size (default: as many as "
                   "fit in --seconds-per-size)")
    p.add_argument("--seconds-per-size", type=float, default=30.0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--db", help="database URL (default: SQLite in a temporary folder)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few seconds: the smallest size, few steps")
    p.add_argument("--collectives-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def device_of(name: str) -> torch.device:
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available[name]:
        raise SystemExit(f"--device {name}: not available on this machine")
    return torch.device(name)


@contextlib.contextmanager
def workspace(db: str | None) -> Iterator[tuple[str, Path]]:
    """A temporary folder, and the database URL: --db, or SQLite in the folder."""
    with tempfile.TemporaryDirectory(prefix="step-cost-") as tmp:
        yield db or f"sqlite:///{Path(tmp) / 'step_cost.db'}", Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.collectives_worker:
        return collectives_worker(args.db, Path(args.workdir), args.steps)
    torch.set_num_threads(1)
    device = device_of(args.device)
    sizes = [SIZES[0]] if args.quick else list(SIZES)
    steps = args.steps or (2 * LOG_EVERY if args.quick else None)
    warmup, counted = (10, LOG_EVERY) if args.quick else (WARMUP, 2 * LOG_EVERY)
    results, started = [], time.perf_counter()
    with workspace(args.db) as (db, tmp):
        for size in sizes:
            results.append(measure_size(size, device, db, tmp, steps, args.seconds_per_size,
                                        warmup, counted))
            r = results[-1]
            print(f"{size.label}: {r.steps} steps, bare {r.bare_ms:.2f} ms/step, "
                  f"livetrain x{r.ratio:.3f}, tensorboard x{r.board_ratio:.3f}", flush=True)
            for where in r.where[:3]:
                print(f"  host read: {where}")
        collectives = blocking_collectives(db, tmp, LOG_EVERY if args.quick else 2 * LOG_EVERY)
    if isinstance(collectives, str):
        print(f"blocking collectives: not measured: {collectives}")
    else:
        print(f"blocking collectives per non-logging step: livetrain "
              f"{collectives['livetrain']:g}, bare DDP {collectives['bare']:g}")
        for where in collectives["where"][:3]:
            print(f"  collective: {where}")
    print(f"\nstep cost on {device.type}, 1 torch thread, Adam, log every {LOG_EVERY} steps, "
          f"checkpoint_every 10**9 (no checkpoint in the measured span), "
          f"{'--db given' if args.db else 'SQLite'}; µs and ms: medians less bare's median "
          f"(ms per log: the mean of the logging steps); {time.perf_counter() - started:.0f} s "
          "in all\n")
    print("\n".join(markdown_table(results)))
    print("\nreproduce: " + " ".join(["python -m bench.step_cost",
                                      *(sys.argv[1:] if argv is None else argv)]))
    return budget.report(verdicts(results, collectives))


if __name__ == "__main__":
    raise SystemExit(main())
