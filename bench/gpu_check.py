"""GPU check: what only a CUDA machine shows about LiveRun, in one run of at most 5 minutes.

Meant for a lent GPU machine (PyTorch, TensorBoard, nothing downloadable) and for CI on
CPU, where the CUDA parts are skipped, each named in the closing table.

  sync          around each non-logging step of a LiveRun MLP, with
                torch.cuda.set_sync_debug_mode("error") armed: does anything make the
                host wait for the GPU (an .item(), a bool of a tensor, a copy to the
                host)? The bare loop is checked first, the same way, as a control.
                Where the first sync happens is reported. CUDA only. (The mode is
                process-wide: a sync on one of the library's background threads during
                those steps raises in that thread, whose traceback is then printed
                above the table, and not in the step.)
  ratios        bench.step_cost's interleaved twins (bare, livetrain, tensorboard) at
                its three MLP sizes, timed with CUDA events (one synchronisation at
                the end of the measured span), against step_cost's budgets (--quick
                on CPU: 60 steps of the two smaller sizes, a smoke test, not a figure).
  fp16 / bf16 / compile
                ~100 steps of LiveRun (log_every 10) with an fp16 GradScaler (CUDA
                only), bf16 autocast, and a torch.compile'd model; the telemetry read
                back from SQLite must be finite (statistics.train_loss;
                layer_statistics.grad_norm and act_std non-null), and the compiled run
                reports how many graphs dynamo compiled. On CPU the compiled run uses
                dynamo's eager backend: inductor's C++ build takes over a minute here.
  memory        peak GPU memory (torch.cuda.max_memory_allocated) of the same model
                trained bare and under LiveRun. CUDA only.

The machine may lack the trainer side's packages (SQLAlchemy, psutil): with --wheels
DIR the check installs them from DIR (`make gpu-wheels` fills gpu-wheels/) into a
temporary folder and runs itself again with that folder and the repository on
PYTHONPATH, so nothing is installed into the machine's Python.

The exit code is 1 only when a check could not run (an error); a missed budget or a
sync found is a finding, reported as FAIL in the table, as the check's purpose is to
report them.

    python -m bench.gpu_check [--quick] [--wheels gpu-wheels] [--device cuda|cpu]
                              [--minutes 4.5]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.util
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NEEDS = ("sqlalchemy", "psutil", "typing_extensions")  # the trainer side's, beyond torch
WHEELS = ("SQLAlchemy", "psutil", "typing_extensions", "greenlet")  # greenlet: SQLAlchemy's
REEXEC = "LIVETRAIN_GPU_CHECK_SITE"  # set in the re-executed process: the folder it uses
SKIPPED = "skipped: needs CUDA"


def missing_modules() -> list[str]:
    """The trainer-side modules that do not import here."""
    missing = []
    for name in NEEDS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def wheel_names(folder: Path) -> set[str]:
    """The normalised project names of the wheels in `folder`."""
    return {w.name.split("-")[0].lower().replace("_", "-") for w in folder.glob("*.whl")}


def fits_here(wheel: Path) -> bool:
    """Whether a wheel's tags (name-version-python-abi-platform.whl) suit this Python."""
    parts = wheel.name[:-len(".whl")].split("-")
    if len(parts) < 5:
        return False
    python, abi, platform_tag = parts[-3:]
    here = sys.version_info
    pythons = python.split(".")
    if abi == "abi3":
        fits = any(t.startswith("cp3") and int(t[3:] or 0) <= here.minor for t in pythons)
    else:
        fits = f"cp{here.major}{here.minor}" in pythons or "py3" in pythons
    machine = platform.machine()
    return fits and (platform_tag == "any" or (sys.platform.startswith("linux")
                                               and platform_tag.endswith(machine)))


def unpack_wheels(folder: Path, target: str) -> subprocess.CompletedProcess[str]:
    """What `pip install --target` does for these pure-layout wheels, for a Python
    without pip: each project's newest wheel that suits this Python, unzipped."""
    lacking = []
    for project in WHEELS:
        key = project.lower().replace("_", "-")
        fitting = sorted((w for w in folder.glob("*.whl") if fits_here(w)
                          and w.name.split("-")[0].lower().replace("_", "-") == key),
                         key=lambda w: w.name)
        if not fitting:
            lacking.append(project)
            continue
        with zipfile.ZipFile(fitting[-1]) as wheel:
            wheel.extractall(target)
    why = f"no wheel for this Python of {', '.join(lacking)}" if lacking else ""
    return subprocess.CompletedProcess(["unzip"], 1 if lacking else 0, "", why)


def ensure_trainer_side(wheels: str | None) -> None:
    """Return when the trainer side imports; else install it from `wheels` into a
    temporary folder and exec this check again with it on PYTHONPATH (no return).
    SystemExit with what is lacking when that cannot be done."""
    missing = missing_modules()
    if not missing:
        return
    if os.environ.get(REEXEC) or not wheels:
        hint = " (the wheels were installed, yet they do not import: a Python " \
            "version the wheels are not built for?)" if os.environ.get(REEXEC) else \
            "; pass --wheels DIR with their wheels (make gpu-wheels fills gpu-wheels/)"
        raise SystemExit(f"gpu_check: this Python lacks {', '.join(missing)}{hint}")
    folder = Path(wheels)
    have = wheel_names(folder) if folder.is_dir() else set()
    lacking = [w for w in WHEELS if w.lower().replace("_", "-") not in have]
    target = tempfile.mkdtemp(prefix="gpu-check-site-")
    if importlib.util.find_spec("pip") is None:  # a Python without pip: unpack them
        done = unpack_wheels(folder, target)
    else:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
             str(folder), "--target", target, *WHEELS], capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        last = (done.stderr.strip().splitlines() or ["(pip printed nothing)"])[-1]
        raise SystemExit(
            f"gpu_check: this Python lacks {', '.join(missing)}, and pip could not install "
            f"them from {folder}" + (f" (no wheel there for {', '.join(lacking)})"
                                     if lacking else "") + f": {last}")
    print(f"gpu_check: installed {', '.join(WHEELS)} from {folder} into {target}", flush=True)
    path = os.pathsep.join(filter(None, [target, str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, REEXEC: target}
    argv = [sys.executable, "-m", "bench.gpu_check", *sys.argv[1:]]
    os.execve(sys.executable, argv, env)  # noqa: S606 - this check again, as it was run


@dataclass
class Row:
    check: str
    result: str  # starts with PASS:, FAIL:, ERROR: or measured:, or is SKIPPED

    @property
    def error(self) -> bool:
        return self.result.startswith("ERROR")


def verdict(passed: bool, text: str) -> str:
    return f"{'PASS' if passed else 'FAIL'}: {text}"


def innermost_outside_torch(tb: Any) -> str:
    """Where an exception came from: its innermost frame outside torch."""
    import torch

    torch_dir = str(Path(torch.__file__).resolve().parent)
    frames = [f for f in traceback.extract_tb(tb)
              if not str(Path(f.filename).resolve()).startswith(torch_dir)]
    if not frames:
        return "(inside torch)"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"


def first_sync(step: Callable[[], bool], logs_next: Callable[[], bool], steps: int
               ) -> str | None:
    """Run `steps` steps, the non-logging ones with the CUDA sync debug mode at "error";
    where the first sync happened, or None."""
    import torch

    for _ in range(steps):
        if logs_next():
            step()
            continue
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
            return f"{innermost_outside_torch(exc.__traceback__)} ({message})"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return None


@dataclass
class Setting:
    """What every check is given: the device, a folder, the database, quick or not."""

    device: Any  # torch.device
    workdir: Path
    quick: bool
    deadline: float  # time.monotonic() by which the last check should have ended

    @property
    def db_path(self) -> Path:
        return self.workdir / "gpu_check.db"

    @property
    def db(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def check_sync(s: Setting) -> Row:
    """(a) Host-device syncs in non-logging steps, bare first as the control."""
    if not s.cuda:
        return Row("sync: no host-device sync in a non-logging step", SKIPPED)
    import torch

    from bench.step_cost import SIZES, LiveTwin, Twin, build_model, make_batches

    size = SIZES[1]
    model = build_model(size, s.device)
    batches = make_batches(size, s.device)
    bare = Twin("bare", model, torch.optim.Adam(model.parameters(), lr=1e-3))
    live_model = build_model(size, s.device)
    live = LiveTwin(live_model, torch.optim.Adam(live_model.parameters(), lr=1e-3), s.db,
                    "gpu-check sync", s.workdir / "ck-sync")
    try:
        for twin in (bare, live):  # warm-up: the first steps allocate the optimizer state
            for i in range(5):
                twin.step(*batches[i])
        feed = iter(batches * 10)
        steps = 60 if s.quick else 120
        control = first_sync(lambda: bare.step(*next(feed)), bare.logs_next, steps)
        feed = iter(batches * 10)
        found = first_sync(lambda: live.step(*next(feed)), live.logs_next, steps)
    finally:
        live.close()
    if control is not None:
        return Row("sync: no host-device sync in a non-logging step",
                   f"FAIL: the bare loop itself syncs, at {control}: no verdict on LiveRun")
    return Row("sync: no host-device sync in a non-logging step",
               verdict(found is None, f"first sync at {found}" if found else
                       f"none in {steps} steps' non-logging ones (bare: none either)"))


def check_ratios(s: Setting) -> list[Row]:
    """(b) bench.step_cost's three MLP sizes: livetrain and tensorboard against bare."""
    from bench.step_cost import SIZES, measure_size

    rows = []
    for size in SIZES[:3]:
        if s.quick and not s.cuda and size.width > 512:
            rows.append(Row(f"ratio: {size.label}", "skipped: --quick on CPU (too slow)"))
            continue
        seconds = max(2.0, min(20.0, (s.deadline - time.monotonic() - 30) / 4))
        r = measure_size(size, s.device, s.db, s.workdir, 60 if s.quick else None, seconds,
                         warmup=5 if s.quick else 60, count_steps=10 if s.quick else 60)
        budget = r.size.ratio_budget or math.inf
        passed = r.ratio <= budget and r.ratio <= r.board_ratio
        rows.append(Row(
            f"ratio: {size.label}",
            verdict(passed, f"bare {r.bare_ms:.2f} ms/step, livetrain x{r.ratio:.3f} "
                    f"(budget {budget:g}), tensorboard x{r.board_ratio:.3f}, "
                    f"{r.added_us:+.0f} µs per non-logging step, {r.log_ms:.1f} ms per log, "
                    f"{r.steps} steps")))
    return rows


def telemetry(s: Setting, run_id: int) -> tuple[bool, str]:
    """Whether the run's logged rows are finite and filled: train_loss in statistics,
    grad_norm and act_std in layer_statistics (the step-0 log, before any update, has
    neither a training loss nor a gradient, and is not read)."""
    def finite(v: Any) -> bool:
        return v is not None and math.isfinite(v)

    with contextlib.closing(sqlite3.connect(s.db_path)) as con:
        losses = [r[0] for r in con.execute(
            "SELECT train_loss FROM statistics WHERE run_id = ? AND step > 0", (run_id,))]
        layers = con.execute("SELECT grad_norm, act_std FROM layer_statistics "
                             "WHERE run_id = ? AND step > 0", (run_id,)).fetchall()
    bad_loss = sum(not finite(v) for v in losses)
    bad_grad = sum(not finite(g) for g, _ in layers)
    bad_act = sum(not finite(a) for _, a in layers)
    passed = bool(losses) and bool(layers) and not (bad_loss or bad_grad or bad_act)
    return passed, (f"{len(losses)} logs ({bad_loss} without a finite train_loss), "
                    f"{len(layers)} layer rows ({bad_grad} without a finite grad_norm, "
                    f"{bad_act} without a finite act_std)")


def grad_scaler() -> Any:
    """An fp16 GradScaler for CUDA: torch.amp's (torch >= 2.3) or torch.cuda.amp's."""
    import torch

    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def dynamo_graphs() -> int | None:
    """Graphs dynamo has compiled in this process (None where torch does not say)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


def train_precision(s: Setting, kind: str, steps: int) -> tuple[int, list[int | None]]:
    """`steps` LiveRun steps of an MLP with log_every 10, in `kind` (fp16, bf16,
    compile); the run's id and dynamo's graph count after 1, 20 and all steps."""
    import torch
    from torch import nn

    from bench.step_cost import SIZES, build_model, make_batches
    from livetrain import LiveRun

    size = SIZES[1]
    model = build_model(size, s.device)
    net: nn.Module = model
    if kind == "compile":
        import torch._dynamo  # not imported by `import torch` in every version

        torch._dynamo.reset()
        net = torch.compile(model, backend="inductor" if s.cuda else "eager")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = grad_scaler() if kind == "fp16" else None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(kind)
    batches = make_batches(size, s.device)
    graphs: list[int | None] = []
    with LiveRun(net, optimizer, db=s.db, name=f"gpu-check {kind}", log_every=10,
                 checkpoint_dir=s.workdir / f"ck-{kind}", checkpoint_every=10**9,
                 handle_signals=False) as run:
        for i in range(steps):
            x, y = batches[i % len(batches)]
            with torch.autocast(s.device.type, dtype=dtype, enabled=dtype is not None):
                out = net(x)
                loss = nn.functional.cross_entropy(out, y)
            run.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(run.optimizer)
                scaler.update()
            else:
                loss.backward()
                run.optimizer.step()
            run.step(loss, outputs=out, targets=y)
            if i + 1 in (1, 20):
                graphs.append(dynamo_graphs())
        graphs.append(dynamo_graphs())
    return run.run_id, graphs


def check_precision(s: Setting, kind: str) -> Row:
    """(c) One of the fp16 GradScaler, bf16 autocast and torch.compile runs."""
    name = {"fp16": "fp16 GradScaler run: telemetry finite",
            "bf16": "bf16 autocast run: telemetry finite",
            "compile": "torch.compile run: telemetry finite, recompiles"}[kind]
    if kind == "fp16" and not s.cuda:
        return Row(name, SKIPPED)
    steps = 30 if s.quick else 100
    run_id, graphs = train_precision(s, kind, steps)
    passed, text = telemetry(s, run_id)
    if kind == "compile":
        first, twenty, last = graphs
        backend = "inductor" if s.cuda else "eager backend (inductor: needs CUDA here)"
        text += (f"; {backend}: dynamo graphs after step 1: {first}, step 20: {twenty}, "
                 f"step {steps}: {last}" if last is not None else
                 f"; {backend}: this torch does not count dynamo's graphs")
    return Row(name, verdict(passed, f"{steps} steps: {text}"))


def check_memory(s: Setting) -> Row:
    """(d) Peak GPU memory of one model trained bare and under LiveRun."""
    name = "memory: peak GPU memory, bare vs LiveRun"
    if not s.cuda:
        return Row(name, SKIPPED)
    import torch

    from bench.step_cost import SIZES, LiveTwin, Twin, build_model, make_batches

    size = SIZES[2]
    batches = make_batches(size, s.device)
    peaks = []
    for live in (False, True):
        model = build_model(size, s.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        twin = LiveTwin(model, optimizer, s.db, "gpu-check memory", s.workdir / "ck-mem") \
            if live else Twin("bare", model, optimizer)
        try:
            for i in range(60):  # a log at step 50
                twin.step(*batches[i % len(batches)])
            torch.cuda.synchronize()
        finally:
            twin.close()
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        del model, optimizer, twin
    bare, live_peak = peaks
    return Row(name, f"measured: bare {bare:.1f} MiB, LiveRun {live_peak:.1f} MiB "
               f"(+{live_peak - bare:.1f} MiB, x{live_peak / bare:.3f}), 60 steps, "
               f"{size.label} (data included)")


def guarded(name: str, check: Callable[[], Row | list[Row]]) -> list[Row]:
    """The check's rows, or one ERROR row saying where it broke."""
    try:
        rows = check()
    except Exception as exc:  # a check that cannot run is reported, and the rest run
        where = innermost_outside_torch(exc.__traceback__)
        return [Row(name, f"ERROR: {type(exc).__name__}: {exc} (at {where})")]
    return rows if isinstance(rows, list) else [rows]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each check in a short form (CI)")
    p.add_argument("--wheels", help="a folder of wheels to install the trainer side's "
                   "packages from when they do not import (make gpu-wheels)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--minutes", type=float, default=4.5,
                   help="the time the checks must fit in (the timed ratios shrink to fit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ensure_trainer_side(args.wheels)
    if os.environ.get(REEXEC):
        atexit.register(shutil.rmtree, os.environ[REEXEC], True)
    import torch

    torch.set_num_threads(1)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if name == "auto":
        name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda, but torch sees no CUDA device")
    device = torch.device(name)
    gpu = torch.cuda.get_device_name(device) if name == "cuda" else "none"
    print(f"gpu_check: torch {torch.__version__}, device {name} ({gpu}), Python "
          f"{sys.version.split()[0]}{', quick' if args.quick else ''}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        started = time.monotonic()
        s = Setting(device, Path(tmp), args.quick, started + args.minutes * 60)
        # The longest (the timed ratios, which fit themselves to the time left) last.
        checks: list[tuple[str, Callable[[], Row | list[Row]]]] = [
            ("sync", lambda: check_sync(s)),
            ("fp16 GradScaler run", lambda: check_precision(s, "fp16")),
            ("bf16 autocast run", lambda: check_precision(s, "bf16")),
            ("torch.compile run", lambda: check_precision(s, "compile")),
            ("memory", lambda: check_memory(s)), ("ratios", lambda: check_ratios(s))]
        for label, check in checks:
            if time.monotonic() > s.deadline - 20:
                rows.append(Row(label, f"skipped: out of time ({args.minutes:g} minutes)"))
                continue
            rows += guarded(label, check)
            print(f"gpu_check: {label} done, {time.monotonic() - started:.0f} s in",
                  flush=True)
    print("\n| check | result |\n|---|---|")
    for row in rows:
        print(f"| {row.check} | {row.result.replace('|', '/')} |")
    skipped = [row.check for row in rows if row.result == SKIPPED]
    if skipped:
        print(f"\nskipped on {name}, as they need CUDA: {'; '.join(skipped)}")
    errors = [row for row in rows if row.error]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
